"""SiLU*up and its two gradients for the fused layer as Triton kernels that walk rows (`fused.Options.triton_mlp`,
chosen by `speed.plan` on a compute-poor card).

Why: gate and up are column blocks of the packed gate/up matmul's output, and torch.compile writes each step as one
flat kernel over every element with the batch's token count dynamic, so every element splits its flat index into row
and column. On the t4c bench's T4-sized share those two kernels moved 204 and 286 GB/s where the share copies at ~645
(run69's profile: 1.4 ms a layer, 3% of a short step). Here a program takes a block of columns of one row: the index
arithmetic is per program, each load and store a contiguous run.

The arithmetic is the compiled steps' (`fused._silu_mul`, `fused._mlp_grads`, as torch decomposes them): silu(gate) *
up, and silu's backward `grad * s * (1 + gate * (1 - s))` with s = 1 / (1 + exp(-gate)), in fp32 from the 16-bit
inputs, each output rounded once (tests hold it to those formulas in Triton's interpreter on the CPU and to the
compiled steps on the GPU). Where a kernel cannot run (no Triton for the card, columns not contiguous) the functions
return None and the caller takes the compiled step.
"""
from __future__ import annotations

import functools

import torch  # imported by fused.py only where a layer runs these steps on a card (`import qlora` stays light)

from .tritonrun import launch

BLOCK = 1024  # columns a program takes
_failed: list = []  # the reason, once a kernel failed on this process's card: the compiled steps from then on


def silu_mul(gate: torch.Tensor, up: torch.Tensor):
    """silu(gate) * up for (b, s, n) tensors whose columns are contiguous; None where the kernel does not run here."""
    if not _fits(gate, up):
        return None
    b, s, n = gate.shape
    out = torch.empty(b, s, n, dtype=gate.dtype, device=gate.device)

    def run():
        _kernels().forward[(b * s, -(-n // BLOCK))](gate, up, out, n, s, *_rows(gate, up, out), BLOCK=BLOCK,
                                                    num_warps=4)
        return out

    return launch(_failed, "Triton SiLU*up", "the compiled steps compute it and its gradients instead", run)


def silu_mul_grads(dm: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(d gate, d up) from d(silu(gate) * up); None where the kernel does not run here."""
    if not _fits(dm, gate, up):
        return None
    b, s, n = gate.shape
    dg, du = (torch.empty(b, s, n, dtype=gate.dtype, device=gate.device) for _ in range(2))

    def run():
        _kernels().backward[(b * s, -(-n // BLOCK))](dm, gate, up, dg, du, n, s, *_rows(dm, gate, up, dg, du),
                                                     BLOCK=BLOCK, num_warps=4)
        return dg, du

    return launch(_failed, "Triton SiLU*up", "the compiled steps compute it and its gradients instead", run)


def _fits(*tensors) -> bool:
    first = tensors[0]
    return (not _failed and first.dim() == 3
            and all(t.shape == first.shape and t.dtype == first.dtype and t.stride(-1) == 1 for t in tensors))


def _rows(*tensors) -> list[int]:
    """Each tensor's batch and token strides, in argument order."""
    return [stride for t in tensors for stride in t.stride()[:2]]


@functools.cache
def _kernels():
    """The kernels, defined once (Triton compiles them for the card at their first launch)."""
    from types import SimpleNamespace

    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n", "s"])
    def silu_mul_kernel(g_ptr, u_ptr, m_ptr, n, s, g_b, g_s, u_b, u_s, m_b, m_s, BLOCK: tl.constexpr):
        b, p = (tl.program_id(0) // s).to(tl.int64), (tl.program_id(0) % s).to(tl.int64)  # the row's batch, position
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(g_ptr + b * g_b + p * g_s + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + b * u_b + p * u_s + cols, mask=ok, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        tl.store(m_ptr + b * m_b + p * m_s + cols, (g * sig * u).to(m_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["n", "s"])
    def silu_mul_grads_kernel(dm_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, s, dm_b, dm_s, g_b, g_s, u_b, u_s, dg_b, dg_s,
                              du_b, du_s, BLOCK: tl.constexpr):
        b, p = (tl.program_id(0) // s).to(tl.int64), (tl.program_id(0) % s).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        dm = tl.load(dm_ptr + b * dm_b + p * dm_s + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * g_b + p * g_s + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + b * u_b + p * u_s + cols, mask=ok, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        dg = dm * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + b * dg_b + p * dg_s + cols, dg.to(dg_ptr.dtype.element_ty), mask=ok)
        tl.store(du_ptr + b * du_b + p * du_s + cols, (dm * g * sig).to(du_ptr.dtype.element_ty), mask=ok)

    return SimpleNamespace(forward=silu_mul_kernel, backward=silu_mul_grads_kernel)
