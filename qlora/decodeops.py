"""The slot engine's decode-step kernels besides the 4-bit matmul (Triton, CUDA cards of compute capability 8+, as
nf4mm): attention that reads each row's own length of its KV pages, the rotary embedding with the new key/value's
write into the row's page, RMSNorm, and the MLP's silu(gate) * up, one kernel each. The KV pool is slots.Pages':
[pages, page, kv heads, head width], a row's position t in page table[row, t // page] at t % page.

Why by hand: SDPA's masked decode attends every slot over the whole length bucket, free slots too (2.2 of run30's
15.9 ms step: one visitor's two rows paid for sixteen), and has no per-row length argument; flash-attn's
`flash_attn_with_kvcache` has one (`cache_seqlens`) but ships as a CUDA build this project cannot install on a Space.
transformers' RMSNorm is eight kernels a norm (65 a 7B step), its rotary ten a layer and the cache write two more:
at 16 rows each is a launch-bound ~2-3 us, ~1,000 of them a step (run33: 3.5 ms of elementwise work down to 0.5).

Exactness, as in nf4mm: a row's result depends on its own inputs only. Attention splits a row's keys into fixed CHUNK-
position chunks (whatever the length bucket), each chunk's partial softmax computed alone and merged in chunk order (a
loop turn reads one page); chunks at or past the row's length are never read, so a row gets the same bits alone or
batched, in any length bucket and wherever its pages lie. The elementwise kernels use transformers' arithmetic per row
(RMSNorm: fp32, cast back, then times the weight; silu*up: each rounded to the dtype as torch rounds it; rotary in fp32,
rounded once where transformers rounds each product), the GPU tests hold them within a rounding step of transformers'.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch  # imported only where the slot engine starts (`import qlora` stays light)

CHUNK = 256  # key positions a program reduces; fixed so a row's rounding never depends on the bucket

_built = None


def _kernels():
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["CHUNKS"])
    def attend_kernel(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, part_ptr, scale, H, GROUP, CHUNKS,
                      sq_b, sq_h, st_b, sk_p, sk_l, sk_h, sv_p, sv_l, sv_h,
                      D: tl.constexpr, CHUNK: tl.constexpr, PAGE: tl.constexpr):
        # program (row b, head h, chunk c): the softmax partial of q . keys[c * CHUNK, min((c + 1) * CHUNK, length))
        # as (acc [D], max, sum) in fp32, where length = pos[b] + 1 (the row's token was just written at pos[b]); the
        # row's position t lies in pool page table[b, t // PAGE] at t % PAGE, a loop turn reads one page
        bh, c = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kvh = h // GROUP
        length = tl.load(pos_ptr + b).to(tl.int32) + 1
        start = c * CHUNK
        if start < length:
            d = tl.arange(0, D)
            q = tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32) * scale
            m = tl.full((1,), float("-inf"), tl.float32)
            s = tl.zeros((1,), tl.float32)
            acc = tl.zeros((D,), tl.float32)
            end = tl.minimum(start + CHUNK, length)
            i = tl.arange(0, PAGE)
            for first in range(start, end, PAGE):
                page = tl.load(table_ptr + b * st_b + first // PAGE).to(tl.int64)
                ok = first + i < end
                k = tl.load(k_ptr + page * sk_p + kvh * sk_h + i[:, None] * sk_l + d[None, :], mask=ok[:, None],
                            other=0.0).to(tl.float32)
                score = tl.where(ok, tl.sum(k * q[None, :], 1), float("-inf"))
                m_new = tl.maximum(m, tl.max(score, 0))
                p = tl.exp(score - m_new)
                alpha = tl.exp(m - m_new)
                v = tl.load(v_ptr + page * sv_p + kvh * sv_h + i[:, None] * sv_l + d[None, :], mask=ok[:, None],
                            other=0.0).to(tl.float32)
                acc = acc * alpha + tl.sum(p[:, None] * v, 0)
                s = s * alpha + tl.sum(p, 0)
                m = m_new
            out = part_ptr + (bh * CHUNKS + c) * (D + 2)
            tl.store(out + d, acc)
            one = tl.arange(0, 1)
            tl.store(out + D + one, m)
            tl.store(out + D + 1 + one, s)

    @triton.jit(do_not_specialize=["CHUNKS"])
    def merge_kernel(part_ptr, pos_ptr, o_ptr, H, CHUNKS, so_b, so_h, D: tl.constexpr, CHUNK: tl.constexpr):
        # program (row b, head h): the row's chunks merged in chunk order (chunk 0 always holds position 0)
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        length = tl.load(pos_ptr + b).to(tl.int32) + 1
        n = tl.minimum(tl.cdiv(length, CHUNK), CHUNKS)
        d = tl.arange(0, D)
        one = tl.arange(0, 1)
        base = part_ptr + bh * CHUNKS * (D + 2)
        acc = tl.load(base + d)
        m = tl.load(base + D + one)
        s = tl.load(base + D + 1 + one)
        for c in range(1, n):
            part = base + c * (D + 2)
            mc = tl.load(part + D + one)
            m_new = tl.maximum(m, mc)
            a, bb = tl.exp(m - m_new), tl.exp(mc - m_new)
            acc = acc * a + tl.load(part + d) * bb
            s = s * a + tl.load(part + D + 1 + one) * bb
            m = m_new
        tl.store(o_ptr + b * so_b + h * so_h + d, (acc / s).to(o_ptr.dtype.element_ty))

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
        y = (x * tl.rsqrt(tl.sum(x * x, 0) / N + eps)).to(x_ptr.dtype.element_ty)  # transformers: cast back first
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, table_ptr, qo_ptr, kc_ptr, vc_ptr, H, KVH,
                          s_cos, st_b, skc_p, skc_l, skc_h, svc_p, svc_l, svc_h, D: tl.constexpr, PAGE: tl.constexpr):
        # program (row b, head h): q rotated into qo [rows, H, D]; for h < KVH also the row's new key (rotated) and
        # value written into the pool at pos[b] (page table[b, pos // PAGE], offset pos % PAGE). transformers'
        # rotary: x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x[D/2:], x[:D/2]); here in fp32, rounded
        # once.
        b, h = tl.program_id(0), tl.program_id(1)
        HALF: tl.constexpr = D // 2
        i = tl.arange(0, D)
        partner = tl.where(i < HALF, i + HALF, i - HALF)
        sign = tl.where(i < HALF, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * s_cos + i).to(tl.float32)
        sin = tl.load(sin_ptr + b * s_cos + i).to(tl.float32)
        q_row = q_ptr + (b * H + h) * D
        q = tl.load(q_row + i).to(tl.float32) * cos + sign * tl.load(q_row + partner).to(tl.float32) * sin
        tl.store(qo_ptr + (b * H + h) * D + i, q.to(qo_ptr.dtype.element_ty))
        if h < KVH:
            p = tl.load(pos_ptr + b)
            page = tl.load(table_ptr + b * st_b + p // PAGE).to(tl.int64)
            at = p % PAGE
            k_row = k_ptr + (b * KVH + h) * D
            k = tl.load(k_row + i).to(tl.float32) * cos + sign * tl.load(k_row + partner).to(tl.float32) * sin
            tl.store(kc_ptr + page * skc_p + at * skc_l + h * skc_h + i, k.to(kc_ptr.dtype.element_ty))
            tl.store(vc_ptr + page * svc_p + at * svc_l + h * svc_h + i, tl.load(v_ptr + (b * KVH + h) * D + i))

    @triton.jit
    def silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, BLOCK: tl.constexpr):
        # transformers' LlamaMLP: act_fn(gate) * up, each rounded to the dtype as torch rounds them
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
        up = tl.load(u_ptr + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, (act.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)

    return SimpleNamespace(attend=attend_kernel, merge=merge_kernel, rms_norm=rms_norm_kernel,
                           rope_store=rope_store_kernel, silu_mul=silu_mul_kernel)


def attend(query, key, value, table, pos, length: int, scale: float):
    """One decode token a row: query [rows, heads, 1, D]; key/value the KV pool [pages, PAGE, kv heads, D]; table
    [rows, pages a row] each row's pages in position order; pos [rows] each row's position (it attends to 0..pos);
    length the bucket (>= every pos + 1). [rows, 1, heads, D]."""
    kernels = _kernels()
    rows, heads, _, d = query.shape
    page = key.shape[1]
    assert CHUNK % page == 0, (CHUNK, page)
    group = heads // key.shape[2]
    chunks = math.ceil(length / CHUNK)
    if query.stride(-1) != 1:
        query = query.contiguous()
    part = torch.empty(rows * heads, chunks, d + 2, dtype=torch.float32, device=query.device)
    out = torch.empty(rows, 1, heads, d, dtype=query.dtype, device=query.device)
    kernels.attend[(rows * heads, chunks)](
        query, key, value, table, pos, part, scale, heads, group, chunks,
        query.stride(0), query.stride(1), table.stride(0), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), D=d, CHUNK=CHUNK, PAGE=page, num_warps=4)
    kernels.merge[(rows * heads,)](part, pos, out, heads, chunks, out.stride(0), out.stride(2), D=d, CHUNK=CHUNK,
                                   num_warps=1)
    return out


def rope_and_store(q, k, v, cos, sin, pos, table, keys, values):
    """One decode token a row: q [rows, 1, heads * D], k and v [rows, 1, kv heads * D] as the projections give them,
    cos/sin [rows, 1, D] (the model's rotary embedding); the rotated key and the value go into the KV pool
    (keys/values [pages, PAGE, kv heads, D]) at each row's pos, through its page table [rows, pages a row]. The
    rotated query, [rows, heads, 1, D]."""
    rows, d = q.shape[0], keys.shape[-1]
    heads, kv_heads = q.shape[-1] // d, keys.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(rows, heads, 1, d, dtype=q.dtype, device=q.device)
    _kernels().rope_store[(rows, heads)](q, k, v, cos, sin, pos, table, out, keys, values, heads, kv_heads,
                                         cos.stride(0), table.stride(0), keys.stride(0), keys.stride(1),
                                         keys.stride(2), values.stride(0), values.stride(1), values.stride(2), D=d,
                                         PAGE=keys.shape[1], num_warps=1)
    return out


def silu_mul(gate, up):
    """transformers' Llama MLP middle, silu(gate) * up, in one kernel."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    _kernels().silu_mul[(math.ceil(n / 1024),)](gate, up, out, n, BLOCK=1024, num_warps=4)
    return out


class RMSNorm(torch.nn.Module):
    """A transformers Llama RMSNorm in one kernel (16-bit CUDA inputs; anything else goes to the module itself)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.weight = base.weight
        self.eps = float(getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6)))
        _kernels()

    def forward(self, x):
        if x.dtype not in (torch.bfloat16, torch.float16) or self.weight.dtype != x.dtype or not x.is_cuda:
            return self.base(x)
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        out = torch.empty_like(x2)
        _kernels().rms_norm[(x2.shape[0],)](x2, self.weight, out, n, self.eps, BLOCK=triton_block(n),
                                            num_warps=8 if n >= 2048 else 4)
        return out.view(x.shape)


def triton_block(n: int) -> int:
    return 1 << (n - 1).bit_length()


def is_rms_norm(module) -> bool:
    """transformers' Llama-style RMSNorm (weight times x / rms(x)); other norms keep their own forward."""
    return type(module).__name__ in ("LlamaRMSNorm",) and getattr(module, "weight", None) is not None
