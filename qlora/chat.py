"""Side-by-side chat: one shared 4-bit base; every visitor's base and fine-tuned answers stream from one batch.

`ChatEngine` is what the app and the CLI talk to. It turns a visitor's turn into two rows (base pane, tuned pane),
hands them to the scheduler (`batching`) and decodes the tokens each row gets back. The device work is a backend
chosen when the base loads: on a CUDA card and a Llama-style model, the slot engine (`slots`: a static KV cache of
fixed row slots, per-row adapter columns, one-token steps captured in CUDA graphs, many visitors per batch); anywhere
else (the CPU, another architecture, a capture error) today's eager path (`rowexact`: one peft `generate` per visitor),
with one log line saying why. `QLORA_CHAT_DECODE` = auto | graphs | compile | eager | generate overrides the choice
(eager: the slot engine without graphs, e.g. on the CPU). Where it can (CUDA, Triton, compute capability 8+) the slot
engine's decode step runs the project's Triton kernels: `nf4mm` for the 4-bit matmuls, `decodeops` for attention over
each row's own length, rotary + cache write, RMSNorm and silu*up (run33 on an H200: one visitor 106.7 tok/s a pane
against 71.9 with run30's engine, bench/README.md); `QLORA_CHAT_NF4=0` (or `ChatEngine(nf4=False)`) keeps bitsandbytes'
matmuls and `QLORA_CHAT_FUSED=0` (`fused=False`) the model's own attention and norms. Two log lines say which.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import adapter_base, runs
from .batching import Row, Scheduler
from .config import GenerationSettings, hub_token
from .device import CHAT, CHAT_CARD, Cards, free_memory, pick_precision, triton_kernels_unavailable, use_gpu
from .device import cards as host_cards
from .errors import brief
from .model import load_base, load_tokenizer, resolve
from .prompts import PromptFormat, chat_prompt, choose, stop_ids

log = logging.getLogger("qlora.chat")

MAX_PROMPT_TOKENS = 3072
DECODE_MODES = ("auto", "graphs", "compile", "eager", "generate")
# Rows per decode step: 8 visitors at once, as long as their conversations fit the card's KV pages together. Every
# step runs at this shape, however many rows are busy (that is what keeps a row's answer independent of the others),
# so more rows cost every visitor speed.
MAX_ROWS = 16


@dataclass
class PromptView:
    text: str
    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as the engine knows it: its name (unique per content), folder, content key, rank, module paths, and
    the prompt format its run was trained in (both panes of a visitor who picks it are prompted in it)."""
    name: str
    folder: Path
    key: tuple
    rank: int
    modules: frozenset
    fmt: PromptFormat


@dataclass
class ChatUpdate:
    """One streamed update: both panes' text so far, or (waiting set) why the answer has not started yet."""
    base: str
    tuned: str
    waiting: str | None = None


class ChatEngine:
    """One base model, the adapters registered with it, and the scheduler that serves every visitor's rows."""

    def __init__(self, base_model: str, quantize: str = "nf4", precision: str = "auto", token: str | None = None,
                 decode: str | None = None, max_rows: int = MAX_ROWS, cards: Cards | None = None,
                 nf4: bool | None = None, fused: bool | None = None):
        self.base_model, self.quantize, self.precision = base_model, quantize, precision
        self.cards = cards or host_cards  # the host's cards: chat serves on CHAT_CARD, which a training run may hold
        self._token = token
        self.decode = decode or os.environ.get("QLORA_CHAT_DECODE") or "auto"
        if self.decode not in DECODE_MODES:
            raise ValueError(f"QLORA_CHAT_DECODE: one of {', '.join(DECODE_MODES)} (got {self.decode!r})")
        self.max_rows = max_rows
        self.nf4 = nf4 if nf4 is not None else os.environ.get("QLORA_CHAT_NF4", "1") != "0"
        self.fused = fused if fused is not None else os.environ.get("QLORA_CHAT_FUSED", "1") != "0"
        self.kernels: str | None = None  # once loaded: what runs the step's attention and norms, and why
        self.matmul: str | None = None  # the 4-bit decode matmuls once loaded: "nf4mm", "bitsandbytes", ...
        self.tokenizer = None
        self.backend_kind: str | None = None  # "graphs", "compile", "eager" or "generate" once loaded
        self.fallback_reason: str | None = None
        self.capture_s: float | None = None
        self.exactness: dict | None = None  # what the slot engine measured right after capture (slots.check_exact)
        self.adapters: dict[str, AdapterRef] = {}  # name -> adapter, one per folder content
        self._scheduler: Scheduler | None = None
        self._base = None  # the 4-bit base, once loaded (the scheduler's thread loads it)
        self._lock = threading.Lock()

    # --- loading -----------------------------------------------------------------------------------------------
    def load(self, timeout: float | None = None) -> None:
        """Load the base and capture the decode graphs now, before any visitor asks (else the first request does)."""
        self._scheduler_().open(timeout)

    @property
    def model(self):
        """The model the backend runs (None until loaded): the base, wrapped by peft once the fallback attaches one."""
        scheduler = self._scheduler
        backend = scheduler.backend if scheduler is not None else None
        return backend.model if backend is not None else None

    # --- adapters ----------------------------------------------------------------------------------------------
    def load_adapter(self, adapter_dir: str | Path) -> str:
        """Register an adapter folder (a run folder or its adapter/ subfolder); returns its name in this engine.

        The name is keyed on the files' content (their inode, size and modification time): a folder whose adapter was
        replaced gets a new name, so chat never answers with the old weights, and adapters of folders that are gone
        or changed are dropped. The prompt format is read from the run folder each time (runs.prompt_format; an
        adapter folder outside a run is taken as Llama 2's, as runs made before formats were chosen). Weights reach
        the device when a visitor first uses them.
        """
        folder = Path(adapter_dir)
        if (folder / runs.ADAPTER).is_dir():
            folder = folder / runs.ADAPTER
        run_dir = folder.parent if folder.name == runs.ADAPTER else folder
        with self._lock:  # the same files, already checked (every chat turn asks): only the format is read again
            known = next((a for a in self.adapters.values() if a.folder == folder.resolve() and _same_content(a)),
                         None)
        if known is None:
            runs.verify_adapter(folder)  # a truncated file is refused here, never half-loaded
            adapter_base.check(folder, self.base_model, self._layer_shapes)  # another base: say which, not a traceback
        fmt = runs.prompt_format(run_dir)
        self._ensure_tokenizer()
        key = content_key(folder)
        stem = re.sub(r"[^\w-]", "_", run_dir.name)
        name = f"{stem}-{hashlib.sha1(repr(key).encode()).hexdigest()[:8]}"
        with self._lock:
            stale = [n for n, a in self.adapters.items()
                     if n != name and (a.folder == folder.resolve() or not _same_content(a))]
            for n in stale:
                del self.adapters[n]
            if name not in self.adapters or self.adapters[name].fmt != fmt:
                self.adapters[name] = AdapterRef(name, folder.resolve(), key, adapter_rank(folder),
                                                 adapter_modules(folder), fmt)
            scheduler = self._scheduler
        if stale and scheduler is not None:
            scheduler.forget(stale)
        return name

    # --- prompts -----------------------------------------------------------------------------------------------
    def prompt_format(self, adapter: str | None) -> PromptFormat:
        """The format both panes of a visitor using `adapter` are prompted in: the one its run trained in (so the
        base pane is asked exactly what the tuned pane is, and the comparison is fair); without one, the base's own."""
        tokenizer = self._ensure_tokenizer()
        with self._lock:
            ref = self.adapters.get(adapter) if adapter is not None else None
        return ref.fmt if ref is not None else choose(tokenizer)

    def prompt_ids(self, history: Sequence[tuple[str, str]], user: str, system: str = "",
                   adapter: str | None = None) -> list[int]:
        """The token ids a pane sends, in `adapter`'s format."""
        return self.prompt(history, user, system, adapter).token_ids

    def prompt(self, history: Sequence[tuple[str, str]], user: str, system: str = "",
               adapter: str | None = None) -> PromptView:
        """The exact string and tokens a pane sends, in `adapter`'s format. Each pane's own history is used by the
        caller."""
        return prompt_view(self._ensure_tokenizer(), self.prompt_format(adapter), history, user, system)

    # --- generation --------------------------------------------------------------------------------------------
    def stream(self, base_history: Sequence[tuple[str, str]], tuned_history: Sequence[tuple[str, str]], user: str,
               settings: GenerationSettings, adapter: str | None, stop: threading.Event | None = None
               ) -> Iterator[ChatUpdate]:
        """Both panes' answers as they grow, each pane continuing its own history; while the answer waits (the model
        loads, the batch is full) updates carry `waiting`. BusyError at once while training holds chat's card."""
        self._scheduler_().check()  # training holds chat's card: say so before anything else
        fmt = self.prompt_format(adapter)  # both panes: the adapter's format
        rows = [self._row(base_history, user, settings, None, fmt),
                self._row(tuned_history, user, settings, adapter, fmt)]
        yield from self._follow(self._submit(rows, stop), rows)

    def stream_pair(self, base_history, tuned_history, user: str, settings: GenerationSettings, adapter: str | None,
                    stop: threading.Event | None = None) -> Iterator[tuple[str, str]]:
        """Yield (base answer so far, tuned answer so far) as tokens arrive (`stream` without the waiting updates)."""
        for update in self.stream(base_history, tuned_history, user, settings, adapter, stop):
            if update.waiting is None:
                yield update.base, update.tuned

    def generate_sequential(self, user: str, settings: GenerationSettings, adapter: str) -> tuple[str, str]:
        """Each pane alone (base, then adapter), each its own request: what the batched panes must equal."""
        out, fmt = [], self.prompt_format(adapter)
        for name in (None, adapter):
            row = self._row([], user, settings, name, fmt)
            last = ChatUpdate("", "")
            for last in self._follow(self._submit([row], None), [row]):
                pass
            out.append(last.base)
        return out[0], out[1]

    def submit_rows(self, rows_spec: list[tuple[list[int], str | None, GenerationSettings]],
                    stop: threading.Event | None = None):
        """Rows given as (prompt ids, adapter name or None, settings), as one request: its Ticket (`ticket.events()`
        streams new token ids per row; `ticket.rows[i].ids` holds them all). Each row stops on its adapter's format's
        stop ids (a base row: the base's own). For benchmarks and tests."""
        tokenizer = self._ensure_tokenizer()
        with self._lock:  # (load_adapter may be replacing entries from another thread)
            refs = [self.adapters[a] if a else None for _, a, _ in rows_spec]
        rows = [Row(list(p), ref, s, s.max_new_tokens, frozenset(stop_ids(self.prompt_format(a), tokenizer)))
                for (p, a, s), ref in zip(rows_spec, refs)]
        return self._submit(rows, stop)

    def rows_ids(self, rows_spec, stop: threading.Event | None = None) -> list[list[int]]:
        """`submit_rows`, run to the end: each row's token ids."""
        ticket = self.submit_rows(rows_spec, stop)
        for _ in ticket.events():
            pass
        return [list(r.ids) for r in ticket.rows]

    def unload(self) -> None:
        """Free the base and the decode graphs (training needs the memory)."""
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()
        with self._lock:
            self._base = None
        self.backend_kind = None
        free_memory()

    # --- helpers -----------------------------------------------------------------------------------------------
    def _layer_shapes(self):
        """The base's layers, for the adapter check's shapes: the loaded base, or the same model built on the meta
        device from its config (no weights, no device, nothing waits for chat's card)."""
        with self._lock:
            if self._base is not None:
                return self._base
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(resolve(self.base_model), token=hub_token(self._token))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    def _ensure_tokenizer(self):
        with self._lock:
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(resolve(self.base_model), self._token)
        return self.tokenizer

    def _row(self, history, user: str, settings: GenerationSettings, adapter: str | None, fmt: PromptFormat) -> Row:
        """A pane's row: its prompt in `fmt` (the visitor's adapter's, for both panes), ending on fmt's stop ids."""
        tokenizer = self._ensure_tokenizer()
        ids = prompt_view(tokenizer, fmt, history, user, settings.system_prompt).token_ids
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"the conversation is {len(ids)} tokens, over the {MAX_PROMPT_TOKENS} limit; "
                             "clear it and start again")
        ref = None
        if adapter is not None:
            with self._lock:
                ref = self.adapters.get(adapter)
            if ref is None:
                raise ValueError(f"adapter {adapter!r} is not loaded; pick it again")
        return Row(ids, ref, settings, settings.max_new_tokens, frozenset(stop_ids(fmt, tokenizer)))

    def _scheduler_(self) -> Scheduler:
        with self._lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self._open_backend, self.cards.lease(CHAT, (CHAT_CARD,)))
            return self._scheduler

    def _submit(self, rows: list[Row], stop):
        return self._scheduler_().submit(rows, stop)

    def _follow(self, ticket, rows: list[Row]) -> Iterator[ChatUpdate]:
        """Decode a ticket's tokens into text as they come (in the visitor's thread, not the device's)."""
        ids: list[list[int]] = [[] for _ in rows]
        texts = ["" for _ in rows]
        for kind, value in ticket.events():
            if kind == "wait":
                yield ChatUpdate(*_pair(texts), waiting=value)
                continue
            for i, new in enumerate(value):
                if new:
                    ids[i].extend(new)
                    texts[i] = self.tokenizer.decode(ids[i], skip_special_tokens=True).strip()
            yield ChatUpdate(*_pair(texts))

    def _open_backend(self, progress):
        """Runs on the scheduler's thread, holding chat's card: load the base, then the slot engine or the fallback."""
        import time

        use_gpu(CHAT_CARD)  # this thread's device: chat's card, whatever the training run holds
        self._ensure_tokenizer()
        with self._lock:
            model = self._base
        if model is None:  # loaded once; a reload for an adapter on other layers reuses it
            progress("loading the base model")
            model = load_base(resolve(self.base_model), self.quantize, pick_precision(self.precision), self._token)
            model.config.use_cache = True
            model.eval()
            with self._lock:
                self._base = model
        kind, why = self._pick_backend(model)
        if kind != "generate":
            from . import slots

            try:
                context = min(getattr(model.config, "max_position_embeddings", 4096) or 4096, MAX_PROMPT_TOKENS + 4096)
                with self._lock:  # adapter columns on the Linears the registered adapters target
                    targets = set().union(*(a.modules for a in self.adapters.values()))
                no_nf4 = self._no_nf4(model, kind)
                no_fused = self._no_fused(model)
                rows, length, columns, pages = slots.plan(model, context, self.max_rows, targets,
                                                          paged=no_fused is None)
                t0 = time.perf_counter()
                mode = None if kind == "eager" else kind
                try:
                    decoder = slots.open_decoder(model, rows, length, columns, mode, targets, progress,
                                                 nf4=no_nf4 is None, fused=no_fused is None, pages=pages)
                except Exception as e:
                    if no_nf4 is not None and no_fused is not None:
                        raise
                    failed = f"the Triton kernels failed: {brief(e)}"
                    no_nf4, no_fused = no_nf4 or failed, no_fused or failed  # (each keeps its own reason if it had one)
                    log.debug("Triton decode kernels failed", exc_info=True)
                    rows, length, columns, pages = slots.plan(model, context, self.max_rows, targets)
                    decoder = slots.open_decoder(model, rows, length, columns, mode, targets, progress, pages=pages)
                self.matmul = decoder.matmul
                why_not = f" ({no_nf4})" if no_nf4 and decoder.matmul == "bitsandbytes" else ""
                log.info("chat: 4-bit decode matmuls: %s%s", decoder.matmul, why_not)
                self.kernels = ("decodeops: attention over each row's own length, rotary + cache write, RMSNorm, "
                                "silu*up" if decoder.fused
                                else f"SDPA over the length bucket, transformers' norms and rotary ({no_fused})")
                log.info("chat: decode attention and norms: %s", self.kernels)
                if kind != "eager":
                    self.capture_s = time.perf_counter() - t0
                    self.exactness = decoder.exactness
                    kv = f"sharing {(pages - 1) * slots.PAGE} KV tokens" if pages else "fixed slots"
                    log.info("chat: %d rows of up to %d tokens (%s), adapter columns on %d Linears, decode graphs (%s) "
                             "for %d lengths and prompt graphs up to %s tokens captured and checked in %.1f s: %s",
                             rows, length, kv, len(decoder.columns.linears), kind, len(decoder.buckets),
                             max(decoder.prompt_buckets, default=0), self.capture_s, decoder.exactness)
                self.backend_kind = kind
                return slots.SlotBackend(decoder)
            except Exception as e:
                why = f"capturing the decode step failed ({brief(e)})"
                log.debug("decode capture failed", exc_info=True)
        from .rowexact import GenerateBackend

        four_bit = self.quantize == "nf4"
        log.warning("chat: %s; using the eager generate path, one visitor at a time%s", why,
                    " (bitsandbytes' 4-bit matmuls)" if four_bit else "")
        self.backend_kind, self.fallback_reason = "generate", why
        self.matmul = "bitsandbytes" if four_bit else "16-bit (no 4-bit weights)"
        return GenerateBackend(model, self.tokenizer)

    def _no_nf4(self, model, kind: str) -> str | None:
        """Why the slot engine's 4-bit decode matmuls stay bitsandbytes' (None: the nf4mm kernel runs them)."""
        from . import nf4mm

        if not self.nf4:
            return "the nf4mm kernel is turned off (QLORA_CHAT_NF4=0)"
        if not any(nf4mm.fits(m) for m in model.modules()):
            return "no nf4 weights"
        return triton_kernels_unavailable(model.device)

    def _no_fused(self, model) -> str | None:
        """Why the decode step keeps SDPA and transformers' RMSNorm (None: decodeops' kernels run them)."""
        if not self.fused:
            return "turned off (QLORA_CHAT_FUSED=0)"
        return triton_kernels_unavailable(model.device)

    def _pick_backend(self, model) -> tuple[str, str | None]:
        """(backend kind, why the fallback) for this model on this machine."""
        import torch

        from .slots import SUPPORTED

        arch = getattr(model.config, "model_type", "?")
        if self.decode == "generate":
            return "generate", "QLORA_CHAT_DECODE=generate"
        if arch not in SUPPORTED:
            return "generate", f"the slot engine does not serve {arch} models (only {', '.join(SUPPORTED)})"
        if self.decode in ("eager", "graphs", "compile"):  # asked for: tried (a failed capture falls back, logged)
            return self.decode, None
        if model.device.type != "cuda" or not torch.cuda.is_available():
            return "generate", "no CUDA device, so no decode graphs"
        return "graphs", None


def prompt_view(tokenizer, fmt: PromptFormat, history: Sequence[tuple[str, str]], user: str,
                system: str = "") -> PromptView:
    """The exact string, token ids and tokens a chat pane sends, in the run's format (prompts.chat_prompt): the one
    place chat prompts are built (the engine and the app's "show prompt" both call it)."""
    p = chat_prompt(fmt, tokenizer, history, user, system)
    return PromptView(p.text, p.ids, tokenizer.convert_ids_to_tokens(p.ids))


def _pair(texts: list[str]) -> tuple[str, str]:
    return (texts[0], texts[1]) if len(texts) > 1 else (texts[0], "")


def content_key(folder: Path) -> tuple:
    """What identifies an adapter's content without reading it: each file's inode, size and modification time."""
    out = []
    for name in runs.ADAPTER_FILES:
        st = (folder / name).stat()
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _same_content(ref: AdapterRef) -> bool:
    try:
        return content_key(ref.folder) == ref.key
    except OSError:  # the folder is gone
        return False


def adapter_modules(folder: Path) -> frozenset:
    """The module paths an adapter's weights name (read from the safetensors header only)."""
    entries, _ = runs.safetensors_header(folder / "adapter_model.safetensors")
    return frozenset(m.group(1) if (m := adapter_base.LORA_KEY.fullmatch(key)) else key for key in entries)


def adapter_rank(folder: Path) -> int:
    """The widest LoRA rank an adapter folder declares (its r, or the largest of its rank_pattern)."""
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [cfg.get("r") or 8, *(cfg.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)
