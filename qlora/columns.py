"""Per-row LoRA adapters inside a static-shape decode step: the slot engine's adapter columns.

Every decoder Linear that the engine's adapters target gets two static buffers, A [in, C] and B [C, out]
(`AdapterColumns`). An adapter in use occupies a run of those C columns (A^T, and B^T with peft's scaling folded in);
each row has a mask of the columns its adapter owns, so the update is x A, masked, times B. A base row's mask is empty
and its update is an exact zero: base rows stay exactly base. So visitors with different adapters (or none) share one
step whose shapes never change.

Also here: reading a peft adapter folder into that form (`read_adapter`, scaling folded into B), where a new adapter's
columns go (`find_room`) and what the columns cost in memory (`column_bytes`, for `slots.plan`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch  # imported only where the slot engine starts (`import qlora` stays light)

from . import adapter_base, runs

COLUMN_GRAIN = 16  # adapters take columns in units of 16 (tensor-core tiles)


@dataclass
class LoraWeights:
    """One adapter's weights per module path: (A [r, in], B * scaling [out, r]), and the widest rank."""
    modules: dict
    rank: int


def read_adapter(folder: Path) -> LoraWeights:
    """A peft LoRA adapter folder, read with its scaling folded into B. Anything but plain LoRA on Linears is
    refused."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: a {cfg.get('peft_type')} adapter; the chat engine serves LoRA adapters only")
    for key in ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices"):
        if cfg.get(key):
            raise ValueError(f"{folder}: the adapter uses {key}, which the chat engine does not serve")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        m = adapter_base.LORA_KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{folder}: unexpected tensor {key!r} (only lora_A/lora_B weights are served)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    modules, rank = {}, 0
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder}: module {path} has no lora_{'B' if 'A' in ab else 'A'} weight")
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        if b.shape[1] != r:
            raise ValueError(f"{folder}: module {path}: lora_A has rank {r}, lora_B {b.shape[1]}")
        modules[path] = (a, b * runs.lora_scaling(cfg, path, r))
        rank = max(rank, r)
    if not modules:
        raise ValueError(f"{folder}: the adapter holds no LoRA weights")
    return LoraWeights(modules, rank)


class SlotLinear(torch.nn.Module):
    """A decoder Linear plus the adapter columns' update for each row (see the module doc)."""

    def __init__(self, base, columns: int, holder):
        super().__init__()
        self.base = base
        where = dict(dtype=holder.dtype, device=holder.device)
        self.register_buffer("lora_a", torch.zeros(base.in_features, columns, **where))
        self.register_buffer("lora_b", torch.zeros(columns, base.out_features, **where))
        self.holder = holder  # a plain object: its `mask` is the current rows' column mask

    def forward(self, x):
        out = self.base(x)
        xa = x.to(self.lora_a.dtype) @ self.lora_a
        # where, not multiply: a row without this adapter gets an exact 0 even if x A overflowed
        xa = torch.where(self.holder.mask[:, None, :], xa, 0)
        return out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), self.lora_b).view(out.shape)


class DequantLinear(torch.nn.Module):
    """A 4-bit Linear computed as dequantize + one cuBLAS matmul at every row count: the strict path, for cards where
    bitsandbytes' own small-batch kernels were found not to give the same bits run after run (see `check_exact`)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x):
        import bitsandbytes.functional as bf

        w = self.base.weight
        weight = bf.dequantize_4bit(w.data, w.quant_state).to(x.dtype)
        return torch.nn.functional.linear(x, weight, self.base.bias)


class AdapterColumns:
    """The LoRA columns of the decoder Linears adapters target, which adapter owns which run of them, and each row's
    column mask. Only the targeted Linears carry columns: each costs four kernels and its A/B reads every step."""

    def __init__(self, model, columns: int, rows: int, dtype, device, targets=None, strict: bool = False,
                 nf4: bool = False, prefill_rows: int = 1):
        from .nf4mm import NF4Linear, fits

        self.columns, self.dtype, self.device = columns, dtype, device
        self.decode_mask = torch.zeros(rows, columns, dtype=torch.bool, device=device)
        self.prefill_mask = torch.zeros(prefill_rows, columns, dtype=torch.bool, device=device)
        self.mask = self.decode_mask  # what the SlotLinears read; the prefill swaps its own rows in
        self.prefilling = False  # a prompt runs through the model (eager): NF4Linears keep bitsandbytes' path
        self.placed: dict[str, tuple[int, int]] = {}  # adapter name -> (first column, width)
        self.linears: dict[str, torch.nn.Module] = {}
        self._originals: list[tuple] = []
        layers = decoder_layers(model)
        prefix = next(name for name, m in model.named_modules() if m is layers)
        self.served = set()  # every decoder Linear's path: what an adapter may target
        self.nf4_linears = 0  # 4-bit Linears whose decode matmuls run the nf4mm kernel
        self.four_bit = False  # the decoder has 4-bit Linears at all
        try:  # (a failure leaves the model as it was)
            for name, module in list(layers.named_modules()):
                if isinstance(module, torch.nn.Linear):
                    path = f"{prefix}.{name}"
                    self.served.add(path)
                    four_bit = getattr(module.weight, "quant_state", None) is not None
                    self.four_bit |= four_bit
                    wrapped = module
                    if strict and four_bit:
                        wrapped = DequantLinear(module)
                    elif nf4 and fits(module) and dtype in (torch.bfloat16, torch.float16):
                        wrapped = NF4Linear(module, dtype, self)  # the decode step's rows straight from the 4-bit data
                        self.nf4_linears += 1
                    if targets is None or path in targets:
                        wrapped = SlotLinear(wrapped, columns, self)
                        self.linears[path] = wrapped
                    if wrapped is not module:
                        parent_name, _, child = name.rpartition(".")
                        parent = layers.get_submodule(parent_name) if parent_name else layers
                        setattr(parent, child, wrapped)
                        self._originals.append((parent, child, module))
        except BaseException:
            self.restore()
            raise
        for m in self.linears.values():
            torch._dynamo.mark_static_address(m.lora_a)
            torch._dynamo.mark_static_address(m.lora_b)

    def restore(self) -> None:
        """Put the original Linears back (the model is the plain base again)."""
        for parent, child, module in self._originals:
            setattr(parent, child, module)
        self._originals.clear()

    def place(self, name: str, weights: LoraWeights, start: int) -> None:
        """Copy an adapter into columns [start, start + width); modules it does not target get zeros there."""
        width = round_up(weights.rank, COLUMN_GRAIN)
        unknown = sorted(set(weights.modules) - set(self.linears))
        if unknown:
            raise ValueError(f"the adapter targets {unknown[0]}, which has no adapter columns in this engine"
                             + ("" if unknown[0] in self.served else " (not a Linear of the model's decoder layers)"))
        for path, m in self.linears.items():
            m.lora_a[:, start:start + width].zero_()
            m.lora_b[start:start + width].zero_()
            if path in weights.modules:
                a, b = weights.modules[path]
                if a.shape[1] != m.lora_a.shape[0] or b.shape[0] != m.lora_b.shape[1]:
                    raise ValueError(f"the adapter does not fit this base model: {path} takes {m.lora_a.shape[0]} "
                                     f"inputs and gives {m.lora_b.shape[1]}; the adapter's weights are {a.shape[1]} "
                                     f"in and {b.shape[0]} out (trained on another base?)")
                r = a.shape[0]
                m.lora_a[:, start:start + r].copy_(a.t())
                m.lora_b[start:start + r].copy_(b.t())
        self.placed[name] = (start, width)

    def row_mask(self, name: str | None):

        mask = torch.zeros(self.columns, dtype=torch.bool, device=self.device)
        if name is not None:
            start, width = self.placed[name]
            mask[start:start + width] = True
        return mask


def round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def decoder_layers(model):
    """The model's list of decoder layers (Llama-style: model.model.layers)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found")
    return layers


def column_bytes(model, columns: int, dtype_bytes: int, targets=None) -> int:
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    return sum((m.in_features + m.out_features) * columns * dtype_bytes for name, m in layers.named_modules()
               if isinstance(m, torch.nn.Linear) and (targets is None or f"{prefix}.{name}" in targets))


def find_room(placed: dict, width: int, columns: int) -> int | None:
    """The first column of a free run of `width` among `columns`, given the (start, width) runs taken, or None."""
    start = 0
    for first, w in sorted(placed.values()):
        if first - start >= width:
            return start
        start = max(start, first + w)
    return start if columns - start >= width else None
