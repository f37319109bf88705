"""The fast training path: settings picked from the card and the model's shape, applied around SFTTrainer.

Also the one memory model: `plan` says what runs and what it is estimated to need; the preflight reports that figure.
The card's facts it weighs (memory budget, compute capability, fp16 matmul rate) come from qlora/device.py.
"""
from __future__ import annotations

from contextlib import contextmanager
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
#   a fused layer that keeps its MLP (Plan.keep_mlp) also keeps gate and up: 4i in 16 bits, or 2i and two fp32
#   scales a token in 8 bits
KEPT_MLP_I = {16: 4, 8: 2}
WORKSPACE_GIB = 0.5  # the fused LM head's chunks, cuBLAS workspaces (the estimate ran 1-1.5 GiB high at 1.0)
HEADROOM = 0.90  # plan to at most this share of the budget: allocator fragmentation varies by batch

# --- what a compute-poor card keeps (the thresholds to flip after a measurement: bench/README.md, T4-class compute) ---
# Below this fp16 matmul rate (TFLOP/s sustained, device.matmul_tflops) the GPU, not the CPU, sets the pace of this job,
# so recomputing in backward costs time and the plan spends spare memory on keeping instead. The fused 7B step issues
# its kernels in ~0.2 s of CPU (H100, bench/README.md) and does ~33 GFLOP a token: at ~1,700 tokens a step that is
# ~0.09 s of matmuls at an H100's ~600 TFLOP/s (waits on the CPU: recompute is free) but ~1.4 s at a T4's ~40.
COMPUTE_POOR_TFLOPS = 200.0
# What a kept layer saves, per token: the gate/up recompute, 2 x 2 x hidden x intermediate FLOPs (180 MFLOP for the 7B
# shape, ~4.5 us on a T4) for 4 x intermediate bytes (44 KB). The other candidates pay far less per byte, so they are
# not kept: a layer's dequantized 16-bit weights (404 MB for the 7B shape) would save one dequantize (~1.6 ms a step
# on a T4's 320 GB/s), 25x less per byte than the MLP at 4 x 1024 tokens; a norm's output (8 KB a token) would save
# one norm recompute (~0.1 us a token), 5x less per byte. 8-bit keeping fits twice the layers but rounds gate and up
# to 1/254 of each token's largest value (not exact), so 16 stays the default until the t4c bench shows it pays.
KEEP_BITS = 16
# Keeping is optional speed, not what the run needs to fit, so it never fills more of the budget than checkpointing
# decisions do (HEADROOM), and a real T4 leaves ~14.4 of its 14.7 GiB to torch. With the allocator's expandable
# segments (below) the 7B runs reserved 0.3-0.6 GiB below this estimate (run47: 12 layers kept, estimate 13.57 GiB,
# reserved 13.28, allocated 12.73; 16 layers: 14.24, 14.0, 13.4); at 0.90 the reference recipe keeps 11 layers on the
# bench's 15 GiB budget. (Without them the allocator reserved ~1.3 GiB above the estimate, and 0.85 kept 7.)
KEEP_HEADROOM = 0.90
# The allocator's expandable segments while a compute-poor card trains (Plan.expandable_segments, `allocator`): one
# growing segment instead of many fixed ones, so memory freed between a layer's forward and backward is reused
# whatever its size. run47: reserved 12.28 GiB against 13.61 (the same run, 7 layers kept); the memory it frees goes
# to keeping gate/up (1,167 tok/s with 12 layers kept against 1,143 with 7).
EXPANDABLE_SEGMENTS = True
# Fewer elementwise kernels in the fused layers (fused.Options.fewer_passes): the same formulas with fewer 16-bit
# roundings, about a third of the layer's elementwise memory traffic and fewer launches on every card.
FEWER_PASSES = True
# On a compute-poor card the fused layers' elementwise passes (norms and residual adds, RoPE, SiLU*up and their
# backward) took about a third of the GPU's time in the t4c profile (bench/README.md): torch.compile writes each step
# as a few fused kernels (fused.Options.compiled; once a process, batch and token dimensions dynamic). On a fast card
# the step waits on the CPU, where the compiled functions' guards only add host time, so they stay op by op there.
COMPILE_STEPS = True
# On the same card bitsandbytes' dequantize kernel moved ~150 GB/s (8% of the step, run45's profile): dequant.py's
# Triton kernel gives the same bits (fused.Options.triton_dequant). On a fast card its launch costs host time the
# GPU waits on, so bitsandbytes' kernel stays there.
TRITON_DEQUANT = True
# The compiled RoPE backward splits every element's flat index by the batch's token count (dynamic: a 64-bit division)
# and moved ~114 GB/s on the t4c share (run51's profile); ropegrad.py's kernel does that arithmetic once a program.
TRITON_ROPE = True
# With fp32 LoRA weights (fp16 compute: a T4), AdamW as torch's fused kernel instead of the recipe's bitsandbytes paged
# AdamW 32-bit: the same update in fp32, one kernel for all LoRA weights where bitsandbytes launches one per weight
# from Python and synchronizes the device before each step (~35 ms a step of kernels and idle GPU in the t4c profile,
# bench/README.md). Paging is for optimizer state that may not fit; LoRA's (~0.27 GB at r=64 on q, v) is in the memory
# estimate. Not with bf16 LoRA weights, where torch's AdamW would keep its moments in bf16 too.
FUSED_ADAMW = True
# trl's per-step entropy and token accuracy: read by nothing in this project, and each of their `.item()` calls waits
# for the GPU between forward and backward (SFTTrainer.compute_loss); off on the GPU.
TRL_METRICS = False
# With those metrics off, the loss's LM head takes the hidden states' gradient in its forward (qlora/lmhead.py): one
# 16-bit matmul of the head's three fewer, no [tokens, vocabulary] tile in backward, and no boolean indexing that waits
# for the GPU; every position is scored (trl's compact form scores the labelled ones only).
HEAD_IN_FORWARD = True


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
    # how the fused layers compute and what they keep (fused.Options; each a bench lever, bench/README.md)
    attention: str | None = None  # the sdpa kernel the card has: flash | efficient (Turing, Volta) | math (None: off)
    keep_mlp: int = 0  # fused layers (the last ones) that keep gate/up for backward instead of recomputing them
    # ... and the layers below those, one entry each going down: keeping on batches of at most this many tokens
    # (padded), where a batch shorter than the longest leaves the room (`keep_on_shorter_batches`)
    keep_upto_tokens: list[int] = field(default_factory=list)
    keep_bits: int = 16  # ... in 16 bits (exact) or 8 (int8 with a scale a token: half the memory, not exact)
    fewer_passes: bool = False  # norms, RoPE and SiLU*up in fewer elementwise kernels
    gemm_4bit: bool = False  # forward 4-bit matmuls through bitsandbytes' gemm_4bit op, not dequantize + matmul
    lora_fp16: bool = True  # LoRA matmuls in the compute dtype, cast from the master weights (False: in theirs)
    compiled: bool = False  # the fused layers' elementwise steps compiled into fused kernels (torch.compile)
    triton_dequant: bool = False  # the fused layers' nf4 weights dequantized by dequant.py's kernel
    triton_rope: bool = False  # the fused layers' RoPE backward by ropegrad.py's kernel
    compiled_lora: bool = False  # with `compiled`: LoRA's sums (forward and backward) in the compiled steps too
    expandable_segments: bool = False  # the CUDA allocator's expandable segments while training (`allocator`)
    trl_metrics: bool = True  # trl's per-step entropy and token accuracy (each `.item()` waits for the GPU)
    head_in_forward: bool = False  # without them, the LM head's gradient taken in its forward (qlora/lmhead.py)
    optimizer: str | None = None  # the Trainer's optimizer in place of the config's (None: as configured)
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

    def estimate(self, cfg, arch: Arch) -> float:
        """This plan's peak memory (estimate_peak_gib with its settings), GiB to two decimals."""
        return round(self.peak(cfg, arch), 2)

    def peak(self, cfg, arch: Arch, checkpoint_layers: int | None = None, keep_mlp: int | None = None,
             tokens: int | None = None) -> float:
        """estimate_peak_gib with this plan's settings, or with another checkpoint or keep count or batch size in
        tokens (while planning)."""
        lora_fp32 = self.lora_fp32 if self.lora_fp32 is not None else self.precision != "bf16"
        layers = self.checkpointed(cfg, arch) if checkpoint_layers is None else checkpoint_layers
        keep = (self.keep_mlp if keep_mlp is None else keep_mlp) if self.fused else 0
        return estimate_peak_gib(arch, cfg, layers, self.lean, cfg.quantize == "nf4", lora_fp32, self.fused,
                                 4 if self.precision == "fp32" else 2, keep, self.keep_bits, tokens)

    def fused_options(self):
        """What the fused layers compute with (qlora/fused.py's Options)."""
        from .fused import Options

        return Options(attention=self.attention, fewer_passes=self.fewer_passes, gemm_4bit=self.gemm_4bit,
                       lora_fp16=self.lora_fp16, compiled=self.compiled, triton_dequant=self.triton_dequant,
                       triton_rope=self.triton_rope, lora_compiled=self.compiled_lora)


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
                      lora_fp32: bool = True, fused: bool = False, element_bytes: int = 2, keep_mlp: int = 0,
                      keep_bits: int = 16, tokens: int | None = None) -> float:
    """Peak memory of one run: weights, LoRA state, activations of the longest batch, workspace.

    element_bytes: 2 for 16-bit compute on a GPU, 4 for the CPU's fp32 (weights and activations twice as big).
    keep_mlp: fused layers that also keep gate and up (in keep_bits bits) instead of recomputing them.
    tokens: a batch of this many (padded) tokens instead of the longest (the activations grow linearly with it)."""
    width = element_bytes
    weight_bytes = arch.params * (0.5 + 4 / 64) if quantized else arch.params * width  # nf4 + fp32 absmax per 64
    weight_bytes += arch.vocab * arch.hidden * 2 * width * (1 if quantized else 0)  # embeddings and head stay 16-bit
    lora_params = arch.layers * cfg.lora_r * 2 * arch.hidden * (7 if cfg.target_modules == ["all-linear"]
                                                               else len(cfg.target_modules))
    lora_bytes = lora_params * ((4 if lora_fp32 else 2) * 2 + 8)  # weights, grads, two Adam states in fp32
    if tokens is None:  # group_by_length runs the longest batch first; rows are pre-truncated
        tokens = cfg.batch_size * cfg.max_length
    per_layer = activation_bytes_per_token(arch, cfg, lean) * tokens
    kept = arch.layers - checkpoint_layers
    acts = (kept * activation_bytes_per_token(arch, cfg, lean, fused) * tokens
            + checkpoint_layers * 2 * arch.hidden * tokens)
    if checkpoint_layers:
        acts += per_layer  # one layer's activations exist again while it recomputes
    if fused and kept:
        acts += 12 * arch.intermediate * tokens  # a fused layer's backward: the recomputed MLP and its grads
        keep_mlp = min(keep_mlp, kept)
        acts += keep_mlp * (KEPT_MLP_I[keep_bits] * arch.intermediate + (8 if keep_bits == 8 else 0)) * tokens
    return (weight_bytes + lora_bytes + acts * width / 2) / GIB + WORKSPACE_GIB


# --- the plan --------------------------------------------------------------------------------------------
def plan(cfg, arch: Arch | None, precision: str, budget_gib: float | None = None, cuda: bool | None = None,
         capability: tuple[int, int] | None = None, tflops: float | None = None) -> Plan:
    """The fast settings for this card: precision as picked (bf16 LoRA weights where the card has bf16), the attention
    kernel the card has, Llama decoder layers fused into one autograd node each (qlora/fused.py: fewer launches, less
    kept for backward), gradient checkpointing on only as many layers as the memory budget needs and, on a card whose
    matmuls are slow (COMPUTE_POOR_TFLOPS), the MLP's gate/up outputs kept instead of recomputed on as many more
    layers as the budget allows. With the model's shape known, every plan (off and the CPU's too) carries its
    estimated peak memory.

    The card: `cuda=None` asks this process's (qlora/device.py); with `cuda` given, `budget_gib`, `capability` (CUDA
    compute capability, e.g. (7, 5) for a T4) and `tflops` (sustained fp16 matmul rate) describe it, None where
    unknown (then: a modern card, flash attention, recompute)."""
    if cuda is None:
        from . import device

        cuda = device.cuda_available()
        if cuda:
            budget_gib = device.memory_budget_gib() if budget_gib is None else budget_gib
            capability = device.compute_capability() if capability is None else capability
            tflops = device.matmul_tflops() if tflops is None else tflops
    if getattr(cfg, "speed", "auto") == "off" or not cuda or arch is None:
        p = Plan.off(precision)  # the CPU path (the embedded model, tests) keeps the recipe as configured
        if arch is not None:  # stock layers; all or none recompute, as configured; fp32 on the CPU
            p.estimated_peak_gib = p.estimate(cfg, arch)
        return p
    kernel = attention_kernel(capability)
    if precision == "bf16" and capability is not None and capability < (8, 0):
        raise ValueError(f"bf16 on a card of compute capability {capability[0]}.{capability[1]}, which has none")
    lora_fp32 = precision != "bf16"
    p = Plan(precision=precision, lean=True, causal_attention=not cfg.padding_free, lora_fp32=lora_fp32,
             padding_free=cfg.padding_free, budget_gib=budget_gib, attention=kernel, fewer_passes=FEWER_PASSES,
             trl_metrics=TRL_METRICS, head_in_forward=HEAD_IN_FORWARD, keep_bits=KEEP_BITS)
    # the fused layer reproduces Llama's decoder layer on right-padded batches exactly; other models keep theirs
    p.fused = p.causal_attention and arch.model_type == "llama"
    p.notes.append(f"{precision} compute, LoRA weights in {'fp32' if lora_fp32 else 'bf16'}")
    p.notes.append("lean RMSNorm and SiLU*up (keep 16-bit inputs)")
    where = f"compute capability {capability[0]}.{capability[1]}" if capability else "capability unknown"
    if p.causal_attention:
        p.notes.append(f"right-padded batches: sdpa is_causal without a mask, {kernel} kernel ({where}; not cuDNN)")
    else:
        p.notes.append(f"attention: the {kernel} kernel where sdpa runs ({where})")
    # on a compute-poor card the fused layers' elementwise passes cost GPU time: compiled
    p.compiled = p.fused and compute_poor(tflops) and COMPILE_STEPS
    p.triton_dequant = p.fused and compute_poor(tflops) and TRITON_DEQUANT
    p.triton_rope = p.fused and compute_poor(tflops) and TRITON_ROPE
    p.compiled_lora = p.compiled
    if p.fused:
        p.notes.append("fused Llama decoder layers (one autograd node each, hand-written backward"
                       + (", norms, RoPE and SiLU*up compiled into fused kernels by torch.compile once, at the "
                          "first step" if p.compiled else ", fewer elementwise passes" if p.fewer_passes else "")
                       + (", nf4 weights dequantized by a Triton kernel (bitsandbytes' bits)" if p.triton_dequant
                          else "") + (", RoPE's backward by a Triton kernel" if p.triton_rope else "") + ")")
    limit = (budget_gib or 0) * HEADROOM
    if not cfg.gradient_checkpointing:
        p.checkpoint_layers = 0
        p.notes.append("gradient checkpointing off (config)")
    else:
        # the fewest recomputing layers whose estimate fits the budget; all of them if none does
        p.checkpoint_layers = arch.layers
        for k in range(arch.layers + 1):
            if p.peak(cfg, arch, checkpoint_layers=k) <= limit:
                p.checkpoint_layers = k
                break
        p.notes.append(f"gradient checkpointing on {p.checkpoint_layers} of {arch.layers} layers "
                       f"(budget {budget_gib:.1f} GiB)")
    if p.fused:
        p.expandable_segments = compute_poor(tflops) and EXPANDABLE_SEGMENTS
        _choose_keep(p, cfg, arch, tflops, (budget_gib or 0) * KEEP_HEADROOM)
    if not p.trl_metrics:
        p.notes.append("trl's per-step entropy and token accuracy off (each waited for the GPU)"
                       + ("; the LM head's gradient taken in its forward" if p.head_in_forward else ""))
    if FUSED_ADAMW and lora_fp32 and cfg.optimizer == "paged_adamw_32bit":
        p.optimizer = "adamw_torch_fused"
        p.notes.append("AdamW 32-bit as torch's fused kernel, not bitsandbytes' paged one (one launch for all LoRA "
                       "weights, no device sync)")
    p.estimated_peak_gib = p.estimate(cfg, arch)
    return p


def attention_kernel(capability: tuple[int, int] | None) -> str:
    """The sdpa kernel a card has: FlashAttention-2 from Ampere (8.0) on; the memory-efficient kernel on Volta and
    Turing (a T4 is 7.5: no flash kernels there); math before that. An unknown card is taken for a modern one."""
    if capability is None or capability >= (8, 0):
        return "flash"
    return "efficient" if capability >= (5, 0) else "math"


def compute_poor(tflops: float | None) -> bool:
    """Does recomputing in backward cost this card time (see COMPUTE_POOR_TFLOPS)? Unknown: no."""
    return tflops is not None and tflops < COMPUTE_POOR_TFLOPS


def _choose_keep(p: Plan, cfg, arch: Arch, tflops: float | None, limit: float) -> None:
    """On a compute-poor card, the most fused layers that keep gate/up with the estimate still within `limit`."""
    fused_layers = arch.layers - p.checkpoint_layers
    if not compute_poor(tflops):
        why = f"fp16 matmuls at ~{tflops:.0f} TFLOP/s: the GPU waits on the CPU" if tflops else "matmul rate unknown"
        p.notes.append(f"MLP recomputed in backward ({why})")
        return
    rate = f"fp16 matmuls at ~{tflops:.0f} TFLOP/s"
    for keep in range(fused_layers, 0, -1):
        if p.peak(cfg, arch, keep_mlp=keep) <= limit:
            p.keep_mlp = keep
            break
    keep_on_shorter_batches(p, cfg, arch)
    shorter = (f"; on shorter batches more (all {p.keep_mlp + len(p.keep_upto_tokens)} up to "
               f"{p.keep_upto_tokens[-1]:,} tokens)" if p.keep_upto_tokens else "")
    p.notes.append(f"gate/up kept ({p.keep_bits}-bit) on {p.keep_mlp} of {fused_layers} fused layers{shorter}, the "
                   f"rest recompute ({rate}, below {COMPUTE_POOR_TFLOPS:.0f}: recomputing costs time)"
                   + ("; the allocator's expandable segments while training" if p.expandable_segments else ""))


def keep_on_shorter_batches(p: Plan, cfg, arch: Arch) -> None:
    """p.keep_upto_tokens: for each fused layer below the p.keep_mlp that keep on every batch, going down, the
    longest batch (in padded tokens) on which it keeps gate/up too with the estimate still within KEEP_HEADROOM of
    the budget. The plan fits the longest batch, but group_by_length's batches are mostly far shorter (the reference
    dataset's steps average ~1,700 tokens against the longest 4 x 1,024), and a batch's activations shrink with its
    length: the room they leave keeps more layers' gate/up instead of recomputing them."""
    limit = (p.budget_gib or 0) * KEEP_HEADROOM
    longest = cfg.batch_size * cfg.max_length
    p.keep_upto_tokens = []
    for keep in range(p.keep_mlp + 1, arch.layers - p.checkpointed(cfg, arch) + 1):
        # the estimate is affine in the batch's tokens: weights and state, plus activations a token
        fixed = p.peak(cfg, arch, keep_mlp=keep, tokens=0)
        per_token = (p.peak(cfg, arch, keep_mlp=keep, tokens=longest) - fixed) / longest
        tokens = min(longest - 1, int((limit - fixed) / per_token))
        if tokens < 1:
            break
        p.keep_upto_tokens.append(tokens)


# --- applying it -----------------------------------------------------------------------------------------
@contextmanager
def allocator(p: Plan):
    """The CUDA allocator as the plan wants it while training (expandable segments), and as it was afterwards, also
    when training fails: the chat engine that loads next captures its graphs with the process's usual settings.
    Where the process was started with expandable segments (PYTORCH_CUDA_ALLOC_CONF), they stay as they are."""
    import os

    started = (os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")).lower()
    if not p.expandable_segments or "expandable_segments:true" in started.replace(" ", ""):
        yield
        return
    import torch

    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    try:
        yield
    finally:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")


def register_causal_attention(kernel: str | None = None) -> None:
    """sdpa with is_causal=True and no mask. Exact for right-padded batches: a real token only ever looks left, at
    real tokens, and padded positions carry label -100. Never for left padding, packed rows or a KV cache.

    kernel: "efficient" or "math" restricts sdpa to that kernel (the plan's attention_kernel: what a T4 has), with
    math as the fallback; None or "flash": torch's own order."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    from .fused import sdpa_kernel_context

    def causal_sdpa(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        with sdpa_kernel_context(kernel):
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
        register_causal_attention(p.attention)
        model.config._attn_implementation = CAUSAL_ATTENTION
        for sub in model.modules():  # sub-configs of the text model read the same attribute
            if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
                sub.config._attn_implementation = CAUSAL_ATTENTION


def after_trainer(trainer, p: Plan) -> None:
    """Dtype of the trainable weights, which layers recompute once the Trainer has turned checkpointing on, the
    fused layers and what they keep, and trl's per-step metrics."""
    _set_lora_dtype(trainer.model, p)
    if p.checkpoint_layers > 0:
        trainer.add_callback(_checkpoint_some_layers(p.checkpoint_layers))
    if p.fused:
        from . import fused

        try:  # layers that checkpoint keep their own forward (fused.py)
            layers = fused.install(trainer.model, p.fused_options(), p.keep_mlp, p.keep_bits, p.keep_upto_tokens)
            p.notes.append(f"{layers} decoder layers fused")
        except fused.NotFusable as e:
            p.fused = False
            p.notes.append(f"not fused: {e}")
    if not p.trl_metrics:
        import types

        trainer.compute_loss = types.MethodType(_loss_without_metrics, trainer)
        if p.head_in_forward:
            from . import lmhead

            base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
            trainer._qlora_head = lmhead.supports(base)
            if trainer._qlora_head:
                lmhead.install(base)
            else:
                p.notes.append("the LM head's gradient in backward (trl's head: this one is not a plain one)")


def _loss_without_metrics(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """trl 1.16's training loss without its per-step metrics. SFTTrainer.compute_loss takes the loss from its fused LM
    head (the mean negative log-probability of the label tokens), then computes the entropy and token accuracy for the
    logs and the batch's token count, whose `.item()` calls and `num_valid > 0` wait for the GPU between forward and
    backward; no argument turns them off. Here the same loss, in the same operations, without them. Every other case
    (eval, outputs asked for, a custom or smoothed loss, MoE aux loss, sequence parallelism) is trl's own."""
    import torch

    parallel = getattr(self.accelerator, "parallelism_config", None)
    if (not model.training or return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
            or self.args.loss_type != "nll" or self.aux_loss_enabled or getattr(parallel, "sp_enabled", False)):
        return type(self).compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
    inputs["use_cache"] = False
    if getattr(self, "_qlora_head", False):  # qlora/lmhead.py: the same loss, its gradient taken in forward
        log_probs, label_mask = model(**inputs, qlora_head=True)
    else:
        outputs = model(**inputs, fused_lm_head=True)
        log_probs, label_mask = outputs.log_probs, outputs.label_mask
    num_tokens = label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    if self.args.average_tokens_across_devices and num_items_in_batch is not None:  # as trl: DDP averages ranks
        loss = loss * (self.accelerator.num_processes // self.get_tp_size())
    return loss


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
