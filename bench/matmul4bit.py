"""What bitsandbytes' 4-bit matmul costs per decode step at a few rows, by the route it takes.

Issue 14's open lever. bitsandbytes 0.50 has fused 4-bit kernels that read the nf4 bytes directly (SIMT for a few
rows, MMA for more); a per-card heuristic (`_gemm_4bit_use_custom_cuda`) sends larger M on an H100/H200 to
dequantize-to-16-bit + cuBLAS instead. This times, on the 7B decoder's weight shapes inside CUDA graph replays (as the
chat engine's captured step runs them), and summed over the 32 layers: bitsandbytes' own choice, the fused kernel
forced, and M one-row calls:

    python -m bench.matmul4bit [--rows 1,2,4,8,16] [--dtype bf16|fp16]
"""
from __future__ import annotations

import argparse
import json
import sys


def _time_graph(fn, reps: int = 50) -> float:
    """Microseconds a call of fn takes, replayed from a CUDA graph that holds `reps` calls."""
    import torch

    from qlora.slots import captured

    g, _ = captured(lambda: [fn() for _ in range(reps)])  # as the chat engine captures its step
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / reps)
    return best


def main() -> int:
    import torch
    import bitsandbytes as bnb
    from bitsandbytes.backends.cuda import ops as cuda_ops
    from bitsandbytes.functional import quantize_4bit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    rows = [int(r) for r in a.rows.split(",")]
    # (out, in, how many in a Llama-2-7B layer): q k v o, gate up, down
    shapes = [(4096, 4096, 4), (11008, 4096, 2), (4096, 11008, 1)]
    torch.manual_seed(0)
    out: dict = dict(card=torch.cuda.get_device_name(0), dtype=a.dtype, shapes={}, step_ms={})
    for n_out, n_in, per_layer in shapes:
        w = torch.randn(n_out, n_in, device="cuda", dtype=dtype) * 0.02
        packed, state = quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8)
        del w
        figures = {}
        for m in rows:
            x = torch.randn(m, n_in, device="cuda", dtype=dtype)
            one_call = _time_graph(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
            per_row = _time_graph(lambda: [bnb.matmul_4bit(x[i:i + 1], packed.t(), quant_state=state)
                                           for i in range(m)])
            choice = cuda_ops._gemm_4bit_use_custom_fn
            cuda_ops._gemm_4bit_use_custom_fn = lambda *args: True  # the fused kernel at every M
            try:
                fused = _time_graph(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
                ref = bnb.matmul_4bit(x, packed.t(), quant_state=state)
                rows_alone = torch.cat([bnb.matmul_4bit(x[i:i + 1], packed.t(), quant_state=state) for i in range(m)])
            finally:
                cuda_ops._gemm_4bit_use_custom_fn = choice
            figures[m] = dict(bnb_choice_us=round(one_call, 1), fused_forced_us=round(fused, 1),
                              per_row_calls_us=round(per_row, 1),
                              fused_rows_equal_alone=bool(torch.equal(ref, rows_alone)))
            for key, us in (("bnb_choice", one_call), ("fused_forced", fused), ("per_row_calls", per_row)):
                step = out["step_ms"].setdefault(key, {})
                step[m] = round(step.get(m, 0.0) + us * per_layer * 32 / 1000, 2)
        out["shapes"][f"{n_out}x{n_in}"] = figures
        print(f"{n_out} x {n_in}: " + json.dumps(figures), flush=True)
    print("\n| rows | bitsandbytes' choice, ms a step (32 layers) | fused kernel forced | M one-row calls |")
    print("|---|---|---|---|")
    for m in rows:
        f = out["step_ms"]
        print(f"| {m} | {f['bnb_choice'][m]} | {f['fused_forced'][m]} | {f['per_row_calls'][m]} |")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
