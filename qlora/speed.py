"""The fast training path: settings picked from the card and the model's shape, applied around SFTTrainer.

Also the one memory model: `plan` says what runs and what it is estimated to need; the preflight reports that figure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

GIB = 2**30
CAUSAL_ATTENTION = "qlora_causal"  # registered below: sdpa with is_causal and no mask (flash kernel)

# Activation bytes kept for backward, per token and decoder layer, in units of hidden (h) and intermediate (i) widths
# at 2 bytes an element. Counted from what each op saves, then fitted to the H100 run (bench/README.md: 0.58 GiB
# stock and 0.42 GiB with liger's kernels, which keep what lean keeps, per layer at 4 x 1024 tokens, i.e. about 148
# and 109 KB a token):
#   stock HF: the two RMSNorms keep fp32 and 16-bit copies of their input (~8h), sdpa keeps q, k, v, out (8h), every
#   LoRA target keeps its dropout mask and dropped input (3 x in_features), SiLU*up keeps gate, silu(gate), up (6i);
#   frozen 4-bit matmuls keep nothing (bitsandbytes saves only the packed weight).
STOCK = dict(norm_h=8, attn_h=8, mlp_i=6)
#   lean (below, plain torch): each RMSNorm keeps its 16-bit input and one fp32 scale a token (2h), SiLU*up keeps
#   gate and up and recomputes silu in backward (4i).
LEAN = dict(norm_h=4, attn_h=8, mlp_i=4)
#   fused (qlora/fused.py): the layer input and the post-attention residual (4h), q, k, v and the attention output
#   (8h), two fp32 scales and lora_A's rank-r outputs; norms, dropout masks and the MLP recompute in backward.
FUSED = dict(norm_h=4, attn_h=8, mlp_i=0)
WORKSPACE_GIB = 0.5  # the fused LM head's chunks, cuBLAS workspaces (the estimate ran 1-1.5 GiB high at 1.0)
HEADROOM = 0.90  # plan to at most this share of the budget: allocator fragmentation varies by batch


@dataclass
class Arch:
    """The parts of a model's shape that set its training memory."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    params: int  # all parameters of the base model
    model_type: str = ""

    @classmethod
    def of(cls, config) -> "Arch":
        c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        heads, kv = c.get("num_attention_heads", 1), c.get("num_key_value_heads") or c.get("num_attention_heads", 1)
        attn = h * h * 2 + 2 * h * (h // heads) * kv
        per_layer = attn + 3 * h * i
        embed = v * h * (1 if c.get("tie_word_embeddings") else 2)
        return cls(layers=n, hidden=h, intermediate=i, vocab=v, params=n * per_layer + embed,
                   model_type=c.get("model_type", ""))


@dataclass
class Plan:
    """How one run trains. `off()` is the reference recipe exactly as configured."""

    precision: str  # bf16 | fp16 | fp32
    as_configured: bool = False  # off(): speed=off, or the CPU
    checkpoint_layers: int = -1  # decoder layers that recompute in backward; -1: as the config says (all or none)
    lean: bool = False  # RMSNorm and SiLU*up that keep only their 16-bit inputs for backward (less memory)
    causal_attention: bool = False  # right-padded batches run sdpa with is_causal and no mask: the flash kernel
    fused: bool = False  # Llama decoder layers that do not checkpoint run as one hand-written autograd node (fused.py)
    padding_free: bool | None = None  # None: as the config says
    lora_fp32: bool | None = None  # None: fp32 unless bf16, where trl's bf16 cast is kept (fp16's scaler needs fp32)
    estimated_peak_gib: float | None = None  # with the model's shape known; GPU memory, or RAM on the CPU
    budget_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def off(cls, precision: str) -> "Plan":
        return cls(precision=precision, as_configured=True, notes=["speed=off: the recipe as configured"])

    def to_dict(self) -> dict:
        return asdict(self)

    def checkpointed(self, cfg, arch: Arch) -> int:
        """How many decoder layers recompute in backward (-1 in the plan means all or none, as configured)."""
        if self.checkpoint_layers >= 0:
            return self.checkpoint_layers
        return arch.layers if cfg.gradient_checkpointing else 0


# --- memory model ----------------------------------------------------------------------------------------
def _lora_widths(arch: Arch, cfg) -> dict[str, int]:
    h, i = arch.hidden, arch.intermediate
    widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h, "down_proj": i}
    return widths if cfg.target_modules == ["all-linear"] else {t: widths.get(t, h) for t in cfg.target_modules}


def activation_bytes_per_token(arch: Arch, cfg, lean: bool, fused: bool = False) -> float:
    """Bytes one token keeps for backward in one decoder layer that does not recompute, at 2 bytes an element."""
    h, i = arch.hidden, arch.intermediate
    k = FUSED if fused else LEAN if lean else STOCK
    total = (k["norm_h"] + k["attn_h"]) * h + k["mlp_i"] * i
    if fused:  # two fp32 scales and lora_A's rank-r outputs; dropout masks are redrawn in backward, not kept
        return total + 8 + 2 * cfg.lora_r * len(_lora_widths(arch, cfg))
    if cfg.lora_dropout > 0:  # a dropped copy of the input (2 bytes) and its mask (1 byte) per LoRA target
        total += 3 * sum(_lora_widths(arch, cfg).values())
    return total


def estimate_peak_gib(arch: Arch, cfg, checkpoint_layers: int, lean: bool, quantized: bool = True,
                      lora_fp32: bool = True, fused: bool = False, element_bytes: int = 2) -> float:
    """Peak memory of one run: weights, LoRA state, activations of the longest batch, workspace.

    element_bytes: 2 for 16-bit compute on a GPU, 4 for the CPU's fp32 (weights and activations twice as big)."""
    width = element_bytes
    weight_bytes = arch.params * (0.5 + 4 / 64) if quantized else arch.params * width  # nf4 + fp32 absmax per 64
    weight_bytes += arch.vocab * arch.hidden * 2 * width * (1 if quantized else 0)  # embeddings and head stay 16-bit
    lora_params = arch.layers * cfg.lora_r * 2 * arch.hidden * (7 if cfg.target_modules == ["all-linear"]
                                                               else len(cfg.target_modules))
    lora_bytes = lora_params * ((4 if lora_fp32 else 2) * 2 + 8)  # weights, grads, two Adam states in fp32
    tokens = cfg.batch_size * cfg.max_length  # group_by_length runs the longest batch first; rows are pre-truncated
    per_layer = activation_bytes_per_token(arch, cfg, lean) * tokens
    kept = arch.layers - checkpoint_layers
    acts = (kept * activation_bytes_per_token(arch, cfg, lean, fused) * tokens
            + checkpoint_layers * 2 * arch.hidden * tokens)
    if checkpoint_layers:
        acts += per_layer  # one layer's activations exist again while it recomputes
    if fused and kept:
        acts += 12 * arch.intermediate * tokens  # a fused layer's backward: the recomputed MLP and its grads
    return (weight_bytes + lora_bytes + acts * width / 2) / GIB + WORKSPACE_GIB


# --- the plan --------------------------------------------------------------------------------------------
def plan(cfg, arch: Arch | None, precision: str, budget_gib: float | None = None, cuda: bool | None = None) -> Plan:
    """The fast settings for this card: precision as picked (bf16 LoRA weights where the card has bf16), flash
    attention on right-padded batches, Llama decoder layers fused into one autograd node each (qlora/fused.py: fewer
    launches, less kept for backward), and gradient checkpointing on only as many layers as the memory budget needs.
    With the model's shape known, every plan (off and the CPU's too) carries its estimated peak memory."""
    if cuda is None:
        from .device import cuda_available

        cuda = cuda_available()
    quantized = cfg.quantize == "nf4"
    if getattr(cfg, "speed", "auto") == "off" or not cuda or arch is None:
        p = Plan.off(precision)  # the CPU path (the embedded model, tests) keeps the recipe as configured
        if arch is not None:  # stock layers; all or none recompute, as configured; fp32 on the CPU
            p.estimated_peak_gib = round(estimate_peak_gib(
                arch, cfg, p.checkpointed(cfg, arch), False, quantized, precision != "bf16",
                element_bytes=4 if precision == "fp32" else 2), 2)
        return p
    if budget_gib is None:
        from .device import memory_budget_gib

        budget_gib = memory_budget_gib()
    lora_fp32 = precision != "bf16"
    p = Plan(precision=precision, lean=True, causal_attention=not cfg.padding_free, lora_fp32=lora_fp32,
             padding_free=cfg.padding_free, budget_gib=budget_gib)
    # the fused layer reproduces Llama's decoder layer on right-padded batches exactly; other models keep theirs
    p.fused = p.causal_attention and arch.model_type == "llama"
    p.notes.append(f"{precision} compute, LoRA weights in {'fp32' if lora_fp32 else 'bf16'}")
    p.notes.append("lean RMSNorm and SiLU*up (keep 16-bit inputs)")
    if p.causal_attention:
        p.notes.append("right-padded batches: sdpa is_causal without a mask, flash kernel (not cuDNN)")
    if p.fused:
        p.notes.append("fused Llama decoder layers (one autograd node each, hand-written backward)")
    if not cfg.gradient_checkpointing:
        p.checkpoint_layers = 0
        p.notes.append("gradient checkpointing off (config)")
    else:
        # the fewest recomputing layers whose estimate fits the budget; all of them if none does
        limit = (budget_gib or 0) * HEADROOM
        p.checkpoint_layers = arch.layers
        for k in range(arch.layers + 1):
            if estimate_peak_gib(arch, cfg, k, p.lean, quantized, lora_fp32, p.fused) <= limit:
                p.checkpoint_layers = k
                break
        p.notes.append(f"gradient checkpointing on {p.checkpoint_layers} of {arch.layers} layers "
                       f"(budget {budget_gib:.1f} GiB)")
    p.estimated_peak_gib = round(estimate_peak_gib(arch, cfg, p.checkpoint_layers, p.lean, quantized, lora_fp32,
                                                   p.fused), 2)
    return p


# --- applying it -----------------------------------------------------------------------------------------
def register_causal_attention() -> None:
    """sdpa with is_causal=True and no mask. Exact for right-padded batches: a real token only ever looks left, at
    real tokens, and padded positions carry label -100. Never for left padding, packed rows or a KV cache."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def causal_sdpa(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    def no_mask(*args, **kwargs):
        return None

    AttentionInterface.register(CAUSAL_ATTENTION, causal_sdpa)
    AttentionMaskInterface.register(CAUSAL_ATTENTION, no_mask)


def before_peft(model, p: Plan) -> None:
    """Patches on the bare base model: lean kernels, the attention kernel."""
    if p.lean:
        use_lean_activations(model)
    if p.causal_attention:
        import torch

        # cuDNN's attention builds a graph for each new sequence length: ~2 ms of CPU per backward call measured on
        # the H100, where this job waits on the CPU. Flash has no such set-up.
        torch.backends.cuda.enable_cudnn_sdp(False)
        register_causal_attention()
        model.config._attn_implementation = CAUSAL_ATTENTION
        for sub in model.modules():  # sub-configs of the text model read the same attribute
            if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
                sub.config._attn_implementation = CAUSAL_ATTENTION


def after_trainer(trainer, p: Plan) -> None:
    """Dtype of the trainable weights, and which layers recompute once the Trainer has turned checkpointing on."""
    _set_lora_dtype(trainer.model, p)
    if p.checkpoint_layers > 0:
        trainer.add_callback(_checkpoint_some_layers(p.checkpoint_layers))
    if p.fused:
        from . import fused

        try:
            layers = fused.install(trainer.model)  # layers that checkpoint keep their own forward (fused.py)
            p.notes.append(f"{layers} decoder layers fused")
        except fused.NotFusable as e:
            p.fused = False
            p.notes.append(f"not fused: {e}")


def _set_lora_dtype(model, p: Plan) -> None:
    """The one place that undoes trl's cast: trl 1.16 casts a 4-bit model's LoRA weights to bf16 in SFTTrainer's
    constructor whatever fp16 says. fp16's grad scaler cannot unscale bf16 grads and a T4 has no fast bf16, so they
    train in fp32 unless the run is in bf16 (as the QLoRA recipe does); a plan may also ask for bf16 or fp32."""
    import torch

    if p.lora_fp32 is None:
        if p.precision == "bf16":
            return  # as built: trl's bf16 on a 4-bit model
        dtype = torch.float32
    else:
        dtype = torch.float32 if p.lora_fp32 else torch.bfloat16
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpoint_some_layers(k: int):
    from transformers import TrainerCallback

    class CheckpointSomeLayers(TrainerCallback):
        """Trainer turns checkpointing on for every layer before on_train_begin; keep it on the first k only."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for index, layer in enumerate(decoder_layers(model)):
                layer.gradient_checkpointing = index < k

    return CheckpointSomeLayers()


# --- lean activations ------------------------------------------------------------------------------------
def use_lean_activations(model) -> int:
    """Give every Llama-style RMSNorm and SiLU MLP of `model` a forward that keeps only 16-bit inputs for backward.

    Same forward arithmetic as transformers' modules; returns how many modules were switched. (Compiling these with
    torch.compile, RoPE too, measured no gain on the H100, 4,185 vs 4,173 tokens/s: bench/README.md.)"""
    import types

    count = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            module.forward = types.MethodType(_lean_rmsnorm_forward, module)
            count += 1
        elif (kind.endswith("MLP") and hasattr(module, "gate_proj") and hasattr(module, "up_proj")
              and type(getattr(module, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU")):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            count += 1
    return count


def _lean_rmsnorm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_mlp_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _functions():
    import torch

    class RMSNorm(torch.autograd.Function):
        """weight * (x * rsqrt(mean(x^2) + eps)) in fp32, cast back: keeps x (16-bit) and rstd (fp32, one a token)
        where autograd would keep an fp32 copy of x and the 16-bit normalized x."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            xf = x.to(torch.float32)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, rstd)
            return weight * (xf * rstd).to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            x, weight, rstd = ctx.saved_tensors
            xhat = x.to(torch.float32) * rstd
            gxhat = (grad * weight).to(torch.float32)
            gx = rstd * (gxhat - xhat * (gxhat * xhat).mean(-1, keepdim=True))
            gw = None
            if ctx.needs_input_grad[1]:
                gw = (grad * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
            return gx.to(x.dtype), gw, None

    class SiluMul(torch.autograd.Function):
        """silu(gate) * up: keeps gate and up, recomputes silu in backward (autograd also keeps silu(gate))."""

        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
            grad_up = grad * torch.nn.functional.silu(gate)
            return grad_gate, grad_up

    return RMSNorm, SiluMul


class _Lazy:
    """The autograd functions are built on first use: importing this module must not import torch."""

    def __init__(self, index: int):
        self.index = index

    def apply(self, *args):
        return _functions_cached()[self.index].apply(*args)


_CACHE: list = []


def _functions_cached():
    if not _CACHE:
        _CACHE.extend(_functions())
    return _CACHE


_RMSNorm, _SiluMul = _Lazy(0), _Lazy(1)
