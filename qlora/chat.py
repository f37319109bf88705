"""Side-by-side chat: one shared base, answers with the adapter disabled (left) and enabled (right), streamed.

Both answers come from one batched generate over the shared 4-bit base: peft's mixed-adapter batches run row 0
through the bare base ("__base__") and row 1 through the adapter, with the same prompt ids, seed and sampling.
"""
from __future__ import annotations

import queue
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import adapter_base, runs
from .config import GenerationSettings
from .device import BusyError, free_memory, gpu_lock, pick_precision
from .model import load_base, load_tokenizer, resolve
from .prompts import encode, format_prompt

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
MAX_PROMPT_TOKENS = 3072
# A base that never saw the Llama 2 format (the embedded SmolLM2) often ends its answer at once; an empty pane shows
# nothing of what it would say. Both panes get the same floor, so the comparison stays fair.
MIN_NEW_TOKENS = 2
# On a GPU some kernels pick their algorithm (and so their rounding) by the number of rows: bitsandbytes' 4-bit
# matmul, cuBLAS, the RMSNorm reduction. A near-tie in the logits then flips a greedy token and the batched pane drifts
# from what the adapter alone would say. In the 2-row pass these parts run one row at a time, exactly as in a 1-row
# generate; everything else (and all the Python around it) is shared. The parts: "linear": every frozen Linear and
# the LM head; "head": only the 16-bit ones (the LM head of a 4-bit model); "linear-prefill": the 4-bit ones on the
# prompt only; "attention": the attention kernel; "norm": RMSNorm (for Llama's, only its mean of squares).
# Measured on the H100 (bench/README.md): the prompt's 4-bit matmuls, the LM head and RMSNorm must go row by row for
# identical greedy outputs; bitsandbytes' one-token kernel and flash attention gave the same rows batched or not.
ROW_BY_ROW = ("head", "linear-prefill", "norm")
ROWS_ATTENTION = "qlora_rows"


@dataclass
class PromptView:
    text: str
    token_ids: list[int]
    tokens: list[str]


class ChatEngine:
    """Holds one base model and the adapters loaded onto it; loads lazily, on first use."""

    def __init__(self, base_model: str, quantize: str = "nf4", precision: str = "auto", token: str | None = None):
        self.base_model, self.quantize, self.precision = base_model, quantize, precision
        self._token = token
        self.model = None  # a PeftModel once an adapter is attached, the bare base before
        self.tokenizer = None
        self.adapters: dict[str, str] = {}  # adapter name -> folder
        self._load_lock = threading.Lock()

    # --- loading ---------------------------------------------------------------------------------------
    def _ensure_base(self):
        with self._load_lock:
            if self.model is None:
                path = resolve(self.base_model)
                self.tokenizer = load_tokenizer(path, self._token)
                model = load_base(path, self.quantize, pick_precision(self.precision), self._token)
                model.config.use_cache = True
                model.eval()  # mixed-adapter batches are exact only in eval mode
                self.model = model
        return self.model

    def load_adapter(self, adapter_dir: str | Path) -> str:
        """Attach an adapter folder (a run folder or its adapter/ subfolder); returns its name in this engine."""
        from peft import PeftModel

        folder = Path(adapter_dir)
        if (folder / runs.ADAPTER).is_dir():
            folder = folder / runs.ADAPTER
        runs.verify_adapter(folder)  # a truncated file is refused here, never half-loaded
        adapter_base.check(folder, self.base_model, self._ensure_base)  # another base: say which, not a traceback
        name = re.sub(r"[^\w-]", "_", folder.parent.name if folder.name == runs.ADAPTER else folder.name)
        if self.adapters.get(name) == str(folder):
            return name
        model = self._ensure_base()
        with self._load_lock:
            if name in self.adapters:
                model.delete_adapter(name)
            if hasattr(model, "peft_config"):
                model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
            self.model.eval()
            self.adapters[name] = str(folder)
        return name

    def unload(self) -> None:
        """Free the base (training needs the memory)."""
        with self._load_lock:
            self.model = None
            self.adapters.clear()
        free_memory()

    # --- prompts ---------------------------------------------------------------------------------------
    def prompt(self, history: Sequence[tuple[str, str]], user: str, system: str = "") -> PromptView:
        """The exact string and tokens both panes send. Each pane's own history is used by the caller."""
        self._ensure_base()
        text = format_prompt(history, user, system)
        ids = encode(text, self.tokenizer)
        return PromptView(text, ids, self.tokenizer.convert_ids_to_tokens(ids))

    # --- generation ------------------------------------------------------------------------------------
    def stream_pair(self, base_history: Sequence[tuple[str, str]], tuned_history: Sequence[tuple[str, str]],
                    user: str, settings: GenerationSettings, adapter: str | None,
                    stop: threading.Event | None = None) -> Iterator[tuple[str, str]]:
        """Yield (base answer so far, tuned answer so far) as tokens arrive.

        Each pane keeps its own history (their answers differ). When both histories are equal, which is always the
        case on the first turn, both rows share one batched pass; otherwise each row runs on its own, in turn.
        """
        if not gpu_lock.acquire(blocking=False):
            raise BusyError("the GPU is busy (training or another chat is running); try again when it is done")
        try:
            self._ensure_base()
            if adapter is None:
                raise ValueError("pick an adapter first")
            prompts = [encode(format_prompt(h, user, settings.system_prompt), self.tokenizer)
                       for h in (base_history, tuned_history)]
            for ids in prompts:
                if len(ids) > MAX_PROMPT_TOKENS:
                    raise ValueError(f"the conversation is {len(ids)} tokens, over the {MAX_PROMPT_TOKENS} limit; "
                                     "clear it and start again")
            if prompts[0] == prompts[1]:
                yield from self._generate([prompts[0], prompts[0]], [BASE, adapter], settings, stop)
            else:
                base_text = ""
                for (base_text,) in self._generate([prompts[0]], [BASE], settings, stop):
                    yield base_text, ""
                for (tuned_text,) in self._generate([prompts[1]], [adapter], settings, stop):
                    yield base_text, tuned_text
        finally:
            gpu_lock.release()

    def generate_sequential(self, user: str, settings: GenerationSettings, adapter: str) -> tuple[str, str]:
        """Two separate generations (base, then adapter): the reference the batched pass must match."""
        self._ensure_base()
        ids = encode(format_prompt([], user, settings.system_prompt), self.tokenizer)
        base = list(self._generate([ids], [BASE], settings, None))[-1][0]
        tuned = list(self._generate([ids], [adapter], settings, None))[-1][0]
        return base, tuned

    def _generate(self, prompts: list[list[int]], adapter_names: list[str], settings: GenerationSettings,
                  stop: threading.Event | None) -> Iterator[tuple[str, ...]]:
        """Run one batched generate in a thread and yield the decoded rows as they grow. Prompts have equal length."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        model, tok = self.model, self.tokenizer
        ids = torch.tensor(prompts, device=model.device)
        streamer = RowStreamer(len(prompts), tok)
        self.last_streamer = streamer  # its token ids per row: the benchmark counts and compares them
        stop = stop or threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
                      min_new_tokens=min(MIN_NEW_TOKENS, settings.max_new_tokens),
                      streamer=streamer, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      stopping_criteria=StoppingCriteriaList([_Stop()]), use_cache=True)
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None)
        if hasattr(model, "peft_config"):
            kwargs["adapter_names"] = adapter_names
        elif adapter_names != [BASE] * len(adapter_names):
            raise ValueError("no adapter is loaded")
        errors: list[BaseException] = []

        def run():
            try:
                torch.manual_seed(settings.seed)
                with (torch.inference_mode(), adapter_rows_as_slices(model),
                      one_row_at_a_time(model, ROW_BY_ROW if len(prompts) > 1 else ())):
                    model.generate(**kwargs)
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)
            finally:
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            for rows in streamer:
                yield rows
        finally:
            stop.set()  # a consumer that stops early (client gone) stops generation too
            thread.join()
        if errors:
            raise errors[0]


@contextmanager
def adapter_rows_as_slices(model):
    """Within the block, each LoRA Linear adds its adapter to that adapter's rows with two matmuls on a slice.

    peft's mixed-adapter forward picks an adapter's rows with a Python list of indices (`x[[1]]`, then
    `result[[1]] += ...`): each use is a host-to-device copy that waits for the GPU, three per LoRA module and token,
    so the CPU can never run ahead (27 ms a token for the 7B q/v adapter on the H100, a quarter of the step). Here each
    adapter's rows are one contiguous run (the pane order), so a slice picks them without waiting. Decoding is then
    bound by kernel launches, and peft spends six a module (casts to fp32 and back, scaling, add) where two do: A and
    B*scaling are cast once per generation to the model's compute dtype and the update is `rows.addmm_(x A, B)`.
    The 1-row and the 2-row passes both run this, on row slices of the same shape, so they give the same bits.
    Anything else (one adapter's rows apart, autocast, training mode, LoRA variants such as DoRA) goes to peft.
    """
    from peft.tuners.lora import Linear, bnb

    kinds = (Linear, *(getattr(bnb, k) for k in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, k)))
    layers = [m for m in model.modules() if type(m) in kinds]  # plain LoRA on a Linear: x A B * scaling
    try:
        for layer in layers:
            layer._mixed_batch_forward = _sliced_mixed_batch_forward(layer, layer._mixed_batch_forward)
        yield
    finally:
        for layer in layers:
            del layer._mixed_batch_forward


def _sliced_mixed_batch_forward(layer, peft_forward):
    import torch
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    weights = {}  # (adapter, dtype) -> (A^T, (B * scaling)^T), made on first use

    def forward(x, *args, adapter_names, **kwargs):
        row_runs = _row_runs(adapter_names)
        if row_runs is None or torch.is_autocast_enabled() or layer.training or layer.lora_variant:
            return peft_forward(x, *args, adapter_names=adapter_names, **kwargs)
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        result = layer.base_layer(x, *args, **kwargs).contiguous()  # contiguous already: views of its rows below
        for name, rows in row_runs:
            if name == BASE or name not in layer.lora_A:
                continue
            if (name, result.dtype) not in weights:
                weights[name, result.dtype] = (
                    layer.lora_A[name].weight.t().to(result.dtype),
                    (layer.lora_B[name].weight * layer.scaling[name]).t().to(result.dtype))
            a, b = weights[name, result.dtype]
            x_rows = x[rows].reshape(-1, x.shape[-1]).to(result.dtype)
            result[rows].view(-1, result.shape[-1]).addmm_(x_rows @ a, b)
        return result

    return forward


def _row_runs(names: Sequence[str]) -> list[tuple[str, slice]] | None:
    """Each name with the slice of its rows, or None when some name's rows are not one contiguous run."""
    runs: list[tuple[str, slice]] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            runs.append((names[start], slice(start, i)))
            start = i
    return runs if len({name for name, _ in runs}) == len(runs) else None


@contextmanager
def one_row_at_a_time(model, parts: Sequence[str]):
    """Within the block, the chosen parts of `model` compute each batch row on its own (see ROW_BY_ROW)."""
    import torch

    def split(forward, prefill_only=False):
        def each_row(x, *args, **kwargs):
            if x.dim() < 3 or x.shape[0] == 1 or (prefill_only and x.shape[1] == 1):
                return forward(x, *args, **kwargs)
            return torch.cat([forward(x[i:i + 1], *args, **kwargs) for i in range(x.shape[0])])
        return each_row

    patched = []
    configs = []
    try:
        for m in model.modules() if parts else ():
            # LoRA's own Linears see one row already: peft runs each adapter on its rows of a mixed batch
            linear = isinstance(m, torch.nn.Linear)
            four_bit = linear and getattr(m.weight, "quant_state", None) is not None
            prefill_only = four_bit and "linear-prefill" in parts and "linear" not in parts
            if ((linear and "linear" in parts) or prefill_only
                    or (linear and not four_bit and "head" in parts)
                    or ("norm" in parts and type(m).__name__.endswith("RMSNorm"))):
                patched.append((m, m.__dict__.get("forward")))
                m.forward = _rms_norm_rows(m) if _is_llama_rms_norm(m) else split(m.forward, prefill_only)
        if "attention" in parts:
            _register_rows_attention()
            for m in model.modules():
                c = getattr(m, "config", None)
                if c is not None and getattr(c, "_attn_implementation", None) == "sdpa":
                    configs.append((c, c._attn_implementation))
                    c._attn_implementation = ROWS_ATTENTION
        yield
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own
        for c, name in configs:
            c._attn_implementation = name


def _is_llama_rms_norm(module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return type(module).forward is LlamaRMSNorm.forward


def _rms_norm_rows(norm):
    """Llama's RMSNorm, step for step, with only its reduction (the mean of squares) run one row at a time.

    The pointwise steps give the same bits for any number of rows; the reduction does not (PyTorch shapes its
    thread block by the number of rows reduced). Splitting only the mean costs 2 more kernel launches a norm for
    2 rows instead of 9, and decoding on the GPU is bound by launches.
    """
    import torch

    def forward(hidden_states):
        if hidden_states.shape[0] == 1:
            return type(norm).forward(norm, hidden_states)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        squares = hidden_states.pow(2)
        variance = torch.cat([squares[i:i + 1].mean(-1, keepdim=True) for i in range(squares.shape[0])])
        hidden_states = hidden_states * torch.rsqrt(variance + norm.variance_epsilon)
        return norm.weight * hidden_states.to(input_dtype)

    return forward


def _register_rows_attention() -> None:
    """An attention implementation that runs sdpa one batch row at a time, with the sdpa mask."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def rows_sdpa(module, query, key, value, attention_mask, **kwargs):
        outs = [sdpa_attention_forward(module, query[i:i + 1], key[i:i + 1], value[i:i + 1],
                                       None if attention_mask is None else attention_mask[i:i + 1], **kwargs)[0]
                for i in range(query.shape[0])]
        return torch.cat(outs), None

    AttentionInterface.register(ROWS_ATTENTION, rows_sdpa)
    AttentionMaskInterface.register(ROWS_ATTENTION, sdpa_mask)


class RowStreamer:
    """A transformers streamer for a batch: decodes each row on its own and cuts it at its first EOS.

    TextIteratorStreamer handles batch size 1 only; the side-by-side pass has two rows.
    """

    def __init__(self, rows: int, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.ids), -1).tolist()):
            for t in token:
                if self.done[row]:
                    break
                if t == self.tokenizer.eos_token_id:
                    self.done[row] = True
                else:
                    self.ids[row].append(t)
        self.queue.put(tuple(self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in self.ids))

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            yield item
