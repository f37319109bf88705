"""The training's nf4 dequantize (qlora/dequant.py) against bitsandbytes' and a few launch shapes of its own, on the
7B decoder layer's packed weights (issue 18's lever: at the t4c bench's short batches dequantizing is ~8% of a step).

For each candidate: microseconds for one layer's four packed weights (q/k/v, o, gate/up, down: one pass of what a
training step dequantizes twice, forward and backward, on 32 layers), the bytes it moves per second (nf4 bytes and
absmax read, 16-bit weights written) next to a plain copy's, and whether its bits equal the production kernel's.
Candidates: bitsandbytes' `dequantize_4bit`; the production kernel at its shape (ROWS scale blocks a program, 4
warps) and at others; and a "flat" form that computes each output element from its own index (byte i // 2, high
nibble for even i), whose stores are contiguous runs instead of the join of two nibble planes.

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


def _flat_kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n"])
    def nf4_dequantize_flat(data_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCK: tl.constexpr,
                            BLOCKSIZE: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        byte = tl.load(data_ptr + i // 2, mask=ok, other=0).to(tl.int32)
        nibble = tl.where(i % 2 == 0, byte >> 4, byte & 15)
        scale = tl.load(absmax_ptr + i // BLOCKSIZE, mask=ok, other=0.0)
        w = (tl.load(code_ptr + nibble) * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + i, w, mask=ok)

    return nf4_dequantize_flat


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
    flat = _flat_kernel()

    def production(rows: int, warps: int):
        kernel = dequant._kernel()

        def run(data, state, out):
            blocks = state.absmax.numel()
            kernel[(-(-blocks // rows),)](data.reshape(-1), state.absmax, state.code, out, blocks, HALF=32,
                                          ROWS=rows, num_warps=warps)
        return run

    def flat_shape(block: int, warps: int):
        def run(data, state, out):
            n = out.numel()
            flat[(-(-n // block),)](data.reshape(-1), state.absmax, state.code, out, n, BLOCK=block, BLOCKSIZE=64,
                                    num_warps=warps)
        return run

    def bnb(data, state, out):
        F.dequantize_4bit(data, state, out=out)

    candidates = {"bitsandbytes": bnb}
    for rows in (32, 64, 128, 256):
        for warps in (2, 4, 8):
            candidates[f"qlora ROWS={rows} warps={warps}"] = production(rows, warps)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            candidates[f"flat BLOCK={block} warps={warps}"] = flat_shape(block, warps)
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
