"""A Llama decoder layer for LoRA training as one autograd node, with its backward written out by hand.

Why: on a fast card this job waits on the CPU, which issues ~4,700 kernels a step through peft's, bitsandbytes' and
transformers' Python layers and records an autograd node for each (bench/README.md). The same arithmetic written once,
under one node, costs a fraction of that CPU time. It also keeps much less for backward: the layer's input, q/k/v and
the attention output (the attention kernel needs them), the post-attention residual, two fp32 scales a token and the
LoRA rank-r activations. Norms, dropout masks and, by default, the MLP are recomputed in backward, which is cheap on a
GPU that is otherwise waiting. The saved memory is what lets a 7B run skip gradient checkpointing within a T4's 15 GiB.
On a compute-poor card (a T4) recomputing is not free: speed.plan then has some layers keep their gate/up outputs
(`keep_mlp`, in 16 bits, or in 8 with a scale per token; more layers on batches shorter than the longest,
`keep_upto_tokens`) and picks the other `Options` below from the card.

The forward is transformers' LlamaDecoderLayer with peft's LoRA, op for op: RMSNorm in fp32, q/k/v/o, RoPE, causal
sdpa with no mask, SiLU*up, and `base(x) + lora_B(lora_A(dropout(x))) * scaling` on every adapted projection.
Used only where that is exact: training mode with grad on, no KV cache, no attention mask (right-padded batches,
`speed.CAUSAL_ATTENTION`), a layer that does not checkpoint, plain LoRA (no DoRA, no LoRA bias) on any of the seven
projections over 4-bit or 16-bit frozen weights. Anything else runs the layer's own forward.

Kernels: torch and bitsandbytes operators, which run on any CUDA card torch supports, sm_75 (a T4) included;
attention is sdpa restricted to the kernel the card has (memory-efficient on Turing, math as the fallback,
`Options.attention`), and `gemm_4bit` is bitsandbytes' own op, which ships an sm_75 path and falls back to dequantize
+ matmul where its kernel does not pay. On a compute-poor card three options add Triton kernels, each with a fallback
that logs once: `Options.compiled`, torch.compile's kernels for the elementwise steps (`_Steps`, written for the card
at hand, sm_75 included; else op by op), and the project's two training kernels, `Options.triton_dequant`
(qlora/dequant.py: bitsandbytes' nf4 dequantize, bit for bit; else bitsandbytes' own) and `Options.triton_rope`
(qlora/ropegrad.py: RoPE's backward for q, k, v; else the compiled step). Both compile for sm_75 (CI).
"""
from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass, field

from .errors import brief

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")  # the groups that read one input


class NotFusable(Exception):
    """This layer has something the fused forward does not reproduce exactly."""


@dataclass(frozen=True)
class Options:
    """How fused layers compute; speed.Plan picks them from the card. The defaults are the first version's arithmetic.

    Each option gives the loss and LoRA gradients of transformers + peft (tests/test_fused.py); `bench/train_bench.py`
    measures each one as a `project:key=value` lever."""

    attention: str | None = None  # "efficient", "math": sdpa held to it, math the fallback; None, "flash": torch's
    fewer_passes: bool = False  # norms, RoPE and SiLU*up in fewer elementwise kernels and fewer fp32 temporaries
    gemm_4bit: bool = False  # forward 4-bit matmuls through bitsandbytes' gemm_4bit op instead of dequantize + matmul
    lora_fp16: bool = True  # LoRA matmuls in the compute dtype, cast from the fp32 master weights (False: in fp32)
    compiled: bool = False  # the elementwise steps (norms and their residual adds, RoPE, SiLU*up and their backward)
    # each compiled by torch.compile into a few fused kernels (transformers' formulas; `fewer_passes` then unused)
    triton_dequant: bool = False  # nf4 weights dequantized by dequant.py's Triton kernel (bitsandbytes' bits)
    triton_rope: bool = False  # q, k, v's gradients rotated back by ropegrad.py's Triton kernel (not with fewer_passes)
    # with `compiled`: LoRA's sums in the compiled steps (q/k/v's LoRA outputs added in the RoPE step; backward,
    # dropout's backward and the input gradients' sum in one kernel)
    lora_compiled: bool = False


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
    dequantize and one matmul instead of three or two (o and down are packed alone, so every 4-bit weight
    dequantizes here). The modules' own weights become views of this storage."""

    data: object  # packed nf4 bytes, (n, 1) uint8
    absmax: object  # one fp32 scale per block
    shape: tuple
    dtype: object
    blocksize: int
    quant_type: str
    code: object = None  # fp32 [16]: the 4-bit type's values (quant_state.code)
    triton: bool = False  # nf4 dequantized by dequant.py's kernel (Options.triton_dequant)

    def weight(self, dtype):
        import torch

        w = None
        if self.triton and self.quant_type == "nf4" and self.data.is_cuda:
            from . import dequant

            w = dequant.dequantize(self.data, self.absmax, self.code, self.shape, self.dtype, self.blocksize)
        if w is None:
            w = torch.ops.bitsandbytes.dequantize_4bit.default(self.data, self.absmax, self.blocksize,
                                                                 self.quant_type, self.shape, self.dtype)
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
    o: Packed | None = None  # o_proj's and down_proj's weights, each packed alone
    down: Packed | None = None
    options: Options = field(default_factory=Options)
    keep_bits: int = 16  # gate/up outputs kept for backward in 16 bits (exact) or 8 (int8, a scale a token) ...
    keep_tokens: float = 0  # ... on batches of at most this many tokens (inf: all); longer ones recompute them

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
                  first.quant_type, first.code)


def install(model, options: Options = Options(), keep_mlp: int = 0, keep_bits: int = 16,
            keep_upto_tokens=()) -> int:
    """Give every Llama decoder layer of `model` the fused training forward; returns how many layers took it.

    The last `keep_mlp` layers keep their gate/up outputs for backward in `keep_bits` bits (16 or 8) instead of
    recomputing them; the layers below those, going down, keep them on batches of at most `keep_upto_tokens[j]`
    tokens (speed.keep_on_shorter_batches). Layers that checkpoint are the first ones (speed.Plan), so they never
    keep."""
    if keep_bits not in (16, 8):
        raise ValueError(f"keep_bits must be 16 or 8, not {keep_bits}")
    layers = [(m, layer_parts(m)) for m in model.modules()  # every layer checked before any is changed
              if type(m).__name__ == "LlamaDecoderLayer" and not hasattr(m, "_qlora_parts")]
    for index, (module, parts) in enumerate(layers):
        parts.qkv, parts.gate_up = pack(parts.group(QKV)), pack(parts.group(GATE_UP))
        parts.o, parts.down = pack([parts.proj["o_proj"]]), pack([parts.proj["down_proj"]])
        for packed in (parts.qkv, parts.gate_up, parts.o, parts.down):
            if packed is not None:
                packed.triton = options.triton_dequant
        parts.options = options
        parts.keep_bits = keep_bits
        below = len(layers) - keep_mlp - 1 - index  # 0 for the layer just below the ones that always keep
        parts.keep_tokens = (math.inf if below < 0 else keep_upto_tokens[below] if below < len(keep_upto_tokens)
                             else 0)
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


def _gemm_4bit(x, data, state_or_packed):
    """x @ W.T for a 4-bit W through bitsandbytes' gemm_4bit op: its fused kernel where it pays for this many rows
    on this card (a few hundred at most), dequantize + matmul otherwise. The op knows the forward orientation only,
    so backward still dequantizes."""
    import torch

    s = state_or_packed
    out = torch.ops.bitsandbytes.gemm_4bit.default(x, data, list(s.shape), s.absmax, s.blocksize, s.quant_type)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _dropped(x, p: float, seed: int, index: int):
    """dropout(x) for one projection and its kept-units mask (bool), the same each time for the same seed: torch's
    native_dropout, what peft's nn.Dropout runs on a GPU, drawing, masking and rescaling in one kernel (on a T4-sized
    share, bernoulli_, the rescale and the multiply were three passes). It draws from the default generator only, so
    that generator is seeded for the call and put back as it was after it: the Trainer's random stream is untouched.
    While training, the training thread is the only user of its card's generator (chat on that card waits for the
    GPU lock; chat on another card draws from that card's)."""
    import torch

    gen = torch.cuda.default_generators[x.get_device()] if x.is_cuda else torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed * len(PROJECTIONS) + index)
    try:
        return torch.ops.aten.native_dropout(x, p, True)
    finally:
        gen.set_state(state)


def _lora(P: Projection, x, seed: int, fp16: bool = True):
    """lora_B(lora_A(dropout(x))) * scaling, and lora_A's output (kept for backward). The scaling multiplies the
    rank-r activations rather than the full-width output: the same product, on a tensor out/r times smaller. The
    matmuls run in x's dtype (fp16: the master weights are cast per use) or, with fp16=False, in the weights'."""
    import torch.nn.functional as F

    dtype = x.dtype if fp16 else P.A.dtype
    xd = _dropped(x, P.dropout, seed, P.index)[0] if P.dropout else x
    t = F.linear(xd.to(dtype), P.A.to(dtype))
    return F.linear(t * P.scaling, P.B.to(dtype)).to(x.dtype), t


def _lora_backward(P: Projection, dy, x, t, seed: int, grads: dict, need_dx: bool = True):
    """d(input) through the LoRA branch, as (the gradient of dropout's output, its kept-units mask or None, its scale)
    for _Steps.lora_dx to finish (None without need_dx); the LoRA weights' grads go into `grads`. Computes in t's
    dtype."""
    dtype = t.dtype
    dy2, t2 = dy.flatten(0, -2).to(dtype), t.flatten(0, -2)
    xd, keep = _dropped(x, P.dropout, seed, P.index) if P.dropout else (x, None)
    xd = xd.flatten(0, -2).to(dtype)
    grads[id(P.B)] = (dy2.t() @ (t2 * P.scaling)).to(P.B.dtype)
    dt = (dy2 @ P.B.to(dtype)) * P.scaling
    grads[id(P.A)] = (dt.t() @ xd).to(P.A.dtype)
    if not need_dx:
        return None
    dxd = (dt @ P.A.to(dtype)).to(dy.dtype).view(*dy.shape[:-1], -1)
    return dxd, keep, 1 / (1 - P.dropout)


def _project_all(projs: list[Projection], packed: Packed | None, x, seed: int, opts: Options, t_saved=None,
                 apart: bool = False):
    """The outputs of projections reading the same x, and their lora_A outputs. With `t_saved` (backward's
    recompute), LoRA reuses the kept lora_A outputs instead of redrawing dropout. Also returns the frozen weight
    when it was dequantized as one packed matrix, so backward can reuse it. With `apart`, the LoRA outputs come back
    as a fourth list (None where a projection has no LoRA) for a compiled step to add, instead of added here."""
    import torch.nn.functional as F

    w = None
    if packed is not None:
        if opts.gemm_4bit:
            y = _gemm_4bit(x, packed.data, packed)
        else:
            w = packed.weight(x.dtype)
            y = F.linear(x, w)
        ys = list(y.split([p.out_features for p in projs], dim=-1))
    else:
        ys = [_gemm_4bit(x, p.base.weight.data, p.base.weight.quant_state)
              if opts.gemm_4bit and not getattr(getattr(p.base.weight, "quant_state", None), "nested", True)
              else F.linear(x, _weight(p.base, x.dtype)) for p in projs]
    ts, deltas = [], []
    for i, p in enumerate(projs):
        delta = t = None
        if p.A is not None and t_saved is not None:
            t = t_saved[i]
            delta = F.linear(t * p.scaling, p.B.to(t.dtype)).to(x.dtype)
        elif p.A is not None:
            delta, t = _lora(p, x, seed, opts.lora_fp16)
        ts.append(t)
        deltas.append(delta)
        if delta is not None and not apart:
            ys[i] = ys[i] + delta
    return (ys, ts, w, deltas) if apart else (ys, ts, w)


def _backward_all(projs: list[Projection], packed: Packed | None, dys: list, x, ts: list, seed: int, grads: dict,
                  steps: _Steps, w=None, need_dx: bool = True, dy_cat=None, split: bool = False):
    """d(x) for projections reading the same x: one matmul against the packed weight, or one per projection.

    `x` may be a function that makes it: it is only read where a projection has LoRA (its lora_A's gradient), so
    backward never rebuilds an input nothing reads. need_dx=False (the first layer's input, which needs no gradient)
    skips the frozen weights' matmul. `dy_cat`: the dys already side by side, as packed weights read them; `split`:
    without them, one matmul per projection against its rows of the packed weight, summed in place (no cat). LoRA's
    d(input) joins dx through `steps.lora_dx`."""
    import torch

    if any(p.A is not None for p in projs):
        x = x() if callable(x) else x
    dx = None
    if need_dx:
        if packed is not None:
            w = w if w is not None else packed.weight(dys[0].dtype)
            if split and dy_cat is None and len(dys) > 1:
                rows = w.split([p.out_features for p in projs])
                dx = torch.matmul(dys[0], rows[0])
                for dy, part in zip(dys[1:], rows[1:]):
                    dx.view(-1, dx.shape[-1]).addmm_(dy.reshape(-1, dy.shape[-1]), part)
            else:
                if dy_cat is None:
                    dy_cat = dys[0] if len(dys) == 1 else torch.cat(dys, dim=-1)
                dx = torch.matmul(dy_cat, w)
        else:
            dx = sum(torch.matmul(dy, _weight(p.base, dy.dtype)) for p, dy in zip(projs, dys))
    lora = [_lora_backward(p, dy, x, t, seed, grads, need_dx) for p, dy, t in zip(projs, dys, ts) if p.A is not None]
    return steps.lora_dx(dx, [d for d in lora if d is not None])


def _norm(h, norm, r=None, fewer: bool = False):
    """transformers' LlamaRMSNorm: fp32 statistics, weight times the result cast back; also returns the fp32 scale.

    fewer: the same arithmetic with the scaled input written straight in 16 bits (no fp32 copy of it to read back)
    and the weight applied in place; the statistics are squared in place in their own fp32 copy. (Reading the sum of
    squares with one vector_norm would save more traffic, but its sqrt-then-square moves the fp32 result by an ulp,
    which this exact path's tests notice.)"""
    import torch

    if fewer:
        if r is None:
            r = h.to(torch.float32, copy=True).pow_(2).mean(-1, keepdim=True).add_(norm.variance_epsilon).rsqrt_()
        return torch.mul(h, r, out=torch.empty_like(h)).mul_(norm.weight), r
    return _norm_plain(h, norm.weight, norm.variance_epsilon, r)


def _norm_plain(h, weight, eps: float, r=None):
    """_norm's formula on tensors (what torch.compile reads)."""
    import torch

    h32 = h.float()
    if r is None:
        r = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * (h32 * r).to(h.dtype)).to(h.dtype), r


def _norm_backward(dy, h, r, norm, residual, fewer: bool = False):
    """residual + d(input) of the norm. fewer: six kernels instead of eleven, and three fp32 temporaries, not six."""
    import torch

    if fewer:
        dn = dy * norm.weight  # the 16-bit product that the fp32 formula below reads
        n = torch.mul(h, r)  # fp32
        c = (n * dn).mean(-1, keepdim=True)
        g = torch.addcmul(dn, n, c, value=-1)  # fp32: dn - n * c
        return torch.addcmul(residual, g, r, out=torch.empty_like(residual))
    return _norm_backward_plain(dy, h, r, norm.weight, residual)


def _norm_backward_plain(dy, h, r, weight, residual):
    n = h.float() * r
    dn = (dy * weight).float()
    return residual + (r * (dn - n * (dn * n).mean(-1, keepdim=True))).to(h.dtype)


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _signed_sin(sin):
    """sin with its first half negated: rotate_half(x) * sin == x.roll(half) * _signed_sin(sin), with no cat of x."""
    import torch

    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rope(x, cos, sin, fewer: bool = False):
    """RoPE; with fewer, `sin` is _signed_sin's and the rotation is one roll and one fused multiply-add."""
    import torch

    if fewer:
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
    return x * cos + _rotate_half(x) * sin


def _rope_backward(g, cos, sin, fewer: bool = False, out=None):
    """RoPE's transpose; with fewer, `sin` is _signed_sin's, and the result may go straight into `out`."""
    import torch

    half = g.shape[-1] // 2
    if fewer:
        return torch.addcmul(g * cos, g.roll(half, -1), sin.roll(half, -1), out=out)
    gs = g * sin
    return g * cos + torch.cat((gs[..., half:], -gs[..., :half]), dim=-1)  # rotate_half's transpose


def sdpa_kernel_context(kernel: str | None):
    """The sdpa kernel the plan picked (speed.attention_kernel): "efficient" or "math" restricts sdpa to it (math also
    backs up efficient, e.g. on the CPU); None or "flash" leaves torch's own order (cuDNN is off: speed.before_peft)."""
    import contextlib

    if kernel in (None, "flash"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], "math": [SDPBackend.MATH]}[kernel]
    return sdpa_kernel(backends)


def _attention(parts: LayerParts, q, k, v):
    """Causal sdpa on a small graph of its own: backward asks it for d(q, k, v)."""
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
        with sdpa_kernel_context(parts.options.attention):
            o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=parts.scale)
    return q, k, v, o


def _kept(t, bits: int) -> tuple:
    """A gate/up output kept for backward: itself (16 bits), or int8 with one fp32 scale per token (8 bits: half the
    memory; the values come back rounded to 1/254 of their token's largest, so this one is not exact)."""
    import torch

    if bits == 16:
        return (t,)
    scale = torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = scale.clamp_(min=1e-30).div_(127)
    return torch.div(t, scale).round_().to(torch.int8), scale


def _unkept(kept: tuple, dtype):
    import torch

    if len(kept) == 1:
        return kept[0]
    q, scale = kept
    return torch.mul(q, scale, out=torch.empty(q.shape, dtype=dtype, device=q.device))


def _autocast_off(device):
    import torch

    return torch.autocast(device_type=device.type, enabled=False)


def _layer_function():
    import torch

    class LayerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, cos, sin, parts: LayerParts, seed: int, *trainable):
            P, opts, S = parts.proj, parts.options, _Steps(parts.options)
            qkv, gate_up = parts.group(QKV), parts.group(GATE_UP)
            b, s, _ = h.shape
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            if S.fewer:
                sin = _signed_sin(sin)
            with _autocast_off(h.device):
                x, r1 = S.norm(h, parts.norm_in)
                (q, k, v), (tq, tk, tv), _, deltas = _project_all(qkv, parts.qkv, x, seed, opts, apart=True)
                heads = (parts.heads, parts.kv_heads, parts.kv_heads)
                q, k, v = S.rope_qkv(*[t if t is None else t.view(b, s, n, parts.head_dim).transpose(1, 2)
                                       for t, n in zip((q, k, v, *deltas), heads + heads)], cos, sin)
                q, k, v, o = _attention(parts, q, k, v)
                attn = o.detach().transpose(1, 2).reshape(b, s, -1)
                (a,), (to,), _ = _project_all([P["o_proj"]], parts.o, attn, seed, opts)
                h2, y, r2 = S.add_norm(h, a, parts.norm_post)
                (g, u), (tg, tu), _ = _project_all(gate_up, parts.gate_up, y, seed, opts)
                m = S.silu_mul(g, u)
                (d,), (td,), _ = _project_all([P["down_proj"]], parts.down, m, seed, opts)
                out = h2 + d
                keep = b * s <= parts.keep_tokens  # this batch leaves room for this layer's gate/up
                kept = _kept(g, parts.keep_bits) + _kept(u, parts.keep_bits) if keep else ()
            ctx.parts, ctx.seed = parts, seed
            ctx.attention = (q, k, v, o)  # o carries its own little graph back to q, k, v
            ctx.save_for_backward(h, r1, h2, r2, cos, sin, *[t if t is not None else h.new_empty(0)
                                                             for t in (tq, tk, tv, to, tg, tu, td)], *kept)
            return out

        @staticmethod
        def backward(ctx, dout):
            parts, seed = ctx.parts, ctx.seed
            P, opts, S = parts.proj, parts.options, _Steps(parts.options)
            qkv, gate_up = parts.group(QKV), parts.group(GATE_UP)
            h, r1, h2, r2, cos, sin, *rest = ctx.saved_tensors
            tq, tk, tv, to, tg, tu, td = (t if t.numel() else None for t in rest[:7])
            kept = rest[7:]
            q, k, v, o = ctx.attention
            b, s, _ = h.shape
            dout = dout.to(h.dtype)
            grads: dict = {}

            def post_norm():  # the MLP's input, rebuilt from the saved residual
                return S.norm(h2, parts.norm_post, r2)[0]

            with _autocast_off(h.device):
                if kept:  # gate and up as forward made them (16 bits) or as kept (8 bits)
                    half = len(kept) // 2
                    g, u = _unkept(kept[:half], h.dtype), _unkept(kept[half:], h.dtype)
                    y, w_gate_up = post_norm, None
                else:  # recomputed: norm, gate and up (with the kept lora_A outputs)
                    y = post_norm()
                    (g, u), _, w_gate_up = _project_all(gate_up, parts.gate_up, y, seed, opts, t_saved=(tg, tu))
                dm = _backward_all([P["down_proj"]], parts.down, [dout], lambda: S.silu_mul(g, u), [td], seed, grads,
                                   S)
                dys = S.mlp_grads(dm, g, u)
                del g, u, dm
                # compiled, the two gradients come from one kernel, and a cat of them would cost a pass of its own
                dy = _backward_all(gate_up, parts.gate_up, dys, y, [tg, tu], seed, grads, S, w_gate_up,
                                   split=S.compiled)
                del dys, w_gate_up
                dh2 = S.norm_backward(dy, h2, r2, parts.norm_post, dout)
                del dy
                # attention
                da = _backward_all([P["o_proj"]], parts.o, [dh2], lambda: o.detach().transpose(1, 2).reshape(b, s, -1),
                                   [to], seed, grads, S)
                do = da.view(b, s, parts.heads, parts.head_dim).transpose(1, 2)
                dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
                ctx.attention = None
                dys, dy_cat = S.qkv_grads(parts, dq, dk, dv, cos, sin)
                need_dx = ctx.needs_input_grad[0]
                dx = _backward_all(qkv, parts.qkv, dys, lambda: S.norm(h, parts.norm_in, r1)[0],
                                   [tq, tk, tv], seed, grads, S, need_dx=need_dx, dy_cat=dy_cat)
                dh = S.norm_backward(dx, h, r1, parts.norm_in, dh2) if need_dx else None
            return (dh, None, None, None, None, *[grads.get(id(t)) for t in parts.trainable])

    return LayerFunction


def _qkv_grads(parts: LayerParts, dq, dk, dv, cos, sin, fewer: bool):
    """The gradients of q, k and v before RoPE, as (b, s, width) tensors; with fewer, written straight into one
    (b, s, q+k+v) tensor (returned too), which the packed weight reads without a cat."""
    import torch

    b, _, s, d = dq.shape
    if not fewer:
        return _qkv_plain(dq, dk, dv, cos, sin), None
    widths = [parts.heads * d, parts.kv_heads * d, parts.kv_heads * d]
    cat = torch.empty(b, s, sum(widths), dtype=dq.dtype, device=dq.device)
    dys = list(cat.split(widths, dim=-1))
    for grad, into, rotate in zip((dq, dk, dv), dys, (True, True, False)):
        view = into.view(b, s, grad.shape[1], d).transpose(1, 2)  # (b, heads, s, d) over the slice of `cat`
        if rotate:
            _rope_backward(grad, cos, sin, True, out=view)
        else:
            view.copy_(grad)
    return dys, cat


def _qkv_plain(dq, dk, dv, cos, sin) -> list:
    b, _, s, _ = dq.shape
    return [_rope_backward(dq, cos, sin).transpose(1, 2).reshape(b, s, -1),
            _rope_backward(dk, cos, sin).transpose(1, 2).reshape(b, s, -1), dv.transpose(1, 2).reshape(b, s, -1)]


# --- the elementwise steps, as the options ask -----------------------------------------------------------
# Pure functions of tensors (torch.compile reads them): transformers' formulas, each step's passes in one function.
def _add_norm_plain(h, a, weight, eps: float):
    h2 = h + a
    return (h2, *_norm_plain(h2, weight, eps))


def _rope_pair(q, k, cos, sin):
    return _rope(q, cos, sin), _rope(k, cos, sin)


def _silu_mul(g, u):
    import torch.nn.functional as F

    return F.silu(g) * u


def _mlp_grads(dm, g, u):
    """d(gate) and d(up) from d(SiLU(gate) * up). Compiled, one kernel writes both with one sigmoid an element; written
    side by side into one tensor (a cat), the kernel computed both formulas for every element it wrote, and took 3.2 ms
    a layer at a T4's compute (run45's profile) for ~0.5 GB of traffic."""
    import torch
    import torch.nn.functional as F

    return torch.ops.aten.silu_backward(dm * u, g), dm * F.silu(g)


def _rope_qkv(q, k, v, dq, dk, dv, cos, sin):
    q, k, v = (t if d is None else t + d for t, d in zip((q, k, v), (dq, dk, dv)))
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _lora_dx_sum(dx, *terms):
    """dx + the sum of native_dropout_backward(d, mask, scale) over terms given flat as d, mask (or None), scale."""
    for d, keep, scale in zip(terms[0::3], terms[1::3], terms[2::3]):
        dx = dx + (d if keep is None else d * keep * scale)
    return dx


def _qkv_cat(dq, dk, dv, cos, sin):
    import torch

    return torch.cat(_qkv_plain(dq, dk, dv, cos, sin), dim=-1)


class _Steps:
    """The layer's elementwise steps as its Options ask: transformers' formulas op by op (the first version), the
    same formulas compiled into fused kernels (`compiled`: on a compute-poor card these passes were a third of the
    layer's GPU time, bench/README.md), or the same arithmetic in fewer, partly in-place passes (`fewer_passes`)."""

    def __init__(self, opts: Options):
        self.compiled = opts.compiled
        self.fewer = opts.fewer_passes and not opts.compiled
        self.triton_rope = opts.triton_rope and not self.fewer  # its formula is the plain one's (fewer signs sin)
        self.compiled_lora = opts.compiled and opts.lora_compiled

    def _step(self, fn):
        return _compiled(fn) if self.compiled else fn

    def norm(self, h, norm, r=None):
        """The norm's output and its fp32 scale (given `r`, the scale is reused)."""
        if self.fewer:
            return _norm(h, norm, r, fewer=True)
        return self._step(_norm_plain)(h, norm.weight, norm.variance_epsilon, r)

    def add_norm(self, h, a, norm):
        """h + a, its norm, the norm's scale."""
        if self.fewer:
            h2 = h + a
            return (h2, *_norm(h2, norm, fewer=True))
        return self._step(_add_norm_plain)(h, a, norm.weight, norm.variance_epsilon)

    def rope_qkv(self, q, k, v, dq, dk, dv, cos, sin):
        """q and k rotated and v, each with its LoRA output (or None) added first (with fewer, `sin` is
        _signed_sin's). With compiled LoRA, one kernel: each eager add read a strided column block of the packed
        output and ran at under half the copy rate of a T4's compute share (run55's profile)."""
        if self.compiled_lora:
            return _compiled(_rope_qkv)(q, k, v, dq, dk, dv, cos, sin)
        q, k, v = (t if d is None else t + d for t, d in zip((q, k, v), (dq, dk, dv)))
        if self.fewer:
            return _rope(q, cos, sin, fewer=True), _rope(k, cos, sin, fewer=True), v
        return (*self._step(_rope_pair)(q, k, cos, sin), v)

    def silu_mul(self, g, u):
        import torch.nn.functional as F

        if self.fewer:
            return F.silu(g).mul_(u)
        return self._step(_silu_mul)(g, u)

    def mlp_grads(self, dm, g, u):
        """[d(gate), d(up)]."""
        import torch
        import torch.nn.functional as F

        if self.fewer:
            sg = F.silu(g)
            return [torch.ops.aten.silu_backward(dm * u, g), sg.mul_(dm)]
        return list(self._step(_mlp_grads)(dm, g, u))

    def norm_backward(self, dy, h, r, norm, residual):
        """residual + d(input) of the norm."""
        if self.fewer:
            return _norm_backward(dy, h, r, norm, residual, fewer=True)
        return self._step(_norm_backward_plain)(dy, h, r, norm.weight, residual)

    def lora_dx(self, dx, lora: list):
        """dx plus each LoRA branch's d(input), given as _lora_backward's (d, mask, scale): dropout's backward and the
        sums, one kernel compiled (op by op, two passes a branch: 0.34 + 0.18 ms a layer each at a T4's compute,
        run55's profile)."""
        import torch

        if self.compiled_lora and lora:
            return _compiled(_lora_dx_sum)(dx, *[a for term in lora for a in term])
        for d, keep, scale in lora:
            d = d if keep is None else torch.ops.aten.native_dropout_backward(d, keep, scale)
            dx = d if dx is None else dx + d
        return dx

    def qkv_grads(self, parts: LayerParts, dq, dk, dv, cos, sin):
        """As _qkv_grads: the (b, s, width) gradients of q, k, v before RoPE, and the three side by side (or None)."""
        cat = None
        if self.triton_rope:
            from . import ropegrad

            cat = ropegrad.qkv_grads(dq, dk, dv, cos, sin)
        if cat is None:
            if not self.compiled:
                return _qkv_grads(parts, dq, dk, dv, cos, sin, self.fewer)
            cat = _compiled(_qkv_cat)(dq, dk, dv, cos, sin)
        d = dq.shape[-1]
        return list(cat.split([parts.heads * d, parts.kv_heads * d, parts.kv_heads * d], dim=-1)), cat


_COMPILED: dict = {}  # fn -> its compiled form, or fn itself once compiling failed


def _compiled(fn):
    """fn compiled by torch.compile, once a process: one compile serves every batch, its batch and token dimensions
    dynamic from the first call, the widths (hidden, heads, head size, MLP) static. Fully dynamic (dynamic=True), the
    widths were runtime values too and the index arithmetic (64-bit divisions by them for every element) ran RoPE's
    backward at 15.8 ms a layer in the t4c profile, 70x its memory traffic; dynamic only from the second batch length
    on (torch's default), the recompile took ~11 s in the middle of a run. Where compiling fails (no Triton for this
    card, no C++ compiler on the CPU), fn itself from then on, with a log line."""
    if fn not in _COMPILED:
        import torch

        compiled = torch.compile(fn)

        def run(*args):
            if _COMPILED[fn] is fn:
                return fn(*args)
            for t in args:  # (b, s, width) and (b, heads, s, head_dim) tensors: b and s vary from batch to batch
                if isinstance(t, torch.Tensor) and t.dim() >= 3:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                    torch._dynamo.maybe_mark_dynamic(t, 1 if t.dim() == 3 else 2)
            try:
                return compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                logging.getLogger("qlora").warning(
                    "speed: the fused layer's %s step did not compile (%s); it runs op by op", fn.__name__, brief(e))
                _COMPILED[fn] = fn
                return fn(*args)

        _COMPILED[fn] = run
    return _COMPILED[fn]


_BUILT: list = []


def _apply_layer(*args):
    """LayerFunction.apply; the class is built on first use, so importing this module does not import torch."""
    if not _BUILT:
        _BUILT.append(_layer_function())
    return _BUILT[0].apply(*args)
