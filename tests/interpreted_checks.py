"""The checks `tests/test_kernels_interpreted.py` runs, each in a process of its own started with TRITON_INTERPRET=1
(Triton decides at its import whether its own library functions are interpreted, so the process must start that way).

Imported first here: the mend for one limit of Triton 3.6's interpreter under NumPy 2 (a loaded scalar used as a loop
bound: its scalars are shape-(1,) arrays, which `int()` refuses), for these checks only.
"""
from __future__ import annotations

import os
import types

import numpy as np
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run these through tests/test_kernels_interpreted.py"

from kernel_refs import from_pages, softmax_attention, to_pages  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

_patch_tensor = interpreter._patch_lang_tensor


def _patched(tensor, scope):
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))


interpreter._patch_lang_tensor = _patched


def attention_reads_each_rows_own_length_alone_batched_and_in_any_bucket(dtype_name: str):
    from qlora import decodeops as ops
    from qlora.slots import PAGE

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, d, slot = 4, 6, 2, 16, 600
    q = torch.randn(rows, heads, 1, d, generator=g).to(dtype)
    k = torch.randn(rows, kv_heads, slot, d, generator=g).to(dtype)
    v = torch.randn(rows, kv_heads, slot, d, generator=g).to(dtype)
    pos = torch.tensor([0, ops.CHUNK - 1, ops.CHUNK, 599])  # one position, a chunk's end, the next chunk, the slot
    kp, vp, table = to_pages(k, v, PAGE)  # each row's pages scattered through the pool, the rest NaN
    out = ops.attend(q, kp, vp, table, pos, slot, d ** -0.5)
    ref = softmax_attention(q, k, v, pos, d ** -0.5)
    assert out.shape == (rows, 1, heads, d) and out.dtype == dtype
    for r in range(rows):  # each row at its own scale (a one-key row's output is a value, the others' averages)
        assert (out[r].float() - ref[r]).abs().max() <= 4 * torch.finfo(dtype).eps * ref[r].abs().max(), r
    garbage_k, garbage_v = k.clone(), v.clone()
    for r in range(rows):  # past a row's position: never read
        garbage_k[r, :, int(pos[r]) + 1:] = float("nan")
        garbage_v[r, :, int(pos[r]) + 1:] = float("nan")
    assert torch.equal(ops.attend(q, *to_pages(garbage_k, garbage_v, PAGE, seed=1), pos, slot, d ** -0.5), out)
    assert torch.equal(ops.attend(q, kp, vp, table, pos, 1024, d ** -0.5), out)  # a longer bucket
    for r in range(rows):
        alone = ops.attend(q[r:r + 1], kp, vp, table[r:r + 1], pos[r:r + 1], int(pos[r]) + 1, d ** -0.5)
        assert torch.equal(alone[0], out[r]), r


def nf4mm_sums_its_split_k_partials_in_the_kernel_and_rows_stay_independent():
    import bitsandbytes.functional as bf

    from qlora import nf4mm
    g = torch.Generator().manual_seed(0)
    w16 = torch.randn(96, 1024, generator=g) * 0.02  # 96 outputs: two 64-row tiles, the second half empty
    data, state = bf.quantize_4bit(w16, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = nf4mm.Weight.of(types.SimpleNamespace(data=data, quant_state=state))
    x = torch.randn(20, 1024, generator=g).half()  # two 16-row tiles, the second mostly empty
    out = nf4mm.matmul(x, w)  # 16 scale blocks a row in 8 splits: the last program of each tile adds them
    exact = x.double() @ nf4mm.dequantize(w).double().t()
    cublas_like = (x.float() @ nf4mm.dequantize(w).t()).double()  # fp32 sums of fp16 products, one rounding less
    assert out.shape == (20, 96) and out.dtype == torch.float16
    assert (out.double() - exact).abs().max() <= 2 * (cublas_like - exact).abs().max() + 1e-3
    assert not w.locks.any()  # every counter back at zero for the next call
    for r in (0, 7, 19):
        assert torch.equal(nf4mm.matmul(x[r:r + 1], w)[0], out[r]), r
    assert torch.equal(nf4mm.matmul(x, w), out)  # again: the same bits


def rms_norm_rope_and_silu_mul_do_transformers_arithmetic():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from qlora import decodeops as ops
    from qlora.slots import PAGE
    g = torch.Generator().manual_seed(0)
    dtype, eps = torch.float16, torch.finfo(torch.float16).eps
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
    x = (torch.randn(5, 96, generator=g) * 3).to(dtype)
    out = torch.empty_like(x)
    ops._kernels().rms_norm[(5,)](x, norm.weight, out, 96, 1e-5, BLOCK=ops.triton_block(96))
    with torch.no_grad():
        ref = norm(x)
    assert (out.float() - ref.float()).abs().max() <= 2 * eps * ref.float().abs().max()

    rows, heads, kv_heads, d, slot = 3, 4, 2, 16, 50
    q = torch.randn(rows, 1, heads * d, generator=g).to(dtype)
    k = torch.randn(rows, 1, kv_heads * d, generator=g).to(dtype)
    v = torch.randn(rows, 1, kv_heads * d, generator=g).to(dtype)
    pos = torch.tensor([0, 9, 49])
    angle = pos[:, None, None].float() * torch.rand(d // 2, generator=g).repeat(2)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    zeros = torch.zeros(rows, kv_heads, slot, d, dtype=dtype)
    key_pool, value_pool, table = to_pages(zeros, zeros, PAGE)
    rotated = ops.rope_and_store(q, k, v, cos, sin, pos, table, key_pool, value_pool)
    keys, values = from_pages(key_pool, table, slot), from_pages(value_pool, table, slot)
    assert key_pool[0].isnan().all()  # the trash page: not written
    ref_q, ref_k = apply_rotary_pos_emb(q.view(rows, 1, heads, d).transpose(1, 2).float(),
                                        k.view(rows, 1, kv_heads, d).transpose(1, 2).float(), cos.float(), sin.float())
    assert (rotated.float() - ref_q).abs().max() <= eps * ref_q.abs().max()
    for r in range(rows):
        p = int(pos[r])
        assert (keys[r, :, p].float() - ref_k[r, :, 0]).abs().max() <= eps * ref_k.abs().max()
        assert torch.equal(values[r, :, p], v[r, 0].view(kv_heads, d))
        assert keys[r].abs().sum(-1).count_nonzero() == kv_heads  # only position p written, in each head

    gate, up = (torch.randn(4, 1, 200, generator=g) * 4).to(dtype), torch.randn(4, 1, 200, generator=g).to(dtype)
    ref = torch.nn.functional.silu(gate.float()).to(dtype).float() * up.float()
    assert (ops.silu_mul(gate, up).float() - ref).abs().max() <= 2 * eps * ref.abs().max()


def the_triton_rope_backward_does_the_compiled_steps_arithmetic():
    from qlora import fused, ropegrad
    for dtype in (torch.float16, torch.float32):
        g = torch.Generator().manual_seed(3)
        b, hq, hk, s, d = 2, 4, 2, 37, 16  # grouped k/v heads; 37 positions: the second block of 32 runs part empty
        dq = torch.randn(b, s, hq, d, generator=g).to(dtype).transpose(1, 2)  # attention's layout: strided heads
        dk, dv = (torch.randn(b, hk, s, d, generator=g).to(dtype) for _ in range(2))
        for rows in (b, 1):  # one cos/sin per row, or one for all rows (broadcast)
            cos, sin = (torch.randn(rows, 1, s, d, generator=g).to(dtype) for _ in range(2))
            got = ropegrad.qkv_grads(dq, dk, dv, cos, sin)
            assert got is not None and got.shape == (b, s, (hq + 2 * hk) * d) and got.dtype == dtype
            # the compiled step's arithmetic: the formula in fp32 from the 16-bit inputs, rounded once
            want = torch.cat(fused._qkv_plain(dq.float(), dk.float(), dv.float(), cos.float().expand(b, 1, s, d),
                                              sin.float().expand(b, 1, s, d)), dim=-1)
            eps = torch.finfo(dtype).eps
            assert (got.float() - want).abs().max() <= eps * want.abs().max(), (dtype, rows)
            assert torch.equal(got[..., (hq + hk) * d:], dv.transpose(1, 2).reshape(b, s, -1))  # v as it is


def the_triton_dequantize_gives_bitsandbytes_bits():
    import bitsandbytes.functional as bf

    from qlora import dequant
    for dtype, blocksize, rows in ((torch.float16, 64, 3 * 96), (torch.float32, 64, 96), (torch.float16, 128, 40)):
        # blocks: 432, 96 and 60, so the last program of each runs part empty (ROWS = 64)
        w = torch.randn(rows, 64 * 3, generator=torch.Generator().manual_seed(rows)).to(dtype)
        data, state = bf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        assert not state.nested and set(range(16)) <= set((data >> 4).flatten().tolist())
        got = dequant.dequantize(data, state.absmax, state.code, state.shape, state.dtype, blocksize)
        assert got is not None and got.dtype == dtype
        if blocksize == 64:  # bitsandbytes' CPU backend (0.50) gives other values at 128; the GPU test checks its CUDA
            assert torch.equal(got, bf.dequantize_4bit(data, state)), dtype
        d = data.reshape(-1)  # the layout's arithmetic: high nibble first, code * absmax in fp32, one rounding
        codes = torch.stack([d >> 4, d & 15], dim=-1).reshape(-1).long()
        want = (state.code[codes].view(-1, blocksize) * state.absmax.view(-1, 1)).to(dtype).view(state.shape)
        assert torch.equal(got, want), (dtype, blocksize)
