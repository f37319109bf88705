"""A few rows times a bitsandbytes nf4 weight, read straight from its packed 4-bit data (a Triton kernel): the slot
engine's decode-step matmul.

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
partial sums are added in a fixed order by a second kernel; the tile shapes depend on the weight's shape only, never on
M. So an output row depends on its own input row only: a pane's answer alone equals its answer in any batch, bit for
bit. The result differs from bitsandbytes' dequantize + cuBLAS by the accumulation order only (the dtype's rounding).
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
    """Whether a bitsandbytes Linear4bit's weight is one this kernel reads: nf4, K a multiple of its block size."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None or state.quant_type != "nf4" or len(state.shape) != 2:
        return False
    n, k = state.shape
    nested_ok = not state.nested or state.state2.code.numel() == 256
    return k % state.blocksize == 0 and k % 2 == 0 and nested_ok


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
    block_n: int
    block_k: int
    split: int  # K ranges summed by the second kernel (1: no partials)
    warps: int = 4
    stages: int = 3


def config(n: int, k: int, sms: int) -> Config:
    """Tiles for an [n, k] weight, from its shape and the card's SM count only (never from the row count: see the
    module doc). Enough programs to keep every SM streaming: split K where N alone gives too few tiles."""
    block_n, block_k = 32, 256 if k % 256 == 0 or k > 4096 else 128
    tiles = math.ceil(n / block_n)
    want = max(1, min(math.ceil(4 * sms / tiles), k // (2 * block_k)))
    span = math.ceil(math.ceil(k / want) / block_k) * block_k
    return Config(block_n, block_k, math.ceil(k / span))


_kernels = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M", "stride_xm"])
    def nf4mm_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset, out_ptr,
                     M, N, K, SPAN, stride_xm,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, PARTIAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        half = tl.arange(0, BLOCK_K // 2)
        m_ok, n_ok = rm < M, rn < N
        k_begin = pid_s * SPAN
        k_end = tl.minimum(k_begin + SPAN, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_end
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            kb = k0 // 2 + half
            wmask = n_ok[:, None] & (kb * 2 < k_end)[None, :]
            packed = tl.load(w_ptr + rn[:, None] * (K // 2) + kb[None, :], mask=wmask, other=0)
            q = tl.interleave(packed >> 4, packed & 0xF).to(tl.int32)  # weights k0, k0 + 1, ...: high nibble first
            values = tl.load(code_ptr + q)
            block = rn[:, None] * (K // BLOCKSIZE) + kk[None, :] // BLOCKSIZE
            bmask = n_ok[:, None] & k_ok[None, :]
            if NESTED:
                qa = tl.load(absmax_ptr + block, mask=bmask, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=bmask, other=0.0)
                scale = scale + offset
            else:
                scale = tl.load(absmax_ptr + block, mask=bmask, other=0.0)
            w = (values * scale).to(x.dtype)  # fp32 product, then the compute dtype: bitsandbytes' dequantize
            acc = tl.dot(x, tl.trans(w), acc)
        out = out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :]
        if PARTIAL:
            tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def sum_kernel(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT):  # a fixed order, element by element
            acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return nf4mm_kernel, sum_kernel


_sms: dict = {}


def matmul(x: torch.Tensor, w: Weight, cfg: Config | None = None) -> torch.Tensor:
    """x [..., K] (bf16 or fp16, CUDA) times the nf4 weight's transpose: [..., N] in x's dtype."""
    global _kernels
    if _kernels is None:
        _kernels = _build()
    nf4mm_kernel, sum_kernel = _kernels
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if cfg is None:
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if dev not in _sms:
            _sms[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
        cfg = config(w.n, w.k, _sms[dev])
    span = math.ceil(math.ceil(w.k / cfg.split) / cfg.block_k) * cfg.block_k
    split = math.ceil(w.k / span)
    out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    target = torch.empty(split, m, w.n, dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (math.ceil(w.n / cfg.block_n), split, math.ceil(m / BLOCK_M))
    nested = w.nested
    nf4mm_kernel[grid](x2, w.data, w.absmax, w.code, w.code2 if nested else w.code,
                       w.absmax2 if nested else w.absmax, w.offset, target, m, w.n, w.k, span, x2.stride(0),
                       BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=nested, PARTIAL=split > 1,
                       BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       num_warps=cfg.warps, num_stages=cfg.stages)
    if split > 1:
        block = 1024
        sum_kernel[(math.ceil(m * w.n / block),)](target, out, m * w.n, SPLIT=split, BLOCK=block)
    return out.view(*lead, w.n)


class NF4Linear(torch.nn.Module):
    """A bitsandbytes Linear4bit whose few-row calls (the decode step) run the kernel; longer inputs (prefills) keep
    bitsandbytes' own path. Computes in the layer's compute dtype and returns the input's dtype, as Linear4bit does."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight4 = Weight.of(base.weight)

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        dtype = getattr(self.base, "compute_dtype", None) or x.dtype
        if rows > MAX_ROWS or dtype not in (torch.bfloat16, torch.float16):
            return self.base(x)
        out = matmul(x.to(dtype), self.weight4)
        if self.base.bias is not None:
            out = out + self.base.bias.to(dtype)
        return out.to(x.dtype)
