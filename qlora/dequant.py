"""bitsandbytes' nf4 dequantize as one Triton kernel, bit for bit: the fused training layer's 4-bit weights on a
compute-poor card (`fused.Options.triton_dequant`, chosen by `speed.plan`).

Why: on a T4-sized share of an H200 (the train bench's t4c mode) bitsandbytes' `kDequantizeBlockwise` moved ~150 GB/s
and took 8% of a training step's GPU time (bench/README.md, run45's profile), where the card copies at ~650 GB/s.
A compute-poor card has few multiprocessors, and that kernel's small blocks of 64 threads, each reading a few bytes,
leave most of their bandwidth unused. Here a program reads 64 scale blocks' bytes in one 2-D load and writes 64 x 64
weights in one store.

The arithmetic is bitsandbytes' CUDA kernel's (`functional.dequantize_4bit` for nf4): byte j of the flat data holds
weights 2j (high nibble) and 2j + 1 (low nibble); weight i is `code[nibble] * absmax[i // blocksize]` in fp32,
rounded once to the output dtype. The GPU test holds the result to that kernel bit for bit; the interpreted CPU test
holds it to the formula and, at block size 64, to bitsandbytes' CPU backend (whose 0.50 values differ at 128). Plain
(not nested) absmax only, which is what the fused layer's packed weights are; anything else stays with bitsandbytes.
"""
from __future__ import annotations

import functools

import torch  # imported by fused.py only when a layer dequantizes on a card (`import qlora` stays light)

from .tritonrun import launch

ROWS = 64  # scale blocks a program dequantizes
# with this many warps: 340 GB/s on the t4c share against 316 with 4 and 272 with 8 (bench/dequant_probe.py, run50;
# bitsandbytes' kernel 154, a plain copy 645); ROWS of 32 or 128 was no faster
WARPS = 2
_failed: list = []  # the reason, once the kernel failed on this process's card: bitsandbytes' kernel from then on


def dequantize(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, dtype, blocksize: int):
    """The [shape] weight in `dtype` from nf4 `data` (uint8, two weights a byte), fp32 `absmax` (one a block) and
    `code` (fp32 [16], the nf4 values), on data's CUDA device; None where the kernel cannot run here (the caller
    then takes bitsandbytes' path; the first failure is logged) or does not read this layout (a block size that is
    not a power of two, absmax not plain fp32)."""
    if _failed or blocksize < 2 or blocksize & (blocksize - 1):
        return None
    half = blocksize // 2
    blocks = data.numel() // half
    if blocks * half != data.numel() or absmax.numel() != blocks or absmax.dtype != torch.float32:
        return None
    out = torch.empty(shape, dtype=dtype, device=data.device)

    def run():
        _kernel()[(-(-blocks // ROWS),)](data.reshape(-1), absmax.reshape(-1), code, out, blocks, HALF=half,
                                         ROWS=ROWS, num_warps=WARPS)
        return out

    return launch(_failed, "Triton nf4 dequantize", "bitsandbytes' kernel dequantizes instead", run)


@functools.cache
def _kernel():
    """The kernel, defined once (Triton compiles it for the card at its first launch)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["blocks"])
    def nf4_dequantize_kernel(data_ptr, absmax_ptr, code_ptr, out_ptr, blocks, HALF: tl.constexpr,
                              ROWS: tl.constexpr):
        # rows of this program: scale blocks; a row's HALF bytes are its 2 * HALF weights, high nibble first
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = r < blocks
        packed = tl.load(data_ptr + r[:, None] * HALF + tl.arange(0, HALF)[None, :], mask=ok[:, None],
                         other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + r, mask=ok, other=0.0)[:, None]
        hi = tl.load(code_ptr + (packed >> 4)) * scale  # fp32, as bitsandbytes multiplies
        lo = tl.load(code_ptr + (packed & 15)) * scale
        w = tl.reshape(tl.join(hi, lo), (ROWS, 2 * HALF)).to(out_ptr.dtype.element_ty)  # one rounding
        tl.store(out_ptr + r[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :], w, mask=ok[:, None])

    return nf4_dequantize_kernel
