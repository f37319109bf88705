"""Run folders on disk, the one module that knows their layout: writing them, reading them back, choosing the runs
whose adapter can be used, and recovery after a crash (an explicit step at start-up; listing never writes).

    runs/<name>/
      run.json            status (running | finished | stopped | failed | interrupted), final figures, pid
      config.yaml         the resolved TrainConfig
      prompt_format.json  the prompt format the adapter was trained on: llama2, or a chat template (qlora/prompts.py)
      versions.json       library versions
      metrics.jsonl       one line per logged step (train loss, eval loss, lr, tokens/s)
      adapter/            adapter_config.json + adapter_model.safetensors: PeftModel.from_pretrained(base, this)
      checkpoints/        resumable Trainer checkpoints, when save_steps > 0
      eval.json           the evaluation card: base vs adapter on held-out rows (qlora/evaluate.py)
      votes.jsonl         blind votes from the Chat tab, one line each (qlora/votes.py)
      export/             the adapter merged into the base's own weights: a standalone model (qlora/export.py)

Every folder is someone else's file until checked: one that cannot be read is listed as damaged, with the reason, and
the others work. Sizes written in a file are never trusted before they are compared with the file's own size.
stdlib only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import TrainConfig
from .events import EvalLoss, Event, Progress
from .prompts import LLAMA2, PromptFormat

log = logging.getLogger("qlora")

ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FORMAT_FILE = "prompt_format.json"
EVAL_CARD = "eval.json"
VOTES = "votes.jsonl"
EXPORT = "export"
# What goes with an adapter off this machine (a zip, a Hub repo): what it takes to use it again, and its evaluation
# card when it has one. The zip adds HISTORY.
PORTABLE_FILES = ("config.yaml", FORMAT_FILE, "versions.json", EVAL_CARD)
HISTORY_FILES = ("metrics.jsonl", "run.json")
SWAPPED = (ADAPTER, EXPORT)  # folders replaced whole by save_folder_atomically
USABLE = ("finished", "stopped")
NAME = re.compile(r"[\w.-]{1,100}")  # a run name that a visitor may send back: never a path
MAX_JSON_BYTES = 1 << 20  # run.json and adapter_config.json are a few KB
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on a header
LFS_POINTER = b"version https://git-lfs"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class DamagedRun(ValueError):
    """A run folder (or an adapter) that cannot be used; the message names the file and what is wrong with it."""


# --- writing ---------------------------------------------------------------------------------------------
def new_run_dir(root: str | Path, name: str = "") -> Path:
    """A fresh folder under root; a given name that is taken gets a numeric suffix rather than overwriting."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = name or time.strftime("run-%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = root / (base if i == 0 else f"{base}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"{root}: cannot find a free run name for {base!r}")


def start(run_dir: Path, cfg: TrainConfig, precision: str, prompt_format: dict, versions: dict) -> None:
    """The files a run has from its first step, and run.json saying it is running in this process."""
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    write_json(run_dir / FORMAT_FILE, prompt_format)  # PromptFormat.to_json(): chat prompts the adapter the same way
    write_json(run_dir / "versions.json", versions)
    meta = read_json(run_dir / "run.json")  # a resumed run keeps its creation time
    meta.update(status="running", base_model=cfg.base_model, dataset=cfg.dataset, precision=precision,
                created=meta.get("created", time.time()), pid=os.getpid(), boot=boot_id())
    write_json(run_dir / "run.json", meta)


def recording(emit: Callable[[Event], None], run_dir: Path) -> Callable[[Event], None]:
    """emit, plus one metrics.jsonl line for every logged step, so history outlives the process."""

    def record(event: Event) -> None:
        if isinstance(event, (Progress, EvalLoss)):
            append_jsonl(run_dir / "metrics.jsonl", {"type": type(event).__name__, "time": time.time(),
                                                     **asdict(event)})
        emit(event)

    return record


def checkpoints_dir(run_dir: Path) -> Path:
    """Where the Trainer writes a run's resumable checkpoints."""
    return run_dir / CHECKPOINTS


def finish(run_dir: Path, status: str, step: int, metrics: dict) -> None:
    meta = read_json(run_dir / "run.json")
    meta.update(status=status, step=step, finished=time.time(), final_loss=metrics.get("final_loss"), metrics=metrics)
    write_json(run_dir / "run.json", meta)


def write_json(path: Path, data: Any) -> None:
    """Write via a temp file and os.replace: readers see the old file or the new one, never half of one."""
    write_text(path, json.dumps(data, indent=2, default=str))


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def save_adapter_atomically(run_dir: Path, save: Callable[[Path], None],
                            verify: Callable[[Path], None] | None = None) -> Path:
    """save(tmp) writes the adapter into a temp folder; it is checked, then swapped in for run_dir/adapter.

    A crash or a full disk during save() leaves the previous adapter (if any) untouched; the temp folder is removed.
    """
    return save_folder_atomically(run_dir, ADAPTER, save, verify or verify_adapter)


def save_folder_atomically(run_dir: Path, name: str, save: Callable[[Path], None],
                           verify: Callable[[Path], None]) -> Path:
    """save(tmp) fills a temp folder; verify(tmp) checks it; then it is swapped in for run_dir/name.

    Until the last rename, run_dir/name is the previous folder (or absent): nothing half-written ever has the final
    name. recover() finishes or undoes a swap a killed process left halfway.
    """
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    old = run_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
    try:
        save(tmp)
        verify(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading ---------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in path, or {} when it is missing or unreadable (for files this module writes itself)."""
    try:
        return _json_object(path)
    except (OSError, DamagedRun):
        return {}


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in a small file; DamagedRun naming the file when it is too big, not JSON or not an object."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DamagedRun(f"{path.name} is {size:,} bytes, over the {MAX_JSON_BYTES:,}-byte limit for it")
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if raw.startswith(LFS_POINTER):
        raise DamagedRun(f"{path.name} is a Git LFS pointer, not the file (run `git lfs pull` where it came from)")
    return _parse_object(raw, path.name)


def _parse_object(raw: bytes, what: str) -> dict[str, Any]:
    """raw as a JSON object; DamagedRun saying that `what` is not JSON or not an object."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DamagedRun(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise DamagedRun(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def run_folder(path: str | Path) -> Path:
    """The run folder that `path` names (the folder itself, or its adapter/ subfolder); ValueError if it is none."""
    run_dir = Path(path)
    if run_dir.name == ADAPTER:
        run_dir = run_dir.parent
    if not (run_dir / "config.yaml").exists():
        raise ValueError(f"{path}: not a run folder (no config.yaml); pass the folder `train` printed")
    return run_dir


def run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig a run was trained with (its config.yaml); OSError or ValueError if it cannot be read."""
    return TrainConfig.from_yaml(run_dir / "config.yaml")


def prompt_format(run_dir: Path) -> PromptFormat:
    """The prompt format a run was trained in (prompt_format.json); Llama 2 for a run made before formats were chosen
    (no file). DamagedRun naming the file when it cannot be read."""
    path = run_dir / FORMAT_FILE
    if not path.exists():
        return PromptFormat(LLAMA2)
    try:
        return PromptFormat.from_json(_json_object(path))
    except DamagedRun:
        raise
    except OSError as e:
        raise DamagedRun(f"{FORMAT_FILE} cannot be read ({type(e).__name__})") from None
    except ValueError as e:  # valid JSON that is not a format
        raise DamagedRun(f"{FORMAT_FILE}: {str(e)[:100]}") from None


@dataclass
class History:
    """A run's logged steps, from metrics.jsonl: (step, loss) pairs and the last tokens/s."""

    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float | None = None


def history(run_dir: Path) -> History:
    """What metrics.jsonl says; lines that are not what this module writes are skipped, never fatal."""
    h = History()
    try:
        with open(run_dir / "metrics.jsonl", encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict) or not _number(rec.get("step")):
                    continue
                step, loss = int(rec["step"]), rec.get("loss")
                if rec.get("type") == "Progress":
                    if _number(loss):
                        h.losses.append((step, float(loss)))
                    if _number(rec.get("tokens_per_s")):
                        h.tokens_per_s = float(rec["tokens_per_s"])
                elif rec.get("type") == "EvalLoss" and _number(loss):
                    h.eval_losses.append((step, float(loss)))
    except OSError:
        pass
    return h


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- checking an adapter ---------------------------------------------------------------------------------
def verify_adapter(folder: Path) -> None:
    """Raise DamagedRun unless folder holds an adapter that loads whole (see adapter_problem)."""
    problem = adapter_problem(folder)
    if problem:
        raise DamagedRun(f"{folder}: {problem}")


def adapter_problem(folder: Path) -> str:
    """'' for an adapter that loads whole: a config that parses, a safetensors file whose header is sound and whose
    size is what the header says, and tensors for every module the config targets. Else why not, naming the file.

    Nothing here allocates what the file claims: the header's length is compared with the file's size (and capped)
    before it is read."""
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        config = _json_object(folder / "adapter_config.json")
        tensors = list(safetensors_header(folder / "adapter_model.safetensors")[0])
    except OSError as e:
        return f"cannot read the adapter ({type(e).__name__}: {e.strerror or e})"
    except DamagedRun as e:
        return str(e)
    missing = _missing_modules(config, tensors)
    if missing:
        return (f"half-complete adapter: adapter_model.safetensors has no LoRA tensors for {missing} "
                "(adapter_config.json targets them)")
    return ""


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(the header's tensor entries by name, the offset where tensor data starts) of a safetensors file, after checking
    the header against the file's real size: DamagedRun naming the file when it is truncated, has trailing bytes, or
    is not a safetensors file. The one reader of these headers (adapters, and the base shards an export merges into)."""
    name = path.name
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(LFS_POINTER))
        if head == LFS_POINTER:
            raise DamagedRun(f"{name} is a Git LFS pointer, not the weights (run `git lfs pull` where it came from)")
        if len(head) < 8:
            raise DamagedRun(f"{name} is truncated ({size} bytes)")
        n = int.from_bytes(head[:8], "little")
        if n > size - 8:
            raise DamagedRun(f"{name}: its header claims {n:,} bytes but the file has {size:,}: truncated or not "
                             "a safetensors file")
        if n > MAX_HEADER_BYTES:
            raise DamagedRun(f"{name}: a header of {n:,} bytes is over the {MAX_HEADER_BYTES:,}-byte limit")
        f.seek(8)
        meta = _parse_object(f.read(n), f"{name}: its header")
    end = 0
    for tensor, entry in meta.items():
        if tensor == "__metadata__":
            continue
        problem = _entry_problem(entry)
        if problem:
            raise DamagedRun(f"{name}: tensor {tensor[:200]!r}: {problem}")
        end = max(end, entry["data_offsets"][1])
    if 8 + n + end != size:
        raise DamagedRun(f"{name} is truncated or has trailing bytes ({size:,} bytes, its header says {8 + n + end:,})")
    return {t: e for t, e in meta.items() if t != "__metadata__"}, 8 + n


def _entry_problem(entry: Any) -> str:
    """Why a header entry does not describe a tensor, or ''."""
    if not isinstance(entry, dict):
        return "expected an object with dtype, shape and data_offsets"
    offsets, shape, dtype = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(x) for x in offsets)
            and offsets[0] <= offsets[1]):
        return "no valid data_offsets"
    if not (isinstance(shape, list) and all(_count(x) for x in shape)):
        return "no valid shape"
    if dtype not in DTYPE_BYTES:
        return f"unknown dtype {str(dtype)[:20]!r}"
    if math.prod(shape) * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        return "its shape and dtype do not match its data_offsets"
    return ""


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.[^.]+)?$")


def lora_scaling(config: dict, module: str, rank: int) -> float:
    """What peft multiplies a LoRA module's B @ A by: lora_alpha (per module with alpha_pattern; peft's default 8) over
    the module's rank, or over its square root with rsLoRA. The chat engine and the merged export both apply it."""
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    alpha = float(pattern.get(get_pattern_key(pattern.keys(), module), config.get("lora_alpha", 8)))
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


def targets_module(target: str, module: str) -> bool:
    """peft's rule for a target_modules name: the module's own name or its last dotted part(s). Training checks that
    each target found a module, and a saved adapter that each target has tensors, with the same rule."""
    return module == target or module.endswith("." + target)


def _missing_modules(config: dict, tensors: list[str]) -> str:
    """'' when every LoRA module has both halves, every listed target module has tensors, and each has them in the
    same layers as the others; else what is missing, in words."""
    halves: dict[str, set[str]] = {}
    for key in tensors:
        m = _LORA_KEY.match(key)
        if m:
            halves.setdefault(m["module"], set()).add(m["ab"])
    if not halves:
        return "any module"
    lopsided = sorted(mod for mod, ab in halves.items() if ab != {"A", "B"})
    if lopsided:
        return f"the other half (lora_A or lora_B) of {_some(lopsided)}"
    targets = config.get("target_modules")
    if isinstance(targets, list):
        absent = [t for t in targets if isinstance(t, str)
                  and not any(targets_module(t, mod) for mod in halves)]
        if absent:
            return ", ".join(sorted(absent))
    # the same module in every layer: q_proj in layers 0-31 but v_proj only in 0-15 is half an adapter
    layers: dict[tuple[str, int], set[tuple[str, ...]]] = {}
    for mod in halves:
        parts = mod.split(".")
        index = tuple(p for p in parts if p.isdigit())
        shape = ".".join("#" if p.isdigit() else p for p in parts)
        layers.setdefault((shape, len(index)), set()).add(index)
    for depth in {d for _, d in layers if d}:
        everywhere = set().union(*(ix for (_, d), ix in layers.items() if d == depth))
        for (shape, d), ix in sorted(layers.items()):
            if d == depth and ix != everywhere:
                gaps = sorted(".".join(i) for i in everywhere - ix)
                return f"{shape.rsplit('.', 1)[-1]} in layer {_some(gaps)}"
    return ""


def _some(items: list[str], most: int = 5) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


# --- listing and choosing --------------------------------------------------------------------------------
@dataclass
class RunInfo:
    name: str
    path: Path
    status: str
    base_model: str
    dataset: str
    created: float
    step: int
    final_loss: float | None
    usable: bool  # an adapter that loads: finished or stopped, files verified
    metrics: dict = field(default_factory=dict)  # the final figures in run.json
    damaged: str = ""  # why this folder cannot be used although it should be, or ''

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER


def list_runs(root: str | Path) -> list[RunInfo]:
    """Past runs, newest first; reads only. A run whose process died reads as interrupted; a folder that cannot be
    read is listed as damaged, with the reason, and never stops the others from being listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    infos = [info for run_dir in root.iterdir() if (info := _listed(run_dir)) is not None]
    return sorted(infos, key=lambda r: r.created, reverse=True)


def _is_run_folder(path: Path) -> bool:
    """A folder with a run.json, not hidden (temp and trash folders start with a dot)."""
    return not path.name.startswith(".") and path.is_dir() and (path / "run.json").exists()


def _listed(path: Path) -> RunInfo | None:
    """The run in `path` as listed (None where it is no run folder); one that cannot be read is a damaged run."""
    try:
        return _read_run(path) if _is_run_folder(path) else None
    except Exception as e:  # whatever a hostile or broken folder does, the other runs stay listed
        log.warning("run folder %s: %s", path.name, e)
        return _damaged(path, f"cannot be read ({type(e).__name__})")


def _read_run(run_dir: Path) -> RunInfo:
    try:
        meta = _json_object(run_dir / "run.json")
    except DamagedRun as e:
        return _damaged(run_dir, str(e))
    status = _status(meta)
    info = RunInfo(name=run_dir.name, path=run_dir, status=status, base_model=_text(meta.get("base_model")),
                   dataset=_text(meta.get("dataset")), created=_float(meta.get("created")),
                   step=int(_float(meta.get("step"))), final_loss=meta.get("final_loss")
                   if _number(meta.get("final_loss")) else None, usable=False,
                   metrics=meta["metrics"] if isinstance(meta.get("metrics"), dict) else {})
    if (run_dir / ADAPTER).exists():
        info.damaged = adapter_problem(run_dir / ADAPTER) or _format_problem(run_dir)
        info.usable = not info.damaged and status in USABLE
    return info


def _format_problem(run_dir: Path) -> str:
    """'' when chat can read the prompt format the adapter was trained in, else why not."""
    try:
        prompt_format(run_dir)
        return ""
    except DamagedRun as e:
        return str(e)


def _damaged(run_dir: Path, reason: str) -> RunInfo:
    return RunInfo(name=run_dir.name, path=run_dir, status="unknown", base_model="", dataset="", created=0.0, step=0,
                   final_loss=None, usable=False, damaged=reason)


def _text(v: Any) -> str:
    return v[:500] if isinstance(v, str) else ""


def _float(v: Any) -> float:
    return float(v) if _number(v) else 0.0


def usable_runs(root: str | Path) -> list[RunInfo]:
    """The runs whose adapter can be loaded, newest first (Chat offers these)."""
    return [r for r in list_runs(root) if r.usable]


def find_run(root: str | Path, name: str) -> RunInfo | None:
    """The run called `name` under root, as listed, reading only its folder (a click names one run: the list is not
    read); None when there is none. A name that is no run name (a path, "..") is a ValueError: it never escapes root."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ValueError("pick a run from the list")
    return None if name.startswith(".") else _listed(Path(root) / name)  # "." would be root itself


def usable_run(root: str | Path, name: str) -> RunInfo:
    """The run called `name` under root if its adapter is usable; ValueError says why not."""
    info = find_run(root, name)
    if info is None:
        raise ValueError(f"no run called {name}")
    if info.damaged:
        raise ValueError(f"run {name} is damaged: {info.damaged}")
    if not info.usable:
        raise ValueError(f"run {name} has no usable adapter (status: {info.status})")
    return info


def resumable_runs(root: str | Path) -> list[RunInfo]:
    """Interrupted runs that saved a complete checkpoint to go on from."""
    return [r for r in list_runs(root) if r.status == "interrupted" and latest_checkpoint(r.path)]


def portable_files(info: RunInfo, history: bool = False) -> list[Path]:
    """What leaves this machine with an adapter: its files and what it takes to use it again (PORTABLE_FILES); with
    history, the metrics and run.json too."""
    extra = PORTABLE_FILES + (HISTORY_FILES if history else ())
    return [info.adapter_dir / n for n in ADAPTER_FILES] + [info.path / n for n in extra if (info.path / n).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint of a run, if it saved any.

    Trainer checkpoints are not atomic; trainer_state.json is written last, so a folder without it is one whose
    write was cut short (the process was killed mid-save) and resuming from it would fail.
    """
    ckpts = [p for p in checkpoints_dir(run_dir).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


# --- recovery after a crash ------------------------------------------------------------------------------
def recover_all(root: str | Path) -> list[str]:
    """Start-up step (the app, the CLI): undo what killed processes left in every run folder. Returns what was done."""
    root = Path(root)
    done = []
    for run_dir in sorted(root.iterdir()) if root.is_dir() else ():
        try:
            if _is_run_folder(run_dir):
                done += [f"{run_dir.name}: {what}" for what in recover(run_dir)]
        except Exception as e:  # one folder that cannot be repaired is listed as damaged; the others are repaired
            log.warning("run folder %s: recovery failed: %s", run_dir.name, e)
    return done


def recover(run_dir: Path) -> list[str]:
    """Undo what a killed process left behind: a half-done adapter or export swap, temp folders, a run stuck at
    'running'.

    A folder whose run is still running in a live process is left alone: its temp folders are a save in progress."""
    meta = read_json(run_dir / "run.json")
    if meta.get("status") == "running" and _alive(meta.get("pid"), meta.get("boot")):
        return []
    done = []
    for name in SWAPPED:  # the adapter, and a merged export: both swapped in whole by save_folder_atomically
        final = run_dir / name
        olds = sorted(run_dir.glob(f".{name}.old-*"))
        if not final.exists() and olds:
            olds[-1].rename(final)
            done.append(f"the {name} of a swap cut short is back in place")
        for junk in list(run_dir.glob(f".{name}.tmp-*")) + list(run_dir.glob(f".{name}.old-*")):
            shutil.rmtree(junk, ignore_errors=True)
            done.append(f"removed {junk.name}")
    if meta.get("status") == "running":
        meta["status"] = "interrupted"
        write_json(run_dir / "run.json", meta)
        done.append("marked interrupted (its process is gone)")
    return done


def _status(meta: dict) -> str:
    """run.json's status, except that a run whose process is gone reads as interrupted (before recovery writes it)."""
    status = meta.get("status")
    if not isinstance(status, str):
        return "unknown"
    if status == "running" and not _alive(meta.get("pid"), meta.get("boot")):
        return "interrupted"
    return status[:40]


def boot_id() -> str:
    """Distinguishes this process from an earlier one with the same pid (after a restart)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() + f":{_process_start()}"
    except OSError:
        return f"{_process_start()}"


def _process_start() -> str:
    try:
        return Path(f"/proc/{os.getpid()}/stat").read_text().split()[21]
    except (OSError, IndexError):
        return "?"


def _alive(pid: Any, boot: Any) -> bool:
    if pid != os.getpid():
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except (OSError, ProcessLookupError, OverflowError):
            return False
        return _stat_start(pid) is not None and str(boot).endswith(":" + str(_stat_start(pid)))
    return boot == boot_id()


def _stat_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[21]
    except (OSError, IndexError):
        return None
