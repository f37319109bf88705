"""App-level reliability and security cases (issue #4) against the real app: a Gradio server on a loopback port,
driven by gradio_client and raw HTTP, the way a script that bypasses the browser would.

One server with an admin password is shared by the module; its runs folder starts with one finished tiny-Llama run,
so chat answers in well under a second and a training run through the app takes a few seconds.
The list of cases and their outcomes for users is RELIABILITY.md.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from apphelpers import Records, free_port, start_at_once, tiny_form, tiny_runs, wait_for

ADMIN = "adm1n-Pa55word"
CANARY = "hf_SecuritySecuritySecurity00000Canary"  # a fake token shaped like a real one (hf_ + 34 characters)
ACTIVE = ("starting", "running", "stopping")


# --- the server -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    import app
    from gradio_client import Client

    root = tmp_path_factory.mktemp("security")
    runs_root, memo = tiny_runs(root, tiny_llama_dir, {"earlier": {}})
    # the app loads local base models only from the owner's models folder
    models = root / "models"
    shutil.copytree(tiny_llama_dir, models / "tiny-llama")
    old_models = os.environ.get("QLORA_MODELS_DIR")
    os.environ["QLORA_MODELS_DIR"] = str(models)
    records = Records()
    logging.getLogger().addHandler(records)
    old_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    demo = app.build_demo(runs_root=runs_root, admin_password=ADMIN)
    kwargs = app.launch_kwargs("127.0.0.1", free_port(), share=False)
    demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    url = f"http://127.0.0.1:{kwargs['server_port']}"
    yield dict(demo=demo, url=url, client=Client(url + "/", verbose=False), runs_root=runs_root, memo=memo,
               records=records, outputs=[], tiny=str(models / "tiny-llama"), models=models, root=root)
    demo.ctx.jobs.stop()
    demo.ctx.jobs.wait(60)
    demo.close()
    logging.getLogger().removeHandler(records)
    logging.getLogger().setLevel(old_level)
    if old_models is None:
        os.environ.pop("QLORA_MODELS_DIR", None)
    else:
        os.environ["QLORA_MODELS_DIR"] = old_models


def http():
    import httpx

    return httpx.Client(timeout=60, follow_redirects=False)


def wait_status(client, until, timeout: float = 120) -> dict:
    return wait_for(client, until, timeout, every=0.2)


def tiny_run(server, **overrides) -> dict:
    """The /start form for a short 4-bit run of the tiny Llama on an uploaded file."""
    return tiny_form(server["tiny"], server["memo"], ADMIN, **overrides)


# === Gradio's file routes ==================================================================================
def test_file_routes_refuse_paths_outside_the_allowed_folders(server):
    runs_root = server["runs_root"]
    adapter = runs_root / "earlier" / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file()
    probes = [
        "/etc/passwd", "%2Fetc%2Fpasswd", "..%2f..%2f..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "..%5c..%5c..%5cetc%5cpasswd", str(adapter), str(runs_root / "earlier" / "run.json"), str(runs_root),
        str(adapter).replace("/adapter/", "/adapter/../adapter/"), str(Path(__file__).resolve()), "app.py",
        "tests/conftest.py", "/proc/self/environ", "/this/file/does/not/exist", "//10.0.0.1/share",
        "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd",
    ]
    with http() as c:
        for probe in probes:
            r = c.get(server["url"] + "/gradio_api/file=" + probe)
            # 403 for files that exist and for files that do not (no existence oracle), never a redirect
            assert r.status_code == 403, (probe, r.status_code, r.text[:200])
            assert "root:" not in r.text and "location" not in {k.lower() for k in r.headers}, probe
        r = c.get(server["url"] + "/static/..%2f..%2f..%2f..%2fetc%2fpasswd")
        assert r.status_code == 403 and "root:" not in r.text


def test_api_refuses_a_file_path_that_was_not_uploaded(server):
    """A script sends /start a FileData that points at a server file: Gradio refuses it before our handler runs."""
    before = sorted(p.name for p in server["runs_root"].iterdir())
    with http() as c:
        params = c.get(server["url"] + "/gradio_api/info").json()["named_endpoints"]["/start"]["parameters"]
        data = {p["parameter_name"]: p.get("parameter_default") for p in params}
        data.update(admin_password=ADMIN, dataset_source="upload", base_model=server["tiny"])
        for path in ("/etc/passwd", "/proc/self/environ", str(server["memo"]),
                     str(server["runs_root"] / "earlier" / "run.json")):
            data["upload"] = {"path": path, "meta": {"_type": "gradio.FileData"}}
            r = c.post(server["url"] + "/gradio_api/call/start", json={"data": list(data.values())})
            assert r.status_code == 200, r.text
            result = c.get(server["url"] + f"/gradio_api/call/start/{r.json()['event_id']}").text
            assert result.startswith("event: error"), result  # show_error=False: no detail for the caller
            assert "root:" not in result and "Started" not in result
    assert not server["demo"].ctx.jobs.state().active
    assert sorted(p.name for p in server["runs_root"].iterdir()) == before


def test_run_names_sent_to_the_api_never_escape_the_runs_folder(server):
    client = server["client"]
    for name in ("../earlier", "../../etc/passwd", "/etc/passwd", "earlier/../../x", "..", "x" * 500):
        out = client.predict("hi", [], [], name, 0.0, 0.9, 3, 0, "", api_name="/chat")
        assert "pick a run from the list" in out[3] or "no run called" in out[3], (name, out[3])
        path, note = client.predict(name, ADMIN, api_name="/download")
        assert path is None and note.startswith("❌"), (name, note)
        said = client.predict(name, "alice/adapter", True, "", ADMIN, api_name="/push")
        assert said.startswith("❌"), (name, said)


def test_uploads_over_the_size_limit_or_with_traversal_names_are_refused(server):
    import app

    limit = 100 * 1024 * 1024
    assert app.MAX_FILE_SIZE == "100mb"
    with http() as c:
        r = c.post(server["url"] + "/gradio_api/upload", files={"files": ("big.jsonl", b"x" * (limit + 1))})
        assert r.status_code == 413 and "maximum allowed size" in r.text, (r.status_code, r.text[:200])
        r = c.post(server["url"] + "/gradio_api/upload", files={"files": ("..", b'{"text": "hi"}\n')})
        assert r.status_code == 400 and "Invalid file name" in r.text
        # a name with a path in it is cut to its last part and stored inside Gradio's upload folder
        r = c.post(server["url"] + "/gradio_api/upload", files={"files": ("../../app.py", b"print('x')\n")})
        assert r.status_code == 200
        [stored] = r.json()
        assert Path(stored).name == "app.py" and ".." not in stored
        assert Path(stored).resolve() != (Path(__file__).resolve().parents[1] / "app.py")
        assert (Path(__file__).resolve().parents[1] / "app.py").read_text() != "print('x')\n"


def test_cross_site_requests_get_no_cors_permission(server):
    with http() as c:
        for method, path, kwargs in (("GET", "/gradio_api/info", {}), ("GET", "/config", {}),
                                     ("POST", "/gradio_api/upload", {"files": {"files": ("x.jsonl", b"{}\n")}})):
            r = c.request(method, server["url"] + path, headers={"Origin": "https://evil.example"}, **kwargs)
            assert "access-control-allow-origin" not in {k.lower() for k in r.headers}, (method, path)
        r = c.options(server["url"] + "/gradio_api/upload", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


# === Admin gate ============================================================================================
def test_without_the_admin_password_training_upload_use_and_push_are_refused_through_the_api(server):
    from gradio_client import Client, handle_file

    client = Client(server["url"] + "/", verbose=False)  # another visitor, a script
    before = sorted(p.name for p in server["runs_root"].iterdir())
    for wrong in ("", "wrong", ADMIN.upper(), ADMIN + " "):
        out = client.predict(**tiny_run(server, admin_password=wrong), api_name="/start")
        assert out.startswith("🔒"), out
        table, note = client.predict(**tiny_run(server, admin_password=wrong, upload=handle_file(str(server["memo"]))),
                                     api_name="/preview")
        assert note.startswith("🔒") and not table["data"], note  # the uploaded file is not even read
        assert client.predict(**tiny_run(server, admin_password=wrong), api_name="/preflight").startswith("🔒")
        assert client.predict("earlier", "alice/adapter", True, CANARY, wrong, api_name="/push").startswith("🔒")
        path, note = client.predict("earlier", wrong, api_name="/download")
        assert path is None and note.startswith("🔒")
        assert client.predict(admin_password=wrong, api_name="/stop").startswith("🔒")
    assert sorted(p.name for p in server["runs_root"].iterdir()) == before
    assert server["demo"].ctx.jobs.state().status in ("idle", "finished", "stopped", "failed")
    # the password is nowhere in what the page receives
    with http() as c:
        assert ADMIN not in c.get(server["url"] + "/config").text
    assert ADMIN not in repr(server["demo"].config)


# === Hyperparameters refused on the server =================================================================
@pytest.mark.parametrize("field,value,says", [
    ("learning_rate", -1e-4, "learning_rate"), ("learning_rate", 1e9, "learning_rate"), ("lora_r", 0, "lora_r"),
    ("batch_size", 0, "batch_size"), ("max_length", 0, "max_length"), ("epochs", 1e6, "epochs"),
    ("run_name", "../../etc", "run_name"), ("hub_dataset", "../../etc/passwd", "dataset"),
    ("base_model", "x" * 10_000, "base_model"), ("quantize", "int3", "quantize"), ("optimizer", "sgd; rm", "optimizer"),
])
def test_out_of_range_hyperparameters_are_refused_on_the_server(server, field, value, says):
    """Sent straight to the API (no browser, no slider limits): refused by Gradio's bounds or by TrainConfig."""
    from gradio_client import Client

    form = tiny_run(server, **{field: value})
    if field == "hub_dataset":
        form["dataset_source"] = "hub"
    client = Client(server["url"] + "/", verbose=False)
    before = sorted(p.name for p in server["runs_root"].iterdir())
    try:
        out = client.predict(**form, api_name="/start")
    except Exception as e:  # gradio's own bounds check (gr.Number minimum/maximum, Dropdown choices)
        out = str(e)
        assert "Traceback" not in out
    else:
        assert out.startswith("❌") and says in out, out
    assert not server["demo"].ctx.jobs.state().active
    assert sorted(p.name for p in server["runs_root"].iterdir()) == before


# === Concurrency ===========================================================================================
def test_two_starts_at_once_one_run_chat_busy_and_stop_from_a_second_browser(server):
    from gradio_client import Client

    url = server["url"] + "/"
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    form = tiny_run(server, max_steps=400, save_steps=1, run_name="long", hf_token=CANARY)
    answers = start_at_once([a, b], form)
    server["outputs"] += answers
    started = [x for x in answers if x.startswith("▶️ Started")]
    busy = [x for x in answers if x.startswith("⏳ Busy")]
    assert len(started) == 1 and len(busy) == 1, answers
    s = wait_status(a, lambda s: s["step"] >= 2)
    assert s["status"] == "running"

    # chat while training holds the device: a clear message at once, not a wait
    t0 = time.perf_counter()
    out = b.predict("hello", [], [], "earlier", 0.0, 0.9, 4, 0, "", api_name="/chat")
    assert time.perf_counter() - t0 < 10
    assert out[3].startswith("⏳ Training holds the GPU"), out[3]
    server["outputs"].append(repr(out))

    # Stop from the other browser (it never started the run), with the admin password
    said = b.predict(admin_password=ADMIN, api_name="/stop")
    assert "Stopping" in said
    s = wait_status(a, lambda s: s["status"] not in ACTIVE)
    assert s["status"] == "stopped" and s["step"] < 400, s
    server["outputs"].append(repr(s))
    assert (server["runs_root"] / s["run"] / "adapter" / "adapter_model.safetensors").is_file()


def test_twenty_chat_clients_at_once_are_all_answered(server):
    from gradio_client import Client

    url = server["url"] + "/"
    clients = [Client(url, verbose=False) for _ in range(20)]
    jobs = [c.submit(f"Question {i}?", [], [], "earlier", 0.0, 0.9, 3, i, "", api_name="/chat")
            for i, c in enumerate(clients)]
    results = [j.result(timeout=240) for j in jobs]
    for i, (base, tuned, box, status, prompt) in enumerate(results):
        assert status.startswith("done"), (i, status)
        assert base[-1]["role"] == "assistant" and tuned[-1]["role"] == "assistant"
        assert f"Question {i}?" in prompt  # each client got its own answer
    server["outputs"] += [repr(r) for r in results]


def test_a_100k_row_upload_does_not_freeze_the_page(server, tmp_path):
    """Previewing a 100k-row file runs in a worker: status polls and other endpoints keep answering meanwhile."""
    from gradio_client import Client, handle_file

    big = tmp_path / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write(json.dumps({"instruction": f"What is {i} plus one?", "output": f"It is {i + 1}."}) + "\n")
    client = Client(server["url"] + "/", verbose=False)
    poller = Client(server["url"] + "/", verbose=False)
    job = client.submit(**tiny_run(server, upload=handle_file(str(big))), api_name="/preview")
    slowest, polls = 0.0, 0
    while not job.done():
        t0 = time.perf_counter()
        poller.predict(api_name="/job_status")
        slowest, polls = max(slowest, time.perf_counter() - t0), polls + 1
        time.sleep(0.05)
    table, note = job.result(timeout=120)
    assert "big.jsonl" in note and "alpaca format" in note and len(table["data"]) == 5, note
    assert polls >= 1 and slowest < 2.0, (polls, slowest)


APP_PROCESS = r"""
import sys
sys.argv = ["app.py", "--port", sys.argv[1], "--runs-dir", sys.argv[2]]
import app
sys.exit(app.main())
"""


def test_the_app_killed_mid_run_shows_the_run_interrupted_and_it_resumes_from_its_checkpoint(server, tmp_path):
    """A real app process is killed (a Space restart) while training; a new app shows the run as interrupted,
    and the CLI resumes it from its last complete checkpoint (the app itself has no resume button)."""
    import signal
    import subprocess
    import sys

    import app
    from gradio_client import Client

    from qlora import runs

    runs_root = tmp_path / "runs"
    port = free_port()
    script = tmp_path / "run_app.py"
    script.write_text(APP_PROCESS, encoding="utf-8")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), QLORA_ADMIN_PASSWORD=ADMIN, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(runs_root)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline, "the app did not come up"
                time.sleep(0.5)
        said = client.predict(**tiny_run(server, max_steps=400, save_steps=1, run_name="restarted"),
                              api_name="/start")
        assert said.startswith("▶️ Started"), said
        wait_status(client, lambda s: s["step"] >= 3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    run_dir = runs_root / "restarted"
    demo = app.build_demo(runs_root=runs_root, admin_password=ADMIN)  # the app after its restart
    try:
        kwargs = app.launch_kwargs("127.0.0.1", free_port(), share=False)
        demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
        page = c_get(f"http://127.0.0.1:{kwargs['server_port']}/config")
        assert "restarted" in page and "interrupted" in page
        adapters = Client(f"http://127.0.0.1:{kwargs['server_port']}/", verbose=False).predict(api_name="/adapters")
        assert "restarted" not in json.dumps(adapters)  # not offered in Chat: it has no finished adapter
    finally:
        demo.close()
    [info] = runs.list_runs(runs_root)
    assert info.status == "interrupted" and not info.usable
    checkpoint = runs.latest_checkpoint(run_dir)
    done = int(checkpoint.name.split("-")[1])
    assert done >= 2

    # resume with the CLI, two more steps than the checkpoint holds
    out = subprocess.run([sys.executable, "-m", "qlora", "train", "--config", str(run_dir / "config.yaml"),
                          "--resume-from", str(run_dir), "--max-steps", str(done + 2), "--save-steps", "0"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    [info] = runs.list_runs(runs_root)
    assert info.status == "finished" and info.usable and info.step == done + 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "Progress"]
    assert steps[-2:] == [done + 1, done + 2]  # it went on from the checkpoint, not from step 1


# === Remote code and pickles through the app ===============================================================
def test_remote_code_and_pickle_only_models_fail_clearly_through_the_app(server, tmp_path):
    import pickle
    import shutil

    marker = tmp_path / "code-ran"
    evil = server["models"] / "evil-model"  # the owner's models folder: the only local models the app loads
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil-llama", "architectures": ["EvilForCausalLM"], "hidden_size": 64,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    for module in ("configuration_evil", "modeling_evil"):
        (evil / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write('{module}')\n")
    shutil.copy(Path(server["tiny"]) / "model.safetensors", evil / "model.safetensors")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (Path(server["tiny"]) / name).exists():
            shutil.copy(Path(server["tiny"]) / name, evil / name)

    pickled = server["models"] / "bin-only"
    shutil.copytree(server["tiny"], pickled)
    (pickled / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'a').write('pickle')",))

    with open(pickled / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(), f)

    client = server["client"]
    for folder, says in ((evil, "needs its own Python code to load; remote code is never run here"),
                         (pickled, "no .safetensors weights")):
        out = client.predict(**tiny_run(server, base_model=str(folder), hf_token=CANARY), api_name="/start")
        server["outputs"].append(out)
        if out.startswith("▶️"):  # preflight let it through: the run itself must fail with the message
            s = wait_status(client, lambda s: s["status"] not in ACTIVE)
            server["outputs"].append(repr(s))
            assert s["status"] == "failed" and says in s["error"], s
        else:  # or preflight already refuses it, saying why
            assert says in out, out
    assert not marker.exists()
    # and the app is still usable: chat answers
    out = client.predict("hello", [], [], "earlier", 0.0, 0.9, 3, 0, "", api_name="/chat")
    assert out[3].startswith("done"), out[3]


# === A poisoned run folder (issue #12 item 4) ===============================================================
def test_one_poisoned_run_folder_does_not_stop_the_app_and_every_other_run_works(server, tmp_path):
    """A runs folder holding, beside one good run, every kind of broken folder (a Git LFS pointer, a header claiming
    1 TB, a header entry without offsets, a half-complete adapter, a run.json that is not an object...): the app
    starts, lists each as "damaged: <reason>", and chat, download and listing work for the good run."""
    import html
    import shutil

    from poisoned import poison

    from apphelpers import launch

    runs_root = tmp_path / "runs"
    runs_root.mkdir()
    shutil.copytree(server["runs_root"] / "earlier", runs_root / "earlier")
    expected = poison(server["runs_root"] / "earlier", runs_root)
    demo, client = launch(runs_root, admin_password=ADMIN)
    try:
        config = json.loads(c_get(client.src.rstrip("/") + "/config"))  # the page as it first loads
        [table] = [c["props"]["value"] for c in config["components"]
                   if c.get("type") == "dataframe" and "status" in str(c["props"].get("value", {}).get("headers"))]
        status = {row[0]: row[1] for row in table["data"]}  # Past runs: run -> status
        assert status["earlier"] == "finished"
        for name, said in expected.items():
            assert status[name].startswith("damaged: ") and said in status[name], (name, status[name])
        adapters = client.predict(api_name="/adapters")
        assert [choice[1] for choice in adapters["choices"]] == ["earlier"], adapters
        out = client.predict("Question 1?", [], [], "earlier", 0.0, 0.9, 3, 0, "", api_name="/chat")
        assert out[3].startswith("done"), out[3]
        path, note = client.predict("earlier", ADMIN, api_name="/download")
        assert path and note.startswith("📦"), note
        for name in ("lfs-pointer", "huge-header", "no-offsets", "half-no-v-proj"):
            said = html.unescape(client.predict("hi", [], [], name, 0.0, 0.9, 3, 0, "", api_name="/chat")[3])
            assert said.startswith(f"❌ run {name} is damaged: ") and expected[name] in said, said
            path, note = client.predict(name, ADMIN, api_name="/download")
            assert path is None and f"run {name} is damaged" in note, note
    finally:
        demo.close()


# === Secrets ===============================================================================================
def test_a_pasted_token_never_appears_in_logs_files_args_metrics_the_page_or_browser_storage(server, capfd):
    """Push the fake token through every flow that takes one, then search everything."""
    from gradio_client import Client

    client = Client(server["url"] + "/", verbose=False)
    outs = server["outputs"]
    # flows that take the token (the Start race above already trained with it, checkpoints included)
    pre = client.predict(**tiny_run(server, hf_token=CANARY, base_model="nobody-xyz/gated-model"),
                         api_name="/preflight")
    assert "cannot start" in pre, pre
    outs.append(pre)
    outs.append(repr(client.predict(**tiny_run(server, hf_token=CANARY, base_model="nobody-xyz/gated-model"),
                                    api_name="/preview")))
    started = client.predict(**tiny_run(server, hf_token=CANARY, run_name="tok", max_steps=2, save_steps=1),
                             api_name="/start")
    assert started.startswith("▶️ Started"), started
    done = wait_status(client, lambda s: s["status"] not in ACTIVE)
    assert done["status"] == "finished", done
    pushed = client.predict("earlier", "alice/adapter", True, CANARY, ADMIN, api_name="/push")
    assert pushed.startswith("❌") and ("offline" in pushed or "reach" in pushed), pushed
    bad_repo = client.predict("earlier", "../../etc", True, CANARY, ADMIN, api_name="/push")
    assert bad_repo.startswith("❌ repo id"), bad_repo
    outs += [started, repr(done), pushed, bad_repo, repr(client.predict(api_name="/job_status"))]
    outs += [c_get(server["url"] + "/gradio_api/info")]

    leaks = [o for o in outs if CANARY in o]
    assert leaks == []
    assert not [line for line in server["records"].lines if CANARY in line]
    out, err = capfd.readouterr()
    assert CANARY not in out and CANARY not in err
    # every file of every run: adapters, metrics, run.json, config.yaml, checkpoints' training_args.bin (a pickle)
    assert list(server["runs_root"].rglob("training_args.bin"))
    files = [p for p in server["runs_root"].rglob("*") if p.is_file()]
    assert not [p for p in files if CANARY.encode() in p.read_bytes()]
    # the page: its config and every endpoint's description; the browser's storage: run_history is off, so the
    # page keeps no event inputs (a token textbox's value) in localStorage
    with http() as c:
        page = c.get(server["url"] + "/config").text + c.get(server["url"] + "/gradio_api/info").text
    assert CANARY not in page
    config = json.loads(c_get(server["url"] + "/config"))
    assert config.get("run_history") is False
    tokens = [comp for comp in config["components"] if comp.get("props", {}).get("label", "").startswith("HF token")]
    assert tokens and all(t["props"]["type"] == "password" and t["props"]["value"] == "" for t in tokens)
    assert CANARY not in repr(dict(os.environ))  # never process-global, where another visitor's call would use it


def c_get(url: str) -> str:
    with http() as c:
        return c.get(url).text


# === The pinned Gradio =====================================================================================
def test_gradio_is_pinned_to_a_release_past_the_published_advisories():
    import gradio
    import starlette
    from importlib.metadata import version

    requirements = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    pinned = re.search(r"^gradio==([\d.]+)$", requirements, re.M)
    assert pinned and pinned.group(1) == gradio.__version__ == "6.31.0"
    as_tuple = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:3])  # noqa: E731
    # the newest fix among the advisories listed in RELIABILITY.md (CVE-2026-59806, fixed in 6.20.0)
    assert as_tuple(gradio.__version__) >= (6, 20, 0)
    assert as_tuple(version("gradio_client")) >= (2, 6, 0)
    # starlette: multipart and Range DoS fixes (CVE-2025-54121 in 0.47.2, CVE-2025-62727 in 0.49.1)
    assert as_tuple(starlette.__version__) >= (0, 49, 1)


def test_the_owners_token_stands_in_only_behind_the_admin_password(monkeypatch, tmp_path):
    """On an open app, a visitor must not push with (or download gated models through) the Space owner's secret."""
    from qlora.jobs import JobManager
    from ui.context import AppContext

    monkeypatch.setenv("HF_TOKEN", "hf_OwnersSecretOwnersSecretOwnersSecret12")
    open_app = AppContext(jobs=JobManager(), runs_root=tmp_path)
    assert open_app.token("") is None
    assert open_app.token(" hf_visitor ") == "hf_visitor"
    locked = AppContext(jobs=JobManager(), runs_root=tmp_path, admin_password="pw")
    assert locked.token("") == "hf_OwnersSecretOwnersSecretOwnersSecret12"
