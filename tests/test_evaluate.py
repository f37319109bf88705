"""The evaluation card (issue 13) through the core and the CLI: real tiny Llama runs in 4 bits on the CPU."""
from __future__ import annotations

import json
import math
import threading

import pytest

from conftest import MEMO_ROWS
from qlora import runs
from qlora.data import DataError
from qlora.evaluate import EvalStopped, encode_row, evaluate_run, summary
from qlora.model import BusyError, gpu_lock
from qlora.train import train
from test_cli import cli


@pytest.fixture(scope="module")
def memo_run(tmp_path_factory, tiny_llama_dir):
    """A run that memorized the four memo rows (30 steps), with a held-out split of its own."""
    from qlora.config import TrainConfig

    root = tmp_path_factory.mktemp("evalrun")
    memo = root / "memo.jsonl"
    memo.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in MEMO_ROWS * 2),
                    encoding="utf-8")
    cfg = TrainConfig(base_model=str(tiny_llama_dir), dataset=str(memo), output_dir=str(root / "runs"),
                      run_name="memo", quantize="nf4", batch_size=4, max_steps=30, max_length=64, learning_rate=1e-2,
                      warmup_ratio=0.0, lr_scheduler="constant", gradient_checkpointing=False,
                      group_by_length=False, lora_dropout=0.0, eval_fraction=0.25, target_modules=["all-linear"])
    events = []
    run_dir = train(cfg, events.append)
    return run_dir, memo, events


def test_answer_tokens_are_those_after_each_inst_through_eos(llama_tokenizer):
    text = "<s>[INST] Hi? [/INST] Hello there. </s><s>[INST] And you? [/INST] Fine. </s>"
    row = encode_row(text, llama_tokenizer, 1024)
    answers = [llama_tokenizer.decode([t for t, a in zip(row.ids, row.answer) if a])]
    spans, current = [], []
    for t, a in zip(row.ids, row.answer):
        if a:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [llama_tokenizer.decode(s) for s in spans] == ["Hello there. </s>", "Fine. </s>"], answers
    assert row.prompt == "<s>[INST] Hi? [/INST] Hello there. </s><s>[INST] And you? [/INST]"
    assert row.reference == "Fine."
    assert llama_tokenizer.decode(row.prompt_ids) == "<s> [INST] Hi? [/INST] Hello there. </s><s> [INST] And you? [/INST]"
    short = encode_row(text, llama_tokenizer, 12)  # truncation cuts ids and mask alike
    assert len(short.ids) == len(short.answer) == 12


def test_the_end_of_a_run_with_held_out_rows_writes_the_card(memo_run):
    run_dir, _, events = memo_run
    card = json.loads((run_dir / "eval.json").read_text())
    assert card["run"] == "memo" and card["rows"] == 2 and card["answer_tokens"] > 0
    assert card["source"].startswith("eval split")
    for who in ("base", "adapter"):
        assert math.isfinite(card[who]["loss"]) and card[who]["perplexity"] == pytest.approx(math.exp(card[who]["loss"]))
    assert len(card["answers"]) == 2 and all(a["base"] and a["adapter"] for a in card["answers"])
    logs = [e.line for e in events if type(e).__name__ == "Log"]
    assert any(line.startswith("evaluation card: ") for line in logs)  # progress
    assert any(line.startswith("base     loss") for line in logs)  # the figures, in the run's log
    assert type(events[-1]).__name__ == "Finished"  # the card comes before the run says it is done


def test_on_demand_the_figures_are_the_models_own_and_the_adapter_is_ahead_on_rows_it_learnt(memo_run,
                                                                                             tiny_llama_dir):
    """Every row of the memo file: the adapter memorized them, so it is far ahead; the base figure is exactly what
    the untouched 4-bit base gives on the answer tokens, computed here by hand."""
    import torch
    import torch.nn.functional as F

    from qlora.model import load_base, load_tokenizer

    run_dir, memo, _ = memo_run
    seen = []
    card = evaluate_run(run_dir, dataset=str(memo), progress=lambda done, total: seen.append((done, total)))
    assert card["rows"] == 8 and card["rows_adapter_ahead"] == 8
    assert card["adapter"]["loss"] < 0.5 * card["base"]["loss"]
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert card["helped_most"] and card["helped_most"][0]["change"] <= card["helped_most"][-1]["change"] < 0
    assert any("banana" in a["adapter"] or "dragon" in a["adapter"] for a in card["answers"]), card["answers"]
    assert json.loads((run_dir / "eval.json").read_text())["rows"] == 8  # saved

    tok = load_tokenizer(str(tiny_llama_dir))
    base = load_base(str(tiny_llama_dir), "nf4", "fp32")
    base.eval()
    from qlora.data import prepare

    total, count = 0.0, 0
    for text in prepare(str(memo)).train:
        row = encode_row(text, tok, 64)
        ids = torch.tensor([row.ids])
        with torch.no_grad():
            losses = F.cross_entropy(base(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        mask = torch.tensor(row.answer[1:])
        total, count = total + float(losses[mask].sum()), count + int(mask.sum())
    assert card["answer_tokens"] == count
    assert card["base"]["loss"] == pytest.approx(total / count, rel=1e-5)


def test_a_bad_eval_file_gets_the_usual_message_before_any_model_loads(memo_run, tmp_path):
    run_dir, _, _ = memo_run
    before = (run_dir / "eval.json").read_bytes()
    for name, content, says in (
            ("cut.jsonl", '{"text": "<s>[INST] a [/INST] b </s>"}\n{"text": "<s>[INST] c', r"cut.jsonl: line 2: truncated"),
            ("cols.jsonl", '{"prompt": "a", "completion": "b"}\n', r"cols.jsonl: no usable column"),
            ("empty.jsonl", "", r"empty.jsonl: the file is empty")):
        (tmp_path / name).write_text(content)
        gpu_lock.acquire()  # held: a model load would fail with BusyError, so the message comes before any load
        try:
            with pytest.raises(DataError, match=says):
                evaluate_run(run_dir, dataset=str(tmp_path / name))
        finally:
            gpu_lock.release()
    assert (run_dir / "eval.json").read_bytes() == before


def test_a_long_set_reports_progress_and_stops_on_request_saving_nothing(memo_run, tmp_path):
    run_dir, _, _ = memo_run
    before = (run_dir / "eval.json").read_bytes()
    long_file = tmp_path / "long.jsonl"
    long_file.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                                 for i in range(300)))
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done == 5:
            stop.set()

    with pytest.raises(EvalStopped, match="stopped after 5 of 300 rows; nothing was saved"):
        evaluate_run(run_dir, dataset=str(long_file), progress=progress, stop=stop)
    assert seen[0] == (1, 306) and len(seen) == 5
    assert (run_dir / "eval.json").read_bytes() == before
    assert not gpu_lock.locked()
    card = evaluate_run(run_dir, dataset=str(long_file), rows=3)  # usable afterwards; --rows caps the set
    assert card["rows"] == 3 and card["source"].startswith("first 3 rows of long.jsonl")


def test_evaluation_takes_the_gpu_lock_and_says_busy(memo_run):
    run_dir, memo, _ = memo_run
    gpu_lock.acquire()
    try:
        with pytest.raises(BusyError, match="the GPU is busy"):
            evaluate_run(run_dir, dataset=str(memo))
    finally:
        gpu_lock.release()


def test_a_run_without_held_out_rows_asks_for_a_file(tiny_cfg):
    run_dir = train(tiny_cfg(max_steps=1))
    assert not (run_dir / "eval.json").exists()  # no held-out rows: no card at the end
    with pytest.raises(ValueError, match="kept no held-out rows .eval_fraction 0.: give an eval file"):
        evaluate_run(run_dir)


def test_cli_prints_the_same_figures_it_saves_and_bad_input_exits_2(memo_run, tmp_path):
    run_dir, memo, _ = memo_run
    r = cli("eval", "--adapter", str(run_dir / "adapter"), "--dataset", str(memo), "--rows", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((run_dir / "eval.json").read_text())
    for line in summary(card):
        assert line in r.stdout, (line, r.stdout)
    assert "=== prompt ===" in r.stdout and "--- fine-tuned ---" in r.stdout and "evaluating" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "<s>[INST] cut')
    r = cli("eval", "--adapter", str(run_dir), "--dataset", str(tmp_path / "bad.jsonl"))
    assert r.returncode == 2 and "error: bad.jsonl: line 1: truncated line" in r.stderr and "Traceback" not in r.stderr
    r = cli("eval", "--adapter", str(tmp_path), "--rows", "2")
    assert r.returncode == 2 and "not a run folder" in r.stderr
    assert json.loads((run_dir / "eval.json").read_text()) == card  # a failed eval keeps the last card
