"""The project's Triton kernels (the chat engine's, and the training's nf4 dequantize and RoPE backward) compile for
every card generation they may meet, on a machine without a GPU.

Triton compiles ahead of time for a named target (`triton.compile(..., target=GPUTarget("cuda", cc, 32))`: its own
LLVM and the ptxas it ships), so CI catches a kernel that no longer builds before a GPU ever sees it: Turing (a
Space's T4, 7.5: fp16 only), Ampere (8.0) and Hopper (9.0, where they were measured), in each 16-bit type the card
has. What they compute is held to the libraries' results by the GPU tests (`tests/test_*_gpu.py`).
"""
from __future__ import annotations

import re

import pytest
import triton  # requirements-dev.txt pins the GPU machine's Triton: only the compiler runs here
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CARDS = [(75, "fp16"), (80, "fp16"), (80, "bf16"), (90, "bf16")]  # (compute capability, the engine's 16-bit type)


def kernels(t: str) -> dict:
    """name -> (kernel, argument types, constexprs, launch options), as the engine launches them (7B shapes)."""
    from qlora import decodeops, dequant, nf4mm, ropegrad, slots

    nf4 = nf4mm._build()
    ops = decodeops._build()
    return {
        "nf4mm": (nf4, dict(x_ptr=f"*{t}", w_ptr="*u8", absmax_ptr="*u8", pairs_ptr="*i32", code2_ptr="*fp32",
                            absmax2_ptr="*fp32", offset="fp32", out_ptr=f"*{t}", part_ptr="*fp32", locks_ptr="*i32",
                            M="i32", N="i32", K="i32", SPAN="i32", SPLITS="i32"),
                  dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=True, BLOCK_M=nf4mm.BLOCK_M,
                       BLOCK_N=nf4mm.TILE.block_n), dict(num_warps=nf4mm.TILE.warps, num_stages=nf4mm.TILE.stages)),
        "attend": (ops.attend, dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", table_ptr="*i64", pos_ptr="*i64",
                                part_ptr="*fp32", scale="fp32", H="i32", GROUP="i32", CHUNKS="i32", sq_b="i32",
                                sq_h="i32", st_b="i32", sk_p="i32", sk_l="i32", sk_h="i32", sv_p="i32", sv_l="i32",
                                sv_h="i32"),
                   dict(D=128, CHUNK=decodeops.CHUNK, PAGE=slots.PAGE), dict(num_warps=4)),
        "merge": (ops.merge, dict(part_ptr="*fp32", pos_ptr="*i64", o_ptr=f"*{t}", H="i32", CHUNKS="i32", so_b="i32",
                              so_h="i32"), dict(D=128, CHUNK=decodeops.CHUNK), dict(num_warps=1)),
        "rms_norm": (ops.rms_norm, dict(x_ptr=f"*{t}", w_ptr=f"*{t}", out_ptr=f"*{t}", N="i32", eps="fp32"),
                     dict(BLOCK=4096), dict(num_warps=8)),
        "rope_store": (ops.rope_store, dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", cos_ptr=f"*{t}",
                                            sin_ptr=f"*{t}", pos_ptr="*i64", table_ptr="*i64", qo_ptr=f"*{t}",
                                            kc_ptr=f"*{t}", vc_ptr=f"*{t}", H="i32", KVH="i32", s_cos="i32",
                                            st_b="i32", skc_p="i32", skc_l="i32", skc_h="i32", svc_p="i32",
                                            svc_l="i32", svc_h="i32"),
                       dict(D=128, PAGE=slots.PAGE), dict(num_warps=1)),
        "silu_mul": (ops.silu_mul, dict(g_ptr=f"*{t}", u_ptr=f"*{t}", out_ptr=f"*{t}", N="i32"), dict(BLOCK=1024),
                     dict(num_warps=4)),
        "nf4_dequantize": (dequant._kernel(), dict(data_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32",
                                                   out_ptr=f"*{t}", blocks="i32"),
                           dict(HALF=32, ROWS=dequant.ROWS), dict(num_warps=dequant.WARPS)),
        "rope_backward": (ropegrad._kernel(), dict(g_ptr=f"*{t}", cos_ptr=f"*{t}", sin_ptr=f"*{t}", out_ptr=f"*{t}",
                                                   **dict.fromkeys(["s", "heads", "column", "g_b", "g_h", "g_s", "c_b",
                                                                    "c_s", "n_b", "n_s", "o_b", "o_s"], "i32")),
                          dict(D=128, ROTATE=True, BLOCK_S=ropegrad.BLOCK_S), dict(num_warps=4)),
    }


@pytest.mark.parametrize("cc,dtype", CARDS, ids=[f"sm{cc}-{t}" for cc, t in CARDS])
def test_every_kernel_compiles_for_the_card(cc, dtype):
    built = {}
    for name, (kernel, types, constexprs, options) in kernels(dtype).items():
        assert set(types) | set(constexprs) == set(kernel.arg_names), name  # the test knows every argument
        signature = {arg: types.get(arg, "constexpr") for arg in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", cc, 32),
                                  options=options)
        built[name] = compiled.asm["ptx"]
        assert f".target sm_{cc}" in built[name], name
    # on Ampere and Hopper the 4-bit matmul runs on the tensor cores; Triton 3.6 gives Turing fp32 FMAs instead
    assert bool(re.search(r"^\s*(wgmma|mma)\.", built["nf4mm"], re.M)) == (cc >= 80)
