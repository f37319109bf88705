"""The fused decoder layer (qlora/fused.py) computes transformers' + peft's loss and LoRA gradients, on the real
4-bit path, and trains the same run through build_trainer."""
from __future__ import annotations

import pytest

from qlora import fused, speed
from test_speed import first_losses

SEED = 1234


def loss_and_grads(model_dir, fuse: bool, dropout: float, targets, quantize="nf4", monkeypatch=None,
                   precision="fp32", options=fused.Options(), keep_mlp=0, keep_bits=16, keep_upto_tokens=()):
    """One forward/backward of a LoRA model on fixed ids (a batch of 2 x 12 tokens). With dropout, both paths drop
    the same units: the fused layer draws its masks from a fixed seed, and the stock model's peft dropout modules are
    given those masks. `options`, `keep_mlp`, `keep_bits` and `keep_upto_tokens` go to fused.install."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora.model import load_base

    torch.manual_seed(0)
    model = load_base(str(model_dir), quantize, precision)
    speed.register_causal_attention()
    model.config._attn_implementation = speed.CAUSAL_ATTENTION
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A's gradient zero too
            torch.nn.init.normal_(param, std=0.05)
    if fuse:
        monkeypatch.setattr(fused, "draw_seed", lambda: SEED)
        assert fused.install(peft_model, options, keep_mlp, keep_bits, keep_upto_tokens) == 2
    elif dropout:
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
                module.lora_dropout["default"] = SameMask(dropout, fused.PROJECTIONS.index(name.split(".")[-1]))
    peft_model.train()
    ids = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(1)).to(model.device)
    with torch.autocast(model.device.type, dtype=model.dtype, enabled=precision != "fp32"):  # as the Trainer does
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}


def SameMask(p, index):
    """A stand-in for peft's nn.Dropout that drops what the fused layer drops."""
    import torch

    class Mask(torch.nn.Module):
        def forward(self, x):
            return fused._dropped(x, p, SEED, index)[0]

    return Mask()


@pytest.fixture(scope="module")
def gqa_llama_dir(tmp_path_factory):
    """Like the tiny Llama of conftest, but 4 query heads share 2 key/value heads (SmolLM2 and Llama 3 do this)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gqa-llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                 tie_word_embeddings=False)).save_pretrained(path)
    return path


@pytest.mark.parametrize("case", [
    dict(dropout=0.0, targets="all-linear"),
    dict(dropout=0.1, targets="all-linear"),
    dict(dropout=0.1, targets=["q_proj", "v_proj"]),  # the reference recipe's targets
    dict(dropout=0.1, targets=["q_proj", "v_proj"], quantize="none"),  # 16-bit frozen weights
    dict(dropout=0.1, targets=["k_proj", "down_proj"], gqa=True),
])
def test_the_fused_layer_gives_the_loss_and_lora_gradients_of_transformers_and_peft(case, tiny_llama_dir,
                                                                                    gqa_llama_dir, monkeypatch):
    import torch

    case = dict(case)
    model_dir = gqa_llama_dir if case.pop("gqa", False) else tiny_llama_dir
    ref_loss, ref = loss_and_grads(model_dir, False, **case)
    loss, got = loss_and_grads(model_dir, True, monkeypatch=monkeypatch, **case)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys() and all("lora_" in n for n in got) and len(got) >= 8
    for name in ref:
        assert got[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("lever", ["first version", "a T4's plan", "all at once"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_on_the_gpu_the_fused_layer_is_as_accurate_as_the_stock_one(precision, lever, tiny_llama_dir, monkeypatch):
    """The GPU path: flash attention (or the memory-efficient kernel a T4 has), bitsandbytes' CUDA dequantize and
    gemm_4bit, autocast. In 16-bit both paths round; measured against the same model in fp32 (no dropout: the CPU
    tests cover the masks), the fused layer's LoRA grads are no further off than transformers' + peft's, with the
    first version's arithmetic and with the levers a T4 pulls."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)
    levers = LEVERS.get(lever, {})
    exact_loss, exact = loss_and_grads(tiny_llama_dir, True, 0.0, "all-linear", monkeypatch=monkeypatch)
    ref_loss, ref = loss_and_grads(tiny_llama_dir, False, 0.0, "all-linear", precision=precision)
    loss, got = loss_and_grads(tiny_llama_dir, True, 0.0, "all-linear", monkeypatch=monkeypatch, precision=precision,
                               **levers)

    def error(grads, name):
        return ((grads[name].float() - exact[name]).norm() / exact[name].norm()).item()

    for name in exact:
        mine, stock = error(got, name), error(ref, name)
        print(f"{precision} {lever} {name}: relative error fused {mine:.2e}, stock {stock:.2e}")
        assert mine <= 1.5 * stock + 2e-3, name
    # measured on the H100 in bf16: 0.174 fused vs 0.159 stock off the fp32 loss of ~13.9 (both ~1.2%)
    assert abs(loss.item() - exact_loss.item()) <= 1.5 * abs(ref_loss.item() - exact_loss.item()) + 1e-2


# --- the levers a compute-poor card pulls (speed.plan picks them; bench/README.md measures each) ---------------------
EVERY_LORA = dict(dropout=0.1, targets="all-linear")  # every LoRA path: gate/up LoRA reads the rebuilt MLP input
RECIPE = dict(dropout=0.1, targets=["q_proj", "v_proj"])  # the reference recipe: backward skips what nothing reads
LEVERS = {
    "fewer elementwise passes": dict(options=fused.Options(fewer_passes=True)),
    "gate/up kept in 16 bits": dict(keep_mlp=2),
    "kept on the last layer only": dict(keep_mlp=1),
    "kept on batches this short only": dict(keep_upto_tokens=(24, 24)),
    "bitsandbytes gemm_4bit forward": dict(options=fused.Options(gemm_4bit=True)),
    "LoRA matmuls in the weights' fp32": dict(options=fused.Options(lora_fp16=False)),
    "memory-efficient attention (a T4's), math fallback": dict(options=fused.Options(attention="efficient")),
    "elementwise steps compiled": dict(options=fused.Options(compiled=True, lora_compiled=True)),
    "nf4 dequantized by the Triton kernel (a GPU's; bitsandbytes on the CPU)": dict(
        options=fused.Options(triton_dequant=True)),
    "RoPE's backward by the Triton kernel (a GPU's; the compiled step on the CPU)": dict(
        options=fused.Options(compiled=True, triton_rope=True, lora_compiled=True)),
    "a T4's plan": dict(options=fused.Options(attention="efficient", fewer_passes=True, compiled=True,
                                              triton_dequant=True, triton_rope=True, lora_compiled=True),
                        keep_mlp=2),
    "all at once": dict(options=fused.Options(attention="efficient", fewer_passes=True, gemm_4bit=True,
                                              lora_fp16=False), keep_mlp=1),
}
_REFERENCE: dict = {}


def reference(model_dir, **case):
    """transformers + peft's loss and LoRA grads, once per model and case."""
    key = (str(model_dir), repr(sorted(case.items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = loss_and_grads(model_dir, False, **case)
    return _REFERENCE[key]


@pytest.mark.parametrize("case", [EVERY_LORA, RECIPE], ids=["all-linear", "q,v"])
@pytest.mark.parametrize("lever", list(LEVERS))
def test_every_lever_gives_the_loss_and_lora_gradients_of_transformers_and_peft(lever, case, tiny_llama_dir,
                                                                                monkeypatch):
    import torch

    ref_loss, ref = reference(tiny_llama_dir, **case)
    loss, got = loss_and_grads(tiny_llama_dir, True, monkeypatch=monkeypatch, **case, **LEVERS[lever])
    options = LEVERS[lever].get("options")
    if options is not None and options.compiled:  # the steps ran compiled, none fell back to op by op
        assert len(fused._COMPILED) == 8 and all(run is not fn for fn, run in fused._COMPILED.items())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys() and len(got) >= 8
    for name in ref:
        assert got[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", [
    dict(dropout=0.1, targets=["q_proj", "v_proj"], quantize="none"),  # 16-bit frozen weights: q, k, v apart
    dict(dropout=0.1, targets=["k_proj", "down_proj"], gqa=True),  # grouped-query attention: narrower k and v
], ids=["16-bit weights", "gqa"])
def test_the_levers_hold_on_16_bit_weights_and_grouped_query_attention(case, tiny_llama_dir, gqa_llama_dir,
                                                                       monkeypatch):
    import torch

    case = dict(case)
    model_dir = gqa_llama_dir if case.pop("gqa", False) else tiny_llama_dir
    ref_loss, ref = reference(model_dir, **case)
    for lever in ("a T4's plan", "all at once"):
        loss, got = loss_and_grads(model_dir, True, monkeypatch=monkeypatch, **case, **LEVERS[lever])
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{lever}: {name}")


def test_a_layer_keeps_gate_and_up_on_batches_up_to_its_token_limit_and_recomputes_on_longer(tiny_llama_dir,
                                                                                            monkeypatch):
    """keep_upto_tokens[j] is the longest batch on which the j-th layer below the always-keeping ones keeps: the
    test batch has 24 tokens, so a limit of 24 keeps and 23 recomputes, with the same gradients either way."""
    import torch

    ref_loss, ref = reference(tiny_llama_dir, **RECIPE)
    kept_calls = []
    real_kept = fused._kept
    monkeypatch.setattr(fused, "_kept", lambda t, bits: kept_calls.append(t.shape) or real_kept(t, bits))
    for upto, layers_keeping in [((24, 23), 1), ((23, 23), 0), ((1000, 24), 2)]:
        kept_calls.clear()
        loss, got = loss_and_grads(tiny_llama_dir, True, monkeypatch=monkeypatch, keep_upto_tokens=upto, **RECIPE)
        assert len(kept_calls) == 2 * layers_keeping, upto  # gate and up of each keeping layer
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{upto}: {name}")


def test_gate_and_up_kept_in_8_bits_round_the_gradients_but_not_the_loss(tiny_llama_dir, monkeypatch):
    """Not exact, so never the default (speed.KEEP_BITS): forward is untouched, and backward reads gate and up
    rounded to 1/254 of each token's largest value, a small error in every gradient below the kept MLPs."""
    import torch

    ref_loss, ref = reference(tiny_llama_dir, **EVERY_LORA)
    loss, got = loss_and_grads(tiny_llama_dir, True, monkeypatch=monkeypatch, keep_mlp=2, keep_bits=8, **EVERY_LORA)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    errors = {n: ((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref}
    # measured: 0.3-1.7% (norm of the error over the norm of the gradient) on this model, where fp16 itself is ~20%
    assert max(errors.values()) < 0.03, errors
    assert errors["base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"] == 0  # reads nothing kept
    assert min(e for e in errors.values() if e) > 1e-3  # the rounding is real: a silent 16-bit path would fail here


def test_in_fp16_the_levers_are_as_accurate_as_the_stock_layer(tiny_llama_dir, monkeypatch):
    """The levers' arithmetic in 16 bits, on the CPU: fewer roundings in norms and RoPE, fp32 LoRA or not, kept gate
    and up. Measured against the same model in fp32, their LoRA grads are no further off than transformers' + peft's
    (the criterion of the GPU test below)."""
    import torch

    exact_loss, exact = reference(tiny_llama_dir, dropout=0.0, targets="all-linear")
    ref_loss, ref = reference(tiny_llama_dir, dropout=0.0, targets="all-linear", precision="fp16")
    for lever in ("a T4's plan", "all at once"):
        loss, got = loss_and_grads(tiny_llama_dir, True, 0.0, "all-linear", monkeypatch=monkeypatch,
                                   precision="fp16", **LEVERS[lever])
        for name in exact:
            mine, stock = (((g[name].float() - exact[name]).norm() / exact[name].norm()).item() for g in (got, ref))
            assert mine <= 1.5 * stock + 2e-3, (lever, name, mine, stock)
        assert abs(loss.item() - exact_loss.item()) <= 1.5 * abs(ref_loss.item() - exact_loss.item()) + 1e-2


def test_a_compiled_step_compiles_once_for_every_batch_shape(monkeypatch):
    """Batches change their length (and the last one its size) all through a run: one compile must serve them all,
    or a recompile lands in the middle of training (~11 s a function on the GPU, run41)."""
    import torch
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fused, "_COMPILED", {})
    step = fused._compiled(fused._qkv_cat)
    before = counters["stats"]["unique_graphs"]
    for b, s in ((2, 12), (2, 20), (3, 7), (4, 33)):  # (a batch of one row compiles once more: torch specializes 1)
        dq, dk, dv = (torch.randn(b, 4, s, 16) for _ in range(3))
        cos, sin = torch.randn(b, 1, s, 16), torch.randn(b, 1, s, 16)
        torch.testing.assert_close(step(dq, dk, dv, cos, sin), fused._qkv_cat(dq, dk, dv, cos, sin))
    assert counters["stats"]["unique_graphs"] - before == 1


def test_a_step_that_does_not_compile_runs_op_by_op_and_says_so(tiny_llama_dir, monkeypatch, caplog):
    """Where torch.compile fails (no Triton for the card, no C++ compiler), training goes on with the same
    arithmetic op by op, and the log says which step and why."""
    import torch

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fused, "_COMPILED", {})
    ref_loss, ref = reference(tiny_llama_dir, **RECIPE)
    with caplog.at_level("WARNING", logger="qlora"):
        loss, got = loss_and_grads(tiny_llama_dir, True, monkeypatch=monkeypatch, **RECIPE,
                                   options=fused.Options(compiled=True, lora_compiled=True))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(run is fn for fn, run in fused._COMPILED.items()) and len(fused._COMPILED) == 8
    warned = [r.getMessage() for r in caplog.records if "did not compile" in r.getMessage()]
    assert len(warned) == 8 and "_norm_plain step did not compile (RuntimeError: no compiler here)" in warned[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_on_the_gpu_the_triton_dequantize_gives_bitsandbytes_bits(dtype):
    """dequant.py's kernel against bitsandbytes' own CUDA kernel on the same nf4 weights: equal bit for bit (every
    code of the table; blocks of 64 and 128; the 7B shapes' packed q/k/v and gate/up, and odd block counts)."""
    import bitsandbytes.functional as bnbf
    import torch

    from qlora import dequant

    dt = getattr(torch, dtype)
    for shape, blocksize in (((3 * 4096, 4096), 64), ((2 * 11008, 4096), 64), ((96, 200), 64), ((40, 192), 128)):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).to(dt).cuda()
        data, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        want = bnbf.dequantize_4bit(data, state)
        got = dequant.dequantize(data, state.absmax, state.code, state.shape, state.dtype, blocksize)
        assert got is not None and got.dtype == want.dtype == dt and torch.equal(got, want), (shape, blocksize)
    assert not dequant._failed


def test_where_the_triton_dequantize_cannot_run_bitsandbytes_dequantizes_and_the_log_says_so(monkeypatch, caplog):
    """No Triton for the card (here: CPU tensors, no interpreter): None, one log line, and no second try."""
    import bitsandbytes.functional as bnbf
    import torch

    from qlora import dequant

    monkeypatch.setattr(dequant, "_failed", [])
    dequant._kernel.cache_clear()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data, state = bnbf.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4")
    with caplog.at_level("WARNING", logger="qlora"):
        for _ in range(2):
            assert dequant.dequantize(data, state.absmax, state.code, state.shape, torch.float32, 64) is None
    warned = [r.getMessage() for r in caplog.records if "Triton nf4 dequantize did not run" in r.getMessage()]
    assert len(warned) == 1 and "bitsandbytes' kernel dequantizes instead" in warned[0]


@pytest.mark.gpu
def test_on_the_gpu_the_triton_rope_backward_gives_the_compiled_steps_values():
    """The 7B layer's shapes in fp16: ropegrad's kernel against the compiled step it replaces (both fp32 arithmetic
    rounded once; at most one rounding step apart where the two order a multiply-add differently)."""
    import torch

    from qlora import ropegrad

    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, s, d = 4, 32, 517, 128
    dq, dk, dv = (torch.randn(b, s, h, d, device="cuda", generator=g, dtype=torch.float16).transpose(1, 2)
                  for _ in range(3))
    cos, sin = (torch.randn(b, 1, s, d, device="cuda", generator=g, dtype=torch.float16) for _ in range(2))
    got = ropegrad.qkv_grads(dq, dk, dv, cos, sin)
    want = fused._compiled(fused._qkv_cat)(dq, dk, dv, cos, sin)
    assert got is not None and not ropegrad._failed
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3)
    print(f"RoPE backward: {(got != want).float().mean().item():.2e} of values differ from the compiled step's")


def test_where_the_triton_rope_backward_cannot_run_the_compiled_step_does_and_the_log_says_so(monkeypatch, caplog):
    """No Triton for the card (here: CPU tensors, no interpreter): None, one log line, and no second try."""
    import torch

    from qlora import ropegrad

    monkeypatch.setattr(ropegrad, "_failed", [])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dq, dk, dv = (torch.randn(1, 2, 5, 8).to(torch.float16) for _ in range(3))
    cos, sin = torch.ones(1, 1, 5, 8, dtype=torch.float16), torch.zeros(1, 1, 5, 8, dtype=torch.float16)
    with caplog.at_level("WARNING", logger="qlora"):
        for _ in range(2):
            assert ropegrad.qkv_grads(dq, dk, dv, cos, sin) is None
    warned = [r.getMessage() for r in caplog.records if "Triton RoPE backward did not run" in r.getMessage()]
    assert len(warned) == 1 and "the compiled step rotates" in warned[0]


def test_a_different_dropout_draw_changes_the_gradients(tiny_llama_dir, monkeypatch):
    """The masks really drop units, and backward uses the masks forward used (not fresh ones)."""
    import torch

    _, a = loss_and_grads(tiny_llama_dir, True, 0.5, "all-linear", monkeypatch=monkeypatch)
    _, b = loss_and_grads(tiny_llama_dir, True, 0.5, "all-linear", monkeypatch=monkeypatch)
    for name in a:  # the same seed twice: the same gradients
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    monkeypatch.setattr(globals()["fused"], "_dropped", _shifted(fused._dropped))
    _, c = loss_and_grads(tiny_llama_dir, True, 0.5, "all-linear", monkeypatch=monkeypatch)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dropout_draws_one_mask_a_seed_and_leaves_the_default_generators_stream_alone(device):
    """The fused layer's dropout (native_dropout: peft's on a GPU) seeds the default generator for its draw and puts
    it back: backward's redraw is forward's mask, and the Trainer's own draws go on as if none had happened."""
    import torch

    x = torch.randn(64, 256, device=device)
    torch.manual_seed(5)
    expected = torch.rand(8, device=device)
    torch.manual_seed(5)
    xd, keep = fused._dropped(x, 0.1, 7, 2)
    assert torch.equal(torch.rand(8, device=device), expected)
    again, same = fused._dropped(x, 0.1, 7, 2)
    assert torch.equal(again, xd) and torch.equal(same, keep) and keep.dtype == torch.bool
    assert not torch.equal(fused._dropped(x, 0.1, 8, 2)[1], keep)  # another seed, another draw
    assert not torch.equal(fused._dropped(x, 0.1, 7, 3)[1], keep)  # another projection, another draw
    assert 0.85 < keep.float().mean().item() < 0.95
    torch.testing.assert_close(xd, torch.where(keep, x / 0.9, 0.0))


def _shifted(dropped):
    def other_draw(x, p, seed, index):
        return dropped(x, p, seed + 1, index)
    return other_draw


def test_packing_q_k_v_and_gate_up_leaves_the_modules_own_forward_unchanged(tiny_llama_dir):
    """The 4-bit weights move into one storage per group; the modules read views of it, so eval mode (generation,
    checkpointed layers) computes exactly what it did before."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora.model import load_base

    model = get_peft_model(load_base(str(tiny_llama_dir), "nf4", "fp32"),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).eval()
    ids = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert fused.install(model) == 2
    layers = [m for m in model.modules() if hasattr(m, "_qlora_parts")]
    assert all(m._qlora_parts.qkv is not None and m._qlora_parts.gate_up is not None for m in layers)
    assert layers[0]._qlora_parts.qkv.shape == (3 * 64, 64)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_layers_that_cannot_be_fused_are_refused_before_any_is_changed(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    from qlora.model import load_base

    model = get_peft_model(load_base(str(tiny_llama_dir), "nf4", "fp32"),
                           LoraConfig(r=8, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"))
    with pytest.raises(fused.NotFusable, match="DoRA"):
        fused.install(model)
    assert not any(hasattr(m, "_qlora_parts") for m in model.modules())


def test_training_with_fused_layers_logs_the_losses_of_the_stock_layers(tiny_cfg, tmp_path):
    """Through build_trainer and SFTTrainer: the same losses step after step, so the LoRA grads reach the optimizer.
    Eval mode (generation, evaluation) falls back to the layer's own forward."""
    import torch

    cfg = tiny_cfg(max_steps=4, learning_rate=1e-3, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    stock, _ = first_losses(cfg, speed.Plan(precision="fp32", causal_attention=True), tmp_path, steps=4)
    plan = speed.Plan(precision="fp32", causal_attention=True, fused=True)
    mine, trainer = first_losses(cfg, plan, tmp_path, steps=4)
    assert "2 decoder layers fused" in plan.notes
    assert len(mine) == 4 and mine[-1] < mine[0]
    assert mine == pytest.approx(stock, rel=1e-4)
    model = trainer.model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[1, 450, 7035]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_a_t4s_plan_trains_the_losses_of_the_stock_layers_without_trls_metric_syncs(tiny_cfg, tmp_path):
    """Through build_trainer: the levers a T4 gets (memory-efficient attention with math as the fallback, gate/up kept
    on the last layer, the elementwise steps and LoRA's input gradients compiled, trl's per-step metrics off and the LM
    head's gradient taken in its forward, torch's fused AdamW) give the stock layers' losses, step after step; the
    metrics trl computes with a `.item()` each step are gone from the logs, and only those."""
    # no dropout: the fused layer draws its own masks (the same ones forward and backward; the tests above give both
    # paths the same masks), so with dropout the runs would train on different draws
    cfg = tiny_cfg(max_steps=4, learning_rate=1e-3, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    stock, stock_trainer = first_losses(cfg, speed.Plan(precision="fp32", causal_attention=True), tmp_path, steps=4)
    plan = speed.Plan(precision="fp32", causal_attention=True, fused=True, attention="efficient", keep_mlp=1,
                      fewer_passes=True, trl_metrics=False, head_in_forward=True, compiled=True,
                      compiled_lora=True, optimizer="adamw_torch_fused")
    mine, trainer = first_losses(cfg, plan, tmp_path, steps=4)
    assert trainer._qlora_head  # the LM head's gradient taken in forward (qlora/lmhead.py)
    assert len(mine) == 4 and mine == pytest.approx(stock, rel=1e-4)
    assert trainer.args.optim == "adamw_torch_fused"  # the plan's, where the config's paged one is adamw_torch here
    assert cfg.optimizer == "paged_adamw_32bit" and stock_trainer.args.optim == "adamw_torch"
    layers = [m._qlora_parts for m in trainer.model.modules() if hasattr(m, "_qlora_parts")]
    assert [parts.keep_tokens for parts in layers] == [0, float("inf")]  # the last layer keeps on every batch
    assert all(parts.options.attention == "efficient" and parts.options.compiled for parts in layers)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    stock_logged = [h for h in stock_trainer.state.log_history if "loss" in h]
    assert all("entropy" in h and "mean_token_accuracy" in h for h in stock_logged)
    assert not any("entropy" in h or "mean_token_accuracy" in h for h in logged)
    assert {k for h in stock_logged for k in h} - {k for h in logged for k in h} == {
        "entropy", "mean_token_accuracy", "num_tokens"}


def test_layers_that_checkpoint_run_their_own_forward_next_to_fused_ones(tiny_cfg, tmp_path):
    """Where memory needs checkpointing (a long max_length on a T4), the first k layers recompute with their stock
    forward and the rest are fused: the first step's LoRA gradients are those of the plain recipe."""
    import torch
    from transformers import TrainerCallback

    from qlora.data import prepare, tokenize
    from qlora.model import load_base, load_tokenizer
    from qlora.train import build_trainer

    cfg = tiny_cfg(max_steps=1, lora_dropout=0.0, gradient_checkpointing=True)
    tok = load_tokenizer(cfg.base_model)
    ids = tokenize(prepare(cfg.dataset).train, tok, cfg.max_length)

    class FirstGrads(TrainerCallback):
        grads: dict = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def first_grads(plan):
        trainer = build_trainer(cfg, load_base(cfg.base_model, cfg.quantize, "fp32"), tok, ids, [], "fp32",
                                tmp_path / f"run-{id(plan)}", plan=plan)
        trainer.add_callback(spy := FirstGrads())
        trainer.train()
        return spy.grads, trainer

    stock, _ = first_grads(speed.Plan(precision="fp32", causal_attention=True))
    mixed, trainer = first_grads(speed.Plan(precision="fp32", causal_attention=True, fused=True, checkpoint_layers=1))
    layers = speed.decoder_layers(trainer.model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert all(hasattr(layer, "_qlora_parts") for layer in layers)  # fused where it does not checkpoint
    assert mixed.keys() == stock.keys() and len(stock) == 8  # q and v, A and B, in both layers
    for name in stock:
        torch.testing.assert_close(mixed[name], stock[name], rtol=1e-4, atol=1e-7, msg=name)


def test_the_plan_fuses_llama_and_then_needs_no_checkpointing_for_the_7b_recipe_on_a_t4():
    from qlora.config import TrainConfig
    from test_speed import LLAMA_7B

    llama = speed.Arch.of(dict(LLAMA_7B, model_type="llama"))
    for precision in ("fp16", "bf16"):
        p = speed.plan(TrainConfig(), llama, precision, budget_gib=15, cuda=True)
        assert p.fused and p.checkpoint_layers == 0 and p.estimated_peak_gib <= 15 * speed.HEADROOM
    # other architectures keep their own layers; packed rows need a block mask, which the fused layer has not
    assert not speed.plan(TrainConfig(), speed.Arch.of(LLAMA_7B), "bf16", budget_gib=15, cuda=True).fused
    assert not speed.plan(TrainConfig(padding_free=True), llama, "bf16", budget_gib=15, cuda=True).fused
    # a long max_length still brings checkpointing back where the estimate does not fit
    assert speed.plan(TrainConfig(max_length=4096), llama, "fp16", budget_gib=15, cuda=True).checkpoint_layers > 0
