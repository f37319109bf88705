"""The device: which card this process trains on (or the CPU), its memory budget, precision, the lock, freeing memory.

Also answers the deployment question: is there an NVIDIA GPU here that torch cannot use (a driver older than the CUDA
that torch was built for)? Then everything would quietly run on the CPU, so the app, the CLI and the preflight say so.
torch is imported on first use, never at import.
"""
from __future__ import annotations

import functools
import gc
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
PROC_DRIVER = Path("/proc/driver/nvidia")
SMI_QUERY = ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]

# One device, one user at a time: training and chat both take this lock, and whoever finds it taken says so.
gpu_lock = threading.Lock()


class BusyError(RuntimeError):
    """The device is taken (a training run, or another chat): say so at once instead of queueing for hours."""


@dataclass(frozen=True)
class Card:
    """What this process computes on: a CUDA GPU (name, memory, bf16) or the CPU, and any GPU torch cannot use."""

    cuda: bool
    name: str = "CPU"
    total_gib: float = 0.0
    free_gib: float = 0.0
    bf16: bool = False
    budget_gib: float | None = None  # what one run may plan for (QLORA_GPU_MEMORY_GIB, else the card's memory)
    unusable: str = ""  # a GPU is present but torch cannot use it: why, in one line (see unusable_gpu)


def card() -> Card:
    """This process's card as it is now."""
    import torch

    if not torch.cuda.is_available():
        return Card(cuda=False, unusable=unusable_gpu(cuda=False))
    free, total = torch.cuda.mem_get_info()
    return Card(cuda=True, name=torch.cuda.get_device_name(), total_gib=total / GIB, free_gib=free / GIB,
                bf16=bf16_supported(), budget_gib=memory_budget_gib())


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def current_gpu() -> int | None:
    """The CUDA device this process computes on (its own under `accelerate launch`), or None on the CPU."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else None


def gpu_count() -> int:
    """GPUs torch can use in this process (several: training runs data parallel through accelerate)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


# --- memory ----------------------------------------------------------------------------------------------
def memory_budget_gib() -> float | None:
    """What this process may use on the GPU: QLORA_GPU_MEMORY_GIB (a T4's 15 when emulating one), else the card."""
    import torch

    if os.environ.get("QLORA_GPU_MEMORY_GIB"):
        return float(os.environ["QLORA_GPU_MEMORY_GIB"])
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def available_ram_gib() -> float:
    """Memory the CPU path may use: MemAvailable, or unbounded where /proc does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("inf")


def peak_allocated_gib() -> float | None:
    """The most GPU memory this process has held since the last free_memory(), or None on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


def free_memory() -> None:
    """Give the GPU back however a run or a chat model ended: the next run and chat need it."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    except Exception:
        pass


# --- precision -------------------------------------------------------------------------------------------
def pick_precision(requested: str = "auto", on: Card | None = None) -> str:
    """bf16 where the card has it, fp16 on older cards (a T4), fp32 on the CPU. `on`: the card (default: this one)."""
    cuda = cuda_available() if on is None else on.cuda

    def has_bf16() -> bool:
        return bf16_supported() if on is None else on.bf16

    if requested != "auto":
        if requested == "bf16" and cuda and not has_bf16():
            raise ValueError("precision: bf16 is not supported by this GPU; use fp16 or auto")
        if requested in ("bf16", "fp16") and not cuda:
            return "fp32"  # mixed precision needs a GPU; the CPU path computes in fp32
        return requested
    if not cuda:
        return "fp32"
    return "bf16" if has_bf16() else "fp16"


def bf16_supported() -> bool:
    """QLORA_NO_BF16=1 pretends the card has none: T4 mode on a bigger card."""
    import torch

    if os.environ.get("QLORA_NO_BF16") == "1":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# --- a GPU that torch cannot use -------------------------------------------------------------------------
def unusable_gpu(cuda: bool | None = None, proc_driver: Path = PROC_DRIVER, smi: str | None = None) -> str:
    """'' when torch uses the GPU, or when there is none; else one line naming the driver and torch's CUDA.

    A GPU is present when /proc/driver/nvidia exists or nvidia-smi answers. `smi` is nvidia-smi's answer to SMI_QUERY
    ("535.104.05, Tesla T4"); by default it is asked, where it is installed.
    """
    if cuda is None:
        cuda = cuda_available()
    if cuda:
        return ""
    smi = _nvidia_smi() if smi is None else smi
    driver = _driver_version(proc_driver, smi)
    if driver is None:
        return ""
    import torch

    name = smi.split(",", 1)[1].strip() if "," in smi else "an NVIDIA GPU"
    built = (f"torch {torch.__version__} was built for CUDA {torch.version.cuda}" if torch.version.cuda
             else f"torch {torch.__version__} is a CPU-only build")
    return (f"{name} is present (NVIDIA driver {driver}) but torch cannot use it: {built}, which this driver does "
            "not run; everything runs on the CPU. Install a torch build for this driver (README: an older NVIDIA "
            "driver)")


def _driver_version(proc_driver: Path, smi: str) -> str | None:
    """The driver version from nvidia-smi's answer or /proc/driver/nvidia/version; '?' if present but unreadable."""
    found = re.match(r"\s*(\d+\.\d+(?:\.\d+)?)\s*,", smi)
    if found:
        return found.group(1)
    try:
        text = (proc_driver / "version").read_text(errors="replace")
    except OSError:
        return "?" if proc_driver.exists() else None
    found = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else "?"


@functools.lru_cache(maxsize=1)
def _nvidia_smi() -> str:
    """nvidia-smi's answer to SMI_QUERY (first GPU), or '' when it is not installed or does not answer."""
    if shutil.which(SMI_QUERY[0]) is None:
        return ""
    try:
        out = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0] if lines else ""
