"""The evaluation card: on held-out rows, the base (adapter disabled) vs the adapter, saved as eval.json in the run.

    mean loss and perplexity on the answer tokens, for each; the rows the adapter helped and hurt most
    (per-row loss change, with the text); greedy answers to a few held-out prompts, base and tuned side by side.

Rows are tokenized exactly as training tokenized them (data.tokenize in the run's saved prompt format), and the loss
is taken on the answer tokens (`Row.answer`: each assistant answer through its end-of-turn token), in every format:
also for Llama 2, whose recipe trains on the whole text, so the card says how well each model answers, not how well
it predicts the questions. The greedy answers are prompted and stopped
in the same format (prompts.build, prompts.stop_ids). Computed at the end of a run with held-out rows (on the model
still in memory), and on demand for any run (`evaluate_run`: its own eval split, or another file), which loads the
base as training did and takes a card the way a run does (device.Cards.take_evaluation). Both figures come from one
model: `disable_adapter()` is the base, bit for bit (tests/test_train.py).
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import runs
from .config import TrainConfig
from .data import IGNORE
from .errors import message
from .prompts import PromptFormat

if TYPE_CHECKING:
    from .data import Conversation
    from .device import Cards

ANSWERS = 3  # held-out prompts answered greedily by both
ANSWER_TOKENS = 48  # as the sample answers during training: enough to see the voice, quick on a CPU
SHOWN = 3  # rows listed as helped most, and as hurt most
SHOWN_CHARS = 1500

Progress = Callable[[int, int], None]  # (steps done, steps in all): one per row, then one per greedy answer


class EvalStopped(Exception):
    """Stop was pressed; nothing was saved (an earlier eval.json is kept)."""


# --- which rows ---------------------------------------------------------------------------------------------
def held_out(run_dir: Path, dataset: str | None = None, rows: int = 0,
             token: str | None = None) -> tuple[list[Conversation], str]:
    """(conversations, where they come from): every row of `dataset`, or the run's own eval split; the first `rows`
    only. Read by the same loader as training data: a bad file gets its message here, before any model loads."""
    from .data import prepare

    cfg = runs.run_config(run_dir)
    if dataset:
        data = prepare(dataset, 0.0, cfg.seed, token=token)
        convs, source = data.train, data.source
    else:
        if cfg.eval_fraction <= 0:
            raise ValueError(f"run {run_dir.name} kept no held-out rows (eval_fraction 0): give an eval file")
        data = prepare(cfg.dataset, cfg.eval_fraction, cfg.seed, token=token, max_rows=cfg.max_rows,
                       allow_local=cfg.allow_local_dataset)
        convs, source = data.eval, split_source(data.source, cfg)
    if not convs:
        raise ValueError(f"{source}: no held-out rows")
    if rows and rows < len(convs):
        convs, source = convs[:rows], f"first {rows} rows of {source}"
    return convs, source


def split_source(name: str, cfg: TrainConfig) -> str:
    return f"eval split of {name} (eval_fraction {cfg.eval_fraction}, seed {cfg.seed})"


# --- the card -----------------------------------------------------------------------------------------------
def evaluate_model(model, tokenizer, fmt: PromptFormat, convs: list[Conversation], source: str, max_length: int,
                   progress: Progress | None = None, stop: threading.Event | None = None,
                   answers: int = ANSWERS, answer_tokens: int = ANSWER_TOKENS) -> dict:
    """The card for a PeftModel with its adapter active, on conversations in the run's format `fmt`; `progress` is
    told after every row and every greedy answer, `stop` is honoured between them."""
    from .callbacks import greedy_continuation
    from .data import tokenize
    from .prompts import build, stop_ids

    stop = stop or threading.Event()
    progress = progress or (lambda done, total: None)
    model.eval()
    total = len(convs) + 2 * min(answers, len(convs))
    kept, per_row = [], []
    for i, conv in enumerate(convs):  # tokenized as it goes: a long set shows progress from its first row
        if stop.is_set():
            raise EvalStopped(f"evaluation stopped after {i} of {len(convs)} rows; nothing was saved")
        row = tokenize([conv], tokenizer, max_length, fmt)[0]
        targets = row.answer_labels  # the answers, in every format
        if any(t != IGNORE for t in targets[1:]):  # the first token is never predicted
            kept.append(conv)
            per_row.append(_row_losses(model, row.ids, targets))
        progress(i + 1, total)
    if not kept:
        raise ValueError(f"{source}: no row keeps an answer token within max_length {max_length}")
    shown: list[dict] = []
    stops = stop_ids(fmt, tokenizer)
    for conv in kept:
        if len(shown) == answers:
            break
        prompt = build(fmt, tokenizer, conv[:-1]).ids  # the conversation up to its last answer, as chat prompts it
        if len(prompt) >= max_length:  # a prompt longer than training ever saw: no answer worth showing
            continue
        pair = {"prompt": _short(_plain(conv[:-1])), "reference": _short(conv[-1]["content"])}
        for who in ("base", "adapter"):
            if stop.is_set():
                raise EvalStopped("evaluation stopped during the greedy answers; nothing was saved")
            if who == "base":
                with model.disable_adapter():
                    pair[who] = greedy_continuation(model, tokenizer, prompt, stops, answer_tokens)
            else:
                pair[who] = greedy_continuation(model, tokenizer, prompt, stops, answer_tokens)
            progress(len(convs) + 2 * len(shown) + (1 if who == "base" else 2), total)
        shown.append(pair)
    progress(total, total)
    return _card(kept, per_row, shown, source, max_length, fmt, skipped=len(convs) - len(kept))


def _row_losses(model, ids: list[int], labels: list[int]) -> tuple[float, float, int]:
    """(base loss sum, adapter loss sum, answer tokens) for one row, in fp32."""
    import torch
    import torch.nn.functional as F

    inputs = torch.tensor([ids], device=model.device)
    targets = torch.tensor(labels[1:], device=model.device)

    def nll_sum(logits) -> float:
        return float(F.cross_entropy(logits[0, :-1].float(), targets, ignore_index=IGNORE, reduction="sum"))

    with torch.no_grad():
        tuned = nll_sum(model(input_ids=inputs).logits)
        with model.disable_adapter():
            base = nll_sum(model(input_ids=inputs).logits)
    return base, tuned, int((targets != IGNORE).sum())


def _card(convs: list[Conversation], per_row: list[tuple[float, float, int]], answers: list[dict], source: str,
          max_length: int, fmt: PromptFormat, skipped: int) -> dict:
    tokens = sum(n for _, _, n in per_row)
    base = sum(b for b, _, _ in per_row) / tokens
    tuned = sum(t for _, t, _ in per_row) / tokens
    changes = []
    for i, (conv, (b, t, n)) in enumerate(zip(convs, per_row)):
        changes.append({"row": i + 1, "base_loss": b / n, "adapter_loss": t / n, "change": (t - b) / n,
                        "tokens": n, "text": _short(_plain(conv))})
    by_change = sorted(changes, key=lambda c: c["change"])
    return {
        "source": source, "rows": len(convs), "skipped_rows": skipped, "tokens": tokens, "loss_on": "answers",
        "prompt_format": fmt.describe(), "max_length": max_length, "created": time.time(),
        "base": {"loss": base, "perplexity": _perplexity(base)},
        "adapter": {"loss": tuned, "perplexity": _perplexity(tuned)},
        "rows_adapter_ahead": sum(c["change"] < 0 for c in changes),
        "helped_most": [c for c in by_change[:SHOWN] if c["change"] < 0],
        "hurt_most": [c for c in reversed(by_change[-SHOWN:]) if c["change"] > 0],
        "answers": answers,
    }


def _plain(conv) -> str:
    """A conversation as a reader sees it (role: content), whatever format the model is prompted in."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in conv)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _short(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " …"


# --- on demand, for a saved run ------------------------------------------------------------------------------
def evaluate_run(run_dir: str | Path, dataset: str | None = None, rows: int = 0, token: str | None = None,
                 progress: Progress | None = None, stop: threading.Event | None = None,
                 cards: Cards | None = None, make_room: Callable[[], None] | None = None) -> dict:
    """Load the run's base as training did plus its adapter, compute the card, save it as eval.json; returns it.

    Bad rows fail before any model loads (qlora/data.py's messages). The evaluation takes one card of the host's
    `cards` as a run takes its cards (device.Cards.take_evaluation): BusyError at once, saying who holds them, when
    there is none. `make_room` runs when that card is chat's (one GPU, the CPU): the app unloads its chat model there,
    as it does for a training run.
    """
    from peft import PeftModel

    from .device import CHAT_CARD, EVAL, free_memory, pick_precision, use_gpu
    from .device import cards as host_cards
    from .model import load_base, load_tokenizer, resolve

    run_dir = Path(run_dir)
    cfg = runs.run_config(run_dir)
    fmt = runs.prompt_format(run_dir)
    runs.verify_adapter(run_dir / runs.ADAPTER)
    convs, source = held_out(run_dir, dataset, rows, token)
    cards = cards or host_cards
    card = cards.take_evaluation()
    model = None
    try:
        if card == CHAT_CARD and make_room:
            make_room()
        use_gpu(card)  # this thread computes on the evaluation's card (load_base places the model there)
        path = resolve(cfg.base_model, cfg.allow_local_model, token)
        tokenizer = load_tokenizer(path, token)
        model = PeftModel.from_pretrained(load_base(path, cfg.quantize, pick_precision(cfg.precision), token),
                                          str(run_dir / runs.ADAPTER), is_trainable=False)
        result = evaluate_model(model, tokenizer, fmt, convs, source, cfg.max_length, progress, stop)
        save(run_dir, result)
        return result
    finally:
        del model
        free_memory()  # before the card goes back: the next job finds the memory free
        cards.give_back(EVAL, (card,))


def save(run_dir: Path, card: dict) -> None:
    runs.write_json(Path(run_dir) / runs.EVAL_CARD, dict(card, run=Path(run_dir).name))


def load(run_dir: Path) -> dict | None:
    """A run's saved card, or None when it has none or eval.json is not a card (a run folder is someone else's file
    until checked: what the app and the model cards show of it must be there, with the types they show)."""
    card = runs.read_json(Path(run_dir) / runs.EVAL_CARD)
    try:
        summary(card)
        for r in card.get("helped_most", []) + card.get("hurt_most", []):
            float(r["base_loss"]), float(r["adapter_loss"]), int(r["row"]), str(r["text"])
        for a in card.get("answers", []):
            str(a["prompt"]), str(a["base"]), str(a["adapter"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return card


def end_of_run(run_dir: Path, model, tokenizer, fmt: PromptFormat, convs: list[Conversation], source: str,
               cfg: TrainConfig, log: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """The card at the end of a finished run, on the model in memory. Never raises: the run itself is done."""
    import logging

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            log(f"evaluation card: {done}/{total}")

    try:
        card = evaluate_model(model, tokenizer, fmt, convs, split_source(source, cfg), cfg.max_length, progress, stop)
        save(run_dir, card)
        for line in summary(card)[:3]:
            log(line)
    except Exception as e:  # out of memory, a stop, a full disk: say so, keep the run
        if not isinstance(e, (EvalStopped, ValueError)):
            logging.getLogger("qlora").exception("the evaluation card failed")
        log(f"no evaluation card ({message(e)}); "
            f"make it later: python -m qlora eval --adapter {run_dir}")


def summary(card: dict) -> list[str]:
    """The card's figures as lines: what the CLI prints and the app shows above the tables."""
    base, tuned = card["base"], card["adapter"]
    ahead = base["loss"] - tuned["loss"]
    what = "answer tokens" if card["loss_on"] == "answers" else "tokens (the whole text)"  # cards saved before
    lines = [f"held-out rows: {card['rows']} ({card['source']}), {card['tokens']} {what}"
             + (f", {card['skipped_rows']} rows without answer tokens skipped" if card.get("skipped_rows") else ""),
             f"base     loss {base['loss']:.4f}   perplexity {base['perplexity']:.2f}",
             f"adapter  loss {tuned['loss']:.4f}   perplexity {tuned['perplexity']:.2f}",
             f"adapter {'ahead' if ahead > 0 else 'behind'} by {abs(ahead):.4f} in loss; lower loss on "
             f"{card['rows_adapter_ahead']} of {card['rows']} rows"]
    if card.get("prompt_format"):
        lines.append(card["prompt_format"])
    return lines
