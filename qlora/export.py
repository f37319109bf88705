"""Merged export: a run's adapter folded into the base's own 16-bit safetensors, a standalone model folder.

    runs/<name>/export/   model*.safetensors (+ index), config.json, generation_config.json, the tokenizer,
                          README.md (the run's reproducibility card), config.yaml, prompt_format.json, versions.json

The merge reads the base's own safetensors files, never the 4-bit copy training used (dequantizing nf4 would bake
its rounding into the export). Each shard is copied, then only the LoRA-targeted weights are rewritten in place,
W + scaling * B @ A computed in fp32 and cast back to W's dtype, one weight at a time. Peak memory is one weight
matrix plus the adapter, not one shard: Llama-2-7B's first shard is 10 GB, and loading it whole and serializing it
again would need two copies of it, more than a T4 Space's 15 GB of RAM. The folder is written under a temp name,
verified, then renamed (runs.save_folder_atomically), so a full disk or a kill mid-merge leaves nothing that looks
complete. GGUF is not written here: see README ("Export").
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import runs
from .config import EMBEDDED_MODEL
from .config import hub_token
from .device import BusyError
from .model import HUB_SKIP
from .prompts import LLAMA2, PromptFormat

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
NOT_SAFETENSORS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack")
# What a Hub base contributes to the export: its weights, its config and its tokenizer, nothing that runs code.
HUB_FILES = ["*.safetensors", INDEX, "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
             "*.model", "chat_template*", "added_tokens.json", "LICENSE*", "USE_POLICY*"]
RUN_FILES = ("config.yaml", "prompt_format.json", "versions.json")
PREFIX = "base_model.model."  # peft's prefix on every key of a saved adapter

# The Llama 2 format of qlora/prompts.py as a chat template, so the exported tokenizer's apply_chat_template writes
# exactly the string the adapter was trained on (a base such as SmolLM2 ships another template).
LLAMA2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] | trim -%}"
    "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + (message['content'] | trim) -%}"
    "{%- else -%}{%- set content = message['content'] | trim -%}{%- endif -%}"
    "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}"
    "{%- endif -%}{%- endfor -%}")

_one_at_a_time = threading.Lock()  # an export reads and writes gigabytes: a second one waits its turn


class ExportError(ValueError):
    """An export that cannot be made; the message says why."""


@dataclass
class LoraWeight:
    """One targeted weight: the base key it updates and its low-rank update, kept in the adapter's dtype."""

    key: str
    a: object  # torch.Tensor, r x in
    b: object  # torch.Tensor, out x r
    scaling: float
    fan_in_fan_out: bool


def export_run(run_dir: str | Path, token: str | None = None,
               progress: Callable[[str], None] = lambda line: None) -> Path:
    """Merge run_dir's adapter into its base's own weights; returns run_dir/export. One export at a time.

    `token` is a Hub token for a gated base; passed to the download call only, never stored.
    """
    if not _one_at_a_time.acquire(blocking=False):
        raise BusyError("another export is running; try again when it is done")
    try:
        run_dir = Path(run_dir)
        cfg = runs.run_config(run_dir)
        fmt = runs.prompt_format(run_dir)
        lora = read_adapter(run_dir / runs.ADAPTER)
        base = base_folder(cfg.base_model, token, progress, cfg.allow_local_model)
        shards = shard_files(base)
        _refuse_quantized(base)
        progress(f"merging {len(lora)} LoRA weights into {len(shards)} shard(s) of {cfg.base_model}")

        def write(tmp: Path) -> None:
            tmp.mkdir()
            _write_config_and_tokenizer(base, tmp, fmt)  # first: a tokenizer that cannot load fails in seconds
            merged: set[str] = set()
            for i, shard in enumerate(shards, start=1):
                merged |= merge_shard(base / shard, tmp / shard, lora)
                progress(f"shard {i}/{len(shards)}: {shard}")
            missing = sorted(set(lora) - merged)
            if missing:
                raise ExportError(f"the adapter updates {missing[0]}, which the base checkpoint does not have "
                                  f"({len(missing)} such weights): this adapter does not belong to this base")
            if (base / INDEX).exists():
                shutil.copyfile(base / INDEX, tmp / INDEX)
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    shutil.copyfile(run_dir / name, tmp / name)
            (tmp / "README.md").write_text(model_card(run_dir), encoding="utf-8")

        out = runs.save_folder_atomically(run_dir, runs.EXPORT, write, lambda tmp: verify_export(tmp, shards))
        progress(f"exported: {out}")
        return out
    finally:
        _one_at_a_time.release()


# --- the inputs ------------------------------------------------------------------------------------------
def base_folder(base_model: str, token: str | None = None, progress: Callable[[str], None] = lambda line: None,
                allow_local: bool = True) -> Path:
    """A local folder with the base's safetensors, config and tokenizer (a Hub base is downloaded, safetensors only).
    allow_local as the run had it: a run started from the app reads no folder of this machine but the models folder."""
    from .model import local_folder, materialize_embedded, resolve

    if base_model == EMBEDDED_MODEL:
        return materialize_embedded()
    folder = local_folder(base_model, allow_local)
    if folder is not None:
        return folder
    resolve(base_model)  # a malformed id gets the loader's message
    from huggingface_hub import snapshot_download

    progress(f"fetching {base_model}'s safetensors (once; from the local cache if training downloaded them)")
    try:
        return Path(snapshot_download(base_model, allow_patterns=HUB_FILES, ignore_patterns=HUB_SKIP,
                                      token=hub_token(token)))
    except Exception as e:
        from .model import _explain

        raise _explain(base_model, e) from None


def shard_files(base: Path) -> list[str]:
    """The base's safetensors shards, in the index's order; a base stored any other way is refused."""
    if (base / INDEX).is_file():
        weight_map = json.loads((base / INDEX).read_text(encoding="utf-8")).get("weight_map") or {}
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if "/" in shard or "\\" in shard or not (base / shard).is_file():
                raise ExportError(f"{base.name}: {INDEX} names {shard!r}, which is not a file in that folder")
        return shards
    if (base / SINGLE).is_file():
        return [SINGLE]
    other = sorted({p.name for pattern in NOT_SAFETENSORS for p in base.glob(pattern)})
    if other:
        raise ExportError(f"{base.name}: the base's weights are not safetensors ({', '.join(other[:3])}); the merge "
                          "reads safetensors only (pickled weights can run code when loaded)")
    raise ExportError(f"{base.name}: no {SINGLE} or {INDEX} in the base folder: nothing to merge into")


def _refuse_quantized(base: Path) -> None:
    config = runs.read_json(base / "config.json")
    if config.get("quantization_config"):
        raise ExportError(f"{base.name}: the base checkpoint is already quantized "
                          f"({config['quantization_config'].get('quant_method', '?')}); a merge needs its 16-bit weights")


def read_adapter(adapter_dir: Path) -> dict[str, LoraWeight]:
    """The adapter's updates keyed by the base weight each one changes. Only plain LoRA is merged here."""
    from safetensors.torch import load_file

    try:
        runs.verify_adapter(adapter_dir)
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"the run has no usable adapter ({e})") from None
    unsupported = [what for what, used in (
        ("DoRA", config.get("use_dora")), ("trained full modules (modules_to_save)", config.get("modules_to_save")),
        (f"bias={config.get('bias')}", config.get("bias", "none") != "none"), ("LoRA bias", config.get("lora_bias")),
        ("alpha_pattern", config.get("alpha_pattern"))) if used]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ExportError(f"this adapter uses {', '.join(unsupported) or config.get('peft_type')}, which this export "
                          "does not merge; peft's merge_and_unload() on an unquantized base does")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora: dict[str, LoraWeight] = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[:-len(".lora_A.weight")]
        b = tensors.get(module + ".lora_B.weight")
        if b is None or a.dim() != 2:
            raise ExportError(f"adapter: {module} has lora_A without a matching lora_B")
        rank = a.shape[0]  # the module's own rank (rank_pattern may set it per module)
        key = module.removeprefix(PREFIX) + ".weight"
        lora[key] = LoraWeight(key, a, b, runs.lora_scaling(config, module.removeprefix(PREFIX), rank),
                               bool(config.get("fan_in_fan_out")))
    if not lora:
        raise ExportError("the adapter holds no LoRA weights")
    leftovers = [n for n in tensors if ".lora_A." not in n and ".lora_B." not in n]
    if leftovers:
        raise ExportError(f"the adapter also holds {leftovers[0]}, which a LoRA merge does not cover")
    return lora


# --- the merge --------------------------------------------------------------------------------------------
def merge_shard(src: Path, dst: Path, lora: dict[str, LoraWeight]) -> set[str]:
    """Copy one shard, then rewrite its targeted weights in place; returns the keys merged.

    The header (names, dtypes, shapes, offsets) is unchanged by a merge, so each merged weight goes back to the
    same bytes of the copy. Only one weight (and its fp32 copy) is in memory at a time: the shard is opened anew for
    each weight, because safe_open maps the whole file and every page a read touched would stay resident (and
    counted) until it is closed.
    """
    import torch
    from safetensors import safe_open

    shutil.copyfile(src, dst)
    entries, data_start = runs.safetensors_header(src)
    targets = [k for k in entries if k in lora]
    with open(dst, "r+b") as out:
        for key in targets:
            with safe_open(str(src), framework="pt") as f:
                w = f.get_tensor(key)
            up = lora[key]
            delta = up.b.float() @ up.a.float()
            if up.fan_in_fan_out:
                delta = delta.T
            if delta.shape != w.shape:
                raise ExportError(f"{key}: the adapter's update is {tuple(delta.shape)}, the base weight "
                                  f"{tuple(w.shape)}: this adapter does not belong to this base")
            merged = (w.float() + up.scaling * delta).to(w.dtype).contiguous()
            begin, end = entries[key]["data_offsets"]
            data = merged.reshape(-1).view(torch.uint8).numpy()
            assert data.nbytes == end - begin, key  # same dtype and shape: same bytes, same place
            out.seek(data_start + begin)
            out.write(data)
            del w, delta, merged, data
    return set(targets)


def _write_config_and_tokenizer(base: Path, out: Path, fmt: PromptFormat) -> None:
    """config.json as the base has it, a generation config, and the tokenizer with a chat template that writes the
    format the adapter learnt: Llama 2's, or the template the run saved (the model's own, or the fallback)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    shutil.copyfile(base / "config.json", out / "config.json")
    if (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(base)).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    tokenizer.chat_template = LLAMA2_TEMPLATE if fmt.name == LLAMA2 else fmt.template
    tokenizer.save_pretrained(out)


def verify_export(folder: Path, shards: list[str]) -> None:
    """Raise unless every shard is complete and the config and tokenizer files are there and parse."""
    for shard in shards:
        runs.safetensors_header(folder / shard)  # raises unless whole: the size its header says, no more
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md"):
        if not (folder / name).is_file():
            raise OSError(f"{folder}: {name} missing after the export")
    json.loads((folder / "config.json").read_text(encoding="utf-8"))


# --- the card ---------------------------------------------------------------------------------------------
def model_card(run_dir: Path, repo_id: str = "") -> str:
    """README.md of the merged model: what it is, how to load it, and the run's reproducibility card."""
    meta = runs.read_json(run_dir / "run.json")
    base = meta.get("base_model", "?")
    lines = [
        "---", f"base_model: {base}", "library_name: transformers", "tags: [qlora, lora, merged]", "---",
        f"# {repo_id or run_dir.name}", "",
        f"`{base}` with the LoRA adapter of run `{run_dir.name}` merged into its weights (in the base checkpoint's "
        "own dtype, not the 4-bit copy used in training). It loads without peft:", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained({repo_id or 'path/to/this/folder'!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({repo_id or 'path/to/this/folder'!r})", "```", "",
        "", _format_note(run_dir), "", reproducibility(run_dir)]
    return "\n".join(lines) + "\n"


def _format_note(run_dir: Path) -> str:
    """The prompt format the adapter was trained in, which the exported tokenizer's chat template writes."""
    try:
        what = runs.prompt_format(run_dir).describe()
    except ValueError:
        return "The prompt format it was trained in is unknown (prompt_format.json is damaged)."
    return (f"Trained in this {what}. The tokenizer's chat template writes that format: prompt the model with "
            "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` (prompt_format.json has it too).")


def reproducibility(run_dir: Path) -> str:
    """The run's reproducibility card as markdown: status, data, figures, config, versions, the command."""
    meta = runs.read_json(run_dir / "run.json")
    metrics = meta["metrics"] if isinstance(meta.get("metrics"), dict) else {}
    created = meta.get("created")
    out = ["## Reproducibility card", "",
           f"- run: `{run_dir.name}`, {meta.get('status', '?')} at step {meta.get('step', '?')}"
           + (f", {time.strftime('%Y-%m-%d', time.gmtime(created))}" if isinstance(created, (int, float)) else ""),
           f"- base model: `{meta.get('base_model', '?')}`; dataset: `{meta.get('dataset', '?')}`; precision: "
           f"{meta.get('precision', '?')}"]
    for label, key in (("first train loss", "first_loss"), ("final train loss", "final_loss"),
                       ("final eval loss", "final_eval_loss")):
        if isinstance(metrics.get(key), (int, float)):
            out.append(f"- {label}: {metrics[key]:.4f}")
    from .evaluate import load, summary

    card = load(run_dir)
    if card:
        out += ["", "### Evaluation (eval.json)", "", "```", *summary(card), "```"]
    if (run_dir / "config.yaml").is_file():
        out += ["", "### Training config (config.yaml)", "", "```yaml",
                (run_dir / "config.yaml").read_text(encoding="utf-8").strip(), "```", "",
                "Train again with `python -m qlora train --config config.yaml` (this repository's CLI)."]
    versions = runs.read_json(run_dir / "versions.json")
    if versions:
        out += ["", "### Library versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(out)
