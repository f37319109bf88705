"""The check a user reads before Start: card, precision, estimated peak memory, free disk, can the model be reached.

No gradio here: `preflight(cfg, token)` returns lines and a verdict, so the CLI or a test can call it too.
The memory figure is an estimate from the model's config (a formula, not a measurement); it errs high.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora.config import EMBEDDED_MODEL, TrainConfig

GIB = 2**30
CUDA_OVERHEAD = 0.6 * GIB  # context, cuBLAS workspace, allocator slack
SAFETY = 1.05  # allocator slack; the formula already errs high (see estimate_peak_bytes)


@dataclass
class Preflight:
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why a run cannot work; empty when ok

    def good(self, text: str) -> None:
        self.lines.append(f"✓ {text}")

    def note(self, text: str) -> None:
        self.lines.append(f"⚠ {text}")

    def refuse(self, text: str) -> None:
        self.ok = False
        self.reasons.append(text)
        self.lines.append(f"✗ {text}")

    def markdown(self) -> str:
        head = "**Preflight: ready to start.**" if self.ok else "**Preflight: this run cannot start.**"
        return head + "\n\n" + "\n".join(f"- {line}" for line in self.lines)


def preflight(cfg: TrainConfig, token: str | None = None, runs_root: str | Path = "runs") -> Preflight:
    """Everything we can check in a second or two without loading the model."""
    from qlora.model import ModelError, pick_precision

    pf = Preflight()
    device = _device()
    try:
        precision = pick_precision(cfg.precision)
    except ModelError as e:
        pf.refuse(str(e))
        precision = "fp16"
    if device["cuda"]:
        bf16 = "bf16 supported" if precision == "bf16" else "no bf16 on this card: fp16 compute, LoRA weights in fp32"
        pf.good(f"GPU: {device['name']}, {device['total'] / GIB:.1f} GiB, {device['free'] / GIB:.1f} GiB free; "
                f"precision {precision} ({bf16})")
    else:
        pf.note(f"no GPU: training runs on the CPU in {precision}; fine for {EMBEDDED_MODEL}, far too slow for a 7B")
        if cfg.quantize == "nf4":
            pf.note("nf4 on the CPU works (bitsandbytes 0.50) but buys no speed; quantize=none is faster for small models")

    model_config, where = _model_config(cfg.base_model, token, cfg.allow_local_model)
    if model_config is None:
        pf.refuse(where)
    else:
        pf.good(where)
        est = estimate_peak_bytes(model_config, cfg, precision)
        free = device["free"] if device["cuda"] else _available_ram()
        what = "GPU memory" if device["cuda"] else "RAM"
        line = (f"estimated peak {what}: {est / GIB:.1f} GiB for batch {cfg.batch_size} × {cfg.max_length} tokens "
                f"({_billions(count_params(model_config))} params, {cfg.quantize}, LoRA r={cfg.lora_r}); "
                f"{free / GIB:.1f} GiB free")
        if est > free:
            pf.refuse(line + ": lower batch_size or max_length, or turn gradient_checkpointing on")
        elif est > 0.85 * free:
            pf.note(line + ": tight")
        else:
            pf.good(line)
        # + adapters, checkpoints, logs
        need_disk = _download_bytes(cfg.base_model, model_config, cfg.allow_local_model) + 0.5 * GIB
        _check_disk(pf, runs_root, need_disk)
    return pf


# --- memory --------------------------------------------------------------------------------------------
def _dims(c: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    h = int(c.get("hidden_size") or c.get("n_embd") or 4096)
    inter = int(c.get("intermediate_size") or 4 * h)
    layers = int(c.get("num_hidden_layers") or c.get("n_layer") or 32)
    vocab = int(c.get("vocab_size") or 32000)
    heads = int(c.get("num_attention_heads") or 32)
    kv = int(c.get("num_key_value_heads") or heads)
    kv_dim = h // heads * kv
    return h, inter, layers, vocab, kv_dim, heads


def count_params(c: dict[str, Any]) -> int:
    h, inter, layers, vocab, kv_dim, _ = _dims(c)
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter  # q, o, k, v, gate/up/down
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings


def lora_params(c: dict[str, Any], cfg: TrainConfig) -> int:
    h, inter, layers, _, kv_dim, _ = _dims(c)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv_dim), "v_proj": (h, kv_dim), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    targets = shapes if cfg.target_modules == ["all-linear"] else {m: shapes.get(m, (h, h)) for m in cfg.target_modules}
    return layers * sum(cfg.lora_r * (i + o) for i, o in targets.values())


def estimate_peak_bytes(c: dict[str, Any], cfg: TrainConfig, precision: str) -> float:
    """Weights + LoRA training state + activations + logits, for one full micro-batch of max_length rows.

    Calibration: the seed recipe (7B, nf4, q/v r=64, batch 4 x 1024, checkpointing) peaked at 5.9 GiB allocated on
    an H100 (bench/README.md); this says about 8 GiB with the CUDA context, high on purpose: a refusal that was not
    needed costs a retry, an OOM an hour.
    """
    h, inter, layers, vocab, kv_dim, _ = _dims(c)
    act_bytes = 4 if precision == "fp32" else 2
    embed = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    body = count_params(c) - embed
    weights = body * (0.5 + 0.03 if cfg.quantize == "nf4" else act_bytes) + embed * act_bytes  # nf4: 4 bits + absmax
    lora = lora_params(c, cfg) * 16  # fp32 weight + grad + two Adam moments
    tokens = cfg.batch_size * cfg.max_length
    # Per layer: ~34 values per hidden unit without checkpointing (Korthikanti et al., with fused attention);
    # with checkpointing only each layer's input is kept, plus one layer's full set during its recompute.
    per_layer = tokens * h * act_bytes
    acts = per_layer * (layers + 34) if cfg.gradient_checkpointing else per_layer * 34 * layers
    acts += tokens * inter * act_bytes * 3 * (1 if cfg.gradient_checkpointing else 0)
    logits = tokens * vocab * 4 * 2  # fp32 logits and their gradient
    return SAFETY * (weights + lora + acts + logits) + (CUDA_OVERHEAD if _device()["cuda"] else 0)


def _billions(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


# --- the model's config: local, embedded or Hub ----------------------------------------------------------
def _model_config(name: str, token: str | None, allow_local: bool = True) -> tuple[dict[str, Any] | None, str]:
    """(config dict, a line saying where it came from) or (None, why it cannot be reached).

    allow_local=False (a visitor's form): only the embedded model, models_dir() and the Hub, as in training.
    """
    from qlora.config import is_hub_id
    from qlora.model import ModelError, local_folder, resolve

    try:
        if name == EMBEDDED_MODEL:
            path = Path(resolve(name))
            return _read_config(path / "config.json"), f"model: {EMBEDDED_MODEL} (embedded, on disk, no download)"
        path = local_folder(name, allow_local)
    except ModelError as e:
        return None, f"model: {e}"
    if path is not None:
        if not (path / "config.json").is_file():
            return None, f"model: {name}: a folder without config.json"
        return _read_config(path / "config.json"), f"model: local folder {path.name}"
    if not is_hub_id(name):
        return None, f"model: {name[:100]!r} is not a folder and not a valid Hub id (owner/name)"
    return _hub_config(name, token)


def _hub_config(repo: str, token: str | None) -> tuple[dict[str, Any] | None, str]:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub import errors as hub_errors

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return _read_config(Path(cached)), f"model: {repo} (in the local Hub cache)"
    unreachable = f"model: cannot reach the Hub to fetch {repo}, and it is not cached here"
    if not _hub_reachable():  # fail in a second, not after the client's retries
        return None, unreachable
    try:
        path = hf_hub_download(repo, "config.json", token=token or None, etag_timeout=5)
    except hub_errors.GatedRepoError:
        return None, (f"model: {repo} is gated: accept its license on the Hub, then give a token (field or the "
                      "HF_TOKEN secret) that has access")
    except hub_errors.RepositoryNotFoundError:
        return None, f"model: {repo}: no such model on the Hub (or it is private: give a token)"
    except hub_errors.LocalEntryNotFoundError:  # offline mode, or the connection dropped
        return None, unreachable
    except hub_errors.EntryNotFoundError:
        return None, f"model: {repo} has no config.json; is it a transformers model?"
    except Exception as e:  # DNS, timeouts, proxies: all mean "cannot reach"
        return None, f"{unreachable} ({type(e).__name__})"
    return _read_config(Path(path)), f"model: {repo} reachable on the Hub"


def _hub_reachable(timeout: float = 3.0) -> bool:
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("text_config", data) if isinstance(data, dict) else {}


# --- device, RAM, disk ---------------------------------------------------------------------------------
def _device() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "name": "CPU", "free": 0, "total": 0}
    free, total = torch.cuda.mem_get_info()
    return {"cuda": True, "name": torch.cuda.get_device_name(), "free": free, "total": total}


def _available_ram() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _download_bytes(name: str, c: dict[str, Any], allow_local: bool = True) -> float:
    """What fetching the weights costs on disk: nothing for local or cached models, ~2 bytes a param otherwise."""
    from huggingface_hub import try_to_load_from_cache

    from qlora.model import local_folder

    if name == EMBEDDED_MODEL or local_folder(name, allow_local) is not None:
        return 0
    for weights in ("model.safetensors", "model.safetensors.index.json"):
        if isinstance(try_to_load_from_cache(name, weights), str):
            return 0
    return count_params(c) * 2


def _check_disk(pf: Preflight, runs_root: str | Path, need: float) -> None:
    root = Path(runs_root)
    probe = root if root.exists() else next((p for p in root.absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    line = f"disk: {free / GIB:.1f} GiB free where runs are saved; this run needs about {need / GIB:.1f} GiB"
    if free < need:
        pf.refuse(line + ": free some space")
    else:
        pf.good(line)
