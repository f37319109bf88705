"""On a GPU only (CI skips these): decodeops' attention against fp32 softmax attention, each row over its own length
read through its page table, the same bits alone, batched and in any length bucket; its RMSNorm against
transformers'.

    python -m pytest -m gpu tests/test_decodeops_gpu.py -s
"""
from __future__ import annotations

import pytest
from kernel_refs import from_pages, softmax_attention, to_pages


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,d", [(32, 32, 128), (9, 3, 64)])  # Llama-2-7B; SmolLM2's grouped heads
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_attend_reads_each_rows_own_length_within_rounding_and_rows_are_independent(heads, kv_heads, d, dtype_name):
    import torch

    from qlora.decodeops import CHUNK, attend
    from qlora.slots import PAGE

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, slot = 7, 1300
    q = torch.randn(rows, heads, 1, d, dtype=dtype, device="cuda", generator=g)
    k = torch.randn(rows, kv_heads, slot, d, dtype=dtype, device="cuda", generator=g)
    v = torch.randn(rows, kv_heads, slot, d, dtype=dtype, device="cuda", generator=g)
    pos = torch.tensor([0, 5, CHUNK - 1, CHUNK, 700, 1023, 1299], device="cuda")
    scale = d ** -0.5
    kp, vp, table = to_pages(k, v, PAGE)  # each row's pages scattered through the pool, the rest NaN
    out = attend(q, kp, vp, table, pos, 1300, scale)
    ref = softmax_attention(q, k, v, pos, scale)
    for r in range(rows):  # each row at its own scale (a one-key row's output is a value, the others' averages)
        err = (out[r].float() - ref[r]).abs().max().item()
        assert err <= 4 * torch.finfo(dtype).eps * ref[r].abs().max().item() + 1e-4, (r, err)
    # what lies past a row's position is never read: garbage there changes nothing
    k2, v2 = k.clone(), v.clone()
    for r in range(rows):
        k2[r, :, int(pos[r]) + 1:] = float("nan")
        v2[r, :, int(pos[r]) + 1:] = float("nan")
    assert torch.equal(attend(q, *to_pages(k2, v2, PAGE, seed=1), pos, 1300, scale), out)
    assert torch.equal(attend(q, kp, vp, table, pos, 2048, scale), out)  # a longer bucket: the same bits
    for r in range(rows):  # each row alone = that row in the batch, bit for bit
        alone = attend(q[r:r + 1], kp, vp, table[r:r + 1], pos[r:r + 1], int(pos[r]) + 1, scale)
        assert torch.equal(alone[0], out[r]), r
    short = pos.clamp(max=200)  # rows shorter than a chunk: the bucket's length only bounds the grid
    assert torch.equal(attend(q, kp, vp, table, short, 256, scale), attend(q, kp, vp, table, short, 1300, scale))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_rms_norm_equals_transformers_within_rounding_and_rows_are_independent(dtype_name):
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qlora.decodeops import RMSNorm, is_rms_norm

    dtype = getattr(torch, dtype_name)
    base = LlamaRMSNorm(4096, eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        base.weight.copy_(torch.rand(4096) + 0.5)
    assert is_rms_norm(base)
    fused = RMSNorm(base)
    x = torch.randn(16, 1, 4096, dtype=dtype, device="cuda") * 3
    with torch.no_grad():
        ref, out = base(x), fused(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        # transformers' arithmetic but the sum's order: at most a rounding step of the output apart
        assert (out.float() - ref.float()).abs().max() <= 2 * torch.finfo(dtype).eps * ref.float().abs().max()
        assert torch.equal(fused(x[3:4]), out[3:4])
        assert torch.equal(fused(x.float()), base(x.float()))  # fp32: the module's own forward


@pytest.mark.gpu
def test_rope_and_store_equals_transformers_rotary_and_cache_write_within_rounding():
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from qlora.decodeops import rope_and_store
    from qlora.slots import PAGE

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, heads, kv_heads, d, slot = 5, 9, 3, 64, 300
    dtype = torch.bfloat16
    q = torch.randn(rows, 1, heads * d, dtype=dtype, device="cuda", generator=g)
    k = torch.randn(rows, 1, kv_heads * d, dtype=dtype, device="cuda", generator=g)
    v = torch.randn(rows, 1, kv_heads * d, dtype=dtype, device="cuda", generator=g)
    pos = torch.tensor([0, 7, 100, 255, 299], device="cuda")
    angle = pos[:, None, None].float() * torch.rand(d // 2, device="cuda", generator=g).repeat(2)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)  # [rows, 1, d], as LlamaRotaryEmbedding gives them
    zeros = torch.zeros(rows, kv_heads, slot, d, dtype=dtype, device="cuda")
    key_pool, value_pool, table = to_pages(zeros, zeros, PAGE)
    out = rope_and_store(q, k, v, cos, sin, pos, table, key_pool, value_pool)
    keys, values = from_pages(key_pool, table, slot), from_pages(value_pool, table, slot)
    assert key_pool[0].isnan().all() and value_pool[0].isnan().all()  # the trash page: not written
    q4, k4 = q.view(rows, 1, heads, d).transpose(1, 2), k.view(rows, 1, kv_heads, d).transpose(1, 2)
    ref_q, ref_k = apply_rotary_pos_emb(q4.float(), k4.float(), cos.float(), sin.float())  # fp32: rounded once
    eps = torch.finfo(dtype).eps
    assert out.shape == (rows, heads, 1, d) and (out.float() - ref_q).abs().max() <= eps * ref_q.abs().max()
    for r in range(rows):
        p = int(pos[r])
        assert (keys[r, :, p].float() - ref_k[r, :, 0]).abs().max() <= eps * ref_k.abs().max()
        assert torch.equal(values[r, :, p], v[r, 0].view(kv_heads, d))
        written = torch.zeros(slot, dtype=torch.bool)
        written[p] = True
        assert not keys[r, :, ~written].any() and not values[r, :, ~written].any()  # nothing else written


@pytest.mark.gpu
def test_silu_mul_equals_the_llama_mlp_middle_within_a_rounding_step():
    import torch

    from qlora.decodeops import silu_mul

    gate = torch.randn(16, 1, 11008, dtype=torch.bfloat16, device="cuda") * 4
    up = torch.randn_like(gate)
    ref = torch.nn.functional.silu(gate) * up
    out = silu_mul(gate, up)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out.float() - ref.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * ref.float().abs().max()
    assert torch.equal(silu_mul(gate[5:6], up[5:6]), out[5:6])
