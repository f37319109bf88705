"""Issue #12, second round of reliability cases: ids that read the server's files, small files that blow up, names
that hide runs, an adapter from another base, and messages that mislead.

Core cases call the qlora package (or the CLI through qlora.__main__.main / a subprocess); app cases drive a real
Gradio server on a loopback port with gradio_client, as a script that bypasses the browser would. The list of cases and
what users see is RELIABILITY.md.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from apphelpers import Records, free_port, tiny_form, wait_for
from conftest import ROOT, TOKENIZER_DIR

ADMIN = "hostile-Adm1n"
ACTIVE = ("starting", "running", "stopping")


# --- fixtures ---------------------------------------------------------------------------------------------
def build_wide_llama(path: Path) -> Path:
    """A tiny Llama twice as wide as conftest's (hidden 128): an adapter of the other one does not fit it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.model import load_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    load_tokenizer(str(TOKENIZER_DIR)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    """The real app with an admin password, a models folder (QLORA_MODELS_DIR) holding the tiny Llama and a wider
    one, and one finished run ('earlier') trained on the tiny Llama."""
    import app
    from gradio_client import Client

    from qlora.config import TrainConfig
    from qlora.train import train

    root = tmp_path_factory.mktemp("hostile")
    models = root / "models"
    shutil.copytree(tiny_llama_dir, models / "tiny-llama")
    build_wide_llama(models / "wide-llama")
    memo = root / "memo.jsonl"
    memo.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(8)), encoding="utf-8")
    runs_root = root / "runs"
    train(TrainConfig(base_model=str(models / "tiny-llama"), dataset=str(memo), output_dir=str(runs_root),
                      run_name="earlier", quantize="nf4", batch_size=4, max_steps=2, max_length=64,
                      gradient_checkpointing=False, group_by_length=False, lora_dropout=0.0))
    old_models = os.environ.get("QLORA_MODELS_DIR")
    os.environ["QLORA_MODELS_DIR"] = str(models)
    records = Records()
    logging.getLogger().addHandler(records)
    demo = app.build_demo(runs_root=runs_root, admin_password=ADMIN)
    kwargs = app.launch_kwargs("127.0.0.1", free_port(), share=False)
    demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    url = f"http://127.0.0.1:{kwargs['server_port']}/"
    yield dict(demo=demo, client=Client(url, verbose=False), root=root, models=models, runs_root=runs_root,
               memo=memo, records=records, tiny=str(models / "tiny-llama"), wide=str(models / "wide-llama"))
    demo.ctx.jobs.stop()
    demo.ctx.jobs.wait(60)
    demo.close()
    logging.getLogger().removeHandler(records)
    if old_models is None:
        os.environ.pop("QLORA_MODELS_DIR", None)
    else:
        os.environ["QLORA_MODELS_DIR"] = old_models


def form(server, **overrides) -> dict:
    """The /start, /preview and /preflight form for a 2-step 4-bit run of the tiny Llama on an uploaded file."""
    return tiny_form(server["tiny"], server["memo"], ADMIN, **{"max_steps": 2, **overrides})


def run_names(server) -> list[str]:
    return sorted(p.name for p in server["runs_root"].iterdir())


def chat(client, adapter: str) -> str:
    """The status line of one greedy 3-token chat turn."""
    return client.predict("hello", [], [], adapter, 0.0, 0.9, 3, 0, "", api_name="/chat")[3]


# === Item 2: ids that read the server's files ===============================================================
def test_the_hub_dataset_field_never_reads_a_server_file_nor_says_whether_one_exists(server):
    """A Hub id is loaded from the Hub only: ids that are also relative paths under the app's working directory
    (a file, a folder of data, a source file) get exactly the answer a path that does not exist gets."""
    client = server["client"]
    assert (Path.cwd() / "qlora" / "sample_data.jsonl").is_file() and (Path.cwd() / "tests" / "data").is_dir()
    # (ids ending in .py get datasets' "no scripts" answer from the name alone: compared among themselves)
    said = []
    for ids in (("qlora/sample_data.jsonl", "tests/data", "README.md", "nobody/nothing.jsonl"),
                ("tests/conftest.py", "nobody/conftest.py")):
        answers = set()
        for dataset in ids:
            table, note = client.predict(**form(server, dataset_source="hub", hub_dataset=dataset),
                                         api_name="/preview")
            assert not table["data"], (dataset, table)  # no rows of any file
            answers.add(note.replace(dataset, "ID"))
        assert len(answers) == 1, answers
        said += answers
    assert "cannot reach the Hub" in said[0]
    # paths are refused alike, existing or not; through Start and Preflight too, and no job starts
    for endpoint in ("/preview", "/preflight", "/start"):
        outs = set()
        for dataset in ("/etc/passwd", str(server["memo"]), "/no/such/file.jsonl", "../qlora/sample_data.jsonl"):
            out = client.predict(**form(server, dataset_source="hub", hub_dataset=dataset), api_name=endpoint)
            outs.add(json.dumps(out))
        assert len(outs) == 1 and "give a Hub dataset id" in outs.pop()
    assert not server["demo"].ctx.jobs.state().active


def test_the_base_model_field_loads_only_the_hub_the_embedded_model_and_the_models_folder(server):
    client = server["client"]
    # a path on the server: one answer, whether it exists or not, from every endpoint that takes the id
    paths = ["/etc", str(server["root"]), "/no/such/model", "~", "../qlora", str(server["root"] / "runs" / "earlier"),
             server["tiny"] + "/../../runs/earlier"]  # ".." cannot leave the models folder
    for endpoint in ("/preflight", "/preview", "/start"):
        answers = set()
        for name in paths:
            out = json.dumps(client.predict(**form(server, base_model=name), api_name=endpoint))
            answers.add(out.replace(json.dumps(name[:100])[1:-1], "NAME").replace(repr(name[:100]), "NAME"))
        assert len(answers) == 1, (endpoint, answers)
        assert "folders on this server are not loaded here" in answers.pop()
    # a Hub id that is also a relative folder here goes to the Hub, like one that is not
    for endpoint in ("/preflight", "/preview"):
        here = json.dumps(client.predict(**form(server, base_model="tests/data"), api_name=endpoint))
        elsewhere = json.dumps(client.predict(**form(server, base_model="nobody/none-xyz"), api_name=endpoint))
        assert here.replace("tests/data", "ID") == elsewhere.replace("nobody/none-xyz", "ID"), (here, elsewhere)
        assert "reach the Hub" in here
    assert not server["demo"].ctx.jobs.state().active and run_names(server) == ["earlier"]
    # the owner's models folder works, and is listed in the model choices
    table, note = client.predict(**form(server), api_name="/preview")
    assert table["data"] and "alpaca format" in note, note
    config = server["demo"].config
    choices = [c for c in config["components"] if c.get("props", {}).get("label") == "Base model"][0]["props"]
    assert (server["tiny"], server["tiny"]) in choices["choices"]


def test_hub_ids_never_resolve_to_a_relative_folder_in_the_core_but_the_cli_keeps_local_paths(tmp_path, monkeypatch,
                                                                                                tiny_llama_dir):
    """The core's flag, not the page, decides: with allow_local=False an id that is also a folder under the working
    directory goes to the Hub (offline here, so 'cannot reach'); with the CLI's default the folder loads."""
    from qlora.data import DataError, load_rows
    from qlora.model import ModelError, resolve

    shutil.copytree(tiny_llama_dir, tmp_path / "owner" / "model")
    (tmp_path / "owner" / "data").mkdir()
    (tmp_path / "owner" / "data" / "train.jsonl").write_text('{"text": "secret row"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"^owner/model: cannot reach the Hub"):
        resolve("owner/model", allow_local=False)
    with pytest.raises(DataError, match=r"^owner/data: cannot reach the Hub"):
        load_rows("owner/data", allow_local=False)  # datasets alone would load the local folder
    with pytest.raises(DataError, match=r"^'/etc/passwd': not a Hub dataset id"):
        load_rows("/etc/passwd", allow_local=False)
    assert resolve("owner/model") == "owner/model" and Path(resolve(str(tmp_path / "owner" / "model"))).is_dir()
    rows, _ = load_rows(str(tmp_path / "owner" / "data" / "train.jsonl"))
    assert rows == [{"text": "secret row"}]


# === Item 3: small files that blow up =======================================================================
BOMBS = r"""
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, sys
def repeated(n, value):  # n rows of one dictionary-encoded value: a few KB on disk
    return pa.table({"text": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))})
pq.write_table(repeated(20_000_000, "<s>[INST] hi [/INST] ok </s>"), sys.argv[1] + "/many_rows.parquet", compression="zstd")
pq.write_table(repeated(300_000, "<s>[INST] q [/INST] " + "x" * 8000 + " </s>"), sys.argv[1] + "/wide_rows.parquet", compression="zstd")
"""

UNDER_A_CAP = r"""
import json, resource, sys
cap = 1536 * 2**20  # 1.5 GiB of address space: 20M rows as Python objects need several
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from qlora.data import DataError, prepare
out = {}
for name in ("many_rows.parquet", "wide_rows.parquet"):
    path = sys.argv[1] + "/" + name
    try:
        prepare(path)
        out[name] = "LOADED"
    except DataError as e:
        out[name] = str(e)
    out[name + " preview"] = len(prepare(path, max_rows=50).train)
print("RESULT " + json.dumps(out))
"""


def test_a_tiny_parquet_that_decompresses_huge_is_refused_by_its_limit_under_a_memory_cap(tmp_path):
    """In a subprocess whose address space is capped, loading ends with the limit it hit, not MemoryError; the
    preview of the same files reads its 50 rows and nothing more."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", BOMBS, str(tmp_path)], check=True, env=env, timeout=300)
    for name in ("many_rows.parquet", "wide_rows.parquet"):
        assert (tmp_path / name).stat().st_size < 512 * 1024, name  # small files
    r = subprocess.run([sys.executable, "-c", UNDER_A_CAP, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout + r.stderr
    got = json.loads(line[0][len("RESULT "):])
    assert got["many_rows.parquet"] == ("many_rows.parquet: 20,000,000 rows, over the 1,000,000-row limit; "
                                        "keep fewer rows (or set max_rows)")
    assert got["wide_rows.parquet"].startswith("wide_rows.parquet: over 512 MB once decompressed, the limit"), got
    assert got["many_rows.parquet preview"] == got["wide_rows.parquet preview"] == 50


def test_the_preview_of_a_huge_jsonl_reads_only_its_first_lines(tmp_path):
    """The preview stops at its rows: a broken line far below them is never reached (training still finds it)."""
    from qlora.data import DataError, prepare

    path = tmp_path / "long.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(5000):
            f.write(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n")
        f.write('{"instruction": broken\n')
    assert len(prepare(str(path), max_rows=50).train) == 50
    with pytest.raises(DataError, match=r"long\.jsonl: line 5001: truncated line"):
        prepare(str(path))


def test_a_jsonl_of_too_many_rows_stops_at_the_row_limit(tmp_path, monkeypatch):
    import qlora.data

    monkeypatch.setattr(qlora.data, "MAX_ROWS", 1000)  # the check, without writing a million lines
    path = tmp_path / "many.jsonl"
    path.write_text('{"text": "[INST] x [/INST] y"}\n' * 1001, encoding="utf-8")  # Llama 2 chat rows
    with pytest.raises(qlora.data.DataError, match=r"many\.jsonl: more than 1,000 rows, the limit"):
        qlora.data.prepare(str(path))
    assert len(qlora.data.prepare(str(path), max_rows=1000).train) == 1000


# === Item 6: names that hide runs ===========================================================================
@pytest.mark.parametrize("name, says", [
    (".", "must not start with '.': the folder would be hidden"),
    ("...", "must not start with '.': the folder would be hidden"),
    (".secret", "must not start with '.'"),
    ("CON", "a reserved folder name"), ("lpt1.run", "a reserved folder name"), ("run.", "a reserved folder name"),
    ("日" * 100, "at most 200 bytes in UTF-8 (this one is 300, for 100 characters)"),
    ("a..b", "must not contain '..'"), ("a/b", "letters, digits"),
])
def test_run_names_whose_folder_would_hide_be_reserved_or_too_long_are_refused(name, says, tmp_path):
    from qlora.__main__ import main
    from qlora.config import TrainConfig

    with pytest.raises(ValueError, match="^run_name: " + __import__("re").escape(says)):
        TrainConfig(run_name=name)
    # the CLI refuses it before data or model: exit 2, one line, nothing written
    assert main(["train", "--model", "nobody/none", "--dataset", "sample", "--run-name", name,
                 "--output-dir", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


def test_letters_of_any_script_make_a_run_name_that_is_listed_and_zipped(tmp_path):
    """Non-ASCII letters are allowed (\\w): a 60-character CJK name is 180 bytes, leaving room for the suffixes."""
    from qlora import runs
    from qlora.config import TrainConfig

    name = "日本語の実験" * 10
    assert len(name) == 60 and TrainConfig(run_name=name).run_name == name
    first, second = runs.new_run_dir(tmp_path, name), runs.new_run_dir(tmp_path, name)
    assert second.name == name + "-1"
    for run_dir in (first, second):
        runs.write_json(run_dir / "run.json", {"status": "finished", "created": 1})
    assert {r.name for r in runs.list_runs(tmp_path)} == {name, name + "-1"}
    (tmp_path / f"{name}-999-adapter-abcdef.zip").write_bytes(b"")  # the longest name a download gets


def test_a_run_name_through_the_app_is_refused_before_any_model_loads(server):
    client = server["client"]
    for name in ("...", "日" * 100, "NUL"):
        out = client.predict(**form(server, run_name=name), api_name="/start")
        assert out.startswith("❌ run_name:"), out
    assert not server["demo"].ctx.jobs.state().active and run_names(server) == ["earlier"]


# === Item 8: an adapter from another base ===================================================================
def test_an_adapter_named_for_another_base_is_refused_before_the_base_loads(server, tmp_path):
    from qlora.chat import ChatEngine
    from qlora.model import ModelError

    run = tmp_path / "llama-run"
    shutil.copytree(server["runs_root"] / "earlier", run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "NousResearch/Llama-2-7b-chat-hf"
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    engine = ChatEngine("smollm2-135m", quantize="none")
    with pytest.raises(ModelError, match=r"^llama-run: this adapter was trained on NousResearch/Llama-2-7b-chat-hf, "
                                         r"not smollm2-135m; chat with base NousResearch/Llama-2-7b-chat-hf$"):
        engine.load_adapter(run)
    assert engine.model is None  # nothing was loaded
    # the same base under another name (a Hub cache snapshot folder) is the same model
    from qlora.adapter_base import identity

    assert identity("/data/.hf/hub/models--NousResearch--Llama-2-7b-chat-hf/snapshots/0123abc") == \
        "NousResearch/Llama-2-7b-chat-hf"


def test_an_adapter_whose_shapes_do_not_fit_gets_one_line_in_the_cli_and_the_app(server, tmp_path, capsys):
    """A run folder whose config names a wider base than its adapter was trained on (a copied adapter, an edited
    config): the safetensors header's shapes are compared with the loaded base before peft sees them."""
    from qlora.__main__ import main

    run = server["runs_root"] / "wrong-base"
    shutil.copytree(server["runs_root"] / "earlier", run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace(server["tiny"], server["wide"]))
    try:
        assert main(["chat", "--adapter", str(run), "--max-new-tokens", "2", "hello"]) == 2
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert lines[-1] == (f"error: wrong-base: this adapter does not fit {server['wide']} (model.layers.0.self_attn."
                             f"q_proj has in_features=128, the adapter's lora_A expects 64); it was trained on "
                             f"{server['tiny']}"), err
        assert "Traceback" not in err and "size mismatch" not in err
        # the app says the same, and then answers with a run that fits
        status = chat(server["client"], "wrong-base")
        assert status.startswith("❌ wrong-base: this adapter does not fit") and server["tiny"] in status, status
        assert chat(server["client"], "earlier").startswith("done"), "chat still answers"
    finally:
        shutil.rmtree(run)


# === Weak messages: places in the file, file kinds ============================================================
@pytest.mark.parametrize("name, content, says", [
    ("blank_lines.jsonl", b'{"text": "<s>[INST] a [/INST] b </s>"}\n\n\n{"text": 42}\n',
     r"blank_lines\.jsonl: line 4: column 'text' must be a string"),
    ("multiline.csv", b'instruction,output\n"two\nlines",ok\n"three\nlines\nhere",\n\nq,a,extra\n',
     r"multiline\.csv: line 8: more cells than header columns"),
    ("multiline_cell.csv", b'instruction,input,output\n"two\nlines",,ok\nq,,5\n"x",,"a\n\nb"\nq,"",\n',
     None),
    ("array.json", b'[\n  {"text": "<s>[INST] a [/INST] b </s>"},\n\n  {"text": 42}\n]\n',
     r"array\.json: row 2 \(line 4\): column 'text' must be a string"),
    ("object.json", json.dumps({"text": "<s>[INST] a [/INST] b </s>"}).encode(),
     r"object\.json: expected a list of rows \(a JSON array of objects, or one object per line\), got one object$"),
    ("wrapped.json", json.dumps({"data": [{"text": "a"}], "version": 1}, indent=2).encode(),
     r"wrapped\.json: expected a list of rows .* got one object \(are the rows its 'data' list\? save that list alone\)"),
    ("renamed.jsonl", gzip.compress(b'{"text": "a"}\n'), r"renamed\.jsonl: a gzip-compressed file, not plain \.jsonl"),
    ("renamed.parquet", gzip.compress(b"PAR1"), r"renamed\.parquet: a gzip-compressed file"),
])
def test_messages_point_at_the_line_in_the_file_and_name_the_file_kind(name, content, says, tmp_path):
    from qlora.data import DataError, prepare

    path = tmp_path / name
    path.write_bytes(content)
    if says is None:  # multi-line cells that are fine load as rows
        assert len(prepare(str(path)).train) == 3
        return
    with pytest.raises(DataError, match=says):
        prepare(str(path))


def test_a_csv_cell_over_the_csv_modules_limit_loads_like_a_long_jsonl_row(tmp_path):
    import csv

    from qlora.data import prepare

    answer = "word " * 60_000  # 300 KB, over csv's default 128 KB field limit
    assert len(answer) > csv.field_size_limit() or csv.field_size_limit() > 131072
    (tmp_path / "long.csv").write_text(f'instruction,output\nRepeat,"{answer}"\n', encoding="utf-8")
    (tmp_path / "long.jsonl").write_text(json.dumps({"instruction": "Repeat", "output": answer}) + "\n",
                                         encoding="utf-8")
    assert prepare(str(tmp_path / "long.csv")).train == prepare(str(tmp_path / "long.jsonl")).train


# === Weak messages: YAML, --config, --output-dir, the chat prompt =============================================
def test_yaml_numeric_strings_nulls_and_non_text_names_get_messages_naming_the_field(tmp_path, capsys):
    from qlora.__main__ import main
    from qlora.config import TrainConfig

    cfg = TrainConfig.from_yaml("learning_rate: 1e-4\nwarmup_ratio: 5e-2\n")  # YAML reads these as strings
    assert cfg.learning_rate == 1e-4 and cfg.warmup_ratio == 0.05
    for text, says in (("run_name: 123\n", "run_name: must be text (in YAML, quote a name made of digits)"),
                       ("learning_rate:\n", "learning_rate: has no value (null)"),
                       ("run_name: null\n", "run_name: has no value (null)"),
                       ("learning_rate: fast\n", "learning_rate: must be in (0, 1]")):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match="^" + __import__("re").escape(f"{path}: {says}")):
            TrainConfig.from_yaml(path)
        assert main(["train", "--config", str(path)]) == 2
        assert f"error: {path}: {says}" in capsys.readouterr().err
    for missing in (tmp_path / "nope.yaml", tmp_path / "settings"):  # a name without .yaml is a file too
        assert main(["train", "--config", str(missing)]) == 2
        assert capsys.readouterr().err.strip() == f"error: {missing}: config file not found"
    assert main(["train", "--config", str(tmp_path)]) == 2  # a folder
    assert f"error: {tmp_path}: cannot read the config file" in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_read_only_or_too_long_is_refused_before_the_model_loads(tmp_path, capsys):
    """Refused in a second from the path alone: the model named here does not exist, and is never looked up."""
    from qlora.__main__ import main

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [(a_file, f"--output-dir: {a_file} is a file, not a folder"),
             (a_file / "runs", f"--output-dir: {a_file} is a file, not a folder"),
             (Path("/sys/qlora-runs"), "--output-dir: cannot create folders in /sys"),  # read-only, for root too
             (tmp_path / ("x" * 300), "--output-dir: a folder name in it is 300 bytes long; at most 255"),
             (tmp_path.joinpath(*["y" * 200] * 20), "--output-dir: the path is")]
    for out, says in cases:
        code = main(["train", "--model", "nobody/never-looked-up", "--dataset", "sample", "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: " + says), err
        assert "Traceback" not in err and "never-looked-up" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the checks created nothing


def test_the_cli_refuses_an_empty_chat_prompt_as_the_app_does(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qlora", "chat", "--adapter", str(tmp_path), "   "], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: the prompt is empty: give a question to ask both models"


# === Weak messages: Stop while loading, a failure while recording a failure ===================================
def test_stop_while_the_model_loads_says_nothing_was_saved(server):
    """Stop pressed (through the API) while the base model loads: the run ends before training, no adapter, no run
    folder, and neither the Stop answer, the status nor the page claims a partial adapter was saved."""
    from qlora.events import Log
    from ui import render

    client, jobs = server["client"], server["demo"].ctx.jobs
    loading, release = threading.Event(), threading.Event()

    def hold_while_loading(event):  # runs on the training thread: the base load waits until Stop was pressed
        if isinstance(event, Log) and event.line.startswith("loading ") and not release.is_set():
            loading.set()
            release.wait(60)

    jobs.subscribe(hold_while_loading)
    try:
        assert client.predict(**form(server, run_name="stopped-early"), api_name="/start").startswith("▶️ Started")
        assert loading.wait(120)
        answer = client.predict(admin_password=ADMIN, api_name="/stop")
        assert answer == ("⏹️ Stopping: the model is still loading, so the run ends before training starts; "
                          "nothing is saved."), answer
    finally:
        release.set()
    s = wait_for(client, lambda s: s["status"] not in ACTIVE, timeout=120)
    assert s["status"] == "stopped" and s["summary"] == "stopped before training started; nothing was saved", s
    page = render.status_markdown(jobs.state())
    assert "nothing was saved" in page and "adapter" not in page
    assert not [n for n in run_names(server) if n.startswith("stopped-early")]
    assert chat(client, "earlier").startswith("done")


def test_a_failure_while_recording_a_failure_does_not_hide_the_first_error(server, monkeypatch):
    """The run's folder disappears, then a step raises: writing run.json fails too, but the page and the log get
    the error that ended the run, and the app trains again."""
    from transformers import TrainerCallback

    import qlora.train

    class FolderGoneThenBoom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            shutil.rmtree(Path(args.output_dir).parent)  # the run folder (output_dir is its checkpoints/)
            raise RuntimeError("boom at step 1")

    real = qlora.train.build_trainer

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(FolderGoneThenBoom())
        return trainer

    monkeypatch.setattr(qlora.train, "build_trainer", build)
    client = server["client"]
    assert client.predict(**form(server, run_name="vanishing"), api_name="/start").startswith("▶️ Started")
    s = wait_for(client, lambda s: s["status"] not in ACTIVE, timeout=120)
    assert s["status"] == "failed" and s["error"] == "RuntimeError: boom at step 1", s
    logged = "\n".join(server["records"].lines)
    assert "training failed" in logged and "boom at step 1" in logged
    assert "could not record the failure in" in logged
    monkeypatch.setattr(qlora.train, "build_trainer", real)
    assert client.predict(**form(server, run_name="after"), api_name="/start").startswith("▶️ Started")
    assert wait_for(client, lambda s: s["status"] not in ACTIVE, timeout=120)["status"] == "finished"
    assert chat(client, "after").startswith("done")
