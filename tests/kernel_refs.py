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
