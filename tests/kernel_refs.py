"""Plain-torch references for the chat engine's kernels, shared by the interpreter checks and the GPU tests."""
from __future__ import annotations

import torch


def softmax_attention(q, k, v, pos, scale):
    """fp32 attention of each row's one query [rows, heads, 1, D] over its keys 0..pos[row] of [rows, kv heads, slot,
    D] (grouped heads expanded): [rows, 1, heads, D], as decodeops.attend returns it."""
    rows, heads, _, d = q.shape
    k = k.float().repeat_interleave(heads // k.shape[1], dim=1)
    v = v.float().repeat_interleave(heads // v.shape[1], dim=1)
    out = []
    for r in range(rows):
        n = int(pos[r]) + 1
        w = torch.softmax((q[r, :, 0].float()[:, None, :] * k[r, :, :n]).sum(-1) * scale, dim=-1)
        out.append((w[:, :, None] * v[r, :, :n]).sum(1))
    return torch.stack(out)[:, None]


def to_pages(keys, values, page: int, seed: int = 0):
    """A contiguous cache (keys, values [rows, kv heads, slot, D]) as the slot engine's KV pool: (keys, values
    [1 + rows * pages a row, page, kv heads, D], table [rows, pages a row]), each row's pages scattered through the pool
    in a shuffled order, the trash page 0 (and a last page's tail) NaN: what a kernel must never read."""
    rows, heads, slot, d = keys.shape
    width = -(-slot // page)
    order = torch.randperm(rows * width, generator=torch.Generator().manual_seed(seed)).to(keys.device)
    out = []
    for cache in (keys, values):
        padded = torch.full((rows, heads, width * page, d), float("nan"), dtype=cache.dtype, device=cache.device)
        padded[:, :, :slot] = cache
        pool = torch.full((1 + rows * width, page, heads, d), float("nan"), dtype=cache.dtype, device=cache.device)
        pool[1 + order] = padded.view(rows, heads, width, page, d).permute(0, 2, 3, 1, 4).reshape(-1, page, heads, d)
        out.append(pool)
    return out[0], out[1], (1 + order).view(rows, width)


def from_pages(pool, table, slot: int):
    """The contiguous view of a KV pool: [rows, kv heads, slot, D]."""
    rows, width = table.shape
    page, heads, d = pool.shape[1:]
    return pool[table].permute(0, 3, 1, 2, 4).reshape(rows, heads, width * page, d)[:, :, :slot]
