"""Datasets in: a Hub id, a local .jsonl/.json/.csv/.parquet file or the built-in sample -> conversations -> tokens.

Each row becomes a conversation (role/content messages) by its own shape, so one file may mix shapes:
  text                          a Llama 2 chat row (guanaco's): <s>[INST] q [/INST] a </s>, multi-turn, optional
                                <<SYS>>; read by its structure (prompts.parse_llama2); <s> or the last </s> may be missing
  messages                      [{"role": "system"|"user"|"assistant", "content": str}, ...], multi-turn allowed
  instruction / input / output  alpaca style; input is optional
`tokenize` renders the conversations in the run's prompt format (qlora/prompts.py) and truncates them. Rows with nothing
to train on (null, empty text, an empty user turn or answer, an answer truncation removes) are dropped and counted by
kind. Local files are parsed here rather than by `datasets`, so a bad file gets one message naming the file, the row
and the problem instead of an Arrow traceback.
"""
from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import prompts
from .prompts import PromptFormat

SAMPLE_PATH = Path(__file__).with_name("sample_data.jsonl")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_FILE_BYTES = 200 * 1024 * 1024

Conversation = list[dict[str, str]]  # a checked conversation (prompts.conversation)


class DataError(ValueError):
    """A dataset that cannot be used; the message names the source, the row and the problem."""


@dataclass
class PreparedData:
    train: list[Conversation]
    eval: list[Conversation]
    shape: str  # text | messages | alpaca, or "mixed (3 text, 2 messages)"
    dropped: int  # rows skipped: nothing to train on
    source: str
    dropped_by: dict[str, int] = field(default_factory=dict)  # why, e.g. {"empty answer": 2, "null": 1}

    def skipped(self) -> str:
        """'3 rows skipped (2 empty answer, 1 null)', or '' when no row was."""
        if not self.dropped:
            return ""
        why = ", ".join(f"{n} {kind}" for kind, n in sorted(self.dropped_by.items(), key=lambda x: (-x[1], x[0])))
        return f"{self.dropped} row{'s' if self.dropped > 1 else ''} skipped ({why})"


def load_rows(source: str, token: str | None = None, max_rows: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Raw rows and a display name for them. `source` is "sample", a local file path, or a Hub dataset id."""
    if source == "sample":
        return _read_file(SAMPLE_PATH, max_rows), "built-in sample"
    path = Path(source).expanduser()
    if path.suffix.lower() in SUFFIXES or path.exists():
        return _read_file(path, max_rows), path.name
    return _load_hub(source, token, max_rows), source


def prepare(source: str, eval_fraction: float = 0.0, seed: int = 42, token: str | None = None,
            max_rows: int = 0) -> PreparedData:
    """Load, validate and convert a dataset into training (and eval) conversations."""
    rows, name = load_rows(source, token, max_rows)
    convs, shape, dropped = to_conversations(rows, name)
    train, held_out = split(convs, eval_fraction, seed)
    return PreparedData(train=train, eval=held_out, shape=shape, dropped=sum(dropped.values()), source=name,
                        dropped_by=dict(dropped))


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split; at least one eval row when eval_fraction > 0 and there is room."""
    if eval_fraction <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(items) - 1, max(1, round(len(items) * eval_fraction)))
    held = set(order[:n_eval])
    return [t for i, t in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


# --- shapes --------------------------------------------------------------------------------------------
def to_conversations(rows: list[dict[str, Any]], name: str) -> tuple[list[Conversation], str, Counter]:
    """(conversations, shape, dropped rows by kind); each row is read by its own shape; DataError names the first bad
    row."""
    if not rows:
        raise DataError(f"{name}: no rows")
    columns = set().union(*(r.keys() for r in rows))
    if not ({"text", "messages"} & columns or {"instruction", "output"} <= columns):
        found = ", ".join(sorted(map(str, columns))) or "none"
        raise DataError(f"{name}: no usable column: expected 'text', 'messages' or 'instruction'+'output'; "
                        f"found columns: {found}")
    convs: list[Conversation] = []
    shapes: Counter = Counter()
    dropped: Counter = Counter()
    for i, row in enumerate(rows, start=1):
        shape = _shape_of(row)
        try:
            conv = _CONVERT[shape](row) if shape else _why_empty(row)
        except DataError as e:
            raise DataError(f"{name}: row {i}: {e}") from None
        if isinstance(conv, str):  # the kind of row it is, dropped
            dropped[conv] += 1
        else:
            convs.append(conv)
            shapes[shape] += 1
    if not convs:
        why = ", ".join(f"{n} {kind}" for kind, n in dropped.most_common())
        raise DataError(f"{name}: all {len(rows)} rows are empty ({why})")
    shape = next(iter(shapes)) if len(shapes) == 1 else \
        "mixed (" + ", ".join(f"{n} {s}" for s, n in shapes.most_common()) + ")"
    return convs, shape, dropped


def _present(value: Any) -> bool:
    if isinstance(value, (str, list)):
        return bool(value.strip() if isinstance(value, str) else value)
    return value is not None


def _shape_of(row: dict[str, Any]) -> str | None:
    if _present(row.get("text")):
        return "text"
    if _present(row.get("messages")):
        return "messages"
    if row.get("instruction") is not None or row.get("output") is not None:
        return "alpaca"
    return None


def _why_empty(row: dict[str, Any]) -> str:
    if row.get("text") is not None:
        return "empty text"
    if row.get("messages") is not None:
        return "no messages"
    return "null" if {"text", "messages", "instruction", "output"} & row.keys() else "no usable column"


def _checked(conv: Conversation) -> Conversation | str:
    """The conversation, or why it is dropped: a turn with nothing in it teaches an empty prompt or answer."""
    conv = [m for m in conv if m["role"] != "system" or m["content"].strip()]
    for m in conv:
        if not m["content"].strip():
            return "empty user turn" if m["role"] == "user" else "empty answer"
    return conv


def _from_text(row: dict[str, Any]) -> Conversation | str:
    text = row["text"]
    if not isinstance(text, str):
        raise DataError(f"column 'text' must be a string, got {type(text).__name__} {_short(text)}")
    try:
        return _checked(prompts.parse_llama2(text))  # content exactly as written: Llama 2 rows round-trip
    except ValueError as e:
        raise DataError(f"column 'text': {e}") from None


def _from_messages(row: dict[str, Any]) -> Conversation | str:
    msgs = row["messages"]
    if isinstance(msgs, str):  # CSV cells hold JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise DataError("column 'messages' is text that is not a JSON list of messages") from None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"column 'messages' must be a list of {{role, content}} objects, got {_short(msgs)}")
    if not msgs:
        return "no messages"
    if msgs[-1].get("role") != "assistant":
        raise DataError("the last message must be the assistant's answer (role 'assistant')")
    try:
        return _checked(prompts.conversation(msgs))
    except ValueError as e:
        raise DataError(f"column 'messages': {e}") from None


def _from_alpaca(row: dict[str, Any]) -> Conversation | str:
    instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
    for col, val in (("instruction", instruction), ("input", extra), ("output", output)):
        if val is not None and not isinstance(val, str):
            raise DataError(f"column '{col}' must be a string, got {type(val).__name__} {_short(val)}")
    if not (instruction or "").strip():
        return "empty instruction"
    if not (output or "").strip():
        return "empty output"
    prompt = instruction.strip() + (f"\n\n{extra.strip()}" if (extra or "").strip() else "")
    return prompts.conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])


_CONVERT: dict[str, Callable[[dict[str, Any]], Conversation | str]] = {
    "text": _from_text, "messages": _from_messages, "alpaca": _from_alpaca}


# --- readers -------------------------------------------------------------------------------------------
def _read_file(path: Path, max_rows: int = 0) -> list[dict[str, Any]]:
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{name}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DataError(f"{name}: {size / 2**20:.0f} MB is over the {MAX_FILE_BYTES // 2**20} MB limit")
        if size == 0:
            raise DataError(f"{name}: the file is empty")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot read the file ({e.strerror or e})") from None
    if suffix == ".parquet":
        rows = _parquet_rows(raw, name)
    else:
        text = _decode(raw, name)
        if not text.strip():
            raise DataError(f"{name}: the file is empty")
        if suffix == ".csv":
            rows = _csv_rows(text, name)
        elif suffix == ".json" and text.lstrip().startswith("["):
            rows = _json_array_rows(text, name)
        else:
            rows = _jsonl_rows(text, name)
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows[:max_rows] if max_rows else rows


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # a BOM is harmless; CRLF is handled by splitlines
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{name}: line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def _jsonl_rows(text: str, name: str) -> list[dict[str, Any]]:
    rows = []
    lines = text.splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            last = not any(x.strip() for x in lines[n:])
            why = "truncated line: the file ends mid-record" if last else f"not valid JSON ({e.msg} at column {e.colno})"
            raise DataError(f"{name}: line {n}: {why}") from None
        if not isinstance(row, dict):
            raise DataError(f"{name}: line {n}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def _json_array_rows(text: str, name: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: line {e.lineno}: not valid JSON ({e.msg}); truncated file?") from None
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{name}: row {i}: expected a JSON object, got {type(row).__name__}")
    return data


def _csv_rows(text: str, name: str) -> list[dict[str, Any]]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [dict(r) for r in reader]
    except csv.Error as e:
        raise DataError(f"{name}: not a readable CSV ({e})") from None
    if reader.fieldnames is None:
        raise DataError(f"{name}: the file is empty")
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        if None in r:
            raise DataError(f"{name}: line {i}: more cells than header columns")
    return rows


def _parquet_rows(raw: bytes, name: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(raw)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None


def _load_hub(dataset_id: str, token: str | None, max_rows: int) -> list[dict[str, Any]]:
    from .config import is_hub_id

    if not is_hub_id(dataset_id):
        raise DataError(f"{dataset_id[:100]!r}: not a local file and not a valid Hub dataset id (owner/name)")
    import datasets
    from huggingface_hub import errors as hub_errors

    split = f"train[:{max_rows}]" if max_rows else "train"
    try:
        ds = datasets.load_dataset(dataset_id, split=split, token=token or None)
    except hub_errors.GatedRepoError:
        raise DataError(f"{dataset_id}: gated dataset: accept its terms on the Hub and give a token") from None
    except (hub_errors.RepositoryNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        if "a gated dataset" in str(e):  # datasets wraps GatedRepoError into DatasetNotFoundError("... is a gated dataset ...")
            raise DataError(f"{dataset_id}: gated dataset: accept its terms on the Hub and give a token") from None
        raise DataError(f"{dataset_id}: no such dataset on the Hub (or it is private: give a token)") from None
    except (ConnectionError, OSError) as e:
        raise DataError(f"{dataset_id}: cannot reach the Hub ({type(e).__name__}); use a local file or the sample") from None
    except Exception as e:  # datasets raises plain Exceptions for scripts, bad configs, ...
        raise DataError(f"{dataset_id}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return ds.to_list()


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


# --- tokens --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One training row as the trainer sees it."""

    ids: list[int]
    labels: list[int]  # the ids, with -100 where the loss does not train (the prompt, when the loss is on answers)
    answer_tokens: int  # answer tokens left after truncation; 0: truncation removed the whole answer


def tokenize(convs: list[Conversation], tokenizer, max_length: int, fmt: PromptFormat | None = None) -> list[Row]:
    """Each conversation in the run's format (default: the tokenizer's, prompts.choose), truncated to max_length (so
    padding-free batches never hold one huge row), with labels for the format's loss."""
    fmt = fmt or prompts.choose(tokenizer)
    rows = []
    for conv in convs:
        try:
            p = prompts.build(fmt, tokenizer, conv)
        except ValueError as e:  # a chat template that refuses a conversation (roles it does not support, ...)
            raise DataError(f"the row that begins {conv[0]['content'][:40]!r}: {e}") from None
        ids, answer = p.ids[:max_length], p.answer[:max_length]
        labels = list(ids) if fmt.loss == "all" else [i if a else -100 for i, a in zip(ids, answer)]
        rows.append(Row(ids, labels, sum(answer)))
    return rows


def keep_answered(rows: list[Row], max_length: int, what: str = "train",
                  required: bool = True) -> tuple[list[Row], str]:
    """The rows that keep some answer within max_length, and a warning about the others ('' when none is lost).

    A row whose answer truncation removes teaches nothing (and, with the loss on answers, has no loss at all). When no
    row keeps one, training would learn nothing: DataError, before any model loads (unless not `required`).
    """
    kept = [r for r in rows if r.answer_tokens]
    if required and rows and not kept:
        raise DataError(f"no {what} row keeps any answer token within max_length={max_length}: every answer starts "
                        f"after token {max_length}; raise max_length")
    lost = len(rows) - len(kept)
    return kept, (f"{lost} of {len(rows)} {what} rows dropped: truncation to max_length={max_length} tokens removes "
                  "their whole answer" if lost else "")


def preview(convs: list[Conversation], tokenizer, n: int = 5, max_length: int | None = None,
            fmt: PromptFormat | None = None) -> list[dict[str, Any]]:
    """The first rows exactly as the trainer sees them, with flags a user should look at."""
    fmt = fmt or prompts.choose(tokenizer)
    out = []
    for conv in convs[:n]:
        p = prompts.build(fmt, tokenizer, conv)
        out.append({"text": p.text, "tokens": len(p.ids), "flags": ", ".join(_flags(p, tokenizer, max_length)) or "ok"})
    return out


def _flags(p: prompts.Prompt, tokenizer, max_length: int | None) -> list[str]:
    """The format's special tokens where they should be, truncation, and marker-like text in the content."""
    flags = []
    name = tokenizer.convert_ids_to_tokens
    if len(p.ids) > 1 and p.marker[0] and p.ids[0] == p.ids[1]:
        flags.append(f"doubled {name(p.ids[0])}")
    kept = min(len(p.ids), max_length or len(p.ids))
    ends = [i for i in range(len(p.ids)) if p.answer[i] and p.marker[i]]  # the end-of-turn markers closing answers
    last = max((i for i in range(kept) if p.answer[i]), default=None)
    if last is None:
        flags.append(f"truncation to {max_length} tokens removes the whole answer" if any(p.answer) else "no answer")
    elif ends and not p.marker[last]:
        flags.append(f"no {name(p.ids[ends[-1]])} after the last answer")
    if kept < len(p.ids):
        flags.append(f"truncated to {max_length} tokens")
    flags += [f"content contains {m!r} (kept as plain text)" for m in p.content_markers]
    return flags
