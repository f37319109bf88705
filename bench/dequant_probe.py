"""The training's nf4 dequantize (qlora/dequant.py) against bitsandbytes' and a few launch shapes of its own, on the
7B decoder layer's packed weights (issue 18's lever: at the t4c bench's short batches dequantizing is ~8% of a step).

For each candidate: microseconds for one layer's four packed weights (q/k/v, o, gate/up, down: one pass of what a
training step dequantizes twice, forward and backward, on 32 layers), the bytes it moves per second (nf4 bytes and
absmax read, 16-bit weights written) next to a plain copy's, and whether its bits equal the production kernel's.
Candidates: bitsandbytes' `dequantize_4bit`; the production kernel at its shape (ROWS scale blocks a program, WARPS
warps) and at others; and a "pairs" form that stores each byte's two 16-bit weights as one 32-bit word instead of
joining two nibble planes, with the codes gathered per nibble or, "table", one 64-bit gather a byte. (Run50 also timed
a "flat" form, each element from its own index: slower than the production kernel at every shape, bench/README.md.)

    python -m bench.dequant_probe [--t4c] [--dtype fp16|bf16] [--out DIR]

--t4c runs the timing under the t4c bench mode's MPS share (bench/mps.py: the daemon, the calibrated percentage).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def _pairs_kernel():
    """The production kernel's loads, but each byte's two weights stored as one 32-bit word (high nibble's weight in
    the low half: the lower address), so no join of the two nibble planes; TABLE: one 64-bit gather a byte from a
    256-entry table of its two fp32 codes instead of two 32-bit gathers from the 16 codes."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["blocks"])
    def nf4_dequantize_pairs(data_ptr, absmax_ptr, code_ptr, table_ptr, out_ptr, blocks, HALF: tl.constexpr,
                             ROWS: tl.constexpr, TABLE: tl.constexpr, DTYPE: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = r < blocks
        at = r[:, None] * HALF + tl.arange(0, HALF)[None, :]
        packed = tl.load(data_ptr + at, mask=ok[:, None], other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + r, mask=ok, other=0.0)[:, None]
        if TABLE:
            both = tl.load(table_ptr + packed)
            hi = (both & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            lo = (both >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        else:
            hi = tl.load(code_ptr + (packed >> 4))
            lo = tl.load(code_ptr + (packed & 15))
        hi = (hi * scale).to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lo = (lo * scale).to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(out_ptr + at, hi | (lo << 16), mask=ok[:, None])

    return nf4_dequantize_pairs


def measure(dtype_name: str) -> dict:
    import bitsandbytes.functional as F
    import torch

    from bench.common import cuda_seconds
    from qlora import dequant

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    weights = {}
    for name, shape in SHAPES.items():
        data, state = F.quantize_4bit(torch.randn(shape, device="cuda", dtype=dtype) * 0.02, blocksize=64,
                                      quant_type="nf4")
        weights[name] = (data, state)
    pairs = _pairs_kernel()
    import triton.language as tl

    code = weights["o"][1].code
    b = torch.arange(256, device="cuda")
    table = torch.stack([code[b >> 4], code[b & 15]], 1).contiguous().view(torch.int64).reshape(256)
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]

    def production(rows: int, warps: int):
        kernel = dequant._kernel()

        def run(data, state, out):
            blocks = state.absmax.numel()
            kernel[(-(-blocks // rows),)](data.reshape(-1), state.absmax, state.code, out, blocks, HALF=32,
                                          ROWS=rows, num_warps=warps)
        return run

    def pairs_shape(rows: int, warps: int, use_table: bool):
        def run(data, state, out):
            blocks = state.absmax.numel()
            pairs[(-(-blocks // rows),)](data.reshape(-1), state.absmax, state.code, table, out.view(torch.int32),
                                         blocks, HALF=32, ROWS=rows, TABLE=use_table, DTYPE=tl_dtype,
                                         num_warps=warps)
        return run

    def bnb(data, state, out):
        F.dequantize_4bit(data, state, out=out)

    candidates = {"bitsandbytes": bnb}
    for rows in (64, 128):
        for warps in (2, 4):
            candidates[f"qlora ROWS={rows} warps={warps}"] = production(rows, warps)
    for use_table in (False, True):
        for rows in (32, 64, 128, 256):
            for warps in (1, 2, 4, 8):
                candidates[f"pairs{' table' if use_table else ''} ROWS={rows} warps={warps}"] = pairs_shape(
                    rows, warps, use_table)
    outs = {name: torch.empty(shape, device="cuda", dtype=dtype) for name, shape in SHAPES.items()}
    truth = {name: dequant.dequantize(d, s.absmax, s.code, SHAPES[name], dtype, 64) for name, (d, s) in weights.items()}
    numel = sum(a * b for a, b in SHAPES.values())
    moved = numel // 2 + numel // 64 * 4 + numel * 2  # nf4 bytes and fp32 absmax read, 16-bit weights written
    rows = []
    for label, run in candidates.items():
        def layer():
            for name, (data, state) in weights.items():
                run(data, state, outs[name])
        layer()
        torch.cuda.synchronize()
        equal = all(torch.equal(outs[name], truth[name]) for name in SHAPES)
        us = cuda_seconds(layer, reps=50) * 1e6
        rows.append(dict(candidate=label, us_per_layer=round(us, 1), gbs=round(moved / us / 1e3, 1), equal=equal))
        print(f"{label:32s} {us:9.1f} us a layer {moved / us / 1e3:7.1f} GB/s  same bits: {equal}", flush=True)
    src = torch.empty(numel, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    copy_us = cuda_seconds(lambda: dst.copy_(src), reps=50) * 1e6
    copy = round(2 * src.numel() * 2 / copy_us / 1e3, 1)
    print(f"copy of the layer's 16-bit weights: {copy_us:.1f} us, {copy} GB/s", flush=True)
    return dict(dtype=dtype_name, shapes=SHAPES, moved_bytes=moved, copy_gbs=copy, candidates=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--t4c", action="store_true", help="time under the t4c mode's MPS share of the card")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.dtype)))
        return 0
    from bench.common import ROOT, card, versions, write_json

    mps = None
    cmd = [sys.executable, "-m", "bench.dequant_probe", "--child", "--dtype", args.dtype]
    if args.t4c:
        from bench.mps import T4Compute

        with T4Compute() as t4:
            if not t4.available:
                raise SystemExit(f"t4c: {t4.why}")
            mps = t4.to_dict()
            done = subprocess.run(cmd, env=t4.env(os.environ), cwd=ROOT, capture_output=True, text=True)
    else:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout, done.stderr[-3000:], sep="\n")
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not found:
        return 1
    result = dict(json.loads(found[-1][len("RESULT "):]), card=card(), versions=versions(), t4c=mps,
                  command=" ".join(sys.argv), when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    write_json(Path(args.out) / f"dequant-probe{'-t4c' if args.t4c else ''}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
