"""The device: which card this process trains on (or the CPU), its memory budget, precision, compute capability and
fp16 matmul rate (the card facts the speed plan weighs), the lock, freeing memory.

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
    capability: tuple[int, int] | None = None  # CUDA compute capability: (7, 5) on a T4; None where unknown
    tflops: float | None = None  # large fp16 matmuls' sustained TFLOP/s (see matmul_tflops); None where unknown


def card() -> Card:
    """This process's card as it is now."""
    import torch

    if not torch.cuda.is_available():
        return Card(cuda=False, unusable=unusable_gpu(cuda=False))
    free, total = torch.cuda.mem_get_info()
    return Card(cuda=True, name=torch.cuda.get_device_name(), total_gib=total / GIB, free_gib=free / GIB,
                bf16=bf16_supported(), budget_gib=memory_budget_gib(), capability=compute_capability(),
                tflops=matmul_tflops())


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
    """QLORA_NO_BF16=1 (or QLORA_GPU_CAPABILITY below 8.0) pretends the card has none: T4 mode on a bigger card."""
    import torch

    if os.environ.get("QLORA_NO_BF16") == "1":
        return False
    capability = compute_capability()
    if capability is not None and capability < (8, 0):  # Turing and older: no bf16 arithmetic
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# --- compute: what kernels exist, how fast matmuls run -------------------------------------------------------
# Dense fp16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, fp32 accumulate, no sparsity), by a word of the
# device name; the first match wins, so longer names come first. Cards not listed are measured (matmul_tflops).
FP16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "RTX 4090": 165.0, "V100": 125.0, "T4": 65.0}
# What a large cuBLAS fp16 matmul sustains, as a share of that peak: a T4 at its 70 W cap gives about 40 of its 65
# (bench/mps.py calibrates the t4c mode to that), an H100 about 600-700 of 989.
MATMUL_EFFICIENCY = 0.62
T4_MATMUL_TFLOPS = FP16_PEAK_TFLOPS["T4"] * MATMUL_EFFICIENCY  # ~40: what the bench's t4c mode holds a big card to


def compute_capability() -> tuple[int, int] | None:
    """The card's CUDA compute capability, or None on the CPU. QLORA_GPU_CAPABILITY=7.5 pretends to be a T4 (Turing:
    no bf16, no FlashAttention kernels), as the bench's t4c mode does on a bigger card."""
    forced = os.environ.get("QLORA_GPU_CAPABILITY")
    if forced:
        major, _, minor = forced.partition(".")
        return int(major), int(minor or 0)
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(torch.cuda.current_device()))


def matmul_tflops() -> float | None:
    """Large fp16 matmuls' sustained rate on this card, TFLOP/s: QLORA_GPU_TFLOPS (the bench's compute-capped mode
    sets the rate it calibrated), else the datasheet peak of a known card times MATMUL_EFFICIENCY, else measured once
    (a fraction of a second). None on the CPU."""
    if os.environ.get("QLORA_GPU_TFLOPS"):
        return float(os.environ["QLORA_GPU_TFLOPS"])
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    peak = peak_tflops(torch.cuda.get_device_name(index))
    return peak * MATMUL_EFFICIENCY if peak is not None else _measured_tflops(index)


def peak_tflops(name: str) -> float | None:
    """The datasheet fp16 peak of a card by its name ("Tesla T4" -> 65), or None for a card not in the table."""
    return next((tflops for word, tflops in FP16_PEAK_TFLOPS.items()
                 if re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", name)), None)


@functools.lru_cache(maxsize=None)
def _measured_tflops(index: int, n: int = 4096, reps: int = 10) -> float:
    """A 4096-square fp16 matmul's rate on an unknown card (96 MiB of GPU memory for a moment)."""
    import torch

    with torch.cuda.device(index):
        a = torch.randn(n, n, device="cuda", dtype=torch.float16)
        b = torch.randn(n, n, device="cuda", dtype=torch.float16)
        a @ b  # cuBLAS picks its kernel on the first call
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000 / reps
        del a, b
    return 2 * n**3 / seconds / 1e12


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
