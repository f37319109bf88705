"""Core-level reliability cases (issue #4): bad input, faults, concurrency, secrets.

Every case checks three things: a clear message that names the problem, nothing lost (an earlier adapter is intact
and still listed, no half-written run looks complete), and the core still usable afterwards (a run trains, chat
answers). Faults are injected where they happen in real life: a TrainerCallback that raises at step N, the safetensors
writer that peft calls, a SIGKILL of a real training process. The code under test is never replaced.
The list of cases and their outcomes for users is RELIABILITY.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
from transformers import TrainerCallback

import qlora.train
from qlora import runs
from qlora.config import TrainConfig
from qlora.data import MAX_FILE_BYTES, DataError, prepare, tokenize
from qlora.device import BusyError, gpu_lock
from qlora.events import Failed, Finished, Progress
from qlora.jobs import JobManager
from qlora.model import ModelError, load_base, load_tokenizer, resolve
from qlora.prompts import format_llama2
from qlora.train import train


ROOT = Path(__file__).resolve().parents[1]
CANARY = "hf_CanaryCanaryCanaryCanaryCanary1234"  # the shape of a real token (hf_ + 34 characters)


# --- helpers -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def earlier_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """One finished run trained once per module; each test copies it into its own runs root ("an earlier adapter")."""
    root = tmp_path_factory.mktemp("earlier")
    data = root / "memo.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(4)), encoding="utf-8")
    cfg = TrainConfig(base_model=str(tiny_llama_dir), dataset=str(data), output_dir=str(root / "runs"),
                      run_name="earlier", quantize="nf4", batch_size=4, max_steps=2, max_length=64,
                      learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", gradient_checkpointing=False,
                      group_by_length=False, lora_dropout=0.0)
    return train(cfg)


@pytest.fixture
def runs_root(tmp_path, earlier_run) -> Path:
    """A runs folder that already holds one good, finished run named 'earlier'."""
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(earlier_run, root / "earlier")
    return root


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_earlier_intact(root: Path, earlier_run: Path) -> None:
    """After the start-up recovery the app and the CLI run, the earlier adapter is listed as usable, verifies, and is
    byte-for-byte what it was."""
    runs.recover_all(root)
    listed = {r.name: r for r in runs.list_runs(root)}
    assert digest(root / "earlier" / "adapter") == digest(earlier_run / "adapter")
    runs.verify_adapter(root / "earlier" / "adapter")
    assert listed["earlier"].usable and listed["earlier"].status == "finished"


def assert_no_junk(root: Path) -> None:
    """No temp or half-swapped adapter folder is left anywhere."""
    leftovers = [p for p in root.rglob(".adapter.*")]
    assert leftovers == [], leftovers


def inject(monkeypatch, callback) -> None:
    """Add a TrainerCallback to the real trainer that train() builds: the fault happens inside the real loop."""
    real = qlora.train.build_trainer

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(qlora.train, "build_trainer", build)


def only_run(root: Path, exclude=("earlier",)) -> Path:
    [run_dir] = [p for p in root.iterdir() if p.is_dir() and p.name not in exclude]
    return run_dir


def run_script(tmp_path: Path, code: str, *args: str) -> subprocess.Popen:
    """Start a Python process running `code` with the project importable (a stand-in for the app's process)."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code), encoding="utf-8")
    # the project first, then whatever the environment already adds (a GPU machine's carried packages)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"child never reached {path.name}")
        time.sleep(0.05)


# === Bad input =============================================================================================
BAD_FILES = {
    # name: (bytes, what the message must say)
    "empty.jsonl": (b"", r"empty\.jsonl: the file is empty"),
    "blank.jsonl": (b"\n  \n\n", r"blank\.jsonl: the file is empty"),
    "latin1.jsonl": ('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"), r"latin1\.jsonl: line 2: not UTF-8"),
    "cut.jsonl": (b'{"text": "<s>[INST] a [/INST] b </s>"}\n{"text": "<s>[INST] cu', r"cut\.jsonl: line 2: truncated"),
    "broken.jsonl": (b'{"text": "a"}\n{"text": oops}\n{"text": "b"}\n', r"broken\.jsonl: line 2: not valid JSON"),
    "columns.jsonl": (b'{"prompt": "q", "completion": "a"}\n',
                      r"columns\.jsonl: no usable column: expected 'text'.*found columns: completion, prompt"),
    "numbers.jsonl": (b'{"text": "<s>[INST] ok [/INST] ok </s>"}\n{"text": 42}\n', r"numbers\.jsonl: line 2: column 'text' must be a string, got int"),
    "nulls.jsonl": (b'{"text": null}\n{"text": null}\n', r"nulls\.jsonl: all 2 rows are empty"),
    "empty_strings.jsonl": (b'{"text": ""}\n{"text": "   "}\n', r"empty_strings\.jsonl: all 2 rows are empty"),
    "list.jsonl": (b'["not", "an", "object"]\n', r"list\.jsonl: line 1: expected a JSON object per line, got list"),
    "data.txt": (b"hello", r"data\.txt: unsupported file type \.txt"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_dataset_is_refused_with_a_message_naming_file_and_line_and_nothing_is_written(name, tmp_path, tiny_cfg):
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare(str(path))
    # through train(): the same message as a Failed event, raised before any model load or folder
    events = []
    with pytest.raises(DataError):
        train(tiny_cfg(dataset=str(path)), events.append)
    assert isinstance(events[-1], Failed) and name in events[-1].error
    assert not (tmp_path / "runs").exists()


def test_null_and_empty_rows_are_dropped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"text": "<s>[INST] a [/INST] b </s>"}, {"text": None}, {"text": ""}, {"text": " \n"},
            {"text": "[INST] c [/INST] d"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = prepare(str(path))
    assert data.dropped == 3 and len(data.train) == 2
    assert [format_llama2(c) for c in data.train] == ["<s>[INST] a [/INST] b </s>", "<s>[INST] c [/INST] d </s>"]


def test_a_good_file_with_a_bom_crlf_and_a_csv_load(tmp_path):
    """The control for the cases above: what real editors write is accepted."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes("\ufeff".encode() + b'{"text": "[INST] a [/INST] b"}\r\n{"text": "[INST] c [/INST] d"}\r\n')
    assert len(prepare(str(bom)).train) == 2
    table = tmp_path / "alpaca.csv"
    table.write_bytes(b"instruction,output\nq,a\n")
    data = prepare(str(table))
    assert data.shape == "alpaca" and len(data.train) == 1


def test_a_single_1mb_row_is_tokenized_and_truncated(tmp_path, llama_tokenizer):
    path = tmp_path / "huge_row.jsonl"
    answer = ("All work and no play makes Jack a dull boy. " * 24000)[: 1024 * 1024]
    path.write_text(json.dumps({"instruction": "Repeat.", "output": answer}) + "\n", encoding="utf-8")
    assert path.stat().st_size > 1024 * 1024
    t0 = time.perf_counter()
    data = prepare(str(path))
    rows = tokenize(data.train, llama_tokenizer, max_length=1024)
    assert len(rows) == 1 and len(rows[0].ids) == 1024 and rows[0].ids[0] == llama_tokenizer.bos_token_id
    assert time.perf_counter() - t0 < 30


def test_100k_rows_prepare_in_seconds(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write(json.dumps({"instruction": f"What is {i} plus one?", "output": f"It is {i + 1}."}) + "\n")
    t0 = time.perf_counter()
    data = prepare(str(path), eval_fraction=0.01)
    took = time.perf_counter() - t0
    assert len(data.train) + len(data.eval) == 100_000 and len(data.eval) == 1000
    assert took < 10, f"prepare took {took:.1f}s"  # the app runs it in a worker, but it must not take minutes


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "too_big.jsonl"
    with open(path, "wb") as f:  # sparse: the size is real, the disk use is not
        f.truncate(MAX_FILE_BYTES + 1)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"too_big\.jsonl: \d+ MB is over the 200 MB limit"):
        prepare(str(path))
    assert time.perf_counter() - t0 < 1  # refused from its size, not after reading 200 MB


FAKE_HUB = r"""
import hashlib, http.server, json, os, sys, threading

CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 32000}).encode()
SHA = "0" * 40
requests = []
authorizations = set()

class Hub(http.server.BaseHTTPRequestHandler):
    # The real Hub's answers: 401 + X-Error-Code GatedRepo for a gated repo without a token, 404 RepoNotFound for a
    # repo that does not exist; "owner/bin-only" exists with a config.json and only pickled .bin weights.
    def send(self, code, body=b"", **headers):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def answer(self):
        requests.append(f"{self.command} {self.path}")
        authorizations.add(self.headers.get("Authorization") or "")
        if "bin-only" in self.path:
            if self.path.startswith("/api/models/owner/bin-only") and (self.path.count("/") == 4
                                                                         or "/revision/" in self.path):
                info = {"id": "owner/bin-only", "sha": SHA, "private": False,
                        "siblings": [{"rfilename": "config.json"}, {"rfilename": "pytorch_model.bin"}]}
                return self.send(200, json.dumps(info).encode(), Content_Type="application/json")
            if self.path.endswith("/config.json"):
                return self.send(200, CONFIG, X_Repo_Commit=SHA, ETag=f'"{hashlib.sha1(CONFIG).hexdigest()}"')
            return self.send(404, X_Error_Code="EntryNotFound")
        if self.path.startswith("/api/datasets/owner/huge-data"):  # 50 GB of parquet behind a one-line id
            files = [{"rfilename": "README.md", "size": 900}, {"rfilename": "data/train-00000.parquet",
                     "size": 50 * 2**30, "blobId": "1" * 40}]
            info = {"id": "owner/huge-data", "sha": SHA, "private": False, "siblings": files}
            return self.send(200, json.dumps(info).encode(), Content_Type="application/json")
        if "gated" in self.path:
            return self.send(401, X_Error_Code="GatedRepo")
        return self.send(404, X_Error_Code="RepoNotFound")

    do_GET = do_HEAD = answer

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
                  HF_HOME=sys.argv[1])
os.environ.pop("DISABLE_SAFETENSORS_CONVERSION", None)
from qlora.data import DataError, prepare
from qlora.model import ModelError, load_base, load_tokenizer, resolve
out = {}
for name in ("nobody-xyz/does-not-exist", "meta-llama/gated-model", "owner/bin-only"):
    for what, call in (("tokenizer", lambda: load_tokenizer(resolve(name))),
                       ("model", lambda: load_base(resolve(name), "nf4", "fp32", token=sys.argv[2])),
                       # the app's way: downloaded with huggingface_hub, loaded from the snapshot
                       ("app model", lambda: resolve(name, allow_local=False, token=sys.argv[2])),
                       ("dataset", lambda: prepare(name))):
        try:
            call()
            out[f"{name} {what}"] = "LOADED"
        except (ModelError, DataError) as e:
            out[f"{name} {what}"] = str(e)
from qlora.data import load_rows
for what, call in (("train", lambda: prepare("owner/huge-data")), ("preview", lambda: load_rows("owner/huge-data", max_rows=5))):
    try:
        call()
        out[f"owner/huge-data {what}"] = "LOADED"
    except DataError as e:
        out[f"owner/huge-data {what}"] = str(e)
# a visitor of an open app (no token given) while the server has its own HF_TOKEN: the libraries must not use it
os.environ["HF_TOKEN"] = "hf_OwnerOwnerOwnerOwnerOwnerOwner1234"
for name in ("meta-llama/gated-model", "owner/open-model"):
    for call in (lambda: resolve(name, allow_local=False, weights=False), lambda: prepare(name)):
        try:
            call()
        except (ModelError, DataError):
            pass
out["requests"] = requests
out["authorizations"] = sorted(authorizations)
print("RESULT " + json.dumps(out))
"""


def test_hub_ids_that_do_not_exist_are_gated_or_have_no_safetensors_get_clear_messages(tmp_path):
    """The real huggingface_hub/transformers/datasets calls against a local server that answers like the Hub."""
    proc = run_script(tmp_path, FAKE_HUB, str(tmp_path / "hf-home"), CANARY)
    out, _ = proc.communicate(timeout=120)
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert line, out
    got = json.loads(line[0][len("RESULT "):])
    for what in ("tokenizer", "model", "app model"):
        assert got[f"nobody-xyz/does-not-exist {what}"] == \
            "nobody-xyz/does-not-exist: no such model on the Hub (or it is private: give a token)"
        assert got[f"meta-llama/gated-model {what}"] == \
            "meta-llama/gated-model: gated model: accept its license on the Hub, then give a token that has access"
    assert got["nobody-xyz/does-not-exist dataset"].startswith("nobody-xyz/does-not-exist: no such dataset on the Hub")
    assert got["meta-llama/gated-model dataset"] == \
        "meta-llama/gated-model: gated dataset: accept its terms on the Hub and give a token"
    for what in ("model", "app model"):
        assert got[f"owner/bin-only {what}"] == \
            "owner/bin-only: no .safetensors weights; only safetensors are loaded (pickled .bin files can run code)"
    for what in ("train", "preview"):  # refused from the Hub's file list: the 50 GB file is never asked for
        assert got[f"owner/huge-data {what}"] == ("owner/huge-data: 51,200 MB of files on the Hub, over the 512 MB "
                                                  "limit; nothing was downloaded (use a smaller dataset)")
    assert [r for r in got["requests"] if "huge-data" in r] == ["GET /api/datasets/owner/huge-data?blobs=true"] * 2
    bin_only = [r for r in got["requests"] if "bin-only" in r]
    assert not [r for r in bin_only if r.endswith(".bin")]  # the pickle is never downloaded
    # transformers' auto-conversion (which sends the token to a conversion Space and loads a PR branch) never starts
    assert not [r for r in bin_only if "/commits/" in r or "/discussions" in r], bin_only
    # the caller's token went out where it was given; the server's own HF_TOKEN never did (a visitor gave none)
    assert f"Bearer {CANARY}" in got["authorizations"]
    assert not [a for a in got["authorizations"] if "Owner" in a], got["authorizations"]


def test_no_hub_access_says_so():
    with pytest.raises(ModelError, match=r"nobody-xyz/offline: cannot reach the Hub"):
        load_tokenizer(resolve("nobody-xyz/offline"))
    with pytest.raises(DataError, match=r"nobody-xyz/offline: cannot reach the Hub"):
        prepare("nobody-xyz/offline")
    with pytest.raises(ModelError, match=r"not a folder and not a valid Hub model id"):
        resolve("../../etc/passwd")


def test_a_model_that_needs_remote_code_is_refused_and_its_code_never_runs(tmp_path):
    folder = tmp_path / "evil-model"
    folder.mkdir()
    marker = tmp_path / "remote-code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil-llama", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write('{module}\\n')\n")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64)}, str(folder / "model.safetensors"))
    path = resolve(str(folder))
    for call in (lambda: load_tokenizer(path), lambda: load_base(path, "nf4", "fp32"),
                 lambda: load_base(path, "none", "fp32")):
        with pytest.raises(ModelError, match="needs its own Python code to load; remote code is never run here"):
            call()
    assert not marker.exists()


class _Payload:
    """A pickle that writes a marker file when it is unpickled: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle ran')",))


def test_a_model_without_safetensors_is_refused_and_its_pickle_never_loads(tmp_path, tiny_llama_dir):
    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(ModelError, match=r"bin-only: no \.safetensors weights in this folder; only safetensors"):
        resolve(str(folder))
    # past resolve() too: the loader itself asks for safetensors only
    with pytest.raises(ModelError, match=r"no \.safetensors weights; only safetensors are loaded"):
        load_base(str(folder), "nf4", "fp32")
    assert not marker.exists()


@pytest.mark.parametrize("field,value", [
    ("learning_rate", -1e-4), ("learning_rate", 0.0), ("learning_rate", float("nan")), ("learning_rate", 1e9),
    ("lora_r", 0), ("lora_r", -8), ("batch_size", 0), ("max_length", 0), ("max_length", -5), ("epochs", 1e6),
    ("lora_r", True), ("batch_size", "4"), ("run_name", "../../etc"), ("target_modules", ["q_proj;rm -rf /"]),
])
def test_out_of_range_hyperparameters_are_refused_naming_the_field(field, value, tiny_cfg, tmp_path):
    """TrainConfig is the server-side check: whatever a browser or a script sends goes through it."""
    with pytest.raises(ValueError, match=rf"^{field}: "):
        tiny_cfg(**{field: value})
    with pytest.raises(ValueError, match=rf"{field}: "):
        TrainConfig.from_dict({**tiny_cfg().to_dict(), field: value})
    assert not (tmp_path / "runs").exists()


# === Faults ================================================================================================
class RaiseAt(TrainerCallback):
    """Raises error_type(*args) at the end of step `step`, inside the real training loop.

    The exception is made when raised (not held here), so this callback keeps no traceback, and no model, alive.
    """

    def __init__(self, step: int, error_type: type[BaseException], *args):
        self.step, self.error_type, self.args = step, error_type, args
        self.model = lambda: None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.model = weakref.ref(model)  # to check that the failed run's model is freed afterwards
            raise self.error_type(*self.args)


def test_out_of_memory_mid_training_names_the_knob_and_a_smaller_run_then_trains(tiny_cfg, runs_root, earlier_run,
                                                                                  monkeypatch):
    import torch

    jobs = JobManager()
    oom = RaiseAt(2, torch.cuda.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB")
    inject(monkeypatch, oom)
    jobs.start(tiny_cfg(output_dir=str(runs_root), max_steps=6, batch_size=4, run_name="big"))
    state = jobs.wait(120)
    assert state.status == "failed" and state.error == "out of GPU memory"
    # the model is gone once the job has ended (on a GPU: its memory is back), without anyone calling gc here
    assert oom.model() is None
    assert "lower batch_size or max_length" in state.hint
    assert not gpu_lock.locked()  # the device is free again
    failed = runs_root / "big"
    assert json.loads((failed / "run.json").read_text())["status"] == "failed"
    assert not (failed / "adapter").exists()
    listed = {r.name: r for r in runs.list_runs(runs_root)}
    assert not listed["big"].usable and listed["big"].status == "failed"
    assert_earlier_intact(runs_root, earlier_run)
    assert_no_junk(runs_root)

    monkeypatch.undo()  # the next run has no fault: a smaller one trains
    jobs.start(tiny_cfg(output_dir=str(runs_root), max_steps=2, batch_size=2, run_name="small"))
    state = jobs.wait(120)
    assert state.status == "finished", state.error
    assert {r.name: r for r in runs.list_runs(runs_root)}["small"].usable


REAL_OOM = r"""
import json, sys
import torch
from qlora import runs
from qlora.config import TrainConfig
from qlora.device import gpu_lock
from qlora.jobs import JobManager
from qlora.train import train

huge, small = TrainConfig.from_yaml(sys.argv[1]), TrainConfig.from_yaml(sys.argv[2])
for dtype in (torch.float32, torch.bfloat16, torch.float16):  # cuBLAS keeps a workspace once it has run
    x = torch.ones(64, 64, device="cuda", dtype=dtype)
    (x @ x).sum().item()
del x
torch.cuda.empty_cache()
baseline = torch.cuda.memory_allocated()
total = torch.cuda.get_device_properties(0).total_memory
# a card with 512 MiB free: the big run's logits alone (32 x 4096 x 32000 16-bit values) need 8 GiB
torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 2**29) / total))
jobs = JobManager(train_fn=train)  # in this process, where the cap applies (not accelerate's children)
jobs.start(huge)
first = jobs.wait(600)
listed = {r.name: r for r in runs.list_runs(huge.output_dir)}
out = dict(first=[first.status, first.error, first.hint], locked=gpu_lock.locked(), baseline=baseline,
           after=torch.cuda.memory_allocated(), huge_listed="huge" in listed,
           huge_usable="huge" in listed and listed["huge"].usable)
jobs.start(small)
second = jobs.wait(600)
listed = {r.name: r for r in runs.list_runs(small.output_dir)}
out.update(second=[second.status, second.error], small_usable="small" in listed and listed["small"].usable,
           listed=sorted(listed), logs=list(first.logs[-6:] + second.logs[-6:]))
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.gpu
def test_real_cuda_out_of_memory_frees_the_card_and_a_smaller_run_then_trains(tiny_cfg, tmp_path):
    """The GPU twin: a real OOM under a memory cap, not an injected one. It runs in a process of its own, so its
    baseline and its cap are its own, whatever earlier GPU tests left on the card."""
    long = tmp_path / "long.jsonl"
    answer = "All work and no play makes Jack a dull boy. " * 400  # ~4,400 tokens a row
    long.write_text("".join(json.dumps({"instruction": f"Repeat {i}.", "output": answer}) + "\n" for i in range(64)),
                    encoding="utf-8")
    configs = []
    for name, overrides in (("huge", dict(batch_size=32, max_length=4096)),
                            ("small", dict(batch_size=1, max_length=256))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(tiny_cfg(dataset=str(long), max_steps=2, run_name=name, **overrides).to_yaml())
        configs.append(str(path))
    proc = run_script(tmp_path, REAL_OOM, *configs)
    output, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, output[-3000:]
    r = json.loads(next(line[7:] for line in output.splitlines() if line.startswith("RESULT ")))
    print(r)  # the runs' states and last log lines, for a person reading a failure
    status, error, hint = r["first"]
    assert status == "failed" and error == "out of GPU memory", r
    assert "lower batch_size or max_length" in hint
    assert not r["locked"]
    # all the failed run took is back (the slack covers library workspaces, not a run)
    assert r["after"] <= r["baseline"] + 64 * 2**20, (r["baseline"], r["after"])
    assert r["huge_listed"] and not r["huge_usable"], r  # it failed mid-run: listed as failed, never offered
    assert r["second"][0] == "finished", r
    assert r["small_usable"], r


def test_nan_loss_stops_the_run_with_a_message_and_no_adapter(tiny_cfg, runs_root, earlier_run, monkeypatch):
    import torch

    class PoisonWeights(TrainerCallback):
        """What an fp16 overflow does: LoRA weights become NaN after step 2, so step 3's loss is NaN."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.fill_(float("nan"))

    inject(monkeypatch, PoisonWeights())
    events = []
    with pytest.raises(FloatingPointError):
        train(tiny_cfg(output_dir=str(runs_root), max_steps=20, run_name="nan"), events.append)
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert max(steps) <= 4  # stopped at once, not after 20 steps
    assert isinstance(events[-1], Failed)
    assert events[-1].error == "the loss became NaN/inf at step 3"
    assert "lower learning_rate" in events[-1].hint
    run = runs_root / "nan"
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "adapter").exists()  # a NaN adapter is never saved or listed
    assert not {r.name: r for r in runs.list_runs(runs_root)}["nan"].usable
    assert_earlier_intact(runs_root, earlier_run)


def test_an_exception_in_the_training_thread_is_shown_not_swallowed(tiny_cfg, runs_root, earlier_run, monkeypatch,
                                                                    caplog):
    inject(monkeypatch, RaiseAt(1, KeyError, "input_ids"))
    jobs = JobManager()
    jobs.start(tiny_cfg(output_dir=str(runs_root), max_steps=5, run_name="boom"))
    state = jobs.wait(120)
    assert state.status == "failed"
    assert state.error == "KeyError: 'input_ids'" and state.hint == "see the server log"
    assert "training failed" in caplog.text and "Traceback" in caplog.text  # the whole story is in the server log
    assert not gpu_lock.locked()
    assert json.loads((runs_root / "boom" / "run.json").read_text())["status"] == "failed"
    assert_earlier_intact(runs_root, earlier_run)

    # a train_fn that dies before emitting anything still ends the job as failed, lock released
    def broken(cfg, emit, stop, **kwargs):
        raise RuntimeError("collator exploded")

    jobs = JobManager(train_fn=broken)
    jobs.start(tiny_cfg(output_dir=str(runs_root)))
    state = jobs.wait(30)
    assert state.status == "failed" and state.error == "RuntimeError: collator exploded"
    assert not gpu_lock.locked()


def test_a_full_disk_while_saving_keeps_the_previous_adapter(tiny_cfg, runs_root, earlier_run, monkeypatch,
                                                              tiny_llama_dir):
    import errno

    import peft.peft_model

    real_save = peft.peft_model.safe_save_file

    def disk_full(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:  # part of the file reaches the disk, then the disk is full
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    events = []
    with pytest.raises(OSError):
        train(tiny_cfg(output_dir=str(runs_root), max_steps=2, run_name="full"), events.append)
    assert isinstance(events[-1], Failed)
    assert events[-1].error == "disk full while saving; the previous adapter is untouched"
    assert events[-1].hint == "free disk space and train again"
    assert not (runs_root / "full" / "adapter").exists()
    assert not {r.name: r for r in runs.list_runs(runs_root)}["full"].usable
    assert_no_junk(runs_root)

    # the same fault while replacing an existing adapter in place: the old one stays
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(str(tiny_llama_dir), "nf4", "fp32"),
                                      str(runs_root / "earlier" / "adapter"))
    with pytest.raises(OSError) as e:
        runs.save_adapter_atomically(runs_root / "earlier", lambda tmp: model.save_pretrained(tmp))
    assert e.value.errno == errno.ENOSPC
    assert_earlier_intact(runs_root, earlier_run)
    assert_no_junk(runs_root)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)
    runs.save_adapter_atomically(runs_root / "earlier", lambda tmp: model.save_pretrained(tmp))  # disk freed: works
    runs.verify_adapter(runs_root / "earlier" / "adapter")


KILLED_DURING_SAVE = r"""
import sys, time
from pathlib import Path
import peft.peft_model
from qlora.config import TrainConfig
from qlora.train import train

cfg = TrainConfig.from_yaml(sys.argv[1])
ready = Path(sys.argv[2])

def slow_save(tensors, filename, *args, **kwargs):
    with open(filename, "wb") as f:  # half of the file is on disk when the process dies
        f.write(b"\0" * 4096)
        f.flush()
    ready.write_text(filename)
    time.sleep(600)

peft.peft_model.safe_save_file = slow_save
train(cfg)
"""


def test_process_killed_during_adapter_save_leaves_the_previous_adapter_loadable(tiny_cfg, runs_root, earlier_run,
                                                                                 tmp_path, tiny_llama_dir):
    cfg = tiny_cfg(output_dir=str(runs_root), max_steps=2, run_name="killed")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    ready = tmp_path / "saving"
    proc = run_script(tmp_path, KILLED_DURING_SAVE, str(tmp_path / "cfg.yaml"), str(ready))
    wait_for(ready, proc)
    assert ".adapter.tmp-" in ready.read_text()  # it was writing into the temp folder, not the adapter folder
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    runs.recover_all(runs_root)  # the app's (and the CLI's) start-up step
    listed = {r.name: r for r in runs.list_runs(runs_root)}  # what the app shows after its restart
    assert listed["killed"].status == "interrupted" and not listed["killed"].usable
    assert not (runs_root / "killed" / "adapter").exists()
    assert_no_junk(runs_root)  # recover() removed the half-written temp folder
    assert_earlier_intact(runs_root, earlier_run)

    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(str(tiny_llama_dir), "nf4", "fp32"),
                                      str(runs_root / "earlier" / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


KILLED_MID_SWAP = r"""
import sys, time
from pathlib import Path
from qlora import runs

run_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
real_rename = Path.rename

def rename(self, target):
    out = real_rename(self, target)
    if self.name == "adapter":  # the old adapter was moved aside; the new one is not in place yet
        ready.write_text(str(target))
        time.sleep(600)
    return out

Path.rename = rename
runs.save_adapter_atomically(run_dir, lambda tmp: __import__("shutil").copytree(run_dir / "adapter", tmp))
"""


def test_process_killed_between_the_two_renames_of_an_adapter_swap_is_undone(runs_root, earlier_run, tmp_path):
    ready = tmp_path / "swapping"
    proc = run_script(tmp_path, KILLED_MID_SWAP, str(runs_root / "earlier"), str(ready))
    wait_for(ready, proc, timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (runs_root / "earlier" / "adapter").exists()  # the worst moment: no adapter in place
    assert_earlier_intact(runs_root, earlier_run)  # recover_all() -> recover() puts the old one back
    assert_no_junk(runs_root)


RESTARTED_MID_RUN = r"""
import sys, time
from pathlib import Path
from transformers import TrainerCallback
import qlora.train
from qlora.config import TrainConfig

cfg = TrainConfig.from_yaml(sys.argv[1])
ready = Path(sys.argv[2])

class Hang(TrainerCallback):
    # After checkpoint-2 is on disk the process hangs, so the test can kill it at a known point.
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            ready.write_text("checkpoint-2")
            time.sleep(600)

real = qlora.train.build_trainer
def build(*a, **k):
    t = real(*a, **k)
    t.add_callback(Hang())
    return t
qlora.train.build_trainer = build
qlora.train.train(cfg, token=sys.argv[3])
"""


def test_app_restarted_mid_run_shows_interrupted_and_resumes_from_the_last_checkpoint(tiny_cfg, runs_root,
                                                                                      earlier_run, tmp_path):
    cfg = tiny_cfg(output_dir=str(runs_root), max_steps=5, save_steps=1, run_name="long")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    ready = tmp_path / "checkpointed"
    proc = run_script(tmp_path, RESTARTED_MID_RUN, str(tmp_path / "cfg.yaml"), str(ready), CANARY)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    run_dir = runs_root / "long"
    # a kill during the next checkpoint's write leaves a folder without trainer_state.json (written last)
    half = run_dir / "checkpoints" / "checkpoint-3"
    half.mkdir()
    shutil.copy(run_dir / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors", half)

    listed = {r.name: r for r in runs.list_runs(runs_root)}
    assert listed["long"].status == "interrupted" and not listed["long"].usable
    assert runs.latest_checkpoint(run_dir).name == "checkpoint-2"  # never the half-written one
    assert_earlier_intact(runs_root, earlier_run)

    events = []
    train(cfg, events.append, resume_from=run_dir)
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == [3, 4, 5]  # continued after checkpoint-2, did not start over
    assert isinstance(events[-1], Finished)
    listed = {r.name: r for r in runs.list_runs(runs_root)}
    assert listed["long"].status == "finished" and listed["long"].usable
    # the token the killed process was given is nowhere in its folder (checkpoints' training_args.bin included)
    assert_no_canary(run_dir)


# === Poisoned run folders (issue #12 item 4) ==================================================================
def test_a_poisoned_run_folder_is_listed_as_damaged_and_every_other_run_works(runs_root, earlier_run, tiny_llama_dir):
    """Each way a copied, truncated or hand-made folder can be broken: listing names it, nothing trusts a size from
    the file (a header claiming 1 TB is refused from the file's size, not read), and the good run still chats."""
    import re

    from poisoned import ODD_TYPES, poison

    from qlora.chat import ChatEngine
    from qlora.config import GenerationSettings

    expected = poison(earlier_run, runs_root)
    assert runs.recover_all(runs_root) == []  # the start-up step passes over them (nothing to repair) without error
    listed = {r.name: r for r in runs.list_runs(runs_root)}
    for name, said in expected.items():
        assert said in listed[name].damaged and not listed[name].usable, (name, listed[name])
        with pytest.raises(ValueError, match=f"run {name} is damaged: .*{re.escape(said)}"):
            runs.usable_run(runs_root, name)
        if not name.startswith(("run-json", "format-")):  # the adapter itself is what is broken
            with pytest.raises(runs.DamagedRun, match=re.escape(said)):
                runs.verify_adapter(runs_root / name / "adapter")
    odd = listed[ODD_TYPES]  # fields of the wrong type are ignored, not fatal: its adapter is whole
    assert not odd.damaged and odd.status == "unknown" and not odd.usable and odd.step == 0 and odd.metrics == {}
    assert [r.name for r in runs.usable_runs(runs_root)] == ["earlier"]
    assert_earlier_intact(runs_root, earlier_run)

    engine = ChatEngine(str(tiny_llama_dir), quantize="nf4", precision="fp32")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        engine.load_adapter(runs_root / "lfs-pointer")
    with pytest.raises(ValueError, match="half-complete adapter: .* no LoRA tensors for v_proj"):
        engine.load_adapter(runs_root / "half-no-v-proj")
    with pytest.raises(ValueError, match="prompt_format.json: unknown prompt format"):  # never prompted in a guess
        engine.load_adapter(runs_root / "format-unknown")
    name = engine.load_adapter(runs_root / "earlier")
    *_, (base, tuned) = engine.stream_pair([], [], "Question 1?", GenerationSettings(temperature=0, max_new_tokens=4),
                                           name)
    assert base and tuned


def test_a_run_whose_targets_match_nothing_is_refused_before_training(tiny_cfg, tmp_path):
    """peft only warns when a listed target matches no module; the adapter would then read as half-complete."""
    with pytest.raises(ValueError, match="target_modules: w_proj matches no module of"):
        train(tiny_cfg(output_dir=str(tmp_path / "runs"), max_steps=1, target_modules=["q_proj", "w_proj"]))


# === Concurrency ===========================================================================================
def test_two_simultaneous_starts_give_exactly_one_run(tiny_cfg, tmp_path):
    jobs = JobManager()
    barrier = threading.Barrier(2)
    results: list = []

    def press_start():
        barrier.wait()
        try:
            results.append(jobs.start(tiny_cfg(max_steps=2)).status)
        except BusyError as e:
            results.append(e)

    threads = [threading.Thread(target=press_start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [r for r in results if isinstance(r, BusyError)]
    assert len(busy) == 1 and "a run is already active" in str(busy[0])
    assert jobs.wait(120).status == "finished"
    assert len(list((tmp_path / "runs").iterdir())) == 1
    assert not gpu_lock.locked()


def test_stop_from_another_thread_ends_the_run_and_chat_is_told_the_gpu_is_busy(tiny_cfg, tiny_llama_dir,
                                                                                  runs_root, earlier_run):
    """While a run holds the device, chat says so at once; Stop from anyone ends the run; then chat answers."""
    from qlora.chat import ChatEngine
    from qlora.config import GenerationSettings

    jobs = JobManager()
    running = threading.Event()
    jobs.subscribe(lambda e: running.set() if isinstance(e, Progress) else None)
    jobs.start(tiny_cfg(output_dir=str(runs_root), max_steps=500, run_name="stopme"))
    assert running.wait(120), jobs.state().error

    chat = ChatEngine(str(tiny_llama_dir), quantize="nf4", precision="fp32")
    settings = GenerationSettings(max_new_tokens=4, temperature=0)
    t0 = time.perf_counter()
    with pytest.raises(BusyError, match="the GPU is busy"):
        next(chat.stream_pair([], [], "hello", settings, "earlier"))
    assert time.perf_counter() - t0 < 1  # a message at once, not a wait behind the run
    assert chat.model is None  # it did not even load a model next to the training one

    with pytest.raises(BusyError, match="a run is already active"):
        jobs.start(tiny_cfg(output_dir=str(runs_root)))
    stopper = threading.Thread(target=jobs.stop)  # "a second browser": another thread, no shared handle but `jobs`
    stopper.start()
    stopper.join()
    state = jobs.wait(120)
    assert state.status == "stopped" and state.step < 500
    assert {r.name: r for r in runs.list_runs(runs_root)}["stopme"].usable

    name = chat.load_adapter(runs_root / "earlier")
    *_, (base, tuned) = chat.stream_pair([], [], "hello", settings, name)
    assert isinstance(base, str) and isinstance(tuned, str)
    assert not gpu_lock.locked()


# === Secrets ===============================================================================================
def assert_no_canary(folder: Path) -> None:
    hits = [p for p in folder.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert hits == [], hits


def test_a_token_never_reaches_logs_files_args_metrics_or_events(tiny_cfg, tmp_path, capfd, caplog, monkeypatch):
    import logging

    caplog.set_level(logging.DEBUG)
    events = []
    # a good run with checkpoints (training_args.bin is a pickle of the arguments)
    run_dir = train(tiny_cfg(max_steps=2, save_steps=1, run_name="tok"), events.append, token=CANARY)
    assert list((run_dir / "checkpoints").rglob("training_args.bin"))
    # a failing run (the error path formats messages and logs a traceback)
    inject(monkeypatch, RaiseAt(1, RuntimeError, "boom"))
    with pytest.raises(RuntimeError):
        train(tiny_cfg(max_steps=3, run_name="tokfail"), events.append, token=CANARY)
    monkeypatch.undo()
    # bad data and a bad model, both with the token
    with pytest.raises(DataError):
        train(tiny_cfg(dataset=str(tmp_path / "missing.jsonl")), events.append, token=CANARY)
    with pytest.raises(ModelError):
        train(tiny_cfg(base_model="nobody-xyz/gated"), events.append, token=CANARY)

    assert_no_canary(tmp_path / "runs")
    out, err = capfd.readouterr()
    assert CANARY not in out + err
    assert CANARY not in caplog.text
    assert CANARY not in repr(events)
    assert CANARY not in repr(dict(os.environ))  # never process-global, where another visitor would use it
