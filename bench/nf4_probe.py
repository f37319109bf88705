"""Probe: how fast can a row-independent nf4 matmul of 16 rows run on this card (issue 14's lever)?

Two Triton kernel shapes over bitsandbytes' packed nf4 weight, a sweep of tiles for each, against bitsandbytes'
own 16-row and 2-row matmuls, on the 7B decoder's weight shapes, timed in CUDA graph replays:

- "block": one 64-weight scale block of BLOCK_N weight rows a loop turn (the scale a vector), x's block read each
  turn; split-K partials summed in a fixed order (run26's kernel, with a wider sweep: more programs).
- "xres": a program holds x's K span in registers and walks BLOCK_N-row tiles of the weight over it (x read once a
  program), the scale gathered per byte (both nibbles of a byte share it).

Each candidate's error against the fp64 product of bitsandbytes' dequantized weight is printed next to cuBLAS's on
the same weight, and rows are checked independent (row r of 16 = row r of 2, bit for bit).

    python -m bench.nf4_probe [--dtype bf16|fp16] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

BLOCK_M = 16
SHAPES = [(4096, 4096, 4), (11008, 4096, 2), (4096, 11008, 1)]  # (out, in, per 7B layer)

_k = {}


def kernels():
    if _k:
        return _k
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M", "stride_xm"])
    def block_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, SPAN, stride_xm,
                     BLOCKSIZE: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     UNROLL: tl.constexpr):
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid_n, pid_s = tl.program_id(0), tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, HALF)
        m_ok, n_ok = rm < M, rn < N
        row_blocks = K // BLOCKSIZE
        b_begin = pid_s * SPAN
        b_end = tl.minimum(b_begin + SPAN, row_blocks)
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for b0 in range(b_begin, b_end, UNROLL):
            for u in tl.static_range(UNROLL):
                b = b0 + u
                ok = (b + 0 * rn) < b_end
                packed = tl.load(w_ptr + rn[:, None] * (K // 2) + b * HALF + j[None, :], mask=n_ok[:, None] & ok[:, None], other=0)
                scale = tl.load(absmax_ptr + rn * row_blocks + b, mask=n_ok & ok, other=0.0)
                hi = (tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale[:, None]).to(dtype)
                lo = (tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale[:, None]).to(dtype)
                xt = x_ptr + rm[None, :] * stride_xm + b * BLOCKSIZE + 2 * j[:, None]
                xmask = m_ok[None, :] & ((b * BLOCKSIZE + 2 * j[:, None]) < b_end * BLOCKSIZE)
                acc = tl.dot(hi, tl.load(xt, mask=xmask, other=0.0), acc)
                acc = tl.dot(lo, tl.load(xt + 1, mask=xmask, other=0.0), acc)
        out = out_ptr + pid_s * M * N + rm[None, :] * N + rn[:, None]
        mask = n_ok[:, None] & m_ok[None, :]
        if PARTIAL:
            tl.store(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M", "stride_xm"])
    def xres_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_xm,
                    BLOCKSIZE: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SPAN: tl.constexpr, N_PROG: tl.constexpr):
        HALF: tl.constexpr = SPAN // 2  # bytes of a weight row in the span
        pid_n, pid_s = tl.program_id(0), tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        j = tl.arange(0, HALF)
        k0 = pid_s * SPAN
        kk = k0 + 2 * j  # the even weight of each byte
        k_ok = kk < K
        m_ok = rm < M
        dtype = x_ptr.dtype.element_ty
        xt = x_ptr + rm[None, :] * stride_xm + kk[:, None]
        xmask = m_ok[None, :] & k_ok[:, None]
        xe = tl.load(xt, mask=xmask, other=0.0)
        xo = tl.load(xt + 1, mask=xmask, other=0.0)
        row_blocks = K // BLOCKSIZE
        for t in range(0, N_PROG, BLOCK_N):
            rn = pid_n * N_PROG + t + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            wmask = n_ok[:, None] & k_ok[None, :]
            packed = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2) + j[None, :], mask=wmask, other=0)
            scale = tl.load(absmax_ptr + rn[:, None] * row_blocks + kk[None, :] // BLOCKSIZE, mask=wmask, other=0.0)
            hi = (tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale).to(dtype)
            lo = (tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale).to(dtype)
            acc = tl.dot(hi, xe)
            acc = tl.dot(lo, xo, acc)
            out = out_ptr + pid_s * M * N + rm[None, :] * N + rn[:, None]
            mask = n_ok[:, None] & m_ok[None, :]
            if PARTIAL:
                tl.store(out, acc, mask=mask)
            else:
                tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M"])
    def block2_kernel(xt_ptr, w_ptr, absmax_ptr, lut_ptr, out_ptr, M, N, K, SPAN,
                      BLOCKSIZE: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      LUT: tl.constexpr):
        # xt: [2, K // 2, BLOCK_M], x's even and odd inputs, rows padded with zeros: contiguous tiles
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid_n, pid_s = tl.program_id(0), tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, HALF)
        n_ok = rn < N
        row_blocks = K // BLOCKSIZE
        b_begin = pid_s * SPAN
        b_end = tl.minimum(b_begin + SPAN, row_blocks)
        dtype = xt_ptr.dtype.element_ty
        odd = (K // 2) * BLOCK_M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for b in range(b_begin, b_end):
            packed = tl.load(w_ptr + rn[:, None] * (K // 2) + b * HALF + j[None, :], mask=n_ok[:, None], other=0)
            scale = tl.load(absmax_ptr + rn * row_blocks + b, mask=n_ok, other=0.0)
            xe = tl.load(xt_ptr + (b * HALF + j[:, None]) * BLOCK_M + rm[None, :])
            xo = tl.load(xt_ptr + odd + (b * HALF + j[:, None]) * BLOCK_M + rm[None, :])
            if LUT == 0:  # bitsandbytes' arithmetic: fp32 code times fp32 scale, then the dtype
                hi = (tl.load(lut_ptr + (packed >> 4).to(tl.int32)) * scale[:, None]).to(dtype)
                lo = (tl.load(lut_ptr + (packed & 0xF).to(tl.int32)) * scale[:, None]).to(dtype)
                acc = tl.dot(hi, xe, acc)
                acc = tl.dot(lo, xo, acc)
            else:
                if LUT == 1:  # one gather a byte: both codes in the dtype, packed in an int32
                    pair = tl.load(lut_ptr + packed.to(tl.int32))
                    hi = (pair >> 16).to(tl.int16).to(dtype, bitcast=True)
                    lo = pair.to(tl.int16).to(dtype, bitcast=True)
                else:  # two gathers a byte from a 16-entry table in the dtype
                    hi = tl.load(lut_ptr + (packed >> 4).to(tl.int32))
                    lo = tl.load(lut_ptr + (packed & 0xF).to(tl.int32))
                part = tl.dot(hi, xe)
                part = tl.dot(lo, xo, part)
                acc += part * scale[:, None]
        out = out_ptr + pid_s * M * N + rm[None, :] * N + rn[:, None]
        mask = n_ok[:, None] & (rm < M)[None, :]
        if PARTIAL:
            tl.store(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def sum_kernel(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)

    _k.update(block=block_kernel, xres=xres_kernel, block2=block2_kernel, sum=sum_kernel)
    return _k


def run(kind, cfg, x, w, out, part):
    """One call: x [m, K] times the nf4 weight w (dict of flat tensors) into out [m, N]."""
    k = kernels()
    m = x.shape[0]
    n, kdim, bs = w["n"], w["k"], w["blocksize"]
    if kind == "block":
        block_n, split, unroll, warps = cfg
        row_blocks = kdim // bs
        span = math.ceil(row_blocks / split)
        split = math.ceil(row_blocks / span)
        target = part[:split * m * n].view(split, m, n) if split > 1 else out
        k["block"][(math.ceil(n / block_n), split)](
            x, w["data"], w["absmax"], w["code"], target, m, n, kdim, span, x.stride(0),
            BLOCKSIZE=bs, PARTIAL=split > 1, BLOCK_M=BLOCK_M, BLOCK_N=block_n, UNROLL=unroll, num_warps=warps)
    elif kind.startswith("block2"):
        block_n, split, warps, stages = cfg
        lut = int(kind[-1])
        row_blocks = kdim // bs
        span = math.ceil(row_blocks / split)
        split = math.ceil(row_blocks / span)
        target = part[:split * m * n].view(split, m, n) if split > 1 else out
        xt = w["xt"]
        xt[:, :, :m].copy_(x.view(m, kdim // 2, 2).permute(2, 1, 0))
        k["block2"][(math.ceil(n / block_n), split)](
            xt, w["data"], w["absmax"], w[f"lut{lut}"], target, m, n, kdim, span,
            BLOCKSIZE=bs, PARTIAL=split > 1, BLOCK_M=BLOCK_M, BLOCK_N=block_n, LUT=lut, num_warps=warps,
            num_stages=stages)
    else:
        span, block_n, n_prog, warps = cfg
        split = math.ceil(kdim / span)
        target = part[:split * m * n].view(split, m, n) if split > 1 else out
        k["xres"][(math.ceil(n / n_prog), split)](
            x, w["data"], w["absmax"], w["code"], target, m, n, kdim, x.stride(0),
            BLOCKSIZE=bs, PARTIAL=split > 1, BLOCK_M=BLOCK_M, BLOCK_N=block_n, SPAN=span, N_PROG=n_prog,
            num_warps=warps)
    if split > 1:
        k["sum"][(math.ceil(m * n / 1024),)](target, out, m * n, SPLIT=split, BLOCK=1024)
    return out


def time_graph(fn, reps: int = 30) -> float:
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1000 / reps)
    return best


BLOCK2_CFGS = [(128, 8, 4, 3), (128, 8, 4, 1), (128, 8, 8, 2), (128, 16, 4, 2), (64, 8, 4, 2), (64, 16, 4, 2),
               (256, 8, 8, 2), (256, 4, 8, 2), (128, 4, 4, 2), (256, 16, 8, 1), (64, 32, 4, 2)]
BLOCK_CFGS = [(128, 8, 1, 4), (256, 8, 1, 8), (128, 4, 1, 4)]
XRES_CFGS = [(256, 16, 16, 1)]


def main() -> int:
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    report = dict(card=torch.cuda.get_device_name(0), dtype=a.dtype, when=time.strftime("%Y-%m-%d %H:%M"),
                  shapes={})
    step = {"bnb16": 0.0, "bnb2": 0.0, "bnb1": 0.0}
    best_step = {"block": 0.0, "xres": 0.0, "block2_0": 0.0, "block2_1": 0.0, "block2_2": 0.0, "best": 0.0}
    for n, kdim, per_layer in SHAPES:
        wt = torch.randn(n, kdim, device="cuda", dtype=dtype) * 0.02
        data, state = bf.quantize_4bit(wt, blocksize=64, compress_statistics=False, quant_type="nf4")
        del wt
        weight = bf.dequantize_4bit(data, state).to(dtype)
        w = dict(data=data.view(torch.uint8).reshape(-1), absmax=state.absmax.float().reshape(-1),
                 code=state.code.float(), n=n, k=kdim, blocksize=state.blocksize)
        x = torch.randn(BLOCK_M, kdim, device="cuda", dtype=dtype)
        exact = x.double() @ weight.double().t()
        cublas_err = ((x @ weight.t()).double() - exact).abs().max().item()
        fig = dict(bnb16_us=time_graph(lambda: bnb.matmul_4bit(x, data.t(), quant_state=state)),
                   bnb2_us=time_graph(lambda: bnb.matmul_4bit(x[:2], data.t(), quant_state=state)),
                   bnb1_us=time_graph(lambda: bnb.matmul_4bit(x[:1], data.t(), quant_state=state)),
                   cublas_err=cublas_err, cands={})
        out = torch.empty(BLOCK_M, n, device="cuda", dtype=dtype)
        part = torch.empty(128 * BLOCK_M * n, device="cuda", dtype=torch.float32)
        w["xt"] = torch.zeros(2, kdim // 2, BLOCK_M, device="cuda", dtype=dtype)
        w["lut0"] = w["code"]
        codes = w["code"].to(dtype)
        w["lut2"] = codes
        bits = codes.view(torch.int16).to(torch.int32) & 0xFFFF
        q = torch.arange(256, device="cuda")
        w["lut1"] = ((bits[q >> 4] << 16) | bits[q & 15]).to(torch.int32)
        kinds = [("block", BLOCK_CFGS), ("xres", XRES_CFGS)] + [(f"block2_{v}", BLOCK2_CFGS) for v in (0, 1, 2)]
        for kind, cfgs in kinds:
            for cfg in cfgs:
                name = f"{kind}{cfg}"
                try:
                    got = run(kind, cfg, x, w, out, part).clone()
                    err = (got.double() - exact).abs().max().item()
                    out2 = torch.empty(2, n, device="cuda", dtype=dtype)
                    two = run(kind, cfg, x[:2].contiguous(), w, out2, part).clone()
                    us = time_graph(lambda: run(kind, cfg, x, w, out, part))
                    fig["cands"][name] = dict(us=round(us, 1), err=err, rows_exact=bool(torch.equal(two, got[:2])))
                except Exception as e:  # noqa: BLE001
                    fig["cands"][name] = dict(error=f"{type(e).__name__}: {str(e)[:120]}")
                print(n, kdim, name, fig["cands"][name], flush=True)
        ok = {k: v for k, v in fig["cands"].items() if "us" in v and v["rows_exact"] and v["err"] <= 2 * cublas_err}
        for kind in ("block", "xres", "block2_0", "block2_1", "block2_2"):
            mine = {k: v for k, v in ok.items() if k.startswith(kind)}
            if mine:
                best = min(mine, key=lambda k: mine[k]["us"])
                fig[f"best_{kind}"] = best
                best_step[kind] += mine[best]["us"] * per_layer * 32 / 1000
        if ok:
            best = min(ok, key=lambda k: ok[k]["us"])
            fig["best"] = best
            best_step["best"] += ok[best]["us"] * per_layer * 32 / 1000
            fig["nf4_read_GBps"] = round(data.numel() / (ok[best]["us"] * 1e-6) / 1e9, 1)
        for key in ("bnb16", "bnb2", "bnb1"):
            step[key] += fig[f"{key}_us"] * per_layer * 32 / 1000
        report["shapes"][f"{n}x{kdim}"] = fig
        print(f"== {n}x{kdim}: bnb 16/2/1 rows {fig['bnb16_us']:.1f}/{fig['bnb2_us']:.1f}/{fig['bnb1_us']:.1f} us; "
              f"best {fig.get('best')} {ok.get(fig.get('best'), {})}; cuBLAS err {cublas_err:.4g}", flush=True)
    report["step_ms"] = {**{k: round(v, 2) for k, v in step.items()}, **{k: round(v, 2) for k, v in best_step.items()}}
    print("4-bit work a decode step (7B, 224 weights), ms:", report["step_ms"], flush=True)
    if a.out:
        from pathlib import Path

        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, f"nf4_probe-{a.dtype}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
