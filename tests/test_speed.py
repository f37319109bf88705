"""The fast path on the CPU: each lever trains the same loss as the plain recipe, and the plan follows the card."""
from __future__ import annotations

import pytest

from qlora import speed
from qlora.config import TrainConfig

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)


def first_losses(cfg, plan, tmp_path, steps=2):
    """Train `steps` steps of cfg's tiny 4-bit model under `plan`; the logged losses and the trainer."""
    from qlora.data import prepare, tokenize
    from qlora.model import load_base, load_tokenizer
    from qlora.train import build_trainer

    tok = load_tokenizer(cfg.base_model)
    ids = tokenize(prepare(cfg.dataset).train, tok, cfg.max_length)
    model = load_base(cfg.base_model, cfg.quantize, "fp32")
    trainer = build_trainer(cfg, model, tok, ids, [], "fp32", tmp_path / f"run-{id(plan)}", plan=plan)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h][:steps], trainer


@pytest.fixture
def cfg(tiny_cfg):
    # rows of different lengths in one batch of 4, so padding (or packing) matters
    return tiny_cfg(max_steps=2, learning_rate=1e-3, lora_dropout=0.0)


def test_padding_free_and_flash_causal_batches_train_the_same_loss_as_padded_ones(cfg, tmp_path):
    padded, _ = first_losses(cfg, speed.Plan(precision="fp32", padding_free=False), tmp_path)
    packed, _ = first_losses(cfg, speed.Plan(precision="fp32", padding_free=True), tmp_path)
    causal, _ = first_losses(cfg, speed.Plan(precision="fp32", padding_free=False, causal_attention=True), tmp_path)
    assert len(padded) == 2
    # the first step sees identical weights: equal to float noise; after one Adam step, rounding noise is amplified
    # where a gradient is near zero (Adam normalizes it), so later steps agree to 1e-3 relative
    for other in (packed, causal):
        assert other[0] == pytest.approx(padded[0], abs=1e-4)
        assert other == pytest.approx(padded, rel=1e-3)


def test_checkpointing_some_layers_keeps_the_loss_and_recomputes_only_those(cfg, tmp_path):
    cfg = cfg.replace(gradient_checkpointing=True)
    full, _ = first_losses(cfg, speed.Plan(precision="fp32", checkpoint_layers=-1), tmp_path)
    some, trainer = first_losses(cfg, speed.Plan(precision="fp32", checkpoint_layers=1), tmp_path)
    assert some == pytest.approx(full, abs=1e-5)
    flags = [layer.gradient_checkpointing for layer in speed.decoder_layers(trainer.model)]
    assert flags == [True, False]


def test_causal_attention_matches_masked_attention_on_right_padded_rows(tiny_llama_dir):
    """The flash-kernel path is exact where it is used: real tokens of right-padded rows only look left."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(3, 32000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        speed.register_causal_attention()
        model.config._attn_implementation = speed.CAUSAL_ATTENTION
        out = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


# --- the plan --------------------------------------------------------------------------------------------
def plan_for(budget, precision="bf16", **cfg_overrides):
    cfg = TrainConfig(**cfg_overrides)
    return speed.plan(cfg, speed.Arch.of(LLAMA_7B), precision, budget_gib=budget, cuda=True)


def test_a_card_without_bf16_trains_fp16_with_fp32_lora_weights():
    p = plan_for(15, precision="fp16")
    assert p.precision == "fp16" and p.lora_fp32 is True


def test_a_bf16_card_keeps_lora_weights_in_bf16_and_uses_flash_on_padded_batches():
    p = plan_for(80)
    assert p.precision == "bf16" and p.lora_fp32 is False
    assert p.causal_attention and p.lean  # lean plain-torch kernels (liger measured slower on the H100 and is gone)


def test_checkpointing_is_never_dropped_where_the_estimate_does_not_fit():
    for budget in (6, 8, 15, 24, 40, 80):
        p = plan_for(budget)
        assert p.checkpoint_layers == 32 or p.estimated_peak_gib <= budget * speed.HEADROOM
        if p.checkpoint_layers > 0:  # one layer fewer would not have fit
            cfg = TrainConfig()
            fewer = speed.estimate_peak_gib(speed.Arch.of(LLAMA_7B), cfg, p.checkpoint_layers - 1, False)
            assert fewer > budget * speed.HEADROOM
    assert plan_for(6).checkpoint_layers == 32  # nothing fits: everything recomputes
    assert plan_for(80).checkpoint_layers == 0  # an H100 needs none for the reference batch
    assert 0 < plan_for(15).checkpoint_layers < 32  # a T4's memory needs some
    assert plan_for(15, max_length=2048).checkpoint_layers > plan_for(15).checkpoint_layers


def test_speed_off_and_the_cpu_keep_the_recipe_as_configured():
    cfg = TrainConfig(speed="off")
    assert speed.plan(cfg, speed.Arch.of(LLAMA_7B), "bf16", budget_gib=80, cuda=True).checkpoint_layers == -1
    cpu = speed.plan(TrainConfig(), speed.Arch.of(LLAMA_7B), "fp32", cuda=False)
    assert cpu.as_configured and not cpu.lean and not cpu.fused and cpu.checkpoint_layers == -1
    with pytest.raises(ValueError, match="speed"):
        TrainConfig(speed="fast")


def test_the_7b_estimate_is_in_the_range_measured_on_the_h100():
    arch = speed.Arch.of(LLAMA_7B)
    assert 6.6e9 < arch.params < 6.8e9
    # the seed recipe (all layers recompute, stock kernels) peaked at 5.9 GiB allocated
    assert 4.5 < speed.estimate_peak_gib(arch, TrainConfig(), 32, lean=False) < 8


def test_lean_activations_give_the_stock_loss_and_gradients(tiny_llama_dir):
    """The lean RMSNorm and SiLU*up (eager autograd functions) keep less for backward and compute the same function
    and gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    def loss_and_grads(lean: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        if lean:
            assert speed.use_lean_activations(model) == 7  # 2 layers x 2 norms + the final norm, 2 MLPs
        torch.manual_seed(0)
        ids = torch.randint(3, 32000, (2, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = loss_and_grads(False)
    loss, got = loss_and_grads(True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys() and any("norm" in n for n in got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


# --- the card's balance: compute capability and matmul rate ------------------------------------------------------
LLAMA = speed.Arch.of(dict(LLAMA_7B, model_type="llama"))
T4_CARD = dict(budget_gib=15.0, cuda=True, capability=(7, 5), tflops=40.0)  # a T4 passed in, as the preflight does


def test_a_turing_card_gets_fp16_the_memory_efficient_kernel_and_no_bf16_anywhere():
    """A T4 is compute capability 7.5: no bf16 arithmetic and no FlashAttention-2 kernels in sdpa."""
    import json

    from qlora import device

    t4 = device.Card(cuda=True, name="Tesla T4", total_gib=15.0, free_gib=14.6, bf16=False, budget_gib=15.0,
                     capability=(7, 5), tflops=40.0)
    precision = device.pick_precision("auto", t4)
    p = speed.plan(TrainConfig(), LLAMA, precision, **T4_CARD)
    assert precision == "fp16" and p.precision == "fp16" and p.lora_fp32 is True
    assert p.attention == "efficient" and p.fused_options().attention == "efficient"
    assert any("efficient kernel (compute capability 7.5" in n for n in p.notes)
    assert "bf16" not in json.dumps(p.to_dict())
    with pytest.raises(ValueError, match="bf16 on a card of compute capability 7.5"):
        speed.plan(TrainConfig(), LLAMA, "bf16", **T4_CARD)
    assert [speed.attention_kernel(c) for c in [(9, 0), (8, 0), (7, 5), (7, 0), (3, 7), None]] == [
        "flash", "flash", "efficient", "efficient", "math", "flash"]


def test_a_compute_poor_card_keeps_gate_and_up_on_as_many_layers_as_the_budget_allows():
    cfg = TrainConfig()
    p = speed.plan(cfg, LLAMA, "fp16", **T4_CARD)
    limit = 15.0 * speed.KEEP_HEADROOM  # keeping is optional speed: never more than fitting takes
    assert speed.KEEP_HEADROOM <= speed.HEADROOM
    assert p.fused and p.checkpoint_layers == 0 and 0 < p.keep_mlp < 32 and p.keep_bits == 16
    assert p.estimated_peak_gib <= limit
    more = speed.estimate_peak_gib(LLAMA, cfg, 0, True, True, True, True, keep_mlp=p.keep_mlp + 1, keep_bits=16)
    assert more > limit  # one layer more would not fit
    assert p.estimated_peak_gib > speed.plan(cfg, LLAMA, "fp16", budget_gib=15.0, cuda=True).estimated_peak_gib
    assert any(f"gate/up kept (16-bit) on {p.keep_mlp} of 32 fused layers; on shorter batches more" in n
               for n in p.notes)
    assert p.compiled and p.fused_options().compiled  # its elementwise passes cost GPU time: compiled
    assert p.triton_dequant and p.fused_options().triton_dequant  # and bitsandbytes' dequantize ran slow there
    assert p.triton_rope and p.fused_options().triton_rope  # and the compiled RoPE backward's index arithmetic
    assert p.compiled_lora and p.fused_options().lora_compiled  # and LoRA's sums, in those kernels
    assert not p.trl_metrics and p.head_in_forward  # trl's syncs gone; the LM head's gradient taken in its forward
    assert p.expandable_segments and any("expandable segments" in n for n in p.notes)  # the room keeping uses
    assert any("compiled into fused kernels" in n and "dequantized by a Triton kernel" in n for n in p.notes)
    # a fast card waits on the CPU: it recomputes and keeps its memory low, however much it has, and runs its
    # elementwise steps op by op (compiled functions' guards would only add host time)
    h100 = speed.plan(cfg, LLAMA, "bf16", budget_gib=80.0, cuda=True, capability=(9, 0), tflops=613.0)
    assert h100.keep_mlp == 0 and h100.attention == "flash" and h100.checkpoint_layers == 0
    assert not h100.compiled and not h100.triton_dequant and not h100.triton_rope and not h100.expandable_segments
    assert not h100.compiled_lora and h100.head_in_forward  # the head's matmul fewer and its syncs pay there too
    assert any("fewer elementwise passes)" in n for n in h100.notes)
    # the same big card held to a T4's rate (the bench's t4c mode) keeps; where checkpointing is needed, nothing fits
    assert speed.plan(cfg, LLAMA, "fp16", budget_gib=15.0, cuda=True, capability=(9, 0), tflops=40.0).keep_mlp > 0
    long = speed.plan(TrainConfig(max_length=4096), LLAMA, "fp16", **T4_CARD)
    assert long.checkpoint_layers > 0 and long.keep_mlp == 0


def test_shorter_batches_keep_gate_and_up_on_more_layers_each_within_the_same_limit():
    """group_by_length's batches are mostly far shorter than the longest one the plan fits: on each, more layers keep
    gate/up, each layer down to the longest batch whose estimate still fits, so no batch plans past the limit."""
    cfg = TrainConfig()
    p = speed.plan(cfg, LLAMA, "fp16", **T4_CARD)
    limit, longest, upto = 15.0 * speed.KEEP_HEADROOM, cfg.batch_size * cfg.max_length, p.keep_upto_tokens
    assert len(upto) == 32 - p.keep_mlp and upto == sorted(upto, reverse=True) and upto[0] < longest
    for j, tokens in enumerate(upto):
        keep = p.keep_mlp + 1 + j
        assert p.peak(cfg, LLAMA, keep_mlp=keep, tokens=tokens) <= limit < p.peak(cfg, LLAMA, keep_mlp=keep,
                                                                                   tokens=tokens + 1)
    # the reference dataset's average step (~1,700 tokens) keeps every layer; a batch of 3,000 about two thirds
    assert upto[-1] > 1700 and 16 < p.keep_mlp + sum(t >= 3000 for t in upto) < 32
    assert round(p.peak(cfg, LLAMA, tokens=longest), 2) == p.estimated_peak_gib  # still the longest batch's
    h100 = speed.plan(cfg, LLAMA, "bf16", budget_gib=80.0, cuda=True, capability=(9, 0), tflops=613.0)
    assert h100.keep_upto_tokens == []  # a fast card recomputes on every batch


def test_fp32_lora_weights_take_torchs_fused_adamw_in_place_of_the_paged_one_and_bf16_ones_do_not():
    """The recipe's paged AdamW 32-bit becomes torch's fused AdamW where the LoRA weights are fp32 (a T4's fp16
    compute): the same fp32 update in one launch. bf16 LoRA weights keep it (torch's would keep bf16 moments), and so
    does an optimizer the config names otherwise, and the CPU's plan, which runs the config as it is."""
    t4 = speed.plan(TrainConfig(), LLAMA, "fp16", **T4_CARD)
    assert t4.optimizer == "adamw_torch_fused" and any("fused kernel, not bitsandbytes' paged" in n for n in t4.notes)
    h100 = speed.plan(TrainConfig(), LLAMA, "bf16", budget_gib=80.0, cuda=True, capability=(9, 0), tflops=613.0)
    assert h100.optimizer is None and not h100.lora_fp32
    assert speed.plan(TrainConfig(optimizer="paged_adamw_8bit"), LLAMA, "fp16", **T4_CARD).optimizer is None
    assert speed.plan(TrainConfig(), LLAMA, "fp32", cuda=False).optimizer is None


def test_the_allocator_takes_expandable_segments_for_training_only_and_gives_them_back_on_failure(monkeypatch):
    """speed.allocator turns the CUDA allocator's expandable segments on around training where the plan asks, and
    off again after it, also when training raises (the chat engine that loads next captures with the usual
    settings); a plan that does not ask leaves the allocator alone."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    with speed.allocator(speed.Plan(precision="fp16")):
        assert calls == []
    with pytest.raises(RuntimeError, match="out of memory"):
        with speed.allocator(speed.Plan(precision="fp16", expandable_segments=True)):
            assert calls == ["expandable_segments:True"]
            raise RuntimeError("CUDA out of memory")
    assert calls == ["expandable_segments:True", "expandable_segments:False"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the process's own: left alone
    with speed.allocator(speed.Plan(precision="fp16", expandable_segments=True)):
        pass
    assert len(calls) == 2


def test_an_fp32_run_on_a_gpu_is_planned_with_the_fp32_figure_it_reports():
    """The checkpoint and keep choices weigh the same estimate the plan reports: fp32 doubles weights and
    activations, so a plan chosen on the 16-bit figure reported an estimate over its own budget."""
    p = speed.plan(TrainConfig(), LLAMA, "fp32", **T4_CARD)
    assert p.estimated_peak_gib <= 15.0 * speed.HEADROOM, (p.estimated_peak_gib, p.checkpoint_layers, p.keep_mlp)
    assert p.estimated_peak_gib == p.estimate(TrainConfig(), LLAMA)


def test_8_bit_keeping_fits_about_twice_the_layers(monkeypatch):
    sixteen = speed.plan(TrainConfig(), LLAMA, "fp16", **T4_CARD).keep_mlp
    monkeypatch.setattr(speed, "KEEP_BITS", 8)
    eight = speed.plan(TrainConfig(), LLAMA, "fp16", **T4_CARD)
    assert eight.keep_bits == 8 and 2 * sixteen - 2 <= eight.keep_mlp <= min(32, 2 * sixteen + 2)


def test_the_card_facts_come_from_the_device_module(monkeypatch):
    from qlora import device

    assert device.peak_tflops("Tesla T4") == 65.0 and device.peak_tflops("NVIDIA L40S") == 362.0
    assert device.peak_tflops("NVIDIA L40") is None  # not the L4's figure: unknown cards are measured instead
    assert 38 < device.T4_MATMUL_TFLOPS < 42  # what bench/mps.py holds a big card to
    monkeypatch.setenv("QLORA_GPU_CAPABILITY", "7.5")  # a T4 emulated on a bigger card (the bench's t4c mode)
    monkeypatch.setenv("QLORA_GPU_TFLOPS", "40")
    assert device.compute_capability() == (7, 5) and device.matmul_tflops() == 40.0
    assert device.bf16_supported() is False
