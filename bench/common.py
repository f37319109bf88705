"""Shared benchmark pieces: the 7B-shaped random model, the real guanaco tokens, a step timer, the card's name."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository carries the data (tests/data, see its NOTICE), so it travels to the GPU machine with the tree.
DATA = ROOT / "tests" / "data"
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# the benches' --tiny: a 2-layer model of the same kind, for a CPU smoke test of a script (figures meaningless)
TINY = dict(LLAMA_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4)
T4_GIB = 15.0


def data_dir() -> Path:
    if not (DATA / "guanaco-llama2-1k.parquet").exists():
        raise SystemExit(f"guanaco-llama2-1k.parquet not found in {DATA}: is this a full clone of the repository?")
    return DATA


def build_random_model(path: Path, shape: dict | None = None) -> Path:
    """A Llama with random weights (the 7B shape by default) saved as fp16 safetensors with the real tokenizer.

    Built on the GPU where there is one (about 20 s for 7B); its speed and memory are those of the real model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.model import load_tokenizer

    path = Path(path)
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**(shape or LLAMA_7B))).to(dtype)
    model.save_pretrained(tmp, safe_serialization=True)
    tok = load_tokenizer(str(data_dir() / "llama2-tokenizer"))
    tok.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(path)
    return path


def guanaco_ids(tokenizer, max_length: int = 1024) -> list:
    """The guanaco rows as the product tokenizes them (data.Row: ids and labels), truncated to max_length."""
    from qlora.data import prepare, tokenize

    return tokenize(prepare(str(data_dir() / "guanaco-llama2-1k.parquet")).train, tokenizer, max_length)


def card() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"name": "cpu", "memory_gib": None}
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}


def versions() -> dict:
    from qlora.train import library_versions

    return library_versions()


def cap_memory(gib: float) -> None:
    """Emulate a smaller card: this process may allocate at most `gib` on the GPU."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))


class StepMeter:
    """Per-step wall time (synchronized), non-padding tokens counted at the model's input, and what held the host up
    in the step: Python's garbage collector (seconds) and the CUDA allocator's trips to the driver."""

    def __init__(self, model):
        import torch

        self.cuda = torch.cuda.is_available()
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.gc_s: list[float] = []
        self.device_allocs: list[int] = []
        self._pending = []  # the step's token counts, device tensors until the step's end (no sync a forward)
        self._last = None
        self._gc_now, self._gc_started = 0.0, None
        self._allocs = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        # padded batches carry a mask of real tokens; padding-free ones hold real tokens only
        self._pending.append(mask.sum() if mask is not None else ids.numel())

    def _gc(self, phase, info):
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_now += time.perf_counter() - self._gc_started
            self._gc_started = None

    def callback(self):
        import gc

        from transformers import TrainerCallback

        meter = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter._sync()
                gc.callbacks.append(meter._gc)
                meter._allocs = meter._device_allocs()
                meter._last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                meter._sync()
                now = time.perf_counter()
                meter.times.append(now - meter._last)
                meter.tokens.append(sum(int(n) for n in meter._pending))
                meter.gc_s.append(round(meter._gc_now, 4))
                allocs = meter._device_allocs()
                meter.device_allocs.append(allocs - meter._allocs)
                meter._pending, meter._last, meter._gc_now, meter._allocs = [], now, 0.0, allocs

            def on_train_end(self, args, state, control, **kw):
                if meter._gc in gc.callbacks:
                    gc.callbacks.remove(meter._gc)

        return _Cb()

    def _device_allocs(self) -> int:
        import torch

        return torch.cuda.memory_stats().get("num_device_alloc", 0) if self.cuda else 0

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def cuda_seconds(fn, reps: int = 10, warmup: int = 3) -> float:
    """Seconds one call of fn takes on the GPU: CUDA events around `reps` calls, after `warmup` untimed ones."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")


def kernel_kind(name: str) -> str:
    """A profiled CUDA kernel's kind, for the benches' where-the-time-goes tables (chat steps and training steps)."""
    n = name.lower()
    if "nf4mm" in n:
        return "4-bit matmul (nf4mm)"
    if "gemm_4bit" in n or "kgemm" in n or "gemv" in n or "4bit_inference" in n:
        return "4-bit matmul (bitsandbytes fused)"
    if "nf4_dequantize" in n:
        return "4-bit dequantize (qlora/dequant.py)"
    if "dequantize" in n:
        return "4-bit dequantize (bitsandbytes)"
    if "fmha" in n or "attention" in n or "flash" in n or "attend" in n or "merge_kernel" in n:
        return "attention"
    if "adam" in n or "multi_tensor" in n or "optimizer" in n:
        return "optimizer"
    if "softmax" in n or "nll" in n or "cross_entropy" in n:
        return "softmax / cross-entropy"
    if "sort" in n or "scan" in n or "radix" in n or "cumsum" in n:
        return "sampling (sort, cumsum)"
    if "gemm" in n or "gemv" in n or "xmma" in n or "cutlass" in n or "sm90" in n or "cublas" in n or "matmul" in n:
        return "16-bit matmul (LM head, LoRA, dequantized 4-bit)"
    if "rms_norm" in n:
        return "RMSNorm (decodeops)"
    if "triton" in n:
        return "fused elementwise (inductor)"
    if "reduce_kernel" in n:
        return "reductions (norms, sums)"
    return "elementwise / copies / other"


def ms_by_kind(events, runs: int = 1) -> dict[str, float]:
    """A profile's CUDA kernel time by kernel_kind, in ms a run (`events`: the profiler's key_averages()), largest
    first."""
    kinds: dict[str, float] = {}
    for e in events:
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
            kind = kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1000 / runs
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))



def idle_gaps(trace: dict, top: int = 12, min_us: float = 50.0) -> dict:
    """Where the GPU sat idle in a profiler's chrome trace (`prof.export_chrome_trace`): the wall time from the first
    kernel to the last, the time some kernel ran (the union of kernel intervals), and the idle gaps of at least
    `min_us` grouped by what the host was doing when the kernel after each gap was launched (the profiled ops that
    enclose the launch, outermost first, the last three) and by the host calls that waited for the GPU in the gap
    (a sync ending inside it). The `top` groups by idle time."""
    events = trace.get("traceEvents", [])
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy",
                                                                                    "gpu_memset")),
                     key=lambda e: e["ts"])
    if not kernels:
        return {}
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")),
                 key=lambda e: e["ts"])
    waits = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
             and any(w in e.get("name", "") for w in ("Synchronize", "Memcpy", "EventQuery"))]
    busy, groups, gaps = 0.0, {}, 0
    end = kernels[0]["ts"]
    for k in kernels:
        start = k["ts"]
        if start - end >= min_us:
            launch = launches.get(k.get("args", {}).get("correlation"))
            at = launch["ts"] if launch else start
            inside = [o["name"] for o in ops if o["ts"] <= at <= o["ts"] + o.get("dur", 0)]
            waited = sorted({w["name"] for w in waits if end <= w["ts"] + w.get("dur", 0) <= start})
            key = " > ".join(inside[-3:]) or "(no op)"
            if waited:
                key += " | after " + ", ".join(waited)
            g = groups.setdefault(key, [0.0, 0])
            g[0] += start - end
            g[1] += 1
            gaps += 1
        busy += max(0.0, k["ts"] + k.get("dur", 0) - max(start, end))
        end = max(end, k["ts"] + k.get("dur", 0))
    wall = end - kernels[0]["ts"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(wall_ms=round(wall / 1000, 1), busy_ms=round(busy / 1000, 1), idle_ms=round((wall - busy) / 1000, 1),
                gaps=gaps, largest=[dict(ms=round(v[0] / 1000, 2), n=v[1], where=k) for k, v in ranked])
