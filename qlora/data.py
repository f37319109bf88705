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
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from . import prompts
from .config import hub_token, is_hub_id
from .errors import brief, message
from .prompts import PromptFormat

SAMPLE_PATH = Path(__file__).with_name("sample_data.jsonl")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Limits, checked before rows are built: a small parquet file can decompress into gigabytes.
MAX_FILE_BYTES = 200 * 1024 * 1024  # a file on disk
MAX_ROWS = 1_000_000  # rows in one dataset (the reference set has 1,000)
MAX_DATA_BYTES = 512 * 1024 * 1024  # the rows once decompressed (parquet, a Hub dataset)
PARQUET_BATCH = 256  # rows decoded at a time, so a batch of huge values is measured before the next is read
# A compressed file under a plain name: its first bytes say so (gzip, zip, bzip2, xz, zstd).
COMPRESSED = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"\x28\xb5\x2f\xfd": "zstd"}

Messages = list[dict[str, str]]  # role/content messages, checked (prompts.conversation)


class Conversation(list):
    """A row's checked messages, and where the row is in its source ("data.jsonl: line 7"): a problem found later (a
    chat template that refuses the conversation) still names the row."""

    def __init__(self, messages: Iterable[dict[str, str]] = (), where: str = ""):
        super().__init__(messages)
        self.where = where


class DataError(ValueError):
    """A dataset that cannot be used; the message names the source, the row and the problem."""


@dataclass
class PreparedData:
    train: list[Conversation]
    eval: list[Conversation]
    shape: str  # text | messages | alpaca, or "mixed (3 text, 2 messages)"
    source: str
    dropped_by: dict[str, int] = field(default_factory=dict)  # rows skipped (nothing to train on), by why

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by.values())

    def skipped(self) -> str:
        """'3 rows skipped (2 empty answer, 1 null)', or '' when no row was."""
        if not self.dropped:
            return ""
        why = ", ".join(f"{n} {kind}" for kind, n in sorted(self.dropped_by.items(), key=lambda x: (-x[1], x[0])))
        return f"{self.dropped} row{'s' if self.dropped > 1 else ''} skipped ({why})"


class Rows(list):
    """Rows as read, each with its place in the source ("line 7" of a JSONL or CSV file, "row 3" of a parquet file),
    so a message about a row points where the user looks: blank lines and multi-line CSV cells shift the two apart."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), places: Iterable[str] = ()):
        super().__init__(rows)
        self.places = list(places)


def place(rows: list[dict[str, Any]], i: int) -> str:
    """Where rows[i] is in its source; "row i+1" for rows that carry no places."""
    places = getattr(rows, "places", None)
    return places[i] if places and i < len(places) else f"row {i + 1}"


def display_name(source: str) -> str:
    """What the page, the log and a run's status call a dataset source: the sample, a file's own name, or the Hub id."""
    if source == "sample":
        return "built-in sample"
    path = Path(source).expanduser()
    return path.name if _is_local(path) else source


def _is_local(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES or path.exists()


def load_rows(source: str, token: str | None = None, max_rows: int = 0,
              allow_local: bool = True) -> tuple[list[dict[str, Any]], str]:
    """Raw rows and a display name for them. `source` is "sample", a local file path, or a Hub dataset id.

    allow_local=False (the app's Hub id field, where a visitor types): a Hub id is loaded from the Hub only, never as a
    relative path, and anything else is refused with one message whether or not such a path exists.
    """
    if source == "sample":
        return _read_file(SAMPLE_PATH, max_rows), display_name(source)
    path = Path(source).expanduser()
    if allow_local and _is_local(path):
        return _read_file(path, max_rows), display_name(source)
    if not is_hub_id(source):
        if allow_local:
            raise DataError(f"{source[:100]!r}: not a local file and not a valid Hub dataset id (owner/name)")
        raise DataError(f"{source[:100]!r}: not a Hub dataset id (owner/name); files on this server are never "
                        "read here: upload the file instead")
    return _load_hub(source, token, max_rows), source


def prepare(source: str, eval_fraction: float = 0.0, seed: int = 42, token: str | None = None,
            max_rows: int = 0, allow_local: bool = True) -> PreparedData:
    """Load, validate and convert a dataset into training (and eval) conversations."""
    rows, name = load_rows(source, token, max_rows, allow_local)
    convs, shape, dropped = to_conversations(rows, name)
    train, held_out = split(convs, eval_fraction, seed)
    return PreparedData(train=train, eval=held_out, shape=shape, source=name,
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
    for i, row in enumerate(rows):
        shape, where = _shape_of(row), f"{name}: {place(rows, i)}"
        try:
            conv = _CONVERT[shape](row) if shape else _why_empty(row)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if isinstance(conv, str):  # the kind of row it is, dropped
            dropped[conv] += 1
        else:
            convs.append(Conversation(conv, where))
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


def _checked(conv: Messages) -> Messages | str:
    """The conversation, or why it is dropped: a turn with nothing in it teaches an empty prompt or answer."""
    conv = [m for m in conv if m["role"] != "system" or m["content"].strip()]
    for m in conv:
        if not m["content"].strip():
            return "empty user turn" if m["role"] == "user" else "empty answer"
    return conv


def _from_text(row: dict[str, Any]) -> Messages | str:
    text = row["text"]
    if not isinstance(text, str):
        raise DataError(f"column 'text' must be a string, got {type(text).__name__} {_short(text)}")
    try:
        return _checked(prompts.parse_llama2(text))  # content exactly as written: Llama 2 rows round-trip
    except ValueError as e:
        raise DataError(f"column 'text': {e}") from None


def _from_messages(row: dict[str, Any]) -> Messages | str:
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


def _from_alpaca(row: dict[str, Any]) -> Messages | str:
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


_CONVERT: dict[str, Callable[[dict[str, Any]], Messages | str]] = {
    "text": _from_text, "messages": _from_messages, "alpaca": _from_alpaca}


# --- readers -------------------------------------------------------------------------------------------
def _read_file(path: Path, max_rows: int = 0) -> Rows:
    """The rows of a local file, each with its place; max_rows > 0 reads only that many (a preview)."""
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
        with open(path, "rb") as f:
            head = f.read(8)
            for magic, kind in COMPRESSED.items():
                if head.startswith(magic):
                    raise DataError(f"{name}: a {kind}-compressed file, not plain {suffix}; decompress it first")
            f.seek(0)
            if suffix == ".parquet":
                rows = _parquet_rows(f, name, max_rows)
            elif suffix == ".csv":
                rows = _csv_rows(_lines(f, name), name, max_rows)
            elif suffix == ".json":
                rows = _json_rows(f, name, max_rows)
            else:
                rows = _jsonl_rows(_lines(f, name), name, max_rows)
    except OSError as e:
        raise DataError(f"{name}: cannot read the file ({e.strerror or e})") from None
    except MemoryError:  # the last guard: a file whose rows do not fit in memory even within the limits
        raise DataError(f"{name}: too large to load into memory; use fewer or shorter rows") from None
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows


def _lines(f: BinaryIO, name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file, its end of line kept; a BOM is dropped.

    Split on "\\n" only (str.splitlines also splits on U+2028 and friends, which JSON strings may hold), so line
    numbers are the ones an editor shows.
    """
    offset = 0
    for n, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: line {n}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {offset + e.start}); "
                            "save the file as UTF-8") from None
        yield n, line[1:] if n == 1 and line.startswith("\ufeff") else line
        offset += len(raw)


def _too_many(name: str) -> DataError:
    return DataError(f"{name}: more than {MAX_ROWS:,} rows, the limit; keep fewer rows (or set max_rows)")


def _jsonl_rows(lines: Iterator[tuple[int, str]], name: str, max_rows: int = 0) -> Rows:
    rows = Rows()
    for n, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            last = not any(rest.strip() for _, rest in lines)
            why = "truncated line: the file ends mid-record" if last else f"not valid JSON ({e.msg} at column {e.colno})"
            raise DataError(f"{name}: line {n}: {why}") from None
        if not isinstance(row, dict):
            raise DataError(f"{name}: line {n}: expected a JSON object per line, got {type(row).__name__}")
        if len(rows) >= MAX_ROWS:
            raise _too_many(name)
        rows.append(row)
        rows.places.append(f"line {n}")
        if len(rows) == max_rows:
            break
    if not rows:
        raise DataError(f"{name}: the file is empty")
    return rows


def _json_rows(f: BinaryIO, name: str, max_rows: int = 0) -> Rows:
    """A JSON array of objects, read one element at a time; a .json file of JSON Lines is read as such."""
    raw = f.read()
    text = "".join(line for _, line in _lines(io.BytesIO(raw), name))
    start = len(text) - len(text.lstrip())
    if not text[start:]:
        raise DataError(f"{name}: the file is empty")
    if text[start] == "[":
        return _json_array_rows(text, start + 1, name, max_rows)
    decoder = json.JSONDecoder()
    try:
        value, end = decoder.raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: line {e.lineno}: not valid JSON ({e.msg}); truncated file?") from None
    if text[end:].strip():  # more values follow: JSON Lines under a .json name
        return _jsonl_rows(_lines(io.BytesIO(raw), name), name, max_rows)
    what = f"one {type(value).__name__}"
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        what = "one object" + (f" (are the rows its {lists[0]!r} list? save that list alone)" if lists else "")
    raise DataError(f"{name}: expected a list of rows (a JSON array of objects, or one object per line), got {what}")


def _json_array_rows(text: str, i: int, name: str, max_rows: int) -> Rows:
    """The objects of the array that opens at text[i-1], decoded one by one: the row limit holds before the
    whole array is built, and each row's place is its line."""
    decoder, rows = json.JSONDecoder(), Rows()
    line, seen = 1, 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if text.startswith("]", i) and not rows:
            return rows
        line += text.count("\n", seen, i)
        seen = i
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: line {e.lineno}: not valid JSON ({e.msg}); truncated file?") from None
        if not isinstance(value, dict):
            raise DataError(f"{name}: row {len(rows) + 1} (line {line}): expected a JSON object, got "
                            f"{type(value).__name__}")
        if len(rows) >= MAX_ROWS:
            raise _too_many(name)
        rows.append(value)
        rows.places.append(f"row {len(rows)} (line {line})")
        if len(rows) == max_rows:
            return rows
        while i < len(text) and text[i].isspace():
            i += 1
        if text.startswith("]", i):
            return rows
        if not text.startswith(",", i):
            at = text.count("\n", 0, i) + 1
            raise DataError(f"{name}: line {at}: not valid JSON (expected ',' or ']' after row {len(rows)}); "
                            "truncated file?")
        i += 1


def _csv_rows(lines: Iterator[tuple[int, str]], name: str, max_rows: int = 0) -> Rows:
    """Rows of a CSV file with a header line; a row's place is the line it starts on (cells may span lines)."""
    # The csv module refuses cells over 128 KB; the file size cap already bounds a cell, as it bounds a JSONL row.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FILE_BYTES))
    reader = csv.reader(line for _, line in lines)
    rows = Rows()
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{name}: the file is empty")
        ended = reader.line_num
        for cells in reader:
            begins, ended = ended + 1, reader.line_num
            if not cells:  # a blank line
                continue
            if len(cells) > len(header):
                raise DataError(f"{name}: line {begins}: more cells than header columns")
            if len(rows) >= MAX_ROWS:
                raise _too_many(name)
            rows.append(dict(zip(header, cells + [None] * (len(header) - len(cells)))))
            rows.places.append(f"line {begins}")
            if len(rows) == max_rows:
                break
    except csv.Error as e:
        raise DataError(f"{name}: line {reader.line_num}: not a readable CSV ({e})") from None
    return rows


def _parquet_rows(f: BinaryIO, name: str, max_rows: int = 0) -> Rows:
    """Rows of a parquet file, checked against the limits before they are built.

    The footer gives the row count and the uncompressed size; both are checked first. The footer can lie, and
    dictionary-encoded text decodes far larger than it is stored (one value, repeated by index), so text columns are
    read as dictionaries and each batch's decoded size is measured from its indices before a second pass builds the
    rows. A preview reads only its first rows. Text nested in lists (messages) is decoded a row group at a time;
    a bomb hidden there ends in the memory guard of _read_file.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def batches():
        count = 0
        for batch in pf.iter_batches(batch_size=min(max_rows or PARQUET_BATCH, PARQUET_BATCH)):
            batch = batch.slice(0, max_rows - count) if max_rows else batch
            count += batch.num_rows
            yield batch
            if count == max_rows:
                return

    def decoded_size(column) -> int:
        if pa.types.is_dictionary(column.type):
            return pc.sum(pc.take(pc.binary_length(column.dictionary), column.indices)).as_py() or 0
        return column.nbytes

    try:
        text = [c.name for c in pq.read_schema(f) if pa.types.is_string(c.type) or pa.types.is_large_string(c.type)
                or pa.types.is_binary(c.type) or pa.types.is_large_binary(c.type)]
        pf = pq.ParquetFile(f, read_dictionary=text)
        meta = pf.metadata
        stored = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if (max_rows == 0 or max_rows > MAX_ROWS) and meta.num_rows > MAX_ROWS:
            raise DataError(f"{name}: {meta.num_rows:,} rows, over the {MAX_ROWS:,}-row limit; keep fewer rows "
                            "(or set max_rows)")
        if stored > MAX_DATA_BYTES:
            raise DataError(f"{name}: {stored / 2**20:,.0f} MB once decompressed, over the "
                            f"{MAX_DATA_BYTES // 2**20:,} MB limit")
        count = decoded = 0
        for batch in batches():
            count += batch.num_rows
            decoded += sum(decoded_size(column) for column in batch.columns)
            if count > MAX_ROWS:
                raise _too_many(name)
            if decoded > MAX_DATA_BYTES:
                raise DataError(f"{name}: over {MAX_DATA_BYTES // 2**20:,} MB once decompressed, the limit (its "
                                f"first {count:,} rows already are)")
        rows = Rows(row for batch in batches() for row in batch.to_pylist())
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, MemoryError):
            raise
        raise DataError(f"{name}: not a readable parquet file ({message(e)})") from None
    rows.places = [f"row {i}" for i in range(1, len(rows) + 1)]
    return rows


def _load_hub(dataset_id: str, token: str | None, max_rows: int) -> Rows:
    """A Hub dataset through `datasets`. The hf://datasets/ form is resolved on the Hub only: without it,
    load_dataset would read a folder of the same relative name from the working directory first."""
    import datasets
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import is_offline_mode

    split = f"train[:{max_rows}]" if max_rows else "train"
    try:
        # `datasets` downloads every file of the split before a preview's slice or the limits below apply: the
        # repository's size, from the Hub's file list, is checked first (offline, only the cache is read)
        size = 0 if is_offline_mode() else _hub_data_bytes(dataset_id, token)
        if size > MAX_DATA_BYTES:
            raise DataError(f"{dataset_id}: {size / 2**20:,.0f} MB of files on the Hub, over the "
                            f"{MAX_DATA_BYTES // 2**20:,} MB limit; nothing was downloaded (use a smaller dataset)")
        ds = datasets.load_dataset(f"hf://datasets/{dataset_id}", split=split, token=hub_token(token))
    except DataError:
        raise
    except hub_errors.GatedRepoError:
        raise DataError(f"{dataset_id}: gated dataset: accept its terms on the Hub and give a token") from None
    except (hub_errors.RepositoryNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        if "a gated dataset" in str(e):  # datasets wraps GatedRepoError into DatasetNotFoundError("... is a gated dataset ...")
            raise DataError(f"{dataset_id}: gated dataset: accept its terms on the Hub and give a token") from None
        raise DataError(f"{dataset_id}: no such dataset on the Hub (or it is private: give a token)") from None
    except (ConnectionError, OSError) as e:
        raise DataError(f"{dataset_id}: cannot reach the Hub ({type(e).__name__}); use a local file or the sample") from None
    except Exception as e:  # datasets raises plain Exceptions for scripts, bad configs, ...
        raise DataError(f"{dataset_id}: cannot load ({brief(e)})") from None
    # The rows sit memory-mapped on disk: check the limits before they become Python objects.
    if ds.num_rows > MAX_ROWS:
        raise DataError(f"{dataset_id}: {ds.num_rows:,} rows, over the {MAX_ROWS:,}-row limit; set max_rows")
    if ds.data.nbytes > MAX_DATA_BYTES:
        raise DataError(f"{dataset_id}: {ds.data.nbytes / 2**20:,.0f} MB, over the {MAX_DATA_BYTES // 2**20:,} MB "
                        "limit; set max_rows")
    rows = ds.to_list()
    return Rows(rows, (f"row {i}" for i in range(1, len(rows) + 1)))


def _hub_data_bytes(dataset_id: str, token: str | None) -> int:
    """Bytes of a Hub dataset repository's files (all but its docs), from the Hub's file list."""
    from huggingface_hub import HfApi

    info = HfApi().dataset_info(dataset_id, files_metadata=True, token=hub_token(token))
    return sum(f.size or 0 for f in info.siblings or [] if not f.rfilename.endswith((".md", ".gitattributes")))


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


# --- tokens --------------------------------------------------------------------------------------------
IGNORE = -100  # a label the loss leaves out (torch's cross_entropy and transformers' default ignore_index)


@dataclass
class Row:
    """One training row as the trainer sees it."""

    ids: list[int]
    labels: list[int]  # the ids, with IGNORE where the loss does not train (the prompt, when the loss is on answers)
    answer: list[bool]  # per id: an assistant answer's token (through its end-of-turn marker), whatever the loss

    @property
    def answer_tokens(self) -> int:
        """Answer tokens left after truncation; 0: truncation removed the whole answer."""
        return sum(self.answer)

    @property
    def answer_labels(self) -> list[int]:
        """The ids with IGNORE everywhere but the answers: the loss on answers, whatever the run trained on."""
        return [i if a else IGNORE for i, a in zip(self.ids, self.answer)]


def tokenize(convs: list[Conversation], tokenizer, max_length: int, fmt: PromptFormat | None = None) -> list[Row]:
    """Each conversation in the run's format (default: the tokenizer's, prompts.choose), truncated to max_length (so
    padding-free batches never hold one huge row), with labels for the format's loss."""
    fmt = fmt or prompts.choose(tokenizer)
    rows = []
    for conv in convs:
        try:
            p = prompts.build(fmt, tokenizer, conv)
        except ValueError as e:  # a chat template that refuses a conversation (roles it does not support, ...)
            where = getattr(conv, "where", "") or f"the row that begins {conv[0]['content'][:40]!r}"
            raise DataError(f"{where}: {e}") from None
        ids, answer = p.ids[:max_length], p.answer[:max_length]
        row = Row(ids, list(ids), answer)
        if fmt.loss != "all":
            row.labels = row.answer_labels
        rows.append(row)
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
