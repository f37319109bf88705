"""On a GPU only (CI skips these): nf4mm's kernel against bitsandbytes on the 7B layer shapes, its rows' independence,
and the slot engine decoding with it.

    python -m pytest -m gpu tests/test_nf4mm_gpu.py -s
"""
from __future__ import annotations

import types

import pytest

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]: q/k/v/o, gate/up, down of Llama-2-7B


def quantized(n: int, k: int, dtype, nested: bool, seed: int = 0):
    import torch
    import bitsandbytes.functional as bf

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, dtype=dtype, device="cuda", generator=g) * 0.02
    data, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    return types.SimpleNamespace(data=data, quant_state=state), bf.dequantize_4bit(data, state).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_nf4mm_equals_bitsandbytes_dequantize_and_matmul_within_rounding_and_rows_are_independent(dtype_name):
    import torch

    from qlora import nf4mm

    dtype = getattr(torch, dtype_name)
    worst = {}
    for n, k in SHAPES:
        for nested in (True, False):
            param, weight = quantized(n, k, dtype, nested)
            w = nf4mm.Weight.of(param)
            assert torch.equal(nf4mm.dequantize(w).to(dtype), weight)  # the layout, on the card too
            x = torch.randn(40, k, dtype=dtype, device="cuda")
            solo = nf4mm.matmul(x[:1], w)
            for m in (1, 2, 5, 16, 17, 40):  # 17 and 40: more than one 16-row tile
                out = nf4mm.matmul(x[:m], w)
                exact = x[:m].double() @ weight.double().t()
                cublas = x[:m] @ weight.t()  # bitsandbytes' own path for more than one row: dequantize + cuBLAS
                err, ref_err = (out.double() - exact).abs().max().item(), (cublas.double() - exact).abs().max().item()
                ulp = torch.finfo(dtype).eps * exact.abs().max().item()
                assert err <= max(2 * ref_err, ulp), (n, k, nested, m, err, ref_err)
                assert torch.equal(out[0], solo[0]), (n, k, nested, m)  # row 0 alone = row 0 among m rows
                worst[(n, k, nested, m)] = (round(err, 5), round(ref_err, 5))
            again = nf4mm.matmul(x[:16], w)
            assert torch.equal(again, nf4mm.matmul(x[:16], w))  # run to run
            for r in range(16):  # every row of the 16-row call = that row alone
                assert torch.equal(again[r], nf4mm.matmul(x[r:r + 1], w)[0]), (n, k, nested, r)
    print(dtype_name, "max abs error (nf4mm, cuBLAS on bitsandbytes' dequantized weight) vs fp64:", worst)


@pytest.mark.gpu
def test_nf4linear_equals_linear4bit_and_replays_in_a_cuda_graph():
    import bitsandbytes as bnb
    import torch

    from qlora import nf4mm

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(4096, 11008, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(11008, 4096) * 0.02, requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
    layer = layer.cuda()
    fast = nf4mm.NF4Linear(layer, torch.bfloat16)
    x = torch.randn(16, 1, 4096, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        ref, out = layer(x), fast(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        long = torch.randn(1, 300, 4096, dtype=torch.bfloat16, device="cuda")  # a prefill: bitsandbytes' path
        assert torch.equal(fast(long), layer(long))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fast(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fast(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(captured, fast(x))


@pytest.mark.gpu
def test_the_slot_engine_with_nf4mm_is_exact_and_each_pane_alone_equals_the_batch(tiny_llama_dir, tmp_path, caplog):
    import logging

    from bench.chat_bench import random_adapter
    from qlora.chat import ChatEngine
    from qlora.config import GenerationSettings

    run = random_adapter(tiny_llama_dir, tmp_path / "a", r=8, seed=1)
    settings = GenerationSettings(temperature=0, max_new_tokens=12)
    answers = {}
    caplog.set_level(logging.INFO, logger="qlora.chat")
    for nf4 in (True, False):  # the second: bitsandbytes' matmuls, SDPA, transformers' RMSNorm
        e = ChatEngine(str(tiny_llama_dir), "nf4", "bf16", decode="graphs", max_rows=4, nf4=nf4, fused=nf4)
        try:
            name = e.load_adapter(run)
            e.load()
            assert e.backend_kind == "graphs" and e.matmul == ("nf4mm" if nf4 else "bitsandbytes")
            assert e._scheduler.backend.decoder.fused == nf4 and e.exactness["bucket"] == 0, e.exactness
            assert e.exactness["repeat"] == 0 and e.exactness["neighbours"] == 0, e.exactness
            prompts = [e.prompt_ids([], q, adapter=name) for q in ("Hi", "Who guards the gate? Tell me all.")]
            spec = [(prompts[0], None, settings), (prompts[0], name, settings), (prompts[1], None, settings),
                    (prompts[1], name, settings)]
            batch = e.rows_ids(spec)
            alone = [e.rows_ids([row])[0] for row in spec]
            assert batch == alone and all(batch)
            answers[nf4] = batch
        finally:
            e.unload()
    lines = [r.getMessage() for r in caplog.records if "4-bit decode matmuls" in r.getMessage()]
    assert lines[0].endswith("nf4mm") and "turned off (QLORA_CHAT_NF4=0)" in lines[1], lines
    kernels = [r.getMessage() for r in caplog.records if "decode attention and norms" in r.getMessage()]
    assert "decodeops: attention over each row's own length" in kernels[0], kernels
    assert "QLORA_CHAT_FUSED=0" in kernels[1], kernels
    print("greedy answers, Triton kernels vs bitsandbytes + SDPA:", answers)
    print("nf4mm vs bitsandbytes engine answers equal:", answers[True] == answers[False])
