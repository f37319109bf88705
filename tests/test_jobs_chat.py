"""The background job manager and side-by-side chat, on the real 4-bit path with a tiny Llama."""
import contextlib
import threading
from pathlib import Path

import pytest

from qlora.chat import ChatEngine
from qlora.config import GenerationSettings
from qlora.device import BusyError, gpu_lock
from qlora.jobs import JobManager


def test_job_runs_in_background_refuses_a_second_start_and_stops(tiny_cfg):
    jobs = JobManager()
    cfg = tiny_cfg(max_steps=200)
    jobs.start(cfg)
    assert jobs.state().started_at  # set at the click: the page says "started HH:MM" while the model loads
    loading = jobs.state().dataset  # the name the status uses while the model loads ...
    with pytest.raises(BusyError, match="a run is already active") as busy:
        jobs.start(tiny_cfg())
    assert "?" not in str(busy.value)
    # wait until it is really training, then stop from "another page"
    for _ in range(600):
        if jobs.state().step >= 2:
            break
        threading.Event().wait(0.1)
    assert jobs.state().dataset == loading == Path(cfg.dataset).name  # ... is the one it uses while training
    jobs.stop()
    state = jobs.wait(120)
    assert state.status == "stopped" and 2 <= state.step < 200, state.summary()
    assert state.losses and state.run_dir
    assert not gpu_lock.locked()  # released however the run ended
    # and a new run can start afterwards
    jobs.start(tiny_cfg(max_steps=2))
    assert jobs.wait(120).status == "finished"


def test_failure_in_the_thread_is_shown_not_swallowed(tiny_cfg, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    jobs = JobManager()
    jobs.start(tiny_cfg(dataset=str(bad)))
    state = jobs.wait(60)
    assert state.status == "failed" and "bad.csv: no usable column" in state.error
    assert not gpu_lock.locked()


@pytest.fixture(scope="module")
def trained_run(tiny_llama_dir, tmp_path_factory):
    import json

    from qlora.config import TrainConfig
    from qlora.train import train

    from conftest import MEMO_ROWS

    data = tmp_path_factory.mktemp("data") / "memo.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in MEMO_ROWS))
    cfg = TrainConfig(base_model=str(tiny_llama_dir), dataset=str(data), output_dir=str(data.parent / "runs"),
                      max_steps=20, max_length=64, learning_rate=1e-2, lr_scheduler="constant", warmup_ratio=0.0,
                      gradient_checkpointing=False, group_by_length=False, lora_dropout=0.0,
                      target_modules=["all-linear"])
    return train(cfg)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return ChatEngine(str(tiny_llama_dir), quantize="nf4", precision="fp32")


def test_batched_side_by_side_equals_two_sequential_generations(engine, trained_run):
    name = engine.load_adapter(trained_run)
    settings = GenerationSettings(temperature=0, max_new_tokens=12)
    updates = list(engine.stream_pair([], [], "What is the secret word?", settings, name))
    assert len(updates) > 2  # streamed token by token, not all at once
    base, tuned = updates[-1]
    assert (base, tuned) == engine.generate_sequential("What is the secret word?", settings, name)
    assert base != tuned
    assert "banana" in tuned  # the adapter learned the memorization set; the base did not
    assert "banana" not in base


def test_row_by_row_parts_are_patched_only_during_the_batched_pass(engine, trained_run):
    """Inside one_row_at_a_time the chosen modules compute row by row (same answers on the CPU); afterwards every
    module is as it was, so a sequential generate runs the stock code."""
    import torch

    from qlora import rowexact as chat  # today's eager path (the fallback) moved out of qlora/chat.py

    name = engine.load_adapter(trained_run)
    settings = GenerationSettings(temperature=0, max_new_tokens=6)
    reference = engine.generate_sequential("Who guards the gate?", settings, name)
    model = engine.model  # loaded (and the adapter attached) by the first request
    before = {id(m): m.__dict__.get("forward") for m in model.modules()}
    rows = []
    head = model.get_output_embeddings()
    head.forward = lambda x: (rows.append(x.shape[0]), type(head).forward(head, x))[1]  # a spy under the wrapper
    spy = head.forward
    try:
        with chat.one_row_at_a_time(model, ("head", "linear-prefill", "norm")):
            with torch.no_grad():
                model(input_ids=torch.tensor([[1, 450, 7035]] * 2))
        assert rows == [1, 1]  # the LM head saw one row at a time
        assert head.forward is spy
    finally:
        del head.forward
    assert {id(m): m.__dict__.get("forward") for m in model.modules()} == before
    for parts in [("head", "linear-prefill", "norm"), ("norm",), ()]:
        chat_parts, chat.ROW_BY_ROW = chat.ROW_BY_ROW, parts
        try:
            assert list(engine.stream_pair([], [], "Who guards the gate?", settings, name))[-1] == reference
        finally:
            chat.ROW_BY_ROW = chat_parts


def test_adapter_rows_are_slices_and_each_row_matches_its_one_row_pass(engine, trained_run):
    """Inside adapter_rows_as_slices the mixed-adapter forward never indexes rows with a list (on a GPU each such
    index is a copy that waits for the GPU); each row of a mixed batch gets the bits of its own 1-row pass, and the
    logits are peft's up to rounding (the adapter runs in the model's dtype with the scaling folded into B). Rows of
    one adapter apart are left to peft. Afterwards the LoRA layers run peft's code again."""
    import torch
    from torch.overrides import TorchFunctionMode

    from qlora.rowexact import BASE, adapter_rows_as_slices  # today's eager path, moved out of qlora/chat.py

    class ListIndexes(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[1], list):
                self.count += 1
            return func(*args, **(kwargs or {}))

    name = engine.load_adapter(trained_run)
    list(engine.stream_pair([], [], "hi", GenerationSettings(temperature=0, max_new_tokens=2), name))  # loads, attaches
    model = engine.model
    ids = torch.tensor([[1, 450, 7035, 338]] * 3)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]

    def logits(names, sliced):
        counter = ListIndexes()
        with torch.inference_mode(), counter:
            with adapter_rows_as_slices(model) if sliced else contextlib.nullcontext():
                out = model(input_ids=ids[:len(names)], adapter_names=names).logits
        return out, counter.count

    batched, batched_lists = logits([BASE, name], sliced=True)
    tuned, tuned_lists = logits([name], sliced=True)
    base, _ = logits([BASE], sliced=True)
    assert batched_lists == tuned_lists == 0
    assert torch.equal(batched[0], base[0]) and torch.equal(batched[1], tuned[0])
    stock, stock_lists = logits([BASE, name], sliced=False)
    assert stock_lists == 3 * len(lora_layers)  # x[rows]; result[rows] += ...: what the slices spare
    assert not torch.equal(batched[0], batched[1])  # the adapter changes the logits...
    torch.testing.assert_close(batched, stock, rtol=1e-4, atol=1e-4)  # ...as peft's own forward does
    apart, apart_lists = logits([name, BASE, name], sliced=True)
    assert torch.equal(apart, logits([name, BASE, name], sliced=False)[0]) and apart_lists > 0  # peft's own path
    assert not any("_mixed_batch_forward" in m.__dict__ for m in lora_layers)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_reduces_each_row_alone_and_matches_llama(dtype):
    """The row-by-row RMSNorm runs only its mean one row at a time and gives, row for row, Llama's own norm."""
    import torch
    from torch.overrides import TorchFunctionMode
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qlora.rowexact import one_row_at_a_time

    class MeanRows(TorchFunctionMode):
        rows: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.mean:
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    norm = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = (torch.randn(3, 5, 64) * 3).to(getattr(torch, dtype))
    alone = torch.cat([norm(x[i:i + 1]) for i in range(3)])
    with one_row_at_a_time(norm, ("norm",)), MeanRows() as spy:
        batched = norm(x)
    assert spy.rows == [1, 1, 1]
    assert torch.equal(batched, alone) and batched.dtype == alone.dtype
    assert "forward" not in norm.__dict__


def test_sampling_is_reproducible_with_the_same_seed(engine, trained_run):
    name = engine.load_adapter(trained_run)
    s = GenerationSettings(temperature=1.0, top_p=0.9, seed=3, max_new_tokens=8)
    a = list(engine.stream_pair([], [], "Who guards the gate?", s, name))[-1]
    b = list(engine.stream_pair([], [], "Who guards the gate?", s, name))[-1]
    assert a == b


def test_multi_turn_with_system_prompt_and_prompt_view(engine, trained_run):
    name = engine.load_adapter(trained_run)
    s = GenerationSettings(temperature=0, max_new_tokens=6, system_prompt="Be brief.")
    base1, tuned1 = list(engine.stream_pair([], [], "Who guards the gate?", s, name))[-1]
    # each pane continues its own conversation
    last = list(engine.stream_pair([("Who guards the gate?", base1)], [("Who guards the gate?", tuned1)],
                                   "And the sky?", s, name))[-1]
    assert len(last) == 2
    view = engine.prompt([("Who guards the gate?", tuned1)], "And the sky?", "Be brief.")
    assert view.text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWho guards the gate? [/INST]")
    assert view.text.endswith("<s>[INST] And the sky? [/INST]")
    assert view.token_ids[0] == engine.tokenizer.bos_token_id and len(view.tokens) == len(view.token_ids)


def test_chat_says_busy_while_the_gpu_is_taken(engine, trained_run):
    name = engine.load_adapter(trained_run)
    with gpu_lock:
        with pytest.raises(BusyError, match="busy"):
            next(engine.stream_pair([], [], "hi", GenerationSettings(), name))


def test_stop_generation(engine, trained_run):
    name = engine.load_adapter(trained_run)
    stop = threading.Event()
    stream = engine.stream_pair([], [], "Tell me a story", GenerationSettings(temperature=0, max_new_tokens=200),
                                name, stop)
    first = next(stream)
    stop.set()
    rest = list(stream)
    assert len(rest) < 20 and not gpu_lock.locked()
    assert first is not None
