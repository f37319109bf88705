"""Datasets in: a Hub id, a local .jsonl/.json/.csv/.parquet file or the built-in sample -> Llama 2 formatted "text".

Three row shapes are understood, checked in this order:
  text                          already in the Llama 2 format (guanaco); <s> is added if missing, </s> appended if missing
  messages                      [{"role": "system"|"user"|"assistant", "content": str}, ...], multi-turn allowed
  instruction / input / output  alpaca style; input is optional
Local files are parsed here rather than by `datasets`, so a bad file gets one message naming the file, the row and the
problem instead of an Arrow traceback.
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .prompts import BOS, EOS, encode, format_chat

SAMPLE_PATH = Path(__file__).with_name("sample_data.jsonl")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_FILE_BYTES = 200 * 1024 * 1024


class DataError(ValueError):
    """A dataset that cannot be used; the message names the source, the row and the problem."""


@dataclass
class PreparedData:
    train: list[str]
    eval: list[str]
    shape: str  # text | messages | alpaca
    dropped: int  # empty or null rows skipped
    source: str


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
    """Load, validate and convert a dataset into Llama 2 formatted training (and eval) texts."""
    rows, name = load_rows(source, token, max_rows)
    texts, shape, dropped = to_texts(rows, name)
    train, held_out = split(texts, eval_fraction, seed)
    return PreparedData(train=train, eval=held_out, shape=shape, dropped=dropped, source=name)


def split(texts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded held-out split; at least one eval row when eval_fraction > 0 and there is room."""
    if eval_fraction <= 0 or len(texts) < 2:
        return list(texts), []
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(texts) - 1, max(1, round(len(texts) * eval_fraction)))
    held = set(order[:n_eval])
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


# --- shapes --------------------------------------------------------------------------------------------
def to_texts(rows: list[dict[str, Any]], name: str) -> tuple[list[str], str, int]:
    """(texts, shape, dropped) for rows of one of the three shapes; DataError names the first bad row."""
    if not rows:
        raise DataError(f"{name}: no rows")
    columns = set().union(*(r.keys() for r in rows[:100]))
    if "text" in columns:
        shape, convert = "text", _from_text
    elif "messages" in columns:
        shape, convert = "messages", _from_messages
    elif {"instruction", "output"} <= columns:
        shape, convert = "alpaca", _from_alpaca
    else:
        found = ", ".join(sorted(map(str, columns))) or "none"
        raise DataError(f"{name}: no usable column: expected 'text', 'messages' or 'instruction'+'output'; "
                        f"found columns: {found}")
    texts: list[str] = []
    dropped = 0
    for i, row in enumerate(rows, start=1):
        try:
            text = convert(row)
        except DataError as e:
            raise DataError(f"{name}: row {i}: {e}") from None
        if text is None:
            dropped += 1
        else:
            texts.append(text)
    if not texts:
        raise DataError(f"{name}: all {len(rows)} rows are empty")
    return texts, shape, dropped


def _from_text(row: dict[str, Any]) -> str | None:
    text = row.get("text")
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(f"column 'text' must be a string, got {type(text).__name__} {_short(text)}")
    text = text.strip()
    if not text:
        return None
    while text.startswith(BOS + BOS):  # a doubled BOS teaches the model a pattern it never sees at chat time
        text = text[len(BOS):]
    if not text.startswith(BOS):
        text = BOS + text
    if not text.endswith(EOS):
        text = text + " " + EOS
    return text


def _from_messages(row: dict[str, Any]) -> str | None:
    msgs = row.get("messages")
    if msgs is None:
        return None
    if isinstance(msgs, str):  # CSV cells hold JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise DataError("column 'messages' is text that is not a JSON list of messages") from None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"column 'messages' must be a list of {{role, content}} objects, got {_short(msgs)}")
    if not msgs:
        return None
    if msgs[-1].get("role") != "assistant":
        raise DataError("the last message must be the assistant's answer (role 'assistant')")
    try:
        return format_chat(msgs)
    except ValueError as e:
        raise DataError(f"column 'messages': {e}") from None


def _from_alpaca(row: dict[str, Any]) -> str | None:
    instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
    for col, val in (("instruction", instruction), ("input", extra), ("output", output)):
        if val is not None and not isinstance(val, str):
            raise DataError(f"column '{col}' must be a string, got {type(val).__name__} {_short(val)}")
    if not (instruction or "").strip() or not (output or "").strip():
        return None
    prompt = instruction.strip() + (f"\n\n{extra.strip()}" if (extra or "").strip() else "")
    return format_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])


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
def tokenize(texts: Iterable[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per row, truncated to max_length (so padding-free batches never hold one huge row)."""
    return [encode(t, tokenizer)[:max_length] for t in texts]


def preview(texts: list[str], tokenizer, n: int = 5, max_length: int | None = None) -> list[dict[str, Any]]:
    """The first rows exactly as the trainer sees them, with flags a user should look at."""
    out = []
    for text in texts[:n]:
        ids = encode(text, tokenizer)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        flags = []
        if bos is not None and ids[:2] == [bos, bos]:
            flags.append("doubled BOS")
        if not ids or ids[-1] != eos:
            flags.append("no EOS at the end")
        if max_length and len(ids) > max_length:
            flags.append(f"truncated to {max_length} tokens")
        out.append({"text": text, "tokens": len(ids), "flags": ", ".join(flags) or "ok"})
    return out
