"""A Llama decoder layer for LoRA training as one autograd node, with its backward written out by hand.

Why: on a fast card this job waits on the CPU, which issues ~4,700 kernels a step through peft's, bitsandbytes' and
transformers' Python layers and records an autograd node for each (bench/README.md). The same arithmetic written once,
under one node, costs a fraction of that CPU time. It also keeps much less for backward: the layer's input, q/k/v and
the attention output (flash attention needs them), the post-attention residual, two fp32 scales a token and the
LoRA rank-r activations. Norms, dropout masks and the whole MLP are recomputed in backward, which is cheap on a GPU
that is otherwise waiting. The saved memory is what lets a 7B run skip gradient checkpointing within a T4's 15 GiB.

The forward is transformers' LlamaDecoderLayer with peft's LoRA, op for op: RMSNorm in fp32, q/k/v/o, RoPE, causal
sdpa with no mask, SiLU*up, and `base(x) + lora_B(lora_A(dropout(x))) * scaling` on every adapted projection.
Used only where that is exact: training mode with grad on, no KV cache, no attention mask (right-padded batches,
`speed.CAUSAL_ATTENTION`), a layer that does not checkpoint, plain LoRA (no DoRA, no LoRA bias) on any of the seven
projections over 4-bit or 16-bit frozen weights. Anything else runs the layer's own forward.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")  # the groups that read one input


class NotFusable(Exception):
    """This layer has something the fused forward does not reproduce exactly."""


@dataclass
class Projection:
    """One frozen linear, with its LoRA pair if the adapter targets it."""

    base: object  # bitsandbytes Linear4bit or torch Linear, frozen
    index: int  # position in PROJECTIONS: picks this projection's dropout stream
    A: object = None  # lora_A weight (r, in), trainable
    B: object = None  # lora_B weight (out, r), trainable
    scaling: float = 1.0
    dropout: float = 0.0

    @property
    def out_features(self) -> int:
        return self.base.out_features


@dataclass
class Packed:
    """The 4-bit weights of projections that read the same input (q/k/v, gate/up), stored back to back: one
    dequantize and one matmul instead of three or two. The modules' own weights become views of this storage."""

    data: object  # packed nf4 bytes, (n, 1) uint8
    absmax: object  # one fp32 scale per block
    shape: tuple
    dtype: object
    blocksize: int
    quant_type: str

    def weight(self, dtype):
        import torch

        w = torch.ops.bitsandbytes.dequantize_4bit.default(self.data, self.absmax, self.blocksize, self.quant_type,
                                                             self.shape, self.dtype)
        return w if w.dtype == dtype else w.to(dtype)


@dataclass
class LayerParts:
    """What the fused forward reads from one decoder layer (the modules stay where peft and the Trainer see them)."""

    proj: dict[str, Projection]
    norm_in: object  # input_layernorm
    norm_post: object  # post_attention_layernorm
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    trainable: list = field(default_factory=list)  # A, B of every adapted projection, in PROJECTIONS order
    qkv: Packed | None = None
    gate_up: Packed | None = None

    def group(self, names) -> list[Projection]:
        return [self.proj[n] for n in names]

    @property
    def dropout(self) -> bool:
        return any(p.dropout for p in self.proj.values())


# --- finding the parts -----------------------------------------------------------------------------------
def _projection(module, index: int) -> Projection:
    import torch
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        if module.merged or module.disable_adapters:
            raise NotFusable("the adapter is merged or disabled")
        if len(module.active_adapters) != 1:
            raise NotFusable("more than one active adapter")
        name = module.active_adapters[0]
        base = module.base_layer
        if name in module.lora_A:
            if module.use_dora.get(name):
                raise NotFusable("DoRA")
            if module.lora_B[name].bias is not None or module.lora_A[name].bias is not None:
                raise NotFusable("LoRA with a bias")
            drop = module.lora_dropout[name]
            p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
            proj = Projection(base, index, module.lora_A[name].weight, module.lora_B[name].weight,
                              float(module.scaling[name]), float(p))
        else:
            proj = Projection(base, index)
    else:
        proj = Projection(module, index)
    if getattr(proj.base, "bias", None) is not None:
        raise NotFusable("a projection with a bias")
    if not isinstance(proj.base, torch.nn.Linear):  # bitsandbytes' Linear4bit is a torch Linear too
        raise NotFusable(f"{type(proj.base).__name__} projection")
    return proj


def layer_parts(layer) -> LayerParts:
    """The parts of a Llama decoder layer, or NotFusable with the reason."""
    attn, mlp = layer.self_attn, layer.mlp
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        raise NotFusable("an MLP activation other than SiLU")
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if not hasattr(norm, "variance_epsilon"):
            raise NotFusable(f"{type(norm).__name__} is not an RMSNorm")
    cfg = attn.config
    proj = {name: _projection(getattr(attn if name in PROJECTIONS[:4] else mlp, name), i)
            for i, name in enumerate(PROJECTIONS)}
    parts = LayerParts(proj, layer.input_layernorm, layer.post_attention_layernorm, cfg.num_attention_heads,
                       cfg.num_key_value_heads, attn.head_dim, attn.scaling)
    parts.trainable = [t for p in proj.values() if p.A is not None for t in (p.A, p.B)]
    return parts


def pack(projections: list[Projection]) -> Packed | None:
    """Put the 4-bit weights of `projections` back to back (see Packed); None where they are not plain nf4/fp4 of one
    kind (16-bit weights, nested quantization), which then stay apart."""
    import torch

    states = [getattr(p.base.weight, "quant_state", None) for p in projections]
    if any(s is None or s.nested for s in states):
        return None
    first = states[0]
    if any((s.blocksize, s.quant_type, s.dtype, s.shape[1]) != (first.blocksize, first.quant_type, first.dtype,
                                                                 first.shape[1]) for s in states):
        return None
    if any(s.shape[0] * s.shape[1] % s.blocksize for s in states):  # blocks must not straddle two weights
        return None
    data = torch.cat([p.base.weight.data.reshape(-1, 1) for p in projections])
    absmax = torch.cat([s.absmax for s in states])
    at, block_at = 0, 0
    for p, s in zip(projections, states):  # the modules keep working on views of the packed storage
        n, blocks = p.base.weight.data.numel(), s.absmax.numel()
        p.base.weight.data = data[at:at + n]
        s.absmax = absmax[block_at:block_at + blocks]
        at, block_at = at + n, block_at + blocks
    return Packed(data, absmax, (sum(s.shape[0] for s in states), first.shape[1]), first.dtype, first.blocksize,
                  first.quant_type)


def install(model) -> int:
    """Give every Llama decoder layer of `model` the fused training forward; returns how many layers took it."""
    layers = [(m, layer_parts(m)) for m in model.modules()  # every layer checked before any is changed
              if type(m).__name__ == "LlamaDecoderLayer" and not hasattr(m, "_qlora_parts")]
    for module, parts in layers:
        parts.qkv, parts.gate_up = pack(parts.group(QKV)), pack(parts.group(GATE_UP))
        module._qlora_parts = parts
        module._qlora_stock_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
    return len(layers)


def _fused_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                   position_embeddings=None, **kwargs):
    import torch

    if (not self.training or self.gradient_checkpointing or not torch.is_grad_enabled() or attention_mask is not None
            or cache is not None or kwargs.get("past_key_values") is not None or position_embeddings is None):
        return self._qlora_stock_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                         cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                         **kwargs)
    cos, sin = position_embeddings
    # one draw from the CPU generator seeds this call's dropout masks: reproducible under the Trainer's seed, and
    # backward regenerates the same masks instead of keeping them
    seed = draw_seed() if self._qlora_parts.dropout else 0
    return _apply_layer(hidden_states, cos, sin, self._qlora_parts, seed, *self._qlora_parts.trainable)


def draw_seed() -> int:
    import torch

    return int(torch.randint(0, 2**40, (1,)).item())


# --- the arithmetic --------------------------------------------------------------------------------------
def _weight(base, dtype):
    """The frozen weight (out, in) in the compute dtype: dequantized from nf4 the way bitsandbytes' matmul does."""
    w = base.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w if w.dtype == dtype else w.to(dtype)
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(w.data, state).to(dtype)


_GENERATORS: dict = {}


def _keep_mask(x, p: float, seed: int, index: int):
    """Dropout's kept-and-rescaled mask for one projection; the same tensor each time for the same seed."""
    import torch

    gen = _GENERATORS.get(x.device)
    if gen is None:
        gen = _GENERATORS[x.device] = torch.Generator(device=x.device)
    gen.manual_seed(seed * len(PROJECTIONS) + index)
    return torch.empty_like(x).bernoulli_(1 - p, generator=gen).mul_(1 / (1 - p))


def _lora(P: Projection, x, seed: int):
    """lora_B(lora_A(dropout(x))) * scaling, and lora_A's output (kept for backward). The scaling multiplies the
    rank-r activations rather than the full-width output: the same product, on a tensor out/r times smaller."""
    import torch.nn.functional as F

    xd = x * _keep_mask(x, P.dropout, seed, P.index) if P.dropout else x
    t = F.linear(xd, P.A.to(x.dtype))
    return F.linear(t * P.scaling, P.B.to(x.dtype)), t


def _lora_backward(P: Projection, dy, x, t, seed: int, grads: dict):
    """d(input) through the LoRA branch; the LoRA weights' grads go into `grads`."""
    dy2, t2 = dy.flatten(0, -2), t.flatten(0, -2)
    keep = _keep_mask(x, P.dropout, seed, P.index) if P.dropout else None
    xd = (x * keep if keep is not None else x).flatten(0, -2)
    grads[id(P.B)] = (dy2.t() @ (t2 * P.scaling)).to(P.B.dtype)
    dt = (dy2 @ P.B.to(dy.dtype)) * P.scaling
    grads[id(P.A)] = (dt.t() @ xd).to(P.A.dtype)
    dxd = (dt @ P.A.to(dy.dtype)).view(*dy.shape[:-1], -1)
    return dxd * keep if keep is not None else dxd


def _project_all(projs: list[Projection], packed: Packed | None, x, seed: int, t_saved=None):
    """The outputs of projections reading the same x, and their lora_A outputs. With `t_saved` (backward's
    recompute), LoRA reuses the kept lora_A outputs instead of redrawing dropout. Also returns the frozen weight
    when it was one packed matrix, so backward can reuse it."""
    import torch.nn.functional as F

    if packed is not None:
        w = packed.weight(x.dtype)
        ys = list(F.linear(x, w).split([p.out_features for p in projs], dim=-1))
    else:
        w, ys = None, [F.linear(x, _weight(p.base, x.dtype)) for p in projs]
    ts = []
    for i, p in enumerate(projs):
        if p.A is None:
            ts.append(None)
        elif t_saved is not None:
            ts.append(t_saved[i])
            ys[i] = ys[i] + F.linear(t_saved[i] * p.scaling, p.B.to(x.dtype))
        else:
            delta, t = _lora(p, x, seed)
            ys[i] = ys[i] + delta
            ts.append(t)
    return ys, ts, w


def _backward_all(projs: list[Projection], packed: Packed | None, dys: list, x, ts: list, seed: int, grads: dict,
                  w=None):
    """d(x) for projections reading the same x: one matmul against the packed weight, or one per projection."""
    import torch

    if packed is not None:
        w = w if w is not None else packed.weight(dys[0].dtype)
        dx = torch.matmul(torch.cat(dys, dim=-1), w)
    else:
        dx = sum(torch.matmul(dy, _weight(p.base, dy.dtype)) for p, dy in zip(projs, dys))
    for p, dy, t in zip(projs, dys, ts):
        if p.A is not None:
            dx = dx + _lora_backward(p, dy, x, t, seed, grads)
    return dx


def _norm(h, norm, r=None):
    """transformers' LlamaRMSNorm: fp32 statistics, weight times the result cast back; also returns the fp32 scale."""
    import torch

    h32 = h.float()
    if r is None:
        r = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return (norm.weight * (h32 * r).to(h.dtype)).to(h.dtype), r


def _norm_backward(dy, h, r, norm):
    n = h.float() * r
    dn = (dy * norm.weight).float()
    return (r * (dn - n * (dn * n).mean(-1, keepdim=True))).to(h.dtype)


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _rope_backward(g, cos, sin):
    import torch

    gs = g * sin
    half = g.shape[-1] // 2
    return g * cos + torch.cat((gs[..., half:], -gs[..., :half]), dim=-1)  # rotate_half's transpose


def _attention(parts: LayerParts, q, k, v):
    """Causal sdpa (flash on a GPU) on a small graph of its own: backward asks it for d(q, k, v)."""
    import torch
    import torch.nn.functional as F

    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        kk, vv = k, v
        if parts.kv_heads != parts.heads:  # grouped-query attention: each kv head serves `groups` query heads
            b, n, s, d = k.shape
            groups = parts.heads // parts.kv_heads
            kk = k[:, :, None].expand(b, n, groups, s, d).reshape(b, n * groups, s, d)
            vv = v[:, :, None].expand(b, n, groups, s, d).reshape(b, n * groups, s, d)
        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=parts.scale)
    return q, k, v, o


def _autocast_off(device):
    import torch

    return torch.autocast(device_type=device.type, enabled=False)


def _layer_function():
    import torch
    import torch.nn.functional as F

    class LayerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, cos, sin, parts: LayerParts, seed: int, *trainable):
            P = parts.proj
            qkv, gate_up = parts.group(QKV), parts.group(GATE_UP)
            b, s, _ = h.shape
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            with _autocast_off(h.device):
                x, r1 = _norm(h, parts.norm_in)
                (q, k, v), (tq, tk, tv), _ = _project_all(qkv, parts.qkv, x, seed)
                q = _rope(q.view(b, s, parts.heads, parts.head_dim).transpose(1, 2), cos, sin)
                k = _rope(k.view(b, s, parts.kv_heads, parts.head_dim).transpose(1, 2), cos, sin)
                v = v.view(b, s, parts.kv_heads, parts.head_dim).transpose(1, 2)
                q, k, v, o = _attention(parts, q, k, v)
                attn = o.detach().transpose(1, 2).reshape(b, s, -1)
                (a,), (to,), _ = _project_all([P["o_proj"]], None, attn, seed)
                h2 = h + a
                y, r2 = _norm(h2, parts.norm_post)
                (g, u), (tg, tu), _ = _project_all(gate_up, parts.gate_up, y, seed)
                (d,), (td,), _ = _project_all([P["down_proj"]], None, F.silu(g) * u, seed)
                out = h2 + d
            ctx.parts, ctx.seed = parts, seed
            ctx.attention = (q, k, v, o)  # o carries its own little graph back to q, k, v
            ctx.save_for_backward(h, r1, h2, r2, cos, sin, *[t if t is not None else h.new_empty(0)
                                                             for t in (tq, tk, tv, to, tg, tu, td)])
            return out

        @staticmethod
        def backward(ctx, dout):
            parts, seed = ctx.parts, ctx.seed
            P = parts.proj
            qkv, gate_up = parts.group(QKV), parts.group(GATE_UP)
            h, r1, h2, r2, cos, sin, *ts = ctx.saved_tensors
            tq, tk, tv, to, tg, tu, td = (t if t.numel() else None for t in ts)
            q, k, v, o = ctx.attention
            b, s, _ = h.shape
            dout = dout.to(h.dtype)
            grads: dict = {}
            with _autocast_off(h.device):
                # MLP, recomputed from the saved residual: norm, gate and up (with the kept lora_A outputs), SiLU*up
                y, _ = _norm(h2, parts.norm_post, r2)
                (g, u), _, w_gate_up = _project_all(gate_up, parts.gate_up, y, seed, t_saved=(tg, tu))
                sg = F.silu(g)
                dm = _backward_all([P["down_proj"]], None, [dout], sg * u, [td], seed, grads)
                dg = torch.ops.aten.silu_backward(dm * u, g)
                du = dm * sg
                del g, u, sg, dm
                dy = _backward_all(gate_up, parts.gate_up, [dg, du], y, [tg, tu], seed, grads, w_gate_up)
                del dg, du, w_gate_up
                dh2 = dout + _norm_backward(dy, h2, r2, parts.norm_post)
                del dy
                # attention
                attn = o.detach().transpose(1, 2).reshape(b, s, -1)
                da = _backward_all([P["o_proj"]], None, [dh2], attn, [to], seed, grads)
                do = da.view(b, s, parts.heads, parts.head_dim).transpose(1, 2)
                dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
                ctx.attention = None
                dq = _rope_backward(dq, cos, sin).transpose(1, 2).reshape(b, s, -1)
                dk = _rope_backward(dk, cos, sin).transpose(1, 2).reshape(b, s, -1)
                dv = dv.transpose(1, 2).reshape(b, s, -1)
                x, _ = _norm(h, parts.norm_in, r1)
                dx = _backward_all(qkv, parts.qkv, [dq, dk, dv], x, [tq, tk, tv], seed, grads)
                dh = dh2 + _norm_backward(dx, h, r1, parts.norm_in) if ctx.needs_input_grad[0] else None
            return (dh, None, None, None, None, *[grads.get(id(t)) for t in parts.trainable])

    return LayerFunction


_BUILT: list = []


def _apply_layer(*args):
    """LayerFunction.apply; the class is built on first use, so importing this module does not import torch."""
    if not _BUILT:
        _BUILT.append(_layer_function())
    return _BUILT[0].apply(*args)
