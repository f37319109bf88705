"""The device: which card this process trains on (or the CPU), its memory budget, precision, compute capability and
fp16 matmul rate (the card facts the speed plan weighs), the lock, freeing memory.

Also answers the deployment question: is there an NVIDIA GPU here that torch cannot use (a driver older than the CUDA
that torch was built for)? Then everything would quietly run on the CPU, so the app, the CLI and the preflight say so.
On a host with several GPUs it also owns which job holds which card (`Cards`): chat on one, training on the others.
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
from dataclasses import dataclass, replace
from pathlib import Path

GIB = 2**30
PROC_DRIVER = Path("/proc/driver/nvidia")
SMI_QUERY = ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]


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


def card(index: int | None = None) -> Card:
    """A card as it is now: this thread's, or GPU `index` of this host (where a launched run will train). For another
    card, its name and memory are its own and the rest (precision, compute) this one's: the GPUs of a host are alike."""
    import torch

    if index is not None and torch.cuda.is_available() and index != torch.cuda.current_device():
        props = torch.cuda.get_device_properties(index)
        free = _smi_free_gib(str(props.uuid))
        if free is None:  # no nvidia-smi: ask CUDA, at the price of this process's context on that card
            free = torch.cuda.mem_get_info(index)[0] / GIB
        return replace(card(), name=props.name, total_gib=props.total_memory / GIB, free_gib=free,
                       budget_gib=memory_budget_gib(index))
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
    """The CUDA device this thread computes on (each process's own under `accelerate launch`, chat's card in the chat
    thread), or None on the CPU."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else None


def gpu_count() -> int:
    """GPUs torch can use in this process (several: training runs data parallel through accelerate)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def use_gpu(index: int) -> None:
    """The calling thread computes on GPU `index` (CUDA's current device is per thread); nothing on the CPU."""
    import torch

    if torch.cuda.is_available() and index < torch.cuda.device_count():
        torch.cuda.set_device(index)


def visible_devices(which, parent: str | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for a child process that is to see only this process's cards `which`. This process may
    see a subset itself (`parent`: its own CUDA_VISIBLE_DEVICES, read from the environment by default); the child's
    list then names the same cards in the parent's terms."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES") if parent is None else parent
    if not parent:
        return ",".join(str(c) for c in which)
    ours = [d.strip() for d in parent.split(",") if d.strip()]
    missing = [c for c in which if c >= len(ours)]
    if missing:
        raise ValueError(f"CUDA_VISIBLE_DEVICES={parent!r} names no GPU {missing[0]}")
    return ",".join(ours[c] for c in which)


# --- which job holds which card ------------------------------------------------------------------------------
# Training and chat share the host's cards. On one GPU (or the CPU) they take turns, as one lock. On several, chat
# serves on CHAT_CARD while training runs data parallel on the others; a run takes every card only when no chat
# model is loaded (nobody has chatted since the last run), and chat then says so until the run ends. The split is
# decided when a run starts: a data-parallel run cannot grow or shrink while it trains. An on-demand evaluation
# (qlora/evaluate.py) is a job of one card, in this process, placed by the same rule: chat's card only on one
# device, or when no chat model is loaded.
TRAIN, CHAT, EVAL = "training", "chat", "evaluation"
CHAT_CARD = 0  # torch's default device: the chat code needs no device juggling


def gpu_names(which) -> str:
    """'GPU 2', 'GPUs 1-3', 'GPUs 0, 2'."""
    which = sorted(which)
    if len(which) == 1:
        return f"GPU {which[0]}"
    if which == list(range(which[0], which[-1] + 1)):
        return f"GPUs {which[0]}-{which[-1]}"
    return "GPUs " + ", ".join(map(str, which))


@dataclass(frozen=True)
class Placement:
    """Where a training run goes on a host with `gpus` GPUs (0: the CPU, one device), and where chat serves."""

    gpus: int
    train: tuple[int, ...]
    chat: int = CHAT_CARD

    @property
    def shared(self) -> bool:
        """Training takes chat's card too, so chat waits for the run (one GPU, the CPU, or no chat model loaded)."""
        return self.chat in self.train

    def describe(self) -> str:
        """Which cards each job uses, in words: 'training on GPUs 1-3, chat on GPU 0'."""
        if self.gpus == 0:
            return "training and chat on the CPU, one at a time"
        if self.gpus == 1:
            return "training and chat on the one GPU, one at a time"
        if self.shared:
            return (f"training on {gpu_names(self.train)} (every GPU: no chat model is loaded, so chat waits until "
                    "the run ends)")
        return f"training on {gpu_names(self.train)}, chat on GPU {self.chat}"


def place(gpus: int, chat_loaded: bool) -> Placement:
    """The policy: on several GPUs a run trains on every card but chat's while a chat model is loaded (or loading),
    on all of them otherwise; on one GPU or the CPU it takes the one device, which chat then waits for."""
    if gpus <= 1:
        return Placement(gpus, (0,))
    if chat_loaded:
        return Placement(gpus, tuple(c for c in range(gpus) if c != CHAT_CARD))
    return Placement(gpus, tuple(range(gpus)))


class Cards:
    """Which job holds which card right now, and whether a job's model sits on its card between uses.

    Taking is all or nothing and never queues: whoever finds a card taken says so at once. `gpus` pretends a count
    (tests); by default it is torch's, asked on first use. On the CPU there is one device, card 0.
    """

    def __init__(self, gpus: int | None = None):
        self._gpus = gpus
        self._cond = threading.Condition()
        self._holders: dict[int, str] = {}  # card -> job
        self._loaded: set[Lease] = set()  # leases whose model stays on their cards between uses (a chat engine's)

    @property
    def gpus(self) -> int:
        if self._gpus is None:
            self._gpus = gpu_count()
        return self._gpus

    def every(self) -> tuple[int, ...]:
        return tuple(range(max(self.gpus, 1)))

    def placement(self) -> Placement:
        """Where a run would train if it started now."""
        with self._cond:
            return place(self.gpus, self._chat_present())

    def take_training(self) -> Placement:
        """Take the cards a run trains on now (see `place`); BusyError when chat is answering on the one device, or
        the last run's processes have not let go yet."""
        with self._cond:
            placement = place(self.gpus, self._chat_present())
            if not self._take(TRAIN, placement.train):
                if TRAIN in self._holders.values():
                    raise BusyError("the last run's processes are still exiting; try again in a moment")
                evaluating = sorted(c for c in placement.train if self._holders.get(c) == EVAL)
                if evaluating:
                    raise BusyError(f"an evaluation holds {self._the_gpu(evaluating)}; start the run when it ends")
                raise BusyError("the GPU is busy answering a chat; try again in a moment")
            return placement

    def take_evaluation(self) -> int:
        """Take the one card an evaluation computes on, in this process; returns it. On one GPU or the CPU that is the
        one device, as a run takes it (CHAT_CARD: the caller unloads its chat model); on several, a free card other
        than chat's while a chat model is loaded, else any free card, chat's last. BusyError says who holds them."""
        with self._cond:
            if self.gpus <= 1:
                allowed = [CHAT_CARD]
            else:
                allowed = [c for c in reversed(range(self.gpus)) if c != CHAT_CARD or not self._chat_present()]
            for c in allowed:
                if self._take(EVAL, (c,)):
                    return c
            held = {self._holders.get(c) for c in allowed}
            if self.gpus <= 1:
                raise BusyError({TRAIN: "a training run holds the GPU; evaluate when it ends",
                                 CHAT: "the GPU is busy answering a chat; try again in a moment",
                                 EVAL: "another evaluation holds the GPU; try again when it ends"}[held.pop()])
            jobs = ", ".join(f"{job} on {gpu_names(c for c, j in self._holders.items() if j == job)}"
                             for job in (TRAIN, EVAL, CHAT) if job in self._holders.values())
            kept = f"; GPU {CHAT_CARD} stays chat's" if CHAT_CARD not in allowed else ""
            raise BusyError(f"no GPU is free for an evaluation ({jobs}{kept}); try again when {_when(held)}")

    def take(self, job: str, which, blocking: bool = False, timeout: float | None = None) -> bool:
        """Take every card of `which` for `job`, or none of them; wait for them only if `blocking`."""
        with self._cond:
            if blocking:
                self._cond.wait_for(lambda: self._free(which), timeout)
            return self._take(job, which)

    def give_back(self, job: str, which) -> None:
        with self._cond:
            for c in which:
                if self._holders.get(c) != job:
                    raise RuntimeError(f"{job} gives back GPU {c}, which it does not hold")
            for c in which:
                del self._holders[c]
            self._cond.notify_all()

    def held(self) -> dict[int, str]:
        with self._cond:
            return dict(self._holders)

    def set_loaded(self, lease: "Lease", loaded: bool) -> None:
        """The lease's model stays on its cards between uses (a chat engine's, once loaded), or no longer does."""
        with self._cond:
            (self._loaded.add if loaded else self._loaded.discard)(lease)

    def lease(self, job: str, which=None) -> "Lease":
        return Lease(self, job, None if which is None else tuple(which))

    def why_busy(self, which) -> str:
        """Why the cards `which` cannot be had now, in a visitor's words."""
        with self._cond:
            jobs = {self._holders.get(c) for c in which} - {None}
            if EVAL in jobs:
                return f"an evaluation holds {self._the_gpu(which)}"
            if TRAIN not in jobs:
                return "the GPU is busy; try again in a moment"
            if self.gpus <= 1:
                return "the GPU is busy (a training run holds it); chat is back when it ends"
            run = sorted(c for c, j in self._holders.items() if j == TRAIN)
            return (f"every GPU is busy: the training run uses {gpu_names(run)} (it started while no chat model "
                    "was loaded); chat is back when it ends")

    def _the_gpu(self, which) -> str:
        return "the GPU" if self.gpus <= 1 else gpu_names(which)

    def _chat_present(self) -> bool:
        return any(lease.job == CHAT for lease in self._loaded) or self._holders.get(CHAT_CARD) == CHAT

    def _free(self, which) -> bool:
        return all(c not in self._holders for c in which)

    def _take(self, job: str, which) -> bool:
        if not self._free(which):
            return False
        for c in which:
            self._holders[c] = job
        return True


def _when(jobs: set) -> str:
    return "the run ends" if TRAIN in jobs else "the evaluation ends" if EVAL in jobs else "chat is idle"


class Lease:
    """Some cards (None: every card) that one job takes and gives back as a lock: acquire, release, locked, with."""

    def __init__(self, cards: Cards, job: str, which: tuple[int, ...] | None = None):
        self.cards, self.job, self._which = cards, job, which
        self._taken: tuple[int, ...] = ()

    @property
    def which(self) -> tuple[int, ...]:
        return self._which if self._which is not None else self.cards.every()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        which = self.which
        if not self.cards.take(self.job, which, blocking, None if timeout < 0 else timeout):
            return False
        self._taken = which
        return True

    def release(self) -> None:
        taken, self._taken = self._taken, ()
        self.cards.give_back(self.job, taken)

    def locked(self) -> bool:
        """Is any of these cards held, by anyone?"""
        held = self.cards.held()
        return any(c in held for c in self.which)

    def loaded(self, loaded: bool) -> None:
        """This job's model stays on its cards between uses, or no longer does."""
        self.cards.set_loaded(self, loaded)

    def why_busy(self) -> str:
        return self.cards.why_busy(self.which)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


cards = Cards()  # this host's cards, shared by the job manager and every chat engine of this process
# Every card at once, as one lock (what a one-GPU host has always had): a stand-in for a training run that holds
# them all, and `gpu_lock.locked()` says whether any job holds any card.
gpu_lock = cards.lease(TRAIN)


# --- memory ----------------------------------------------------------------------------------------------
def memory_budget_gib(index: int | None = None) -> float | None:
    """What one run may use on a GPU (this process's, or `index`): QLORA_GPU_MEMORY_GIB (a T4's 15 when emulating
    one), else the card's memory."""
    import torch

    if os.environ.get("QLORA_GPU_MEMORY_GIB"):
        return float(os.environ["QLORA_GPU_MEMORY_GIB"])
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index
                                            ).total_memory / GIB


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


def triton_kernels_unavailable(device) -> str | None:
    """Why the chat engine's Triton kernels (`nf4mm`, `decodeops`) cannot run on `device` (None: they can): they need
    CUDA, Triton, and compute capability 8.0 or newer, where they were built and measured."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"compute capability {major}.x (the Triton kernels are built and measured for 8.0 or newer)"
    return None


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


def _smi_free_gib(uuid: str) -> float | None:
    """GPU `uuid`'s free memory from nvidia-smi, so asking does not make this process a CUDA context on a card a run
    is about to train on (a few hundred MiB it would keep); None where nvidia-smi does not answer."""
    if shutil.which(SMI_QUERY[0]) is None:
        return None
    gpu = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    try:
        out = subprocess.run([SMI_QUERY[0], f"--id={gpu}", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) / 1024 if out.returncode == 0 else None  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


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
