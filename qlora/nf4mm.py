"""A few rows times a bitsandbytes nf4 weight, read straight from its packed 4-bit data (a Triton kernel): the slot
engine's decode-step matmul when asked for (`QLORA_CHAT_NF4=1`; off by default: on the H200 it is still ~1.4x slower
than bitsandbytes' dequantize + cuBLAS at 16 rows, bench/README.md run26).

Why: for more than one input row bitsandbytes dequantizes the whole weight to 16 bits and then multiplies (its fast
gemv takes one row only), so a 16-row decode step of the 7B model writes and reads ~26 GB of 16-bit weights; here each
program reads its tile of the 4-bit weight once (0.5 byte a weight plus the block scales) and multiplies it by every
row in tensor-core tiles.

The layout is bitsandbytes' (`functional.dequantize_4bit`, its default backend's `_dequantize_4bit_compute`): the
[N, K] weight flattened row by row, two weights a byte, the first in the high nibble; weight i is
`code[nibble] * absmax[i // blocksize]` in fp32, then cast. With double quantization (`quant_state.nested`) absmax is
itself uint8 codes: `state2.code[q] * state2.absmax[j // state2.blocksize] + offset` (fp32), computed in the kernel
from those ~1.1 bytes a 64-weight block, so the engine keeps no second copy of the scales. `dequantize` below is the
same arithmetic in plain torch (the CPU tests hold it to bitsandbytes' own dequantize).

Exactness: every program multiplies a fixed 16-row tile (rows past M are zeros) over a fixed K range, and split-K
partial sums are added in a fixed order by a second kernel; the tiles are picked per weight shape once, when the engine
loads (`tuned`: the fastest of a few candidates on this card), never per call or per row count. So an output row
depends on its own input row only: a pane's answer alone equals its answer in any batch, bit for bit. The result
differs from bitsandbytes' dequantize + cuBLAS by the accumulation order only (the dtype's rounding); two loads may
pick different tiles, so two server starts may round differently. Memory: nothing beyond bitsandbytes' own weights
(the kernel reads them in place); split-K partials are [split, rows, N] fp32 scratch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch  # imported only where the slot engine starts (`import qlora` stays light)

BLOCK_M = 16  # rows a program multiplies: the tensor cores' smallest tile; more rows take more tiles
MAX_ROWS = 64  # beyond this many rows (a prefill) bitsandbytes' dequantize + cuBLAS is the faster path


def unavailable(device) -> str | None:
    """Why the kernel cannot run on `device` (None: it can)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"compute capability {major}.x (the kernel's bf16 tiles need 8.0 or newer)"
    return None


def fits(module) -> bool:
    """Whether a bitsandbytes Linear4bit's weight is one this kernel reads: nf4, K a multiple of its block size (at
    least 32: a tensor-core tile)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None or state.quant_type != "nf4" or len(state.shape) != 2:
        return False
    n, k = state.shape
    nested_ok = not state.nested or state.state2.code.numel() == 256
    return 32 <= state.blocksize <= 256 and k % state.blocksize == 0 and nested_ok


@dataclass
class Weight:
    """What the kernel reads of one nf4 weight, flattened; all on the weight's device."""
    data: torch.Tensor  # uint8 [N * K / 2]
    absmax: torch.Tensor  # fp32 [N * K / blocksize], or uint8 codes when nested
    code: torch.Tensor  # fp32 [16]: the nf4 values
    n: int
    k: int
    blocksize: int
    code2: torch.Tensor | None = None  # nested: fp32 [256], the absmax codes' values
    absmax2: torch.Tensor | None = None  # nested: fp32, one scale a `blocksize2` absmax codes
    blocksize2: int = 1
    offset: float = 0.0

    @classmethod
    def of(cls, param) -> "Weight":
        s = param.quant_state
        n, k = s.shape
        w = cls(param.data.view(torch.uint8).reshape(-1), s.absmax.reshape(-1), s.code.float(), n, k, s.blocksize)
        if s.nested:
            w.code2, w.absmax2 = s.state2.code.float(), s.state2.absmax.float().reshape(-1)
            w.blocksize2, w.offset = s.state2.blocksize, float(s.offset)
        else:
            w.absmax = w.absmax.float()
        return w

    @property
    def nested(self) -> bool:
        return self.code2 is not None


def dequantize(w: Weight) -> torch.Tensor:
    """The fp32 [N, K] weight, in plain torch, by the kernel's arithmetic (the CPU tests' reference)."""
    q = torch.stack([w.data >> 4, w.data & 0xF], dim=-1).reshape(-1).long()  # high nibble first
    values = w.code[q]
    absmax = w.absmax
    if w.nested:
        blocks = torch.arange(absmax.numel(), device=absmax.device) // w.blocksize2
        absmax = w.code2[absmax.long()] * w.absmax2[blocks] + w.offset
    return (values.view(-1, w.blocksize) * absmax.view(-1, 1)).view(w.n, w.k)


# --- the kernel ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    block_n: int  # weight rows (outputs) a program computes: the tensor-core tile's M side
    split: int  # K ranges of a weight row computed by separate programs, summed by the second kernel (1: none)
    unroll: int = 1  # scale blocks (64 weights of a row each) a loop turn reads
    warps: int = 4
    stages: int = 3
    split_x: bool = False  # read x's block whole and split it into even/odd in registers (else two strided reads)


# Tried once per weight shape when the engine loads (`tuned`); the fastest serves every call of that shape.
CANDIDATES = (Config(64, 1, 2), Config(64, 2, 1), Config(64, 4, 1), Config(32, 4, 1, 2), Config(128, 2, 1),
              Config(128, 4, 1, 8), Config(64, 2, 1, split_x=True), Config(64, 4, 1, split_x=True),
              Config(128, 2, 1, split_x=True))
_tuned: dict = {}


def tuned(w: Weight, dtype) -> Config:
    """The fastest candidate for this weight's shape on this card, timed once (16 rows, CUDA graph replays). It
    depends on the shape only, never on the rows of a call: see the module doc."""
    key = (w.n, w.k, w.nested, dtype, w.data.device)
    if key not in _tuned:
        times = {c: t for c, t in timings(w, dtype).items() if isinstance(t, float)}
        if not times:
            raise RuntimeError("no nf4mm tile runs on this card")
        _tuned[key] = min(times, key=times.get)
    return _tuned[key]


def timings(w: Weight, dtype, rows: int = BLOCK_M) -> dict:
    """Milliseconds of one call per candidate; a candidate that does not build or fit on this card (e.g. Triton's
    OutOfResources: too much shared memory) gets its error's name instead."""
    import triton.testing

    x = torch.randn(rows, w.k, dtype=dtype, device=w.data.device)
    out = {}
    for c in CANDIDATES:
        try:
            out[c] = float(triton.testing.do_bench_cudagraph(lambda: matmul(x, w, c), rep=10))
        except Exception as e:  # noqa: BLE001  (a compile error is the candidate's, not the engine's)
            out[c] = type(e).__name__
    return out


_kernels = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M", "stride_xm"])
    def nf4mm_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset, out_ptr,
                     M, N, K, SPAN, stride_xm,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, PARTIAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, SPLIT_X: tl.constexpr):
        # One turn per scale block: the weights w[n, k0:k0+BLOCKSIZE] share absmax[n, b], so the scale is a vector
        # over n. The block's even weights (high nibbles) meet the even inputs, the odd (low) ones the odd inputs:
        # out^T[n, m] += hi[n, :] . x[m, k0::2] + lo[n, :] . x[m, k0+1::2], the weights as the tile's A side.
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
                # masks as tensors in the loads' shapes: past b_end (the last turn of a range) nothing is read
                ok = (b + 0 * rn) < b_end
                wmask = n_ok[:, None] & ok[:, None] & (j[None, :] < HALF)
                packed = tl.load(w_ptr + rn[:, None] * (K // 2) + b * HALF + j[None, :], mask=wmask, other=0)
                blk = rn * row_blocks + b
                if NESTED:
                    qa = tl.load(absmax_ptr + blk, mask=n_ok & ok, other=0).to(tl.int32)
                    scale = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=n_ok & ok,
                                                              other=0.0) + offset
                else:
                    scale = tl.load(absmax_ptr + blk, mask=n_ok & ok, other=0.0)
                # fp32 product, then the compute dtype: bitsandbytes' dequantize, weight for weight
                hi = (tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale[:, None]).to(dtype)
                lo = (tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale[:, None]).to(dtype)
                if SPLIT_X:
                    kk = b * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
                    xs = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                                 mask=m_ok[:, None] & (kk[None, :] < b_end * BLOCKSIZE), other=0.0)
                    x_even, x_odd = tl.split(tl.reshape(xs, (BLOCK_M, HALF, 2)))
                    acc = tl.dot(hi, tl.trans(x_even), acc)
                    acc = tl.dot(lo, tl.trans(x_odd), acc)
                else:
                    xt = x_ptr + rm[None, :] * stride_xm + b * BLOCKSIZE + 2 * j[:, None]  # [HALF, BLOCK_M]: x^T
                    xmask = m_ok[None, :] & ((b * BLOCKSIZE + 2 * j[:, None]) < b_end * BLOCKSIZE)
                    acc = tl.dot(hi, tl.load(xt, mask=xmask, other=0.0), acc)
                    acc = tl.dot(lo, tl.load(xt + 1, mask=xmask, other=0.0), acc)
        out = out_ptr + pid_s * M * N + rm[None, :] * N + rn[:, None]
        mask = n_ok[:, None] & m_ok[None, :]
        if PARTIAL:
            tl.store(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def sum_kernel(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT):  # a fixed order, element by element
            acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return nf4mm_kernel, sum_kernel


def matmul(x: torch.Tensor, w: Weight, cfg: Config | None = None) -> torch.Tensor:
    """x [..., K] (bf16 or fp16, CUDA) times the nf4 weight's transpose: [..., N] in x's dtype. `cfg`: the tiles
    (default: the ones `tuned` picked for this shape)."""
    global _kernels
    if _kernels is None:
        _kernels = _build()
    nf4mm_kernel, sum_kernel = _kernels
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = cfg or tuned(w, x.dtype)
    row_blocks = w.k // w.blocksize
    span = math.ceil(row_blocks / cfg.split)  # scale blocks a program covers
    split = math.ceil(row_blocks / span)
    out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    target = torch.empty(split, m, w.n, dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (math.ceil(w.n / cfg.block_n), split, math.ceil(m / BLOCK_M))
    nested = w.nested
    nf4mm_kernel[grid](x2, w.data, w.absmax, w.code, w.code2 if nested else w.code,
                       w.absmax2 if nested else w.absmax, w.offset, target, m, w.n, w.k, span, x2.stride(0),
                       BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=nested, PARTIAL=split > 1,
                       BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, UNROLL=cfg.unroll, SPLIT_X=cfg.split_x,
                       num_warps=cfg.warps, num_stages=cfg.stages)
    if split > 1:
        block = 1024
        sum_kernel[(math.ceil(m * w.n / block),)](target, out, m * w.n, SPLIT=split, BLOCK=block)
    return out.view(*lead, w.n)


class NF4Linear(torch.nn.Module):
    """A bitsandbytes Linear4bit whose few-row calls (the decode step) run the kernel; longer inputs (prefills) keep
    bitsandbytes' own path. Computes in the layer's compute dtype and returns the input's dtype, as Linear4bit does.
    The tiles are picked for the weight's shape here, at load, outside any graph capture."""

    def __init__(self, base, dtype):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight4 = Weight.of(base.weight)
        self.dtype = getattr(base, "compute_dtype", None) or dtype
        self.tiles = tuned(self.weight4, self.dtype) if self.dtype in (torch.bfloat16, torch.float16) else None

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or self.tiles is None:
            return self.base(x)
        out = matmul(x.to(self.dtype), self.weight4, self.tiles)
        if self.base.bias is not None:
            out = out + self.base.bias.to(self.dtype)
        return out.to(x.dtype)
