"""RoPE's backward for the fused layer's q, k, v gradients as a Triton kernel: read in attention's (b, heads, s, d)
layout, rotated back, written side by side into the (b, s, q+k+v) tensor the packed weight reads
(`fused.Options.triton_rope`, chosen by `speed.plan` on a compute-poor card).

Why: torch.compile writes this step as one flat kernel over every output element, with batch and token counts
dynamic, so each element splits its flat index by the token count at run time (a 64-bit division): on the t4c bench's
T4-sized share that kernel moved ~114 GB/s where the share copies at ~645 (run51's profile, 1.8% of a short step).
Here a program takes one head of one row and a block of positions: the index arithmetic is per program, each load and
store a run of head_dim contiguous values.

The arithmetic is the compiled step's: transformers' rotate_half transposed, `g * cos + rotate_half^T(g * sin)`, in
fp32 from the 16-bit inputs and rounded once to the output's dtype (tests hold it to that formula in Triton's
interpreter on the CPU and on the GPU). Where the kernel cannot run (no Triton for the card, a head size that is not
a power of two, inputs not contiguous in head_dim) `qkv_grads` returns None and the caller takes the compiled step.
"""
from __future__ import annotations

import functools

import torch  # imported by fused.py only where a layer's backward runs this step (`import qlora` stays light)

from .tritonrun import launch

BLOCK_S = 32  # positions a program rotates
_failed: list = []  # the reason, once the kernel failed on this process's card: the compiled step from then on


def qkv_grads(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The (b, s, (hq + 2 hk) d) tensor of q's and k's gradients rotated back and v's as they are, from attention's
    (b, h, s, d) gradients and RoPE's (b or 1, 1, s, d) cos and sin; None where the kernel does not run here."""
    b, hq, s, d = dq.shape
    hk = dk.shape[1]
    if _failed or d & (d - 1) or any(t.stride(-1) != 1 for t in (dq, dk, dv, cos, sin)):
        return None
    out = torch.empty(b, s, (hq + 2 * hk) * d, dtype=dq.dtype, device=dq.device)

    def run():
        kernel = _kernel()
        column = 0
        for grad, rotate in ((dq, True), (dk, True), (dv, False)):
            heads = grad.shape[1]
            kernel[(b * heads, -(-s // BLOCK_S))](
                grad, cos, sin, out, s, heads, column, *grad.stride()[:3], _batch_stride(cos), cos.stride(2),
                _batch_stride(sin), sin.stride(2), out.stride(0), out.stride(1), D=d, ROTATE=rotate, BLOCK_S=BLOCK_S,
                num_warps=4)
            column += heads * d
        return out

    return launch(_failed, "Triton RoPE backward", "the compiled step rotates q and k's gradients instead", run)


def _batch_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else 0  # one cos/sin for every row: broadcast


@functools.cache
def _kernel():
    """The kernel, defined once (Triton compiles it for the card at its first launch)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["s", "heads", "column"])
    def rope_backward_kernel(g_ptr, cos_ptr, sin_ptr, out_ptr, s, heads, column, g_b, g_h, g_s, c_b, c_s, n_b, n_s,
                             o_b, o_s, D: tl.constexpr, ROTATE: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0) // heads
        head = tl.program_id(0) % heads
        pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        ok = (pos < s)[:, None]
        j = tl.arange(0, D)[None, :]
        src = g_ptr + row.to(tl.int64) * g_b + head * g_h + pos[:, None].to(tl.int64) * g_s
        g = tl.load(src + j, mask=ok, other=0.0).to(tl.float32)
        if ROTATE:  # out[j] = g[j] cos[j] + sign(j) g[j'] sin[j'], j' = j +- D/2: + in the first half, - in the second
            partner = (j + D // 2) % D
            c = tl.load(cos_ptr + row * c_b + pos[:, None] * c_s + j, mask=ok, other=0.0).to(tl.float32)
            g2 = tl.load(src + partner, mask=ok, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + row * n_b + pos[:, None] * n_s + partner, mask=ok, other=0.0).to(tl.float32)
            rotated = g2 * s2
            g = g * c + tl.where(j < D // 2, rotated, -rotated)
        dst = out_ptr + row.to(tl.int64) * o_b + pos[:, None].to(tl.int64) * o_s + column + head * D + j
        tl.store(dst, g.to(out_ptr.dtype.element_ty), mask=ok)

    return rope_backward_kernel
