"""The project's Triton kernels (the chat engine's, and the training's nf4 dequantize and RoPE backward) run on the
CPU in Triton's interpreter (`TRITON_INTERPRET=1`: each program in NumPy, one after another): their results against
plain torch, and the properties the engine relies on (a row's bits never depend on its neighbours, its length bucket
or what lies past its position; the split-K sum in nf4mm's last arriving program, and its counters left at zero). The
GPU tests (`tests/test_*_gpu.py`) hold the compiled kernels to the libraries on the card; these catch a wrong index
or mask in CI, without one.

Each check (`tests/interpreted_checks.py`) runs in a process of its own started with TRITON_INTERPRET=1. The
interpreter's bf16 is no bit-level bf16, so nf4mm's bitcast of its code table is checked in fp16 here (bf16 on the
GPU tests); attention runs in both.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CHECKS = ["attention_reads_each_rows_own_length_alone_batched_and_in_any_bucket('float16')",
          "attention_reads_each_rows_own_length_alone_batched_and_in_any_bucket('bfloat16')",
          "nf4mm_sums_its_split_k_partials_in_the_kernel_and_rows_stay_independent()",
          "rms_norm_rope_and_silu_mul_do_transformers_arithmetic()",
          "the_triton_dequantize_gives_bitsandbytes_bits()",
          "the_triton_rope_backward_does_the_compiled_steps_arithmetic()"]


@pytest.mark.parametrize("check", CHECKS, ids=[c.replace("('", "-").replace("()", "").rstrip("')") for c in CHECKS])
def test_the_chat_kernels_in_tritons_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", f"import interpreted_checks as c; c.{check}"], env=env, cwd=TESTS,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
