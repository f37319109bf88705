"""The loss's LM head with its gradient taken in forward (qlora/lmhead.py) gives trl's log-probabilities and gradients,
and trains the same run through build_trainer."""
from __future__ import annotations

import pytest

from qlora import lmhead, speed
from test_speed import first_losses


def trl_log_probs(hidden, weight, targets):
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs",))[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("token_chunk", [4096, 7])  # one tile of tokens, or several (the 7B batch has 4,092 positions)
def test_the_log_probs_and_their_gradient_are_trls(dtype, token_chunk, monkeypatch):
    import torch
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "TOKEN_CHUNK_SIZE", token_chunk)
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(29, 48, generator=gen) * 2).to(dtype)
    weight = (torch.randn(1000, 48, generator=gen) / 4).to(dtype)  # large logits: probabilities down to ~1e-20
    targets = torch.randint(0, 1000, (29,), generator=gen)
    upstream = torch.randn(29, generator=gen) * 1e-3  # a loss's per-token weights, one of them zero (a -100 label)
    upstream[3] = 0
    results = []
    for fn in (trl_log_probs, lmhead._log_probs().apply):
        h = hidden.clone().requires_grad_()
        log_probs = fn(h, weight, targets)
        (log_probs * upstream).sum().backward()
        results.append((log_probs.detach(), h.grad))
    (want, want_grad), (got, got_grad) = results
    assert got.dtype == torch.float32 and got_grad.dtype == dtype and got_grad[3].abs().max() == 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    # and against the plain formula in fp64 (in bf16, the logits come rounded to 8 bits first)
    exact = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 0.1)


def test_a_run_trains_trls_losses_with_the_heads_gradient_taken_in_forward(tiny_cfg, tmp_path):
    """Through build_trainer on the real 4-bit path: the plan without trl's metrics, trl's head against this one, step
    by step; the rows are of different lengths, so the batch has padding (-100 labels) the head must weigh zero."""
    import torch

    cfg = tiny_cfg(max_steps=3, learning_rate=1e-3, lora_dropout=0.0)
    trl_head, trl_trainer = first_losses(cfg, speed.Plan(precision="fp32", trl_metrics=False), tmp_path, steps=3)
    mine, trainer = first_losses(cfg, speed.Plan(precision="fp32", trl_metrics=False, head_in_forward=True),
                                 tmp_path, steps=3)
    assert trainer._qlora_head and not getattr(trl_trainer, "_qlora_head", False)
    assert len(mine) == 3 and mine == pytest.approx(trl_head, rel=1e-5)
    lora = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, param in trl_trainer.model.named_parameters():
        if param.requires_grad:
            # to ~1e-6 (0.1% of one Adam step at this learning rate): float noise, which Adam amplifies where a
            # gradient is near zero
            torch.testing.assert_close(lora[name], param, rtol=0, atol=1e-5, msg=name)
    # the model's own forward (generation, evaluation) is unchanged
    model = trainer.model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[1, 450, 7035]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_a_head_that_is_not_a_plain_one_keeps_trls(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.lm_head.weight.requires_grad_(False)
    assert lmhead.supports(model)
    model.config.final_logit_softcapping = 30.0  # Gemma 2's: the head's formula changes
    assert not lmhead.supports(model)
    model.config.final_logit_softcapping = None
    model.lm_head.weight.requires_grad_(True)  # a trained head needs its weight's gradient, which this one never takes
    assert not lmhead.supports(model)


@pytest.mark.gpu
def test_on_the_gpu_the_head_gives_trls_log_probs_and_gradient():
    """The 7B shapes in fp16 under autocast, trl's Triton kernels in both: a batch of 4 x 1,023 positions, hidden
    4,096, vocabulary 32,000."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4092, 4096, device="cuda", generator=gen, dtype=torch.float16)
    weight = torch.randn(32000, 4096, device="cuda", generator=gen, dtype=torch.float16) / 64
    targets = torch.randint(0, 32000, (4092,), device="cuda", generator=gen)
    upstream = torch.full((4092,), -65536 / 4092, device="cuda")  # fp16's loss scale over the batch's tokens
    results = []
    for fn in (trl_log_probs, lmhead._log_probs().apply):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16):
            log_probs = fn(h, weight, targets)
        (log_probs * upstream).sum().backward()
        results.append((log_probs.detach(), h.grad.float()))
    (want, want_grad), (got, got_grad) = results
    exact = torch.log_softmax(hidden.float() @ weight.float().t(), -1).gather(1, targets[:, None])[:, 0]
    print(f"log-probs: largest difference to trl's {(got - want).abs().max().item():.2e}, to fp32's "
          f"{(got - exact).abs().max().item():.2e} (trl's {(want - exact).abs().max().item():.2e}); gradient: relative "
          f"difference {((got_grad - want_grad).norm() / want_grad.norm()).item():.2e}")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    assert ((got_grad - want_grad).norm() / want_grad.norm()).item() < 2e-3
