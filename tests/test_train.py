"""The real 4-bit QLoRA path on the CPU: tiny Llama, real Llama 2 tokenizer, real SFTTrainer."""
from __future__ import annotations

import json
import math
import threading

import pytest

from qlora import runs
from qlora.events import EvalLoss, Failed, Finished, Log, Progress, Started, Stopped
from qlora.train import train


def test_qlora_loss_falls_and_run_folder_is_complete(tiny_cfg):
    events = []
    cfg = tiny_cfg(max_steps=30, eval_fraction=0.25, run_name="memo", target_modules=["all-linear"])
    run_dir = train(cfg, events.append)

    losses = [e.loss for e in events if isinstance(e, Progress)]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # it memorizes

    # event order: Started first, Progress steps strictly increasing, Finished last
    kinds = [type(e) for e in events if not isinstance(e, Log)]
    assert kinds[0] is Started and kinds[-1] is Finished
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == sorted(steps) == list(range(1, 31))
    assert any(isinstance(e, EvalLoss) for e in events)
    assert events[-1].run_dir == str(run_dir)

    # the run folder holds everything needed to reproduce and reload
    for name in ("run.json", "config.yaml", "prompt_format.json", "versions.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    runs.verify_adapter(run_dir / "adapter")
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["step"] == 30
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["type"] == "Progress" for x in lines) == 30
    assert "peft" in json.loads((run_dir / "versions.json").read_text())
    cfg_back = type(cfg).from_yaml(run_dir / "config.yaml")
    assert cfg_back == cfg
    [info] = runs.list_runs(cfg.output_dir)
    assert info.usable and info.status == "finished"


def test_reloaded_adapter_gives_identical_logits_and_disabled_adapter_is_the_base(tiny_cfg, tiny_llama_dir):
    import torch
    from peft import PeftModel

    from qlora.model import load_base, load_tokenizer
    from qlora.prompts import chat_prompt
    from qlora.runs import prompt_format

    run_dir = train(tiny_cfg(max_steps=4))
    tok = load_tokenizer(str(tiny_llama_dir))
    ids = torch.tensor([chat_prompt(prompt_format(run_dir), tok, [], "What is the secret word?").ids])

    untouched = load_base(str(tiny_llama_dir), "nf4", "fp32")
    untouched.eval()
    with torch.no_grad():
        base_logits = untouched(ids).logits

    model = PeftModel.from_pretrained(load_base(str(tiny_llama_dir), "nf4", "fp32"), str(run_dir / "adapter"))
    model.eval()
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            disabled = model(ids).logits
    assert torch.equal(disabled, base_logits)  # exactly the untouched base
    assert not torch.allclose(tuned, base_logits)  # the adapter changes something

    again = PeftModel.from_pretrained(load_base(str(tiny_llama_dir), "nf4", "fp32"), str(run_dir / "adapter"))
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, tuned)  # a reloaded adapter is the same adapter


def test_stop_mid_run_still_saves_the_partial_adapter(tiny_cfg):
    stop = threading.Event()
    events = []

    def emit(e):
        events.append(e)
        if isinstance(e, Progress) and e.step == 2:
            stop.set()

    run_dir = train(tiny_cfg(max_steps=50), emit, stop)
    assert isinstance(events[-1], Stopped)
    assert events[-1].step <= 3  # ends at the next step boundary, not at 50
    runs.verify_adapter(run_dir / "adapter")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    assert runs.list_runs(run_dir.parent)[0].usable


def test_bad_dataset_fails_before_any_folder_is_written(tiny_cfg, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "<s>[INST] hi [/INST] ok </s>"}\n{"text": "<s>[INST] cut', encoding="utf-8")
    cfg = tiny_cfg(dataset=str(bad))
    events = []
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: truncated"):
        train(cfg, events.append)
    assert isinstance(events[-1], Failed) and "line 2" in events[-1].error
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_same_seed_gives_the_same_starting_adapter_twice_in_one_process(tiny_cfg, tmp_path):
    """The app trains many runs in one process: LoRA's random A matrices must come from the config's seed, not from
    whatever the previous run left in the global generator."""
    import torch

    from qlora.data import prepare, tokenize
    from qlora.model import load_base, load_tokenizer
    from qlora.train import build_trainer

    cfg = tiny_cfg()
    tok = load_tokenizer(cfg.base_model)
    ids = tokenize(prepare(cfg.dataset).train, tok, cfg.max_length)

    def start(seed):
        torch.manual_seed(seed * 7 + 1)  # a different global state each time, as after an earlier run
        trainer = build_trainer(tiny_cfg(seed=seed), load_base(cfg.base_model, cfg.quantize, "fp32"), tok, ids, [],
                                "fp32", tmp_path / f"run-{seed}-{torch.initial_seed()}")
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}

    first, again, other = start(3), start(3), start(4)
    assert first.keys() == again.keys() and first
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_a_cpu_4bit_base_keeps_its_layout_and_precision_in_eval_mode(tiny_llama_dir):
    """bitsandbytes 0.50 on an AVX512-BF16 CPU repacks nf4 weights in place at the first eval forward and computes in
    bf16 through a native kernel that crashed the tests (segfault); load_base turns that path off on every CPU."""
    import torch
    import bitsandbytes.functional as bnbf

    from qlora.model import load_base

    model = load_base(str(tiny_llama_dir), "nf4", "fp32").eval()
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = q(x)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    reference = x @ bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).t()
    assert out.dtype == torch.float32 and torch.allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_run_prints_no_library_warning(tiny_cfg, checkpointing):
    """A run and a chat adapter, in a fresh process with Python's default warning filters (as the app runs them),
    print no deprecation the user can do nothing about (issue 16.6: transformers 5's gradient-checkpointing names)."""
    import subprocess
    import sys

    from conftest import ROOT

    cfg = tiny_cfg(max_steps=2, gradient_checkpointing=checkpointing)
    code = ("import sys; from qlora.config import TrainConfig; from qlora.train import train; "
            "from qlora.chat import ChatEngine; "
            f"run = train(TrainConfig.from_yaml(sys.stdin.read())); "
            f"ChatEngine({cfg.base_model!r}, 'nf4').load_adapter(run)")
    r = subprocess.run([sys.executable, "-c", code], input=cfg.to_yaml(), capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr, r.stderr
    # nor bitsandbytes' advice to install `kernels` (a Hub download) on a CPU with AVX512-BF16: it runs its own kernel
    assert "kernels-community" not in r.stderr, r.stderr
