"""The evaluation card: on held-out rows, the base (adapter disabled) vs the adapter, saved as eval.json in the run.

    mean loss and perplexity on the answer tokens, for each; the rows the adapter helped and hurt most (per-row loss
    change, with the text); greedy answers to a few held-out prompts, base and tuned side by side.

Computed at the end of a run with held-out rows (on the model still in memory), and on demand for any run
(`evaluate_run`: its own eval split, or another file), which loads the base as training did and takes the GPU lock.
Both answers come from one model: `disable_adapter()` is the base, bit for bit (tests/test_train.py).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import runs
from .config import TrainConfig
from .model import BusyError, gpu_lock
from .prompts import E_INST, EOS, encode

ANSWERS = 3  # held-out prompts answered greedily by both
ANSWER_TOKENS = 48  # as the sample answers during training: enough to see the voice, quick on a CPU
SHOWN = 3  # rows listed as helped most, and as hurt most
SHOWN_CHARS = 1500

Progress = Callable[[int, int], None]  # (rows done, rows in all)


class EvalStopped(Exception):
    """Stop was pressed; nothing was saved (an earlier eval.json is kept)."""


@dataclass
class Row:
    """One held-out row as the model sees it: ids, which of them are answer tokens, and its last prompt."""

    text: str
    ids: list[int]
    answer: list[bool]  # True where ids[i] is an answer token (loss is taken there)
    prompt: str  # the conversation up to the last answer: what the greedy answers continue
    prompt_ids: list[int]
    reference: str  # the dataset's last answer


def encode_row(text: str, tokenizer, max_length: int) -> Row:
    """A Llama 2 formatted row -> ids and answer mask: the tokens after each [/INST] up to and including </s>.

    The one place where evaluation depends on the prompt format: when qlora/prompts.py tokenizes rows by their
    structure (with answer-only labels), this becomes a call to that.
    """
    ids = encode(text, tokenizer)
    answer = [False] * len(ids)
    end = 0
    while (found := text.find(E_INST, end)) >= 0:
        end = found + len(E_INST)
        prefix = encode(text[:end], tokenizer)
        start = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
        for i in range(start, len(ids)):
            answer[i] = True
            if ids[i] == tokenizer.eos_token_id:
                break
    prompt = text[:end] if end else text
    reference = text[end:].strip() if end else ""
    reference = reference[:-len(EOS)].strip() if reference.endswith(EOS) else reference
    return Row(text, ids[:max_length], answer[:max_length], prompt, encode(prompt, tokenizer)[:max_length], reference)


# --- which rows ---------------------------------------------------------------------------------------------
def held_out(run_dir: Path, dataset: str | None = None, rows: int = 0, token: str | None = None) -> tuple[list[str], str]:
    """(texts, where they come from): every row of `dataset`, or the run's own eval split; the first `rows` only."""
    from .data import prepare

    cfg = run_config(run_dir)
    if dataset:
        data = prepare(dataset, 0.0, cfg.seed, token=token)
        texts, source = data.train, data.source
    else:
        if cfg.eval_fraction <= 0:
            raise ValueError(f"run {run_dir.name} kept no held-out rows (eval_fraction 0): give an eval file")
        data = prepare(cfg.dataset, cfg.eval_fraction, cfg.seed, token=token, max_rows=cfg.max_rows)
        texts, source = data.eval, split_source(data.source, cfg)
    if not texts:
        raise ValueError(f"{source}: no held-out rows")
    if rows and rows < len(texts):
        texts, source = texts[:rows], f"first {rows} rows of {source}"
    return texts, source


def split_source(name: str, cfg: TrainConfig) -> str:
    return f"eval split of {name} (eval_fraction {cfg.eval_fraction}, seed {cfg.seed})"


def run_config(run_dir: Path) -> TrainConfig:
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ValueError(f"{run_dir}: not a run folder (no config.yaml); pass the folder `train` printed")
    return TrainConfig.from_yaml(Path(run_dir) / "config.yaml")


# --- the card -----------------------------------------------------------------------------------------------
def evaluate_model(model, tokenizer, texts: list[str], source: str, max_length: int,
                   progress: Progress | None = None, stop: threading.Event | None = None,
                   answers: int = ANSWERS, answer_tokens: int = ANSWER_TOKENS) -> dict:
    """The card for a PeftModel with its adapter active; `progress` is told after every row, `stop` is honoured."""
    from .callbacks import greedy_continuation

    stop = stop or threading.Event()
    progress = progress or (lambda done, total: None)
    model.eval()
    total = len(texts) + 2 * min(answers, len(texts))
    kept, per_row = [], []
    for i, text in enumerate(texts):  # tokenized as it goes: a long set shows progress from its first row
        if stop.is_set():
            raise EvalStopped(f"evaluation stopped after {i} of {len(texts)} rows; nothing was saved")
        row = encode_row(text, tokenizer, max_length)
        if any(row.answer[1:]):  # the first token is never predicted
            kept.append(row)
            per_row.append(_row_losses(model, row))
        progress(i + 1, total)
    if not kept:
        raise ValueError(f"{source}: no row has answer tokens within max_length {max_length}")
    shown: list[dict] = []
    for row in kept[:answers]:
        pair = {"prompt": _short(row.prompt), "reference": _short(row.reference)}
        for who in ("base", "adapter"):
            if stop.is_set():
                raise EvalStopped("evaluation stopped during the greedy answers; nothing was saved")
            if who == "base":
                with model.disable_adapter():
                    pair[who] = greedy_continuation(model, tokenizer, row.prompt_ids, answer_tokens)
            else:
                pair[who] = greedy_continuation(model, tokenizer, row.prompt_ids, answer_tokens)
            progress(len(texts) + 2 * len(shown) + (1 if who == "base" else 2), total)
        shown.append(pair)
    progress(total, total)
    return _card(kept, per_row, shown, source, max_length, skipped=len(texts) - len(kept))


def _row_losses(model, row: Row) -> tuple[float, float, int]:
    """(base loss sum, adapter loss sum, answer tokens) for one row, in fp32."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor([row.ids], device=model.device)
    targets = ids[0, 1:]
    mask = torch.tensor(row.answer[1:], device=model.device)

    def nll_sum(logits) -> float:
        losses = F.cross_entropy(logits[0, :-1].float(), targets, reduction="none")
        return float(losses[mask].sum())

    with torch.no_grad():
        tuned = nll_sum(model(input_ids=ids).logits)
        with model.disable_adapter():
            base = nll_sum(model(input_ids=ids).logits)
    return base, tuned, int(mask.sum())


def _card(rows: list[Row], per_row: list[tuple[float, float, int]], answers: list[dict], source: str,
          max_length: int, skipped: int) -> dict:
    tokens = sum(n for _, _, n in per_row)
    base = sum(b for b, _, _ in per_row) / tokens
    tuned = sum(t for _, t, _ in per_row) / tokens
    changes = []
    for i, (row, (b, t, n)) in enumerate(zip(rows, per_row)):
        changes.append({"row": i + 1, "base_loss": b / n, "adapter_loss": t / n, "change": (t - b) / n,
                        "tokens": n, "text": _short(row.text)})
    by_change = sorted(changes, key=lambda c: c["change"])
    return {
        "source": source, "rows": len(rows), "skipped_rows": skipped, "answer_tokens": tokens,
        "max_length": max_length, "created": time.time(),
        "base": {"loss": base, "perplexity": _perplexity(base)},
        "adapter": {"loss": tuned, "perplexity": _perplexity(tuned)},
        "rows_adapter_ahead": sum(c["change"] < 0 for c in changes),
        "helped_most": [c for c in by_change[:SHOWN] if c["change"] < 0],
        "hurt_most": [c for c in reversed(by_change[-SHOWN:]) if c["change"] > 0],
        "answers": answers,
    }


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _short(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " …"


# --- on demand, for a saved run ------------------------------------------------------------------------------
def evaluate_run(run_dir: str | Path, dataset: str | None = None, rows: int = 0, token: str | None = None,
                 progress: Progress | None = None, stop: threading.Event | None = None,
                 before_load: Callable[[], None] | None = None) -> dict:
    """Load the run's base as training did plus its adapter, compute the card, save it as eval.json; returns it.

    Bad rows fail before any model loads (qlora/data.py's messages). Takes the GPU lock like training and chat:
    BusyError at once if it is held. `before_load` runs under the lock (the app frees its chat model there).
    """
    from peft import PeftModel

    from .model import free_memory, load_base, load_tokenizer, pick_precision, resolve

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    runs.verify_adapter(run_dir / runs.ADAPTER)
    texts, source = held_out(run_dir, dataset, rows, token)
    if not gpu_lock.acquire(blocking=False):
        raise BusyError("the GPU is busy (training or a chat is running); evaluate when it is free")
    model = None
    try:
        if before_load:
            before_load()
        path = resolve(cfg.base_model)
        tokenizer = load_tokenizer(path, token)
        model = PeftModel.from_pretrained(load_base(path, cfg.quantize, pick_precision(cfg.precision), token),
                                          str(run_dir / runs.ADAPTER), is_trainable=False)
        card = evaluate_model(model, tokenizer, texts, source, cfg.max_length, progress, stop)
        save(run_dir, card)
        return card
    finally:
        del model
        gpu_lock.release()
        free_memory()


def save(run_dir: Path, card: dict) -> None:
    runs.write_json(Path(run_dir) / runs.EVAL_CARD, dict(card, run=Path(run_dir).name))


def end_of_run(run_dir: Path, model, tokenizer, texts: list[str], source: str, cfg: TrainConfig,
               log: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """The card at the end of a finished run, on the model in memory. Never raises: the run itself is done."""
    import logging

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            log(f"evaluation card: {done}/{total}")

    try:
        card = evaluate_model(model, tokenizer, texts, split_source(source, cfg), cfg.max_length, progress, stop)
        save(run_dir, card)
        for line in summary(card)[:3]:
            log(line)
    except Exception as e:  # out of memory, a stop: say so, keep the run
        if not isinstance(e, (EvalStopped, ValueError)):
            logging.getLogger("qlora").exception("the evaluation card failed")
        log(f"no evaluation card ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); "
            f"make it later: python -m qlora eval --adapter {run_dir}")


def summary(card: dict) -> list[str]:
    """The card's figures as lines: what the CLI prints and the app shows above the tables."""
    base, tuned = card["base"], card["adapter"]
    ahead = base["loss"] - tuned["loss"]
    lines = [f"held-out rows: {card['rows']} ({card['source']}), {card['answer_tokens']} answer tokens"
             + (f", {card['skipped_rows']} rows without answer tokens skipped" if card.get("skipped_rows") else ""),
             f"base     loss {base['loss']:.4f}   perplexity {base['perplexity']:.2f}",
             f"adapter  loss {tuned['loss']:.4f}   perplexity {tuned['perplexity']:.2f}",
             f"adapter {'ahead' if ahead > 0 else 'behind'} by {abs(ahead):.4f} in loss; lower loss on "
             f"{card['rows_adapter_ahead']} of {card['rows']} rows"]
    return lines
