"""Which base model an adapter was trained on, and whether it fits the base that is loaded: checked before peft loads it.

Without this, an adapter from another base fails deep inside peft's load_state_dict with a size-mismatch traceback
of dozens of lines. The recorded base is adapter_config.json's base_model_name_or_path: a Hub id, or the folder the
base was loaded from (a Hub cache snapshot, the embedded model's cache, any local folder).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from .config import EMBEDDED_MODEL, is_hub_id
from .model import ModelError

# huggingface_hub's cache layout: .../models--owner--name/snapshots/<revision>
_HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")
# peft's names for a LoRA matrix of module M: base_model.model.M.lora_A.weight (rank x in), .lora_B. (out x rank);
# the chat engine reads adapters by the same names
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def check(adapter_dir: str | Path, base_model: str, loaded_base: Callable[[], Any]) -> None:
    """Raise ModelError naming the base this adapter needs unless it fits `base_model`.

    The names are compared first, so a base that is plainly another model is not loaded for nothing; when a name
    says nothing certain (a local folder), the shapes decide: every LoRA matrix's size, read from the safetensors
    header, against the layer of the model loaded_base() returns.
    """
    folder = Path(adapter_dir)
    run = folder.parent.name if folder.name == "adapter" else folder.name
    recorded = recorded_base(folder)
    needs, have = identity(recorded), identity(base_model)
    if needs and have and needs != have:
        raise ModelError(f"{run}: this adapter was trained on {needs}, not {have}; chat with base {needs}")
    misfit = first_misfit(folder / "adapter_model.safetensors", loaded_base())
    if misfit:
        raise ModelError(f"{run}: this adapter does not fit {base_model} ({misfit}); it was trained on "
                         f"{needs or recorded or 'another base'}")


def recorded_base(adapter_dir: Path) -> str:
    try:
        value = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def identity(name: str) -> str | None:
    """The model a name stands for, where the name alone says so: a Hub id (also as a Hub cache snapshot folder)
    or the embedded model (also as its cache folder). None for any other folder: its contents decide."""
    if not name:
        return None
    posix = name.replace("\\", "/")
    if name == EMBEDDED_MODEL or posix.rstrip("/").rsplit("/", 1)[-1] == EMBEDDED_MODEL:
        return EMBEDDED_MODEL
    cached = _HUB_CACHE.search(posix)
    if cached:
        return f"{cached[1]}/{cached[2]}"
    if is_hub_id(name) and not Path(name).expanduser().is_dir():
        return name
    return None


def first_misfit(weights: Path, model: Any) -> str | None:
    """The first LoRA matrix whose size does not fit its layer in `model`, said in a few words; None if all fit."""
    from .runs import safetensors_header

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel: the model inside
    entries, _ = safetensors_header(weights)
    for key in sorted(entries):
        match = LORA_KEY.fullmatch(key)
        if not match:
            continue
        module_name, which = match.groups()
        try:
            layer = base.get_submodule(module_name)
        except AttributeError:
            return f"the base has no layer {module_name}"
        shape = entries[key]["shape"]
        need, side = (shape[-1], "in_features") if which == "A" else (shape[0], "out_features")
        have = getattr(layer, side, None)
        if isinstance(have, int) and have != need:
            return f"{module_name} has {side}={have}, the adapter's lora_{which} expects {need}"
    return None
