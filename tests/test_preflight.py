"""The preflight in the core: it reports the memory estimate of the plan that will run (qlora/speed.py's own), says
which plan that is, and its verdict follows that figure; a GPU that torch cannot use is named, with its driver."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from qlora import device, speed
from qlora.config import TrainConfig
from qlora.device import Card
from qlora.preflight import preflight

T4 = Card(cuda=True, name="Tesla T4", total_gib=15.0, free_gib=14.6, bf16=False, budget_gib=15.0)
# as device.card() describes a real T4: compute capability 7.5, fp16 matmuls at ~40 TFLOP/s
TURING_T4 = Card(cuda=True, name="Tesla T4", total_gib=15.0, free_gib=14.6, bf16=False, budget_gib=15.0,
                 capability=(7, 5), tflops=40.0)
SETTINGS = [dict(), dict(max_length=4096), dict(batch_size=16), dict(batch_size=16, max_length=4096)]


@pytest.fixture(scope="module")
def llama_7b_config(tmp_path_factory):
    """A folder holding only the 7B shape's config.json: nothing to load, which the preflight never does."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-7b-shape")
    LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                vocab_size=32000).to_json_file(folder / "config.json")
    return folder


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("setting", SETTINGS)
def test_the_figure_is_the_plans_and_the_verdict_follows_it(llama_7b_config, tmp_path, setting, checkpointing):
    from transformers import LlamaConfig

    cfg = TrainConfig(base_model=str(llama_7b_config), dataset="sample", gradient_checkpointing=checkpointing,
                      **setting)
    pf = preflight(cfg, runs_root=tmp_path, on=T4)
    arch = speed.Arch.of(LlamaConfig.from_json_file(llama_7b_config / "config.json"))
    planned = speed.plan(cfg, arch, "fp16", budget_gib=15.0, cuda=True)  # what build_trainer runs on this card
    assert pf.plan == planned and pf.estimate_gib == planned.estimated_peak_gib and pf.budget_gib == 15.0
    assert pf.ok is (planned.estimated_peak_gib <= 15.0), pf.text()
    text = pf.text()
    assert f"estimated peak GPU memory: {planned.estimated_peak_gib:.1f} GiB" in text
    assert f"gradient checkpointing on {planned.checkpointed(cfg, arch)} of 32 layers" in text
    assert "fp16 compute, LoRA weights in fp32, fused decoder layers" in text  # which plan: a T4 has no bf16
    if not pf.ok:
        assert "lower batch_size or max_length" in text and "✗ estimated peak" in text


def test_the_reference_recipe_fits_a_t4_with_or_without_checkpointing(llama_7b_config, tmp_path):
    """The case the old UI formula got wrong both ways: 8.5 GiB said for a plan that needs 11.5, and a refusal
    (42 GiB) without checkpointing where the fused plan fits."""
    for checkpointing in (True, False):
        pf = preflight(TrainConfig(base_model=str(llama_7b_config), gradient_checkpointing=checkpointing),
                       runs_root=tmp_path, on=T4)
        assert pf.ok and pf.plan.fused and pf.plan.checkpoint_layers == 0, pf.text()
        assert 11 < pf.estimate_gib < 12.5
    busy = Card(cuda=True, name="Tesla T4", total_gib=15.0, free_gib=4.0, bf16=False, budget_gib=15.0)
    pf = preflight(TrainConfig(base_model=str(llama_7b_config)), runs_root=tmp_path, on=busy)
    assert pf.ok and "more than is free now" in pf.text()  # the verdict is the budget's; what is free is said
    huge = preflight(TrainConfig(base_model=str(llama_7b_config), batch_size=16, max_length=4096,
                                 gradient_checkpointing=False), runs_root=tmp_path, on=T4)
    assert not huge.ok and huge.estimate_gib > 15 and "lower batch_size or max_length" in huge.reasons[0]


def test_on_a_t4_the_plan_keeps_what_fits_and_its_figure_counts_it(llama_7b_config, tmp_path):
    """The card's compute rate and capability reach the plan: a T4 keeps gate/up on the layers its memory allows, runs
    sdpa's memory-efficient kernel, and the preflight's figure is that plan's, kept activations included."""
    from transformers import LlamaConfig

    cfg = TrainConfig(base_model=str(llama_7b_config))
    pf = preflight(cfg, runs_root=tmp_path, on=TURING_T4)
    arch = speed.Arch.of(LlamaConfig.from_json_file(llama_7b_config / "config.json"))
    planned = speed.plan(cfg, arch, "fp16", budget_gib=15.0, cuda=True, capability=(7, 5), tflops=40.0)
    assert pf.plan == planned and pf.ok and pf.estimate_gib == planned.estimated_peak_gib
    assert planned.keep_mlp > 0 and planned.attention == "efficient" and pf.estimate_gib <= 15 * speed.KEEP_HEADROOM
    assert planned.keep_mlp + len(planned.keep_upto_tokens) == 32  # every layer keeps on the shortest batches
    assert (f"gate/up kept (16-bit) on {planned.keep_mlp} layers and on 32 layers for batches of at most "
            f"{planned.keep_upto_tokens[-1]:,} tokens, efficient attention kernel") in pf.text()
    assert pf.estimate_gib > preflight(cfg, runs_root=tmp_path, on=T4).estimate_gib  # what is kept is counted


def test_precision_and_the_plan_follow_the_card(llama_7b_config, tmp_path):
    h100 = Card(cuda=True, name="H100", total_gib=80.0, free_gib=79.0, bf16=True, budget_gib=80.0)
    pf = preflight(TrainConfig(base_model=str(llama_7b_config)), runs_root=tmp_path, on=h100)
    assert pf.ok and "precision bf16" in pf.text() and "LoRA weights in bf16" in pf.text()
    refused = preflight(TrainConfig(base_model=str(llama_7b_config), precision="bf16"), runs_root=tmp_path, on=T4)
    assert not refused.ok and "bf16 is not supported by this GPU" in refused.reasons[0]
    off_cfg = TrainConfig(base_model=str(llama_7b_config), speed="off")
    off = preflight(off_cfg, runs_root=tmp_path, on=T4)
    assert ("plan: the recipe as configured (speed: off): fp16, stock decoder layers, gradient checkpointing on 32 "
            "of 32 layers") in off.text()
    arch = speed.Arch.of(json.loads((llama_7b_config / "config.json").read_text()))
    assert off.estimate_gib == speed.plan(off_cfg, arch, "fp16", cuda=True).estimated_peak_gib


def test_on_the_cpu_the_figure_is_ram_and_quantize_none_is_said_in_words(tmp_path, tiny_llama_dir):
    cpu = Card(cuda=False)
    pf = preflight(TrainConfig(base_model=str(tiny_llama_dir), quantize="none"), runs_root=tmp_path, on=cpu)
    text = pf.text()
    assert pf.ok and "estimated peak RAM" in text and "no 4-bit quantization" in text and ", none," not in text
    assert "plan: the recipe as configured (no GPU): fp32" in text
    assert pf.estimate_gib == pf.plan.estimated_peak_gib


# --- a GPU that torch cannot use ------------------------------------------------------------------------------
DRIVER_470 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.82.01  Wed Oct 27 13:38:15 UTC 2021\nGCC version:\n"


def torch_build() -> str:
    import torch

    return f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"


def test_a_gpu_that_torch_cannot_use_is_named_with_its_driver(tmp_path):
    proc = tmp_path / "driver" / "nvidia"
    proc.mkdir(parents=True)
    (proc / "version").write_text(DRIVER_470)
    said = device.unusable_gpu(cuda=False, proc_driver=proc, smi="")
    assert "NVIDIA driver 470.82.01" in said and torch_build() in said and "runs on the CPU" in said
    # nvidia-smi's answer names the card too, with no /proc entry (a container that hides it)
    said = device.unusable_gpu(cuda=False, proc_driver=tmp_path / "absent", smi="535.104.05, Tesla T4\n")
    assert said.startswith("Tesla T4 is present (NVIDIA driver 535.104.05)") and torch_build() in said
    # no GPU at all, or torch using it: nothing to say
    assert device.unusable_gpu(cuda=False, proc_driver=tmp_path / "absent", smi="") == ""
    assert device.unusable_gpu(cuda=True, proc_driver=proc, smi="535.104.05, Tesla T4") == ""


def test_the_preflight_and_the_page_header_say_so(tmp_path, tiny_llama_dir):
    import app
    from ui.render import preflight_markdown

    proc = tmp_path / "nvidia"
    proc.mkdir()
    (proc / "version").write_text(DRIVER_470)
    problem = device.unusable_gpu(cuda=False, proc_driver=proc, smi="")
    pf = preflight(TrainConfig(base_model=str(tiny_llama_dir)), runs_root=tmp_path,
                   on=Card(cuda=False, unusable=problem))
    assert f"⚠ {problem}" in pf.lines and "470.82.01" in preflight_markdown(pf)
    assert problem in app.page_banner(tmp_path, locked=True, gpu_problem=problem)
    assert app.page_banner(tmp_path, locked=True) == ""  # nothing to warn about off a Space without a GPU problem


# --- the CLI ------------------------------------------------------------------------------------------------
def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "qlora", "train", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def test_cli_dry_run_prints_the_preflight_and_loads_nothing(llama_7b_config, tmp_path):
    runs_root = tmp_path / "runs"
    r = cli("--dry-run", "--model", str(llama_7b_config), "--dataset", "sample", "--output-dir", str(runs_root))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("preflight: ") and "plan: " in r.stdout and "estimated peak " in r.stdout
    assert "Traceback" not in r.stderr and not runs_root.exists()  # the folder has no weights: nothing was loaded
    r = cli("--dry-run", "--model", "nobody/not-cached-anywhere", "--output-dir", str(runs_root))
    assert r.returncode == 0 and "its size is unknown" in r.stdout and "cannot start" in r.stdout, r.stdout
