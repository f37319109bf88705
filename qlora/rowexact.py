"""The eager chat path (the fallback): one batched peft `generate` per visitor, row-by-row kernels keeping it exact.

Both panes of one visitor run in one `generate` over the shared 4-bit base: peft's mixed-adapter batches run row 0
through the bare base ("__base__") and row 1 through the adapter, with the same prompt ids, seed and sampling. This is
the path used where decode graphs cannot be captured (the CPU, an architecture the slot engine does not know, a capture
error); `batching.Scheduler` serves it one visitor at a time.
"""
from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
# On a GPU some kernels pick their algorithm (and so their rounding) by the number of rows: bitsandbytes' 4-bit
# matmul, cuBLAS, the RMSNorm reduction. A near-tie in the logits then flips a greedy token and the batched pane drifts
# from what the adapter alone would say. In the 2-row pass these parts run one row at a time, exactly as in a 1-row
# generate; everything else (and all the Python around it) is shared. The parts: "head": the 16-bit Linears (the LM
# head of a 4-bit model); "linear-prefill": the 4-bit ones on the prompt only; "norm": RMSNorm (for Llama's, only its
# mean of squares). Measured on the H100 (bench/README.md, run11 sweep): these must go row by row for identical greedy
# outputs; bitsandbytes' one-token kernel and flash attention gave the same rows batched or not, so the sweep's
# "every Linear" and "attention" parts were dropped.
ROW_BY_ROW = ("head", "linear-prefill", "norm")


class GenerateBackend:
    """A scheduler backend over peft's `generate`: one visitor (one or two rows) at a time.

    Rows with the same prompt (and stop ids) share one batched pass; rows whose prompts differ (each pane keeps its
    own history) run one after the other. Adapters are attached through peft when a visitor first needs them.
    """

    rows = 2

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.adapters: dict[str, str] = {}  # peft adapter name -> folder
        self._drop: set[str] = set()  # adapters whose folders are gone or changed: deleted once another is attached
        self._stream = None
        self._stop = threading.Event()
        self.active: list = []

    # --- the scheduler's protocol ---------------------------------------------------------------------------
    def free_rows(self) -> int:
        return 0 if self.active else self.rows

    def wait_reason(self, rows) -> str | None:
        return None if not self.active else "the chat runs one visitor at a time on this machine"

    def join(self, rows) -> None:
        for row in rows:
            if row.adapter is not None:
                self._attach(row.adapter)
        self._delete_dropped(keep={r.adapter.name for r in rows if r.adapter is not None})
        self.active = list(rows)
        self._stop = threading.Event()
        self._stream = self._rows_stream(rows, self._stop)

    def step(self) -> None:
        try:
            next(self._stream)
        except StopIteration:
            for row in self.active:
                row.done = True

    def leave(self, row) -> None:
        row.done = True
        if all(r.done for r in self.active):
            self._stop.set()
            if self._stream is not None:
                self._stream.close()  # joins the generate thread
            self._stream, self.active = None, []

    def forget(self, names) -> None:
        self._drop |= set(names) & set(self.adapters)

    def _delete_dropped(self, keep: set) -> None:
        """Delete dropped adapters from the peft model, keeping at least one (peft needs an active adapter)."""
        for name in sorted(self._drop - keep):
            if len(self.adapters) < 2:
                break
            if self.model.active_adapter == name:
                self.model.set_adapter(next(n for n in self.adapters if n != name))
            self.model.delete_adapter(name)
            del self.adapters[name]
            self._drop.discard(name)

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.close()

    # --- helpers ----------------------------------------------------------------------------------------------
    def _attach(self, adapter) -> None:
        from peft import PeftModel

        if adapter.name in self.adapters:
            return
        if hasattr(self.model, "peft_config"):
            self.model.load_adapter(str(adapter.folder), adapter_name=adapter.name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(adapter.folder), adapter_name=adapter.name,
                                                   is_trainable=False)
        self.model.eval()  # mixed-adapter batches are exact only in eval mode
        self.adapters[adapter.name] = str(adapter.folder)

    def _rows_stream(self, rows, stop) -> Iterator[None]:
        """Run the rows' generations (shared where prompts are equal) and write their tokens into the rows."""
        groups: list[list] = []
        for row in rows:
            same = next((g for g in groups if g[0].prompt == row.prompt and g[0].stops == row.stops and len(g) < 2),
                        None)
            if same is not None:
                same.append(row)
            else:
                groups.append([row])
        for group in groups:
            names = [r.adapter.name if r.adapter else BASE for r in group]
            settings = group[0].settings
            for ids in generate_rows(self.model, self.tokenizer, [r.prompt for r in group], names, settings,
                                     sorted(group[0].stops), stop):
                for row, row_ids in zip(group, ids):
                    if not row.done:
                        row.ids[:] = row_ids
                yield
            for row in group:
                row.finish()
            if stop.is_set():
                return


def generate_rows(model, tokenizer, prompts: list[list[int]], adapter_names: list[str], settings,
                  stop_ids: Sequence[int], stop: threading.Event | None) -> Iterator[list[list[int]]]:
    """One batched generate in a thread; yields each row's token ids (cut at its first stop id: the prompt format's EOS
    or end-of-turn marker) as they grow. Equal-length prompts."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    ids = torch.tensor(prompts, device=model.device)
    streamer = RowStreamer(len(prompts), stop_ids)
    stop = stop or threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
                  streamer=streamer, pad_token_id=tokenizer.pad_token_id, eos_token_id=list(stop_ids),
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
            with (torch.inference_mode(), adapter_rows_as_slices(model), deterministic_attention(),
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
    try:
        for m in model.modules() if parts else ():
            # LoRA's own Linears see one row already: peft runs each adapter on its rows of a mixed batch
            linear = isinstance(m, torch.nn.Linear)
            four_bit = linear and getattr(m.weight, "quant_state", None) is not None
            prefill_only = four_bit and "linear-prefill" in parts
            if (prefill_only or (linear and not four_bit and "head" in parts)
                    or ("norm" in parts and type(m).__name__.endswith("RMSNorm"))):
                patched.append((m, m.__dict__.get("forward")))
                m.forward = _rms_norm_rows(m) if _is_llama_rms_norm(m) else split(m.forward, prefill_only)
        yield
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own


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


class RowStreamer:
    """A transformers streamer for a batch: collects each row's token ids and cuts it at its first stop id.

    TextIteratorStreamer handles batch size 1 only; the side-by-side pass has two rows. Iterating yields a snapshot of
    every row's ids after each step; decoding to text is the consumer's job.
    """

    def __init__(self, rows: int, stop_ids: Sequence[int]):
        self.stops = set(stop_ids)
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
                if t in self.stops:
                    self.done[row] = True
                else:
                    self.ids[row].append(t)
        self.queue.put([list(r) for r in self.ids])

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            yield item


def deterministic_attention():
    """SDPA limited to flash and memory-efficient attention (math where neither applies): their forward passes give
    the same bits run after run, and masked key blocks add exact zeros. Measured on the H200 (bench/README.md): SDPA
    picked cuDNN attention for the masked decode step, and repeated requests drifted apart within 60 tokens."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
