"""The check before a run, for the app and the CLI alike: the card and precision, which cards the run and chat use
(several GPUs), the plan that will run and its memory estimate (qlora/speed.py's own: the figure that decides what
runs), free disk, and whether the model can be reached. No model loads: only the model's config.json is read (a
local folder, the embedded model, the Hub cache or the Hub).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import EMBEDDED_MODEL, TrainConfig, hub_token, is_hub_id
from .device import GIB, Card, Placement, available_ram_gib, card, pick_precision
from .speed import HEADROOM, Arch, Plan, plan

RUN_FILES_GIB = 0.5  # adapters, checkpoints, logs
TOO_BIG = "lower batch_size or max_length, or turn gradient_checkpointing on"


@dataclass
class Preflight:
    ok: bool = True
    lines: list[str] = field(default_factory=list)  # each starts with ✓ (fine), ⚠ (worth knowing) or ✗ (refused)
    reasons: list[str] = field(default_factory=list)  # why a run cannot work; empty when ok
    plan: Plan | None = None  # the plan that will run, where the model's shape is known
    budget_gib: float | None = None  # what its estimate is held against

    @property
    def estimate_gib(self) -> float | None:
        """The plan's peak memory: GPU memory, or RAM on the CPU."""
        return self.plan.estimated_peak_gib if self.plan else None

    def good(self, text: str) -> None:
        self.lines.append(f"✓ {text}")

    def note(self, text: str) -> None:
        self.lines.append(f"⚠ {text}")

    def refuse(self, text: str) -> None:
        self.ok = False
        self.reasons.append(text)
        self.lines.append(f"✗ {text}")

    @property
    def verdict(self) -> str:
        return "ready to start" if self.ok else "this run cannot start"

    def text(self) -> str:
        """Plain text for a terminal."""
        return f"preflight: {self.verdict}\n" + "\n".join(f"  {line}" for line in self.lines)


def preflight(cfg: TrainConfig, token: str | None = None, runs_root: str | Path = "runs",
              on: Card | None = None, placement: Placement | None = None) -> Preflight:
    """Everything we can check in a second or two without loading the model. `on`: the card each process trains on
    (default: this process's, or the placement's first training card). `placement`: where the app would put the run
    and chat on a host with several GPUs (device.Cards.placement); the CLI passes none."""
    several = placement is not None and placement.gpus > 1
    on = on or card(placement.train[0] if several else None)
    pf = Preflight()
    if several:
        _check_cards(pf, placement)
    try:
        precision = pick_precision(cfg.precision, on)
    except ValueError as e:
        pf.refuse(str(e))
        precision = "fp16"
    if on.cuda:
        bf16 = "bf16 supported" if precision == "bf16" else "no bf16 on this card: fp16 compute, LoRA weights in fp32"
        pf.good(f"GPU: {on.name}, {on.total_gib:.1f} GiB, {on.free_gib:.1f} GiB free; precision {precision} ({bf16})")
    else:
        if on.unusable:
            pf.note(on.unusable)
        pf.note(f"no GPU: training runs on the CPU in {precision}; fine for {EMBEDDED_MODEL}, far too slow for a 7B")
        if cfg.quantize == "nf4":
            pf.note("nf4 on the CPU works (bitsandbytes 0.50) but buys no speed; no 4-bit quantization "
                    "(quantize: none) is faster for small models")

    model_config, where = _model_config(cfg.base_model, token, cfg.allow_local_model)
    if model_config is None:
        pf.refuse(where)
        return pf
    pf.good(where)
    try:
        arch = Arch.of(model_config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        arch = None
        pf.note("config.json does not give the model's shape (hidden_size, intermediate_size, num_hidden_layers, "
                "vocab_size): its memory is unknown")
    if arch is not None:
        _check_memory(pf, cfg, arch, precision, on)
    _check_disk(pf, runs_root, _download_gib(cfg.base_model, arch, cfg.allow_local_model) + RUN_FILES_GIB)
    return pf


def _check_cards(pf: Preflight, placement: Placement) -> None:
    n = len(placement.train)
    line = (f"GPUs: {placement.describe()}; " + (f"{n} processes, data parallel, one base each" if n > 1
                                                  else "one process") + "; the figures below are each card's")
    if placement.shared:  # visitors will be told chat waits, for the whole run
        pf.note(line)
    else:
        pf.good(line)


# --- memory: the plan's own estimate -------------------------------------------------------------------------
def _check_memory(pf: Preflight, cfg: TrainConfig, arch: Arch, precision: str, on: Card) -> None:
    pf.plan = p = plan(cfg, arch, precision, budget_gib=on.budget_gib, cuda=on.cuda, capability=on.capability,
                       tflops=on.tflops)
    pf.good(describe(p, cfg, arch))
    pf.budget_gib = on.budget_gib if on.cuda else available_ram_gib()
    what = "GPU memory" if on.cuda else "RAM"
    line = (f"estimated peak {what}: {p.estimated_peak_gib:.1f} GiB for batch {cfg.batch_size} × {cfg.max_length} "
            f"tokens ({_billions(arch.params)} params, {cfg.quantize_words}, LoRA r={cfg.lora_r}); "
            + (f"budget {pf.budget_gib:.1f} GiB, {on.free_gib:.1f} GiB free now" if on.cuda
               else f"{pf.budget_gib:.1f} GiB available"))
    if pf.budget_gib is not None and p.estimated_peak_gib > pf.budget_gib:
        pf.refuse(f"{line}: {TOO_BIG}")
    elif pf.budget_gib is not None and p.estimated_peak_gib > HEADROOM * pf.budget_gib:
        pf.note(line + ": tight")
    elif on.cuda and p.estimated_peak_gib > on.free_gib:
        pf.note(line + ": more than is free now (Train frees the chat model; other processes must end first)")
    else:
        pf.good(line)


def describe(p: Plan, cfg: TrainConfig, arch: Arch) -> str:
    """Which plan runs, in one line: fused or not, how many layers recompute, precision."""
    layers = f"gradient checkpointing on {p.checkpointed(cfg, arch)} of {arch.layers} layers"
    if p.as_configured:
        why = "speed: off" if cfg.speed == "off" else "no GPU"
        return f"plan: the recipe as configured ({why}): {p.precision}, stock decoder layers, {layers}"
    lora = "fp32" if p.lora_fp32 else "bf16"
    kind = "fused decoder layers" if p.fused else "stock decoder layers with lean norms"
    kept = f", gate/up kept ({p.keep_bits}-bit) on {p.keep_mlp} layers" if p.fused and p.keep_mlp else ""
    if p.fused and p.keep_upto_tokens:
        kept += (f"{' and' if kept else ', gate/up kept'} on {p.keep_mlp + len(p.keep_upto_tokens)} layers for "
                 f"batches of at most {p.keep_upto_tokens[-1]:,} tokens")
    attention = f", {p.attention} attention kernel" if p.attention not in (None, "flash") else ""
    return f"plan: {p.precision} compute, LoRA weights in {lora}, {kind}, {layers}{kept}{attention}"


def _billions(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


# --- the model's config: local, embedded or Hub ----------------------------------------------------------------
def _model_config(name: str, token: str | None, allow_local: bool = True) -> tuple[dict[str, Any] | None, str]:
    """(config dict, a line saying where it came from) or (None, why it cannot be reached).

    allow_local=False (a visitor's form): only the embedded model, the server's models folder and the Hub, as in
    training.
    """
    from .model import ModelError, local_folder, resolve

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
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return _read_config(Path(cached)), f"model: {repo} (in the local Hub cache)"
    unreachable = f"model: cannot reach the Hub to fetch {repo}, and it is not cached here (its size is unknown)"
    if not _hub_reachable():  # fail in a second, not after the client's retries
        return None, unreachable
    try:
        path = hf_hub_download(repo, "config.json", token=hub_token(token), etag_timeout=5)
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
    if not isinstance(data, dict):
        return {}
    text = data.get("text_config")  # multimodal configs keep the language model's shape here
    return text if isinstance(text, dict) else data


# --- disk --------------------------------------------------------------------------------------------------
def _download_gib(name: str, arch: Arch | None, allow_local: bool = True) -> float:
    """What fetching the weights costs on disk: nothing for local or cached models, ~2 bytes a param otherwise."""
    from huggingface_hub import try_to_load_from_cache

    from .model import local_folder

    if arch is None or name == EMBEDDED_MODEL or local_folder(name, allow_local) is not None:
        return 0
    for weights in ("model.safetensors", "model.safetensors.index.json"):
        if isinstance(try_to_load_from_cache(name, weights), str):
            return 0
    return arch.params * 2 / GIB


def _check_disk(pf: Preflight, runs_root: str | Path, need_gib: float) -> None:
    root = Path(runs_root)
    probe = root if root.exists() else next((p for p in root.absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free / GIB
    line = f"disk: {free:.1f} GiB free where runs are saved; this run needs about {need_gib:.1f} GiB"
    if free < need_gib:
        pf.refuse(line + ": free some space")
    else:
        pf.good(line)
