"""nf4mm on the CPU: the kernel's reading of bitsandbytes' nf4 layout (plain torch, held to bitsandbytes' own
dequantize), its byte-to-codes table, and the engine staying on bitsandbytes' matmuls, logged, where the kernel cannot
run.
The kernel itself runs on a GPU only: tests/test_nf4mm_gpu.py."""
from __future__ import annotations

import logging
import types

import pytest

from apphelpers import Records
from qlora import device, nf4mm
from qlora.chat import ChatEngine
from qlora.config import GenerationSettings


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_the_kernels_reading_of_the_packed_weight_equals_bitsandbytes_dequantize(nested, dtype_name):
    import bitsandbytes.functional as bf
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    for n, k in [(64, 256), (192, 320), (32, 17 * 64)]:  # 17 blocks a row: blocks of 256 scales straddle rows
        w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
        w[3, :64] = 0  # a block of zeros (absmax 0)
        data, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        weight = nf4mm.Weight.of(types.SimpleNamespace(data=data, quant_state=state))
        assert weight.nested == nested and (n, k) == (weight.n, weight.k)
        ref = bf.dequantize_4bit(data, state)
        assert torch.equal(nf4mm.dequantize(weight).to(ref.dtype), ref), (n, k)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_one_table_entry_a_byte_holds_both_of_its_codes_in_the_compute_dtype(dtype_name):
    import bitsandbytes.functional as bf
    import torch

    dtype = getattr(torch, dtype_name)
    data, state = bf.quantize_4bit(torch.randn(64, 128).to(dtype), blocksize=64, quant_type="nf4")
    weight = nf4mm.Weight.of(types.SimpleNamespace(data=data, quant_state=state))
    table = weight.pairs(dtype)
    assert table.dtype == torch.int32 and table.shape == (256,)
    b = torch.arange(256)
    hi, lo = (table >> 16).to(torch.int16).view(dtype), table.to(torch.int16).view(dtype)  # as the kernel reads it
    codes = state.code.to(dtype)
    assert torch.equal(hi, codes[b >> 4]) and torch.equal(lo, codes[b & 15])  # the first weight: the high nibble
    assert weight.pairs(dtype) is table  # built once a dtype


def test_the_models_4bit_linears_are_read_as_bitsandbytes_reads_them(tiny_llama_dir):
    import bitsandbytes.functional as bf
    import torch

    from qlora.model import load_base

    model = load_base(str(tiny_llama_dir), "nf4", "fp32")
    four_bit = [m for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None]
    assert len(four_bit) == 14 and all(nf4mm.fits(m) for m in four_bit)  # 7 Linears x 2 layers
    for m in four_bit:
        ref = bf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        assert torch.equal(nf4mm.dequantize(nf4mm.Weight.of(m.weight)), ref)
    assert not nf4mm.fits(model.lm_head)  # 16-bit: not the kernel's


def test_on_the_cpu_the_engine_keeps_bitsandbytes_matmuls_and_logs_why(tiny_llama_dir, monkeypatch, caplog):
    assert device.triton_kernels_unavailable("cpu") == "no CUDA device"
    caplog.set_level(logging.INFO, logger="qlora.chat")  # the matmul line is an info line
    records = Records()
    logging.getLogger("qlora.chat").addHandler(records)
    engines = []
    try:
        e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2, nf4=True)  # asked for
        engines.append(e)
        e.load()
        assert e.matmul == "bitsandbytes"
        lines = [line for line in records.lines if "4-bit decode matmuls" in line]
        assert lines == ["chat: 4-bit decode matmuls: bitsandbytes (no CUDA device)"], records.lines
        kernels = [line for line in records.lines if "decode attention and norms" in line]
        assert kernels == ["chat: decode attention and norms: SDPA over the length bucket, transformers' norms and "
                           "rotary (no CUDA device)"], records.lines
        assert not e._scheduler.backend.decoder.fused
        assert e.rows_ids([([1, 450, 4996], None, GenerationSettings(temperature=0, max_new_tokens=3))])[0]
        assert ChatEngine(str(tiny_llama_dir), "nf4", "fp32").nf4  # on by default, where it can run
        assert ChatEngine(str(tiny_llama_dir), "nf4", "fp32").fused
        monkeypatch.setenv("QLORA_CHAT_NF4", "0")
        monkeypatch.setenv("QLORA_CHAT_FUSED", "0")
        off = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2)
        engines.append(off)
        assert not off.nf4 and not off.fused
        off.load()
        assert "turned off (QLORA_CHAT_NF4=0)" in [line for line in records.lines if "4-bit decode" in line][-1]
        assert "turned off (QLORA_CHAT_FUSED=0)" in [line for line in records.lines if "and norms" in line][-1]
        generate = ChatEngine(str(tiny_llama_dir), "nf4", "fp32")  # the CPU default: the eager generate path
        engines.append(generate)
        generate.load()
        assert generate.backend_kind == "generate" and generate.matmul == "bitsandbytes"
        assert "bitsandbytes' 4-bit matmuls" in records.lines[-1]
    finally:
        logging.getLogger("qlora.chat").removeHandler(records)
        for e in engines:
            e.unload()


def test_a_base_without_4bit_weights_is_not_said_to_use_4bit_matmuls(tiny_llama_dir, caplog):
    caplog.set_level(logging.INFO, logger="qlora.chat")
    records = Records()
    logging.getLogger("qlora.chat").addHandler(records)
    engines = []
    try:
        for decode in ("eager", "generate"):
            e = ChatEngine(str(tiny_llama_dir), "none", "fp32", decode=decode, max_rows=2)
            engines.append(e)
            e.load()
            assert e.matmul == "16-bit (no 4-bit weights)", (decode, e.matmul)
        assert not [line for line in records.lines if "bitsandbytes" in line], records.lines
    finally:
        logging.getLogger("qlora.chat").removeHandler(records)
        for e in engines:
            e.unload()
