"""A few rows times a bitsandbytes nf4 weight, read straight from its packed 4-bit data (a Triton kernel): the slot
engine's decode-step matmul on CUDA cards of compute capability 8+ (bench/README.md: the 7B decoder's 4-bit work of a
16-row step 6.8 ms in run33's profile, against 10.7 ms in bitsandbytes' own 16-row matmuls in run28's).

Why: for more than one input row bitsandbytes dequantizes the whole weight to 16 bits and then multiplies (its fast
gemv takes one row only), so a 16-row decode step of the 7B model writes and reads ~26 GB of 16-bit weights; here each
program reads its tile of the 4-bit weight once (0.5 byte a weight plus the block scales) and multiplies it by 16 rows
in tensor-core tiles.

The layout is bitsandbytes' (`functional.dequantize_4bit`): the [N, K] weight flattened row by row, two weights a
byte, the first in the high nibble; weight i is `code[nibble] * absmax[i // blocksize]`. With double quantization
(`quant_state.nested`) absmax is itself uint8 codes: `state2.code[q] * state2.absmax[j // state2.blocksize] + offset`,
computed in the kernel. `dequantize` below is that arithmetic in plain torch (the CPU tests hold it to bitsandbytes').

The arithmetic (run28 and run32): a loop turn takes one 64-weight scale block of BLOCK_N weight rows; one gather from
a 256-entry table turns a byte into both its codes in the compute dtype (`Weight.pairs`), joined back into input
order; one tensor-core dot with x's block (read as it is) gives the block's [BLOCK_N, 16] partial in fp32, and the
block's scale multiplies that partial. So a weight is rounded once (its code, to the compute dtype) where bitsandbytes
rounds `code * absmax` once: the result differs from bitsandbytes' dequantize + cuBLAS by the dtype's rounding (the
GPU test bounds it by twice cuBLAS's own error on the dequantized weight).

Exactness: the tiles are fixed (`TILE`), never picked per call, per row count or per card; every program multiplies a
16-row tile (rows past M read as zeros) over a fixed K range, and the split-K partial sums are added in a fixed order
by the last program of the tile to finish (an arrival counter a tile, `Weight.locks`). So an output row depends on its
own input row only, bit for bit: a pane's answer alone equals its answer in any batch. Memory: the 1 KB table and the
counters a weight, and [split, rows, N] fp32 scratch a call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch  # imported only where the slot engine starts (`import qlora` stays light)

BLOCK_M = 16  # rows a program multiplies: the tensor cores' smallest tile; more rows take more tiles
MAX_ROWS = 64  # beyond this many rows (a prefill) bitsandbytes' dequantize + cuBLAS is the faster path


@dataclass(frozen=True)
class Tile:
    block_n: int  # weight rows (outputs) a program computes
    split: int  # K ranges of a weight row computed by separate programs, summed in a fixed order
    warps: int
    stages: int


# The fastest of run28's and run32's sweeps on the three 7B shapes (bench/nf4_probe.py), within 1-2%; fixed, so two
# server starts round alike.
TILE = Tile(block_n=64, split=8, warps=4, stages=2)


def fits(module) -> bool:
    """Whether a bitsandbytes Linear4bit's weight is one this kernel reads: nf4, K a multiple of its block size."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None or state.quant_type != "nf4" or len(state.shape) != 2:
        return False
    n, k = state.shape
    nested_ok = not state.nested or state.state2.code.numel() == 256
    return state.blocksize in (32, 64, 128, 256) and k % state.blocksize == 0 and nested_ok


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
    tables: dict = field(default_factory=dict)  # dtype -> `pairs`
    locks: torch.Tensor | None = None  # int32 arrival counters of the split programs, one a tile, zero between calls

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
        w.locks = torch.zeros(math.ceil(n / 16) * math.ceil(MAX_ROWS / BLOCK_M), dtype=torch.int32,
                              device=w.data.device)  # enough for any tile of up to MAX_ROWS rows
        return w

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    def pairs(self, dtype) -> torch.Tensor:
        """int32 [256]: byte b's two codes in `dtype`, the high nibble's in the upper 16 bits (one gather a byte)."""
        if dtype not in self.tables:
            bits = self.code.to(dtype).view(torch.int16).long() & 0xFFFF
            b = torch.arange(256, device=self.code.device)
            word = bits[b >> 4] << 16 | bits[b & 15]
            self.tables[dtype] = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
        return self.tables[dtype]


def dequantize(w: Weight) -> torch.Tensor:
    """The fp32 [N, K] weight, in plain torch, as the kernel reads the layout (the CPU tests hold it to bitsandbytes'
    dequantize; the kernel itself rounds each code to the compute dtype and scales a block's partial sum instead)."""
    q = torch.stack([w.data >> 4, w.data & 0xF], dim=-1).reshape(-1).long()  # high nibble first
    values = w.code[q]
    absmax = w.absmax
    if w.nested:
        blocks = torch.arange(absmax.numel(), device=absmax.device) // w.blocksize2
        absmax = w.code2[absmax.long()] * w.absmax2[blocks] + w.offset
    return (values.view(-1, w.blocksize) * absmax.view(-1, 1)).view(w.n, w.k)


# --- the kernel ------------------------------------------------------------------------------------------------
_built = None


def _kernels():
    """The Triton kernel (Triton compiles it on its first launch), defined once. (A plain global, not
    functools.cache: the compile mode traces this call.)"""
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M", "SPLITS"])
    def nf4mm_kernel(x_ptr, w_ptr, absmax_ptr, pairs_ptr, code2_ptr, absmax2_ptr, offset, out_ptr, part_ptr, locks_ptr,
                     M, N, K, SPAN, SPLITS,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # out^T[n, m] = sum over scale blocks b of scale[n, b] * (w[n, block b] . x[m, block b]), this program's blocks
        # [pid_s * SPAN, (pid_s + 1) * SPAN); x is [M, K] as given, and a block's codes are joined back into input
        # order (w[2j] = the high nibble of byte j, w[2j + 1] its low nibble).
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, HALF)
        kk = tl.arange(0, BLOCKSIZE)
        n_ok = rn < N
        m_ok = rm < M
        row_blocks = K // BLOCKSIZE
        b_begin = pid_s * SPAN
        b_end = tl.minimum(b_begin + SPAN, row_blocks)
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for b in range(b_begin, b_end):
            packed = tl.load(w_ptr + rn[:, None] * (K // 2) + b * HALF + j[None, :], mask=n_ok[:, None], other=0)
            blk = rn * row_blocks + b
            if NESTED:
                qa = tl.load(absmax_ptr + blk, mask=n_ok, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=n_ok,
                                                          other=0.0) + offset
            else:
                scale = tl.load(absmax_ptr + blk, mask=n_ok, other=0.0)
            pair = tl.load(pairs_ptr + packed.to(tl.int32))
            hi = (pair >> 16).to(tl.int16).to(dtype, bitcast=True)
            lo = pair.to(tl.int16).to(dtype, bitcast=True)
            w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCKSIZE))
            xb = tl.load(x_ptr + rm[None, :] * K + b * BLOCKSIZE + kk[:, None], mask=m_ok[None, :], other=0.0)
            acc += tl.dot(w, xb) * scale[:, None]
        mask = n_ok[:, None] & m_ok[None, :]
        offs = rm[None, :] * N + rn[:, None]
        if SPLITS == 1:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + pid_s * M * N + offs, acc, mask=mask)
            # The last of the tile's SPLITS programs to arrive sums their partials, in split order (so the sum's
            # rounding never depends on which arrived last), and zeroes the counter for the next call: no second
            # kernel (run32: 224 launches a step fewer).
            tl.debug_barrier()  # every thread's partial is stored before the arrival is counted
            lock = locks_ptr + pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for s in range(0, SPLITS):
                    total += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock, 0)

    return nf4mm_kernel


def matmul(x: torch.Tensor, w: Weight, tile: Tile | None = None) -> torch.Tensor:
    """x [..., K] (bf16 or fp16, CUDA) times the nf4 weight's transpose: [..., N] in x's dtype (`tile`: TILE)."""
    nf4mm_kernel = _kernels()
    tile = tile or TILE
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k).contiguous()
    m = x2.shape[0]
    row_blocks = w.k // w.blocksize
    span = math.ceil(row_blocks / tile.split)  # scale blocks a program covers
    split = math.ceil(row_blocks / span)
    grid = (math.ceil(w.n / tile.block_n), split, math.ceil(m / BLOCK_M))
    out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    part = torch.empty(split, m, w.n, dtype=torch.float32, device=x.device) if split > 1 else out
    if w.locks is None or w.locks.numel() < grid[0] * grid[2]:  # (a call of more rows than NF4Linear makes)
        w.locks = torch.zeros(grid[0] * grid[2], dtype=torch.int32, device=x.device)
    nested = w.nested
    nf4mm_kernel[grid](
        x2, w.data, w.absmax, w.pairs(x.dtype), w.code2 if nested else w.code, w.absmax2 if nested else w.absmax,
        w.offset, out, part, w.locks, m, w.n, w.k, span, split,
        BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=nested, BLOCK_M=BLOCK_M, BLOCK_N=tile.block_n,
        num_warps=tile.warps, num_stages=tile.stages)
    return out.view(*lead, w.n)


class NF4Linear(torch.nn.Module):
    """A bitsandbytes Linear4bit whose decode-step calls run the kernel; prompts (`holder.prefilling`, the slot
    engine's flag) and calls of more than MAX_ROWS rows keep bitsandbytes' own path, which is faster there and
    launches far fewer kernels from the host. Computes in the layer's compute dtype and returns the input's dtype,
    as Linear4bit does."""

    def __init__(self, base, dtype, holder=None):
        super().__init__()
        self.base = base
        self.holder = holder  # a plain object with a `prefilling` flag (columns.AdapterColumns), or None
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight4 = Weight.of(base.weight)
        self.dtype = getattr(base, "compute_dtype", None) or dtype
        self.weight4.pairs(self.dtype)  # built here, outside any graph capture or compile
        _kernels()

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        prefilling = self.holder is not None and self.holder.prefilling
        if prefilling or rows > MAX_ROWS or self.dtype not in (torch.bfloat16, torch.float16):
            return self.base(x)
        out = matmul(x.to(self.dtype), self.weight4)
        if self.base.bias is not None:
            out = out + self.base.bias.to(self.dtype)
        return out.to(x.dtype)
