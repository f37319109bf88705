"""Run folders on disk: naming, atomic writes, the adapter swap, listing past runs, and recovery after a crash.

    runs/<name>/
      run.json            status (running | finished | stopped | failed | interrupted), final figures, pid
      config.yaml         the resolved TrainConfig
      prompt_format.json  the prompt format the adapter was trained in (qlora/prompts.py)
      versions.json       library versions
      metrics.jsonl       one line per logged step (train loss, eval loss, lr, tokens/s)
      adapter/            adapter_config.json + adapter_model.safetensors: PeftModel.from_pretrained(base, this)
      checkpoints/        resumable Trainer checkpoints, when save_steps > 0
stdlib only.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ADAPTER = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
USABLE = ("finished", "stopped")


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


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_adapter_atomically(run_dir: Path, save: Callable[[Path], None],
                            verify: Callable[[Path], None] | None = None) -> Path:
    """save(tmp) writes the adapter into a temp folder; it is checked, then swapped in for run_dir/adapter.

    A crash or a full disk during save() leaves the previous adapter (if any) untouched; the temp folder is removed.
    """
    final = run_dir / ADAPTER
    tmp = run_dir / f".{ADAPTER}.tmp-{uuid.uuid4().hex[:8]}"
    old = run_dir / f".{ADAPTER}.old-{uuid.uuid4().hex[:8]}"
    try:
        save(tmp)
        (verify or verify_adapter)(tmp)
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


def verify_adapter(folder: Path) -> None:
    """Raise unless folder holds a readable adapter config and a safetensors file whose header parses."""
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise OSError(f"{folder}: {name} missing after save")
    json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    with open(folder / "adapter_model.safetensors", "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise OSError(f"{folder}: adapter_model.safetensors is truncated")
        n = int.from_bytes(head, "little")
        header = f.read(n)
        if len(header) != n:
            raise OSError(f"{folder}: adapter_model.safetensors is truncated")
        meta = json.loads(header)
        size = os.fstat(f.fileno()).st_size
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise OSError(f"{folder}: adapter_model.safetensors is truncated ({size} bytes, expected {8 + n + end})")


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

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER


def list_runs(root: str | Path) -> list[RunInfo]:
    """Past runs, newest first. Runs whose process died are reported as interrupted; half-saved folders are cleaned."""
    root = Path(root)
    if not root.is_dir():
        return []
    infos = []
    for run_dir in root.iterdir():
        meta_path = run_dir / "run.json"
        if not run_dir.is_dir() or run_dir.name.startswith(".") or not meta_path.exists():
            continue
        recover(run_dir)
        meta = read_json(meta_path)
        status = meta.get("status", "unknown")
        try:
            verify_adapter(run_dir / ADAPTER)
            has_adapter = True
        except (OSError, ValueError):
            has_adapter = False
        infos.append(RunInfo(name=run_dir.name, path=run_dir, status=status, base_model=meta.get("base_model", ""),
                             dataset=meta.get("dataset", ""), created=float(meta.get("created", 0)),
                             step=int(meta.get("step", 0) or 0), final_loss=meta.get("final_loss"),
                             usable=has_adapter and status in USABLE))
    return sorted(infos, key=lambda r: r.created, reverse=True)


def recover(run_dir: Path) -> None:
    """Undo what a killed process left behind: a half-done adapter swap, temp folders, a run stuck at 'running'."""
    final = run_dir / ADAPTER
    olds = sorted(run_dir.glob(f".{ADAPTER}.old-*"))
    if not final.exists() and olds:
        olds[-1].rename(final)
    for junk in list(run_dir.glob(f".{ADAPTER}.tmp-*")) + list(run_dir.glob(f".{ADAPTER}.old-*")):
        shutil.rmtree(junk, ignore_errors=True)
    meta_path = run_dir / "run.json"
    meta = read_json(meta_path)
    if meta.get("status") == "running" and not _alive(meta.get("pid"), meta.get("boot")):
        meta["status"] = "interrupted"
        write_json(meta_path, meta)


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
        if not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except (OSError, ProcessLookupError):
            return False
        return _stat_start(pid) is not None and str(boot).endswith(":" + str(_stat_start(pid)))
    return boot == boot_id()


def _stat_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[21]
    except (OSError, IndexError):
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint of a run, if it saved any.

    Trainer checkpoints are not atomic; trainer_state.json is written last, so a folder without it is one whose
    write was cut short (the process was killed mid-save) and resuming from it would fail.
    """
    ckpts = [p for p in (run_dir / "checkpoints").glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)
