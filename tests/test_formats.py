"""The prompt format follows the model, through real training runs: chosen once, saved in the run folder, read back by a
new chat engine; the embedded SmolLM2 trains and chats in its own ChatML; rows whose answers truncation removes."""
from __future__ import annotations

import json

import pytest

from test_cli import cli

from qlora.config import TrainConfig, embedded_defaults
from qlora.data import DataError
from qlora.events import Failed, Log
from qlora.train import train


def test_a_run_is_prompted_in_the_format_it_trained_in_after_a_restart(chatml_llama_dir, tiny_cfg, tmp_path):
    """Two runs on one ChatML model, one in its own template and one told to use Llama 2. A new chat engine (as after
    a restart) reads each run's format from its folder and prompts each adapter, both panes, in it."""
    from qlora.chat import ChatEngine
    from qlora.config import GenerationSettings

    events: list = []
    own = train(tiny_cfg(base_model=str(chatml_llama_dir), run_name="own", max_steps=2), events.append)
    assert any(isinstance(e, Log) and e.line.startswith("prompt format: the model's own chat template; loss on the "
                                                         "answers only") for e in events)
    forced = train(tiny_cfg(base_model=str(chatml_llama_dir), run_name="forced", max_steps=2, prompt_format="llama2"))
    assert json.loads((own / "prompt_format.json").read_text())["name"] == "chat_template"
    assert json.loads((forced / "prompt_format.json").read_text())["name"] == "llama2"

    engine = ChatEngine(str(chatml_llama_dir), "nf4")
    a, b = engine.load_adapter(own), engine.load_adapter(forced)
    chatml = engine.prompt([("Hi", "Hello!")], "Who guards the gate?", "Be brief.", adapter=a)
    assert chatml.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>"
                           "assistant\nHello!<|im_end|>\n<|im_start|>user\nWho guards the gate?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert chatml.token_ids.count(32000) == 5 and chatml.token_ids.count(32001) == 4  # one per turn
    # the "show prompt" inspector shows exactly these ids, for the same chat as the app holds it
    from ui.chat import prompt_text

    hist = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    shown = prompt_text(engine.tokenizer, engine.prompt_format(a), hist, hist, "Who guards the gate?", "Be brief.")
    assert f"### token ids\n{chatml.token_ids}\n" in shown and chatml.text in shown
    llama = engine.prompt([], "Who guards the gate?", adapter=b)
    assert llama.text == "<s>[INST] Who guards the gate? [/INST]" and llama.token_ids[0] == 1
    settings = GenerationSettings(temperature=0, max_new_tokens=4)
    for name in (a, b):  # both panes answer, each adapter prompted its own way
        base, tuned = list(engine.stream_pair([], [], "Who guards the gate?", settings, name))[-1]
        assert (base, tuned) == engine.generate_sequential("Who guards the gate?", settings, name)


def test_a_resumed_run_keeps_the_format_it_started_with(chatml_llama_dir, tiny_cfg, tmp_path):
    run = train(tiny_cfg(base_model=str(chatml_llama_dir), run_name="r", max_steps=2, save_steps=1,
                         prompt_format="llama2"))
    events: list = []
    # resumed with a config that would now choose the model's own template: the run's saved format wins
    train(tiny_cfg(base_model=str(chatml_llama_dir), max_steps=3, save_steps=1), events.append, resume_from=run)
    assert any(isinstance(e, Log) and e.line.startswith("prompt format: Llama 2") for e in events)
    assert json.loads((run / "prompt_format.json").read_text())["name"] == "llama2"


def test_no_row_keeping_an_answer_refuses_the_run_before_the_model_loads(tiny_cfg, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"instruction": "word " * 40 + str(i), "output": "a"}) + "\n" for i in range(3)))
    events: list = []
    with pytest.raises(DataError, match=r"no train row keeps any answer token within max_length=16"):
        train(tiny_cfg(dataset=str(path), max_length=16), events.append)
    assert isinstance(events[-1], Failed) and "raise max_length" in events[-1].error
    assert not (tmp_path / "runs").exists()


def test_the_cli_warns_when_truncation_removes_answers_and_refuses_when_it_removes_all(tiny_llama_dir, tmp_path):
    some = tmp_path / "some.jsonl"
    some.write_text(json.dumps({"instruction": "word " * 40, "output": "a"}) + "\n"
                    + json.dumps({"instruction": "q", "output": "a"}) + "\n")
    base = ["train", "--model", str(tiny_llama_dir), "--output-dir", str(tmp_path / "runs"), "--max-steps", "1",
            "--max-length", "16", "--batch-size", "1", "--gradient-checkpointing", "false"]
    r = cli(*base, "--dataset", str(some))
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("warning: 1 of 2 train rows dropped: truncation to max_length=16 tokens removes their whole answer"
            in r.stderr)
    every = tmp_path / "every.jsonl"
    every.write_text(json.dumps({"instruction": "word " * 40, "output": "a"}) + "\n")
    r = cli(*base, "--dataset", str(every), "--run-name", "none")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: no train row keeps any answer token within max_length=16" in r.stderr
    assert not (tmp_path / "runs" / "none").exists()


# --- the embedded default: SmolLM2 in its own ChatML -----------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from qlora.model import load_base, load_tokenizer, resolve

    path = resolve("smollm2-135m")
    return load_base(path, "none", "fp32"), load_tokenizer(path)


def test_the_embedded_base_answers_sensibly_in_its_own_template(smollm2):
    """In the Llama 2 format it answered "The answer is: [S]Bombay" to the capital of Germany; in ChatML it knows."""
    from qlora.callbacks import greedy_answer
    from qlora.prompts import choose

    model, tok = smollm2
    fmt = choose(tok)
    assert fmt.name == "chat_template" and fmt.source == "tokenizer"
    answer = greedy_answer(model, tok, fmt, "What is the capital of France?", 12)
    assert "Paris" in answer, answer


def held_out_losses(run_dir, model, tokenizer, rows) -> tuple[float, float]:
    """(base, adapter) mean loss per trained token over the held-out rows, as the trainer's labels define it."""
    import torch
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    tuned.eval()

    def mean_loss(disabled: bool) -> float:
        total = count = 0.0
        for row in rows:
            ids, labels = torch.tensor([row.ids]), torch.tensor([row.labels])
            with torch.no_grad():
                if disabled:
                    with tuned.disable_adapter():
                        logits = tuned(input_ids=ids).logits
                else:
                    logits = tuned(input_ids=ids).logits
            target = labels[0, 1:]
            losses = torch.nn.functional.cross_entropy(logits[0, :-1], target, ignore_index=-100, reduction="sum")
            total += losses.item()
            count += (target != -100).sum().item()
        return total / count

    try:
        return mean_loss(True), mean_loss(False)
    finally:
        tuned.unload()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a few minutes alone on 2 cores; more on a shared machine
def test_the_embedded_adapter_beats_the_base_on_held_out_rows_in_its_own_format(tmp_path, capsys):
    """The embedded preset (30 steps) on 80% of the sample; the loss on the answers of the other 20%, in ChatML."""
    from qlora.data import prepare, tokenize
    from qlora.model import load_base, load_tokenizer, resolve
    from qlora.runs import prompt_format

    cfg = TrainConfig.from_dict(dict(embedded_defaults(), output_dir=str(tmp_path), run_name="heldout",
                                     eval_fraction=0.2))
    run = train(cfg)
    fmt = prompt_format(run)
    assert fmt.name == "chat_template"
    path = resolve(cfg.base_model)
    tok = load_tokenizer(path)
    held = prepare(cfg.dataset, cfg.eval_fraction, cfg.seed).eval
    rows = tokenize(held, tok, cfg.max_length, fmt)
    base, tuned = held_out_losses(run, load_base(path, "none", "fp32"), tok, rows)
    with capsys.disabled():
        print(f"\nheld-out answer-token loss on {len(rows)} rows: base {base:.4f}, adapter {tuned:.4f}")
    assert tuned < base

