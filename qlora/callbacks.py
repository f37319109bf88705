"""TrainerCallbacks: turn the Trainer's hooks into events, honour the stop flag between steps, sample answers."""
from __future__ import annotations

import math
import threading
import time
from typing import Callable

from transformers import TrainerCallback

from .events import EvalLoss, Event, Log, Progress, Sample, Started
from .prompts import PromptFormat, chat_prompt, stop_ids

SAMPLE_PROMPTS = ("What is the capital of France?", "Give me one tip for learning to code.")


class EventCallback(TrainerCallback):
    """Emits Started / Progress / EvalLoss / Log; stops between steps when `stop` is set or the loss is not finite."""

    def __init__(self, emit: Callable[[Event], None], stop: threading.Event, run_dir: str, base_model: str,
                 dataset: str):
        self.emit, self.stop = emit, stop
        self.run_dir, self.base_model, self.dataset = run_dir, base_model, dataset
        self.t0 = time.perf_counter()
        self.tokens0 = 0
        self.first: tuple[float, int, int] | None = None  # (time, tokens seen, step) when this session's first step
        # ended (a resumed run's first step is not step 1)
        self.stop_requested = False
        self.bad_loss_step: int | None = None  # set when the loss went NaN/inf; train() reports it as a failure

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()
        self.tokens0 = state.num_input_tokens_seen
        self.first = None
        self.emit(Started(run_dir=self.run_dir, total_steps=state.max_steps, base_model=self.base_model,
                          dataset=self.dataset))

    def on_step_end(self, args, state, control, **kwargs):
        if self.first is None:
            self.first = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)
        if _any_rank(self.stop.is_set()):
            self.stop_requested = True  # on any rank: the others may not have seen the flag yet
            control.should_training_stop = True

    on_substep_end = on_step_end  # with gradient accumulation, stop inside a long step too

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step, total = state.global_step, state.max_steps
        elapsed = time.perf_counter() - self.t0
        if "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                self.bad_loss_step = step
                control.should_training_stop = True
            # rates from the steps after the first where there are some: the first step carries one-time work (the
            # card's warm-up and, on a compute-poor card, compiling the fused layers' kernels: 15-40 s), which would
            # overstate the ETA and understate tokens/s for most of a run
            t, tokens, steps = self.t0, self.tokens0, 1  # only the first step seen: nothing better to go on
            if self.first is not None and step > self.first[2]:
                t, tokens, steps = self.first[0], self.first[1], step - self.first[2]
            span = time.perf_counter() - t
            rate = (state.num_input_tokens_seen - tokens) / span if span > 0 else 0.0
            self.emit(Progress(step=step, total_steps=total, loss=loss, learning_rate=logs.get("learning_rate"),
                               tokens_per_s=rate, elapsed_s=elapsed,
                               eta_s=span / steps * (total - step) if self.first is not None else None,
                               epoch=logs.get("epoch")))
        if "eval_loss" in logs:
            self.emit(EvalLoss(step=step, loss=float(logs["eval_loss"])))
        shown = {k: v for k, v in logs.items() if k not in ("total_flos", "num_input_tokens_seen")}
        self.emit(Log(f"step {step}/{total} " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())))


class SampleCallback(TrainerCallback):
    """Every `every` steps, answers fixed prompts with the base (adapter disabled) and the adapter as it is now."""

    def __init__(self, emit: Callable[[Event], None], tokenizer, fmt: PromptFormat, every: int,
                 prompts=SAMPLE_PROMPTS, max_new_tokens: int = 48):
        self.emit, self.tokenizer, self.fmt, self.every = emit, tokenizer, fmt, every
        self.prompts, self.max_new_tokens = prompts, max_new_tokens
        self.base_answers: dict[str, str] = {}  # the base never changes: answer once

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.every or state.global_step % self.every or model is None:
            return
        for prompt in self.prompts:
            if prompt not in self.base_answers:
                with model.disable_adapter():
                    self.base_answers[prompt] = greedy_answer(model, self.tokenizer, self.fmt, prompt,
                                                              self.max_new_tokens)
            tuned = greedy_answer(model, self.tokenizer, self.fmt, prompt, self.max_new_tokens)
            self.emit(Sample(step=state.global_step, prompt=prompt, base=self.base_answers[prompt], tuned=tuned))


def greedy_answer(model, tokenizer, fmt: PromptFormat, user: str, max_new_tokens: int) -> str:
    """A short greedy answer to one user turn, prompted and stopped as chat prompts the run (prompts.chat_prompt)."""
    return greedy_continuation(model, tokenizer, chat_prompt(fmt, tokenizer, [], user).ids, stop_ids(fmt, tokenizer),
                               max_new_tokens)


def greedy_continuation(model, tokenizer, prompt_ids: list[int], stops: list[int], max_new_tokens: int) -> str:
    """The greedy answer to a prompt's ids, ending at any of `stops` (prompts.stop_ids), in the middle of training
    too: eval mode and the cache for the call, training mode after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([prompt_ids], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=stops)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    finally:
        if was_training:
            model.train()


def _any_rank(flag: bool) -> bool:
    """True if any process saw the flag: data-parallel ranks must stop at the same step or they deadlock."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    import torch

    from .device import current_gpu

    device = torch.device("cuda", current_gpu()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
