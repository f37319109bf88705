"""The evaluation card (issue 13) through the core and the CLI: real tiny Llama runs in 4 bits on the CPU."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from conftest import MEMO_ROWS
from qlora import runs
from qlora.data import DataError
from qlora.device import CHAT, CHAT_CARD, EVAL, TRAIN, BusyError, Cards, gpu_lock
from qlora.evaluate import EvalStopped, evaluate_run, summary
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


def hand_figures(run_dir, model_dir, dataset):
    """(base loss, answer tokens) over every row of `dataset`, computed here: the untouched 4-bit base, the rows
    tokenized as training tokenizes them in the run's saved format, the loss on the answers' tokens."""
    import torch
    import torch.nn.functional as F

    from qlora.data import prepare, tokenize
    from qlora.model import load_base, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    base = load_base(str(model_dir), "nf4", "fp32")
    base.eval()
    total, count = 0.0, 0
    for row in tokenize(prepare(str(dataset)).train, tok, 64, runs.prompt_format(run_dir)):
        ids = torch.tensor([row.ids])
        labels = torch.tensor([i if a else -100 for i, a in zip(row.ids, row.answer)][1:])
        with torch.no_grad():
            total += float(F.cross_entropy(base(ids).logits[0, :-1].float(), labels, ignore_index=-100,
                                           reduction="sum"))
        count += int((labels != -100).sum())
    return total / count, count


def test_the_end_of_a_run_with_held_out_rows_writes_the_card(memo_run):
    run_dir, _, events = memo_run
    card = json.loads((run_dir / "eval.json").read_text())
    assert card["run"] == "memo" and card["rows"] == 2 and card["tokens"] > 0
    # the tiny Llama's tokenizer is Llama 2's, whose recipe trains on the whole text: the card scores the answers
    assert card["loss_on"] == "answers" and "Llama 2" in card["prompt_format"]
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
    the untouched 4-bit base gives on the tokens the run trained on (Llama 2: the whole text), computed here by hand."""
    run_dir, memo, _ = memo_run
    seen = []
    card = evaluate_run(run_dir, dataset=str(memo), progress=lambda done, total: seen.append((done, total)))
    assert card["rows"] == 8 and card["rows_adapter_ahead"] == 8
    assert card["adapter"]["loss"] < 0.5 * card["base"]["loss"]
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert card["helped_most"] and card["helped_most"][0]["change"] <= card["helped_most"][-1]["change"] < 0
    assert any("banana" in a["adapter"] or "dragon" in a["adapter"] for a in card["answers"]), card["answers"]
    assert json.loads((run_dir / "eval.json").read_text())["rows"] == 8  # saved
    loss, tokens = hand_figures(run_dir, tiny_llama_dir, memo)
    assert card["tokens"] == tokens
    assert card["base"]["loss"] == pytest.approx(loss, rel=1e-5)


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
    gpu_lock.acquire()  # a run holding every card of this host (one device here)
    try:
        with pytest.raises(BusyError, match="^a training run holds the GPU; evaluate when it ends$"):
            evaluate_run(run_dir, dataset=str(memo))
    finally:
        gpu_lock.release()


@pytest.mark.parametrize("gpus", [0, 1])
def test_on_one_device_an_evaluation_takes_it_as_a_run_does_and_chat_is_told_so(memo_run, gpus):
    """The CPU or one GPU: the evaluation holds the one device (the app unloads chat's model first); meanwhile chat
    and a training start hear that an evaluation holds it, not that another chat does."""
    run_dir, memo, _ = memo_run
    cards = Cards(gpus)
    chat = cards.lease(CHAT, (CHAT_CARD,))
    assert chat.acquire(blocking=False)  # a visitor is being answered: the evaluation says so at once
    with pytest.raises(BusyError, match="^the GPU is busy answering a chat; try again in a moment$"):
        evaluate_run(run_dir, dataset=str(memo), cards=cards)
    chat.release()
    chat.loaded(True)  # loaded but idle: the evaluation takes the device and makes room first
    seen, rooms = [], []

    def progress(done, total):
        if done == 1:
            seen.append((cards.held(), chat.why_busy(), chat.acquire(blocking=False)))
            with pytest.raises(BusyError, match="^an evaluation holds the GPU; start the run when it ends$"):
                cards.take_training()

    evaluate_run(run_dir, dataset=str(memo), rows=2, progress=progress, cards=cards,
                 make_room=lambda: rooms.append(cards.held()))
    assert rooms == [{0: EVAL}]  # chat's model is unloaded with the device already taken: no visitor slips in
    assert seen == [({0: EVAL}, "an evaluation holds the GPU", False)]
    assert cards.held() == {}  # given back


def test_on_several_gpus_an_evaluation_leaves_a_loaded_chat_its_card(memo_run):
    run_dir, memo, _ = memo_run
    cards = Cards(4)
    chat = cards.lease(CHAT, (CHAT_CARD,))
    chat.loaded(True)
    run = cards.take_training()  # training on GPUs 1-3, chat keeps GPU 0: no card for an evaluation
    with pytest.raises(BusyError, match=r"^no GPU is free for an evaluation \(training on GPUs 1-3; GPU 0 stays "
                                        r"chat's\); try again when the run ends$"):
        evaluate_run(run_dir, dataset=str(memo), cards=cards)
    cards.give_back(TRAIN, run.train)
    held, rooms = [], []
    evaluate_run(run_dir, dataset=str(memo), rows=1, cards=cards, make_room=lambda: rooms.append(1),
                 progress=lambda done, total: held.append(cards.held()))
    assert held[0] == {3: EVAL} and rooms == []  # a card of its own: chat's model stays loaded, chat answers
    assert chat.acquire(blocking=False)
    chat.release()
    chat.loaded(False)  # no chat model: a run takes every card, so an evaluation must wait for it
    run = cards.take_training()
    with pytest.raises(BusyError, match=r"^no GPU is free for an evaluation \(training on GPUs 0-3\)"):
        evaluate_run(run_dir, dataset=str(memo), cards=cards)
    cards.give_back(TRAIN, run.train)
    assert cards.held() == {}


def test_a_chat_template_run_is_scored_on_its_answers_and_answered_in_its_own_format(chatml_llama_dir, tmp_path):
    """A run in ChatML: the loss is on the answers through <|im_end|> (as trained, nothing else), and the
    greedy answers are prompted with the template's generation prompt and end on its stop ids."""
    from qlora.config import TrainConfig
    from qlora.evaluate import evaluate_model
    from qlora.model import load_tokenizer

    memo = tmp_path / "memo.jsonl"
    memo.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in MEMO_ROWS),
                    encoding="utf-8")
    run_dir = train(TrainConfig(base_model=str(chatml_llama_dir), dataset=str(memo), output_dir=str(tmp_path / "runs"),
                                run_name="chatml", quantize="nf4", batch_size=4, max_steps=2, max_length=64,
                                gradient_checkpointing=False, group_by_length=False, lora_dropout=0.0))
    fmt = runs.prompt_format(run_dir)
    assert fmt.name == "chat_template"
    card = evaluate_run(run_dir, dataset=str(memo))
    loss, tokens = hand_figures(run_dir, chatml_llama_dir, memo)
    assert card["loss_on"] == "answers" and card["tokens"] == tokens
    assert card["base"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert "answer tokens" in summary(card)[0] and "chat template" in summary(card)[-1]
    tok = load_tokenizer(str(chatml_llama_dir))
    answered = sum(len(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for _, a in MEMO_ROWS)
    assert tokens == answered  # exactly the answers and each one's end-of-turn token
    assert [a["prompt"] for a in card["answers"]] == [f"user: {q}" for q, _ in MEMO_ROWS[:3]]
    assert [a["reference"] for a in card["answers"]] == [a for _, a in MEMO_ROWS[:3]]

    class Recorder:  # the model evaluate_model is given, recording what generate() is asked
        def __init__(self, model):
            self.model, self.calls = model, []

        def __getattr__(self, name):
            return getattr(self.model, name)

        def __call__(self, *args, **kwargs):
            return self.model(*args, **kwargs)

        def generate(self, **kwargs):
            self.calls.append(kwargs)
            return self.model.generate(**kwargs)

    from peft import PeftModel

    from qlora.model import load_base
    from qlora.prompts import build, chat_conversation, stop_ids

    model = Recorder(PeftModel.from_pretrained(load_base(str(chatml_llama_dir), "nf4", "fp32"),
                                               str(run_dir / "adapter")))
    from qlora.data import prepare

    evaluate_model(model, tok, fmt, prepare(str(memo)).train[:1], "memo", 64, answers=1)
    prompt = build(fmt, tok, chat_conversation([], MEMO_ROWS[0][0]))
    assert [c["input_ids"][0].tolist() for c in model.calls] == [prompt.ids, prompt.ids]  # base, then adapter
    assert prompt.text.endswith("<|im_end|>\n<|im_start|>assistant\n")  # the template's generation prompt
    assert all(c["eos_token_id"] == stop_ids(fmt, tok) for c in model.calls)


def test_an_end_of_run_card_that_fails_never_fails_the_run(tiny_cfg, monkeypatch):
    """Out of memory in the card (the real exception, raised where the card is computed): the run is finished on disk
    before the card starts, stays finished and usable, and its log says how to make the card later."""
    import torch

    from qlora import evaluate

    seen = []

    def out_of_memory(model, tokenizer, fmt, convs, source, *args, **kwargs):
        seen.append((runs.read_json(Path(cfg.output_dir) / cfg.run_name / "run.json").get("status"), fmt.name,
                     len(convs)))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluate, "evaluate_model", out_of_memory)
    cfg = tiny_cfg(max_steps=1, eval_fraction=0.25, run_name="oom")
    events = []
    run_dir = train(cfg, events.append)
    assert seen == [("finished", "llama2", 1)]  # run.json said finished before the card began
    assert runs.read_json(run_dir / "run.json")["status"] == "finished" and not (run_dir / "eval.json").exists()
    assert type(events[-1]).__name__ == "Finished"
    logs = [e.line for e in events if type(e).__name__ == "Log"]
    assert f"no evaluation card (CUDA out of memory. Tried to allocate 2.00 GiB); make it later: python -m qlora " \
           f"eval --adapter {run_dir}" in logs, logs[-3:]
    assert runs.usable_run(run_dir.parent, "oom").path == run_dir


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


def test_a_saved_card_is_read_only_when_it_is_one(memo_run, tmp_path):
    """eval.json is a file of a run folder, someone else's until checked: what is shown of it must be there."""
    import shutil

    from qlora.evaluate import load
    from qlora.export import reproducibility

    run_dir = tmp_path / "copy"
    shutil.copytree(memo_run[0], run_dir)
    card = load(run_dir)
    assert card is not None and card["run"] == "memo"
    for bad in ([1, 2], {"base": {"loss": "low"}}, dict(card, helped_most=[{"row": 1}]), dict(card, answers="x"),
                dict(card, tokens=None, base={"loss": None, "perplexity": 1.0})):
        (run_dir / "eval.json").write_text(json.dumps(bad))
        assert load(run_dir) is None, bad
        assert "### Evaluation" not in reproducibility(run_dir)  # the model card leaves it out, and is written
    (run_dir / "eval.json").write_text("version https://git-lfs.github.com/spec/v1\n")
    assert load(run_dir) is None
