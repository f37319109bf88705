"""Static-slot decoding: fixed row slots, each with its own position, adapter and KV cache (pages of a shared pool, or
a fixed slot), stepped one token at a time in captured CUDA graphs.

Why this and not transformers' continuous batching (`generation/continuous_batching`, `init_continuous_batching`):
that engine packs every request's tokens into one sequence over a paged cache and pads the batch to a power of two of
requests, so a row's matmuls run at a shape that depends on who else is decoding (its rounding, and so a greedy answer,
with them); it has one sampling setting for the whole batch and no per-request seed; and it has no per-row adapter.
Here the decode step always runs at the same shapes (`rows` slots, padded), so a row's arithmetic never depends on the
other rows: each slot's answer in a full batch is the answer it gets alone. The pieces are the library's: the model's
own forward with a `Cache` of `StaticLayer`s (whose `update` writes each row at its own position), a 4D attention
mask, SDPA, and `torch.cuda.CUDAGraph` (optionally over `torch.compile`d code) for the step.

The KV cache, where decodeops' attention runs, is a pool of PAGE-position pages (`Pages`): each row's page table maps
its positions to pages, taken when it joins (its prompt and its longest answer) and given back when it leaves. A card's
memory then holds what the rows use, not rows x the whole context: in 15 GiB fixed slots held 8 rows of 2,304 tokens
(visitors 5-8 waited, run60), the pool holds 16 rows of the whole 4,096 context, as long as their conversations fit
together. decodeops' attention reads a row's pages in place, with the same arithmetic as over a contiguous slot, so the
same bits. The model's own attention (no decodeops: a T4, the CPU) keeps fixed slots (`plan`), read as one strided view
of the pool (`Pages.contiguous`).

Prompts are prefilled one visitor at a time, its two panes in one forward of two rows where their prompts take the same
length (one pass over the 4-bit weights, one dequantize of each, where two forwards dequantized everything twice; a lone
row runs twice, so a row's shapes, and so its bits, never depend on its partner), each layer writing the prompts'
keys/values straight into their rows' pages (`prefill_cache`); prompts up to PREFILL_BUCKETS[-1] tokens run in a graph
captured for the bucket that holds them (each prompt padded at its end, which causal attention keeps out of the prompt's
own positions; the pads' keys/values land past the prompt, in the row's pages, where its decode steps overwrite them
before reading them, or in the trash page). A prompt's prefill is launch-bound without a graph (~50 ms for 15 or 711
tokens on an H200, run29): the graphs are what keeps eight visitors' first tokens within a second.

Per-row adapters inside the graph: `columns.AdapterColumns` (each adapter in use holds a run of static LoRA columns on
the Linears adapters target, each row a mask of its own; a base row's update is an exact zero).

The base's 4-bit Linears run their decode matmuls in `nf4mm`'s kernel where the engine asks for it (CUDA with
Triton): straight from the packed 4-bit data, each row on its own, where bitsandbytes would dequantize every weight to
16 bits each step. Prefills keep bitsandbytes' path. With `fused`, the decode step's attention (over each row's own
length), rotary and cache write, RMSNorm and silu*up run `decodeops`' kernels (instance attributes, undone at close).

The serving loop keeps one step in flight ahead of the host (`SlotDecoder.launch` / `collect`): the step itself writes
each slot's new token and position for the next, so the host reads step k's tokens, streams them and finds the rows
that ended while the GPU runs step k+1 (run33: one visitor 99.6 -> 106.7 tok/s a pane).

Right after capture `check_exact` measures what this relies on, on the card at hand (`open_decoder`).
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch  # this module is imported only when the slot engine starts (`import qlora` stays light)

from .columns import (COLUMN_GRAIN, AdapterColumns, LoraWeights, column_bytes, find_room, read_adapter,
                      round_up)
from .errors import brief
from .rowexact import deterministic_attention

log = logging.getLogger("qlora.chat")

ATTENTION = "qlora_slots"  # our attention implementation: SDPA over the first mask-width positions of the cache
MIN_BUCKET = 256  # the shortest attention length captured; buckets double up to the slot length
PAGE = 64  # positions a page of the KV pool holds (decodeops' attention reads a page a loop turn)
# prompt lengths whose prefill is captured (longer prompts run eagerly): steps of at most 1.5x, so padding wastes at
# most a third of a prompt's compute (powers of two wasted up to half: run33's eight visitors padded 7,608 tokens to
# 10,008); 2,048 where the slot is longer
PREFILL_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
PREFILL_ROWS = 2  # rows of every prefill: a visitor's two panes (run39: at 512 tokens a one-row prefill's 22.6 ms held
# 7.4 ms of dequantize, which two rows share)
SILU = ("SiLUActivation", "SiLU")  # the MLP activations decodeops.silu_mul computes
SUPPORTED = ("llama",)  # decoders checked to read the cache and the 4D mask as assumed (no sliding window); others:
# the eager path


# --- the KV cache: a pool of pages ------------------------------------------------------------------------
class Pages:
    """Which pages of the KV pool each row holds: `table` [rows, pages a slot] on the device (row r's position t lies
    in page table[r, t // PAGE] at t % PAGE).

    A pool of `pages` (where decodeops' attention reads the pages in place): a row takes pages for its prompt and its
    longest answer when it joins and gives them back when it leaves, so the pool holds what the rows in it use: many
    short conversations or a few long ones, each up to the slot length. Page 0 is the trash page: free rows and
    positions past a row's pages (a prefill's padding, the step in flight after a row's last token) write there, and
    no live row reads it. `pages` None: fixed slots, each row owning its whole slot's pages in order for good
    (`static`), so the model's own attention reads a row's slot as one strided view (`contiguous`). Gathering each
    row's pages for it instead would write and read every row's whole bucket again each step: 42 against 10 ms a step
    at 4,096 tokens on the H200 (run66), several times that at a T4's bandwidth."""

    def __init__(self, rows: int, length: int, pages: int | None, device):
        self.width = math.ceil(length / PAGE)  # pages a slot
        self.static = pages is None
        self.count = rows * self.width + 1 if pages is None else pages
        assert self.count >= 2, self.count
        if self.static:
            self.table = 1 + torch.arange(rows * self.width, device=device).view(rows, self.width)
        else:
            self.table = torch.zeros(rows, self.width, dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.table)
        self.free = [] if self.static else list(range(self.count - 1, 0, -1))  # page 1 first
        self.held: dict[int, list[int]] = {}
        self.write = self.read = self.prompt = None  # a step's / a prefill's pool indices (`index`)

    @staticmethod
    def needed(tokens: int) -> int:
        return math.ceil(tokens / PAGE)

    def can_take(self, pages: int) -> bool:
        return self.static or pages <= len(self.free)

    def reserve(self, slot: int, tokens: int) -> None:
        """Pages for a row's first `tokens` positions (it keeps those it holds). Written into the table after every
        step launched so far, which still see the row's old pages."""
        held = self.held.setdefault(slot, [])
        want = self.needed(min(tokens, self.width * PAGE))
        if self.static:
            held[:] = range(1 + slot * self.width, 1 + slot * self.width + max(want, len(held)))
            return
        more = want - len(held)
        if more > len(self.free):
            raise MemoryError(f"{more} KV pages wanted, {len(self.free)} free")
        if more > 0:
            held.extend(self.free.pop() for _ in range(more))
            self.table[slot, :len(held)].copy_(torch.tensor(held))

    def release(self, slot: int) -> None:
        """A leaving row's pages back to the pool (its table row to the trash page); a step still in flight may write
        into them, before any later prefill overwrites them on the same stream."""
        held = self.held.pop(slot, [])
        if not self.static:
            self.free.extend(reversed(held))
            self.table[slot].zero_()

    def contiguous(self, pool):
        """Fixed slots only: the pool [pages, PAGE, kv heads, D] as every row's slot, [rows, kv heads, slot, D]."""
        rows = self.table.shape[0]
        return pool[1:].view(rows, self.width * PAGE, *pool.shape[2:]).transpose(1, 2)

    def index(self, positions, slots=None):
        """Pool indices ([pages * PAGE] flattened) of `positions` ([n], or [rows, n]: each row's own) of the rows in
        `slots` (a device tensor; None: every row)."""
        pages = self.table if slots is None else self.table[slots]
        if positions.dim() == 1:
            positions = positions.expand(pages.shape[0], -1)
        return pages.gather(1, positions // PAGE) * PAGE + positions % PAGE


def slot_cache(config, pages: Pages, dtype, device):
    """A transformers Cache whose layers hold the KV pool ([pages, PAGE, kv heads, head width] each) and, on the
    model's own attention path (SDPA), write each row's new key/value at its position (`pages.write`) and hand
    attention each row's keys: its fixed slot, or (a pool) gathered from its pages over the bucket (`pages.read`)."""
    from transformers.cache_utils import Cache, StaticLayer

    n_layers, heads, head_dim = _kv_shape(config)

    class PagedLayer(StaticLayer):
        def __init__(self):
            super().__init__(max_cache_len=pages.width * PAGE)
            self.device, self.batch_size, self.num_heads = device, pages.table.shape[0], heads
            self.k_head_dim = self.v_head_dim = head_dim
            self.keys = torch.zeros(pages.count, PAGE, heads, head_dim, dtype=dtype, device=device)
            self.values = torch.zeros_like(self.keys)
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = self.keys.view(-1, heads, head_dim), self.values.view(-1, heads, head_dim)
            keys.index_copy_(0, pages.write, key_states[:, :, 0])
            values.index_copy_(0, pages.write, value_states[:, :, 0])
            if pages.static:  # (attention reads the step's bucket of it)
                return pages.contiguous(self.keys), pages.contiguous(self.values)
            return keys[pages.read].transpose(1, 2), values[pages.read].transpose(1, 2)

    return Cache(layers=[PagedLayer() for _ in range(n_layers)])


def prefill_cache(slot_cache_, pages: Pages):
    """A Cache for a prefill's forward whose layers write each prompt's keys/values into its row's pages
    (`pages.prompt`: pool indices [prompts, length]), and hand the prompts' own keys/values to attention."""
    from transformers.cache_utils import Cache, DynamicLayer

    class PrefillLayer(DynamicLayer):
        def __init__(self, target):
            super().__init__()
            self.target = target

        def update(self, key_states, value_states, *args, **kwargs):
            where = pages.prompt[:, :key_states.shape[2]].reshape(-1)
            for pool, states in ((self.target.keys, key_states), (self.target.values, value_states)):
                flat = pool.view(-1, *pool.shape[2:])  # [pages * PAGE, kv heads, head width]
                flat.index_copy_(0, where, states.transpose(1, 2).reshape(-1, *flat.shape[1:]))
            return key_states, value_states

    return Cache(layers=[PrefillLayer(layer) for layer in slot_cache_.layers])


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    n_layers, heads, head_dim = _kv_shape(config)
    return 2 * n_layers * heads * head_dim * dtype_bytes


def _kv_shape(config) -> tuple[int, int, int]:
    """(decoder layers, key/value heads, head width) of a model config: what one cached token holds."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, heads, head_dim


def attention_fits(config) -> bool:
    """decodeops' attention serves this model's heads: a head width its tiles take (a power of two, 16 or more)."""
    head_dim = _kv_shape(config)[2]
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def buckets(length: int) -> list[int]:
    """Attention lengths captured: 256, 512, ... and the slot length itself."""
    out, b = [], MIN_BUCKET
    while b < length:
        out.append(b)
        b *= 2
    return out + [length]


def register_attention() -> None:
    """SDPA over the first `mask.shape[-1]` cache positions (the length bucket the step was captured for)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def slots_sdpa(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None:  # (a no-op slice in the prefill; no branch: the length stays symbolic)
            n = attention_mask.shape[-1]
            key, value = key[:, :, :n], value[:, :, :n]
        with deterministic_attention():
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION, slots_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


# --- sampling ------------------------------------------------------------------------------------------------
def sample(logits, u, temperature, top_p, greedy, sampling: bool = True):
    """Each row's next token: argmax for greedy rows; else temperature, top-p, and the inverse CDF at the row's own u.

    Every operation is per row, at fixed shapes, so a row's token depends only on its logits and its u (drawn from
    the visitor's seeded generator on the host): the same answer alone or in any batch. Whether a token ends its row
    (its prompt format's stop ids) is the host's decision (batching.Row.add), so rows of different formats share a
    step.
    """
    best = logits.argmax(-1)
    if not sampling:  # every row greedy (eager steps only: a captured step always carries the sampling)
        return best
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    p, index = probs.sort(dim=-1, descending=True)
    cum = p.cumsum(-1)
    p = torch.where(cum - p < top_p[:, None], p, 0)  # the smallest set whose mass reaches top_p (the top one always)
    cum = p.cumsum(-1)
    pick = (cum < (u * cum[:, -1])[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)
    drawn = index.gather(-1, pick[:, None])[:, 0]
    return torch.where(greedy, best, drawn)


# --- the decoder ---------------------------------------------------------------------------------------------
class SlotDecoder:
    """The slot state on the device and the step that advances every slot by one token.

    The step reads only device buffers (each slot's input token and position, its sampling inputs, the KV cache and
    the adapter columns), so it is one graph per length bucket; it ends by writing each slot's new token as its next
    input and moving its live slots one position on. So steps can follow each other without the host: the serving
    loop (`launch`, then `collect` the step before) launches step k+1 before it reads step k's tokens, and the host's
    work on them (stop ids, streaming to visitors) overlaps the GPU's next step instead of stalling it. The host
    changes a slot between steps through `set_row` and `clear` (kernels ordered on the same stream) and stages each
    step's sampling inputs (u, temperature, top-p, greedy, live) in pinned buffers. `step` is the synchronous form
    (the host's `host_ints` copied in first) that the exactness checks and tests use.
    """

    def __init__(self, model, rows: int, length: int, columns: int, capture: str | None = "graphs", targets=None,
                 strict: bool = False, nf4: bool = False, fused: bool = False, pages: int | None = None):
        self.model, self.rows, self.length = model, rows, length
        self.capture_mode, self.targets, self.strict = capture, targets, strict
        self.device = model.device
        self.dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
        cuda = self.device.type == "cuda"
        self.ints = torch.zeros(2, rows, dtype=torch.long, device=self.device)  # input token, position
        # u, temperature, top-p, greedy, live (a slot in use moves on a position each step; a free one stays at 0)
        self.floats = torch.zeros(5, rows, dtype=torch.float32, device=self.device)
        self.host_ints = torch.zeros(2, rows, dtype=torch.long, pin_memory=cuda)
        self.host_floats = torch.zeros(5, rows, dtype=torch.float32)
        self.host_floats[1:3] = 1.0
        # two of each staging buffer: step k+1's are filled while step k's copies may still be pending
        self._staged = [torch.zeros(5, rows, dtype=torch.float32, pin_memory=cuda) for _ in range(2)]
        self._next = [torch.zeros(rows, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._done = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._launched = 0  # steps launched; collected ones are counted by _collected
        self._collected = 0
        self.kv_index = torch.arange(length, device=self.device)
        for t in (self.ints, self.floats, self.kv_index):
            torch._dynamo.mark_static_address(t)
        self.columns = AdapterColumns(model, columns, rows, self.dtype, self.device, targets, strict, nf4,
                                      PREFILL_ROWS)
        # the 4-bit matmuls of the step: strict wins over the kernel (check_exact found drift)
        self.matmul = ("16-bit (no 4-bit weights)" if not self.columns.four_bit
                       else "dequantize + cuBLAS (strict)" if strict else "nf4mm" if self.columns.nf4_linears
                       else "bitsandbytes")
        # the KV pool: `pages` pages, each row's taken as it joins (`reserve`); None: fixed slots
        self.pages = Pages(rows, length, pages, self.device)
        self.cache = slot_cache(model.config, self.pages, self.dtype, self.device)
        self._configs = []
        self._norms: list[tuple] = []  # (parent, name, the model's own RMSNorm) replaced by decodeops.RMSNorm
        self._forwards: list = []  # attention and MLP modules whose decode steps run decodeops' kernels
        self.fused = fused and self.dtype in (torch.bfloat16, torch.float16)
        self.fused_attention = False  # decodeops' attention in the step (else the model's, through PagedLayer)
        if self.fused:
            self._fuse()
        register_attention()
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and getattr(c, "_attn_implementation", None) not in (None, ATTENTION):
                self._configs.append((c, c._attn_implementation))
                c._attn_implementation = ATTENTION
        self.buckets = buckets(length)
        self._graphs: dict[int, tuple] = {}
        self.prefill_slot = torch.zeros(PREFILL_ROWS, dtype=torch.long, device=self.device)  # the rows it writes
        self.prefill_last = torch.zeros(PREFILL_ROWS, dtype=torch.long, device=self.device)  # prompts' last positions
        self._prefills: dict[int, tuple] = {}  # padded prompt length -> (graph, input ids, logits)
        self.last_logits = None  # the last step's logits [rows, vocab] (teacher-forced checks)
        self._logits_fn = self._logits
        self.capture_s = 0.0
        self.exactness: dict = {}

    def _fuse(self) -> None:
        """decodeops' kernels in the model for this decoder's life: every RMSNorm in one kernel; and in the decode
        step (prompts keep the model's own path) each attention layer's rotary, cache write and attention over each
        row's own length in three kernels, each MLP's silu(gate) * up in one. Instance attributes only: the model's
        classes, and any other model of the process (a training run), are untouched."""
        from .decodeops import RMSNorm, is_rms_norm

        attention = attention_fits(self.model.config)
        for module in list(self.model.modules()):
            for child_name, child in list(module.named_children()):
                if is_rms_norm(child):
                    setattr(module, child_name, RMSNorm(child))
                    self._norms.append((module, child_name, child))
            kind = type(module).__name__
            if attention and kind == "LlamaAttention":
                module.forward = self._attention_forward(module)
                self._forwards.append(module)
                self.fused_attention = True
            elif kind == "LlamaMLP" and type(getattr(module, "act_fn", None)).__name__ in SILU:
                module.forward = self._mlp_forward(module)
                self._forwards.append(module)

    def _attention_forward(self, module):
        from .decodeops import attend, rope_and_store

        own = module.forward

        def forward(hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
            if self.columns.prefilling or attention_mask is None or cache is None:
                return own(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                           cache=cache, **kwargs)
            layer, pos, table = cache.layers[module.layer_idx], self.ints[1], self.pages.table
            q = rope_and_store(module.q_proj(hidden_states), module.k_proj(hidden_states),
                               module.v_proj(hidden_states), *position_embeddings, pos, table, layer.keys, layer.values)
            out = attend(q, layer.keys, layer.values, table, pos, attention_mask.shape[-1], module.scaling)
            return module.o_proj(out.view(*hidden_states.shape[:-1], -1)), None

        return forward

    def _mlp_forward(self, module):
        from .decodeops import silu_mul

        own = module.forward

        def forward(x):
            if self.columns.prefilling:
                return own(x)
            return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))

        return forward

    def _unfuse(self) -> None:
        for parent, name, module in self._norms:
            setattr(parent, name, module)
        for module in self._forwards:
            del module.forward  # the class's forward again
        self._norms.clear()
        self._forwards.clear()

    # --- the step ---------------------------------------------------------------------------------------------
    def _logits(self, positions):
        """Every slot's next-token logits, attending over cache `positions` (a prefix of kv_index: the bucket)."""
        tokens, pos = self.ints[0], self.ints[1]
        mask = (positions[None, :] <= pos[:, None])[:, None, None, :]
        if not self.fused_attention:  # where the model's attention writes each row's key and reads its bucket
            self.pages.write = self.pages.index(pos[:, None])[:, 0]
            self.pages.read = None if self.pages.static else self.pages.index(positions)
        out = self.model(input_ids=tokens[:, None], position_ids=pos[:, None], attention_mask=mask, cache=self.cache,
                         use_cache=True)
        return out.logits[:, -1].float()

    def _forward(self, positions, sampling: bool = True):
        """Every slot's next token and logits; the new tokens become the next inputs and live slots move on."""
        logits = self._logits_fn(positions)
        f = self.floats
        tokens = sample(logits, f[0], f[1], f[2], f[3] > 0.5, sampling)
        self.ints[0].copy_(tokens)
        # clamped: a slot that reached its end (the host ends its row) rewrites its last position, never past it
        self.ints[1].add_(f[4].long()).clamp_(max=self.length - 1)
        return tokens, logits

    def _positions(self, length: int):
        positions = self.kv_index[:length]
        torch._dynamo.maybe_mark_dynamic(positions, 0)
        return positions

    def bucket(self, max_pos: int) -> int:
        return next(b for b in self.buckets if b > max_pos)

    def capture(self, progress: Callable[[str], None] = lambda s: None) -> float:
        """Compile (if asked) and capture one graph per length bucket; the seconds it took."""
        t0 = time.perf_counter()
        if self.capture_mode == "compile":
            progress("compiling the decode step (once)")
            # The model's forward only: inductor (torch 2.11) failed to lower the sampling's cumsum; the sampling's
            # few kernels are captured eagerly. The attention length is symbolic: one compile serves the buckets.
            self._logits_fn = torch.compile(self._logits, fullgraph=True)
        pool = torch.cuda.graph_pool_handle()
        self._graphs.clear()
        for i, length in enumerate(self.buckets):
            progress(f"capturing decode graphs (once): {i + 1}/{len(self.buckets)}")
            with torch.no_grad():
                self._graphs[length] = captured(lambda: self._forward(self._positions(length)), pool)
        self._prefills.clear()
        try:
            self._capture_prompts(pool, progress)
        except Exception as e:  # a prompt still prefills without a graph, only slower to its first token
            self._prefills.clear()
            log.warning("chat: prompt graphs not captured (%s); prompts are prefilled eagerly", brief(e))
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        return self.capture_s

    def _capture_prompts(self, pool, progress) -> None:
        """One graph per prompt bucket shorter than the slot: the prompts' forward into slots `prefill_slot`."""
        lengths = [b for b in PREFILL_BUCKETS if b < self.length]
        for i, length in enumerate(lengths):
            progress(f"capturing prompt graphs (once): {i + 1}/{len(lengths)}")
            ids = torch.zeros(PREFILL_ROWS, length, dtype=torch.long, device=self.device)
            with torch.no_grad(), self._prefilling():  # (the graph reads prefill_mask as each replay finds it)
                graph, logits = captured(lambda: self._prompt_logits(ids, self.prefill_last), pool)
            self._prefills[length] = (graph, ids, logits)

    @property
    def prompt_buckets(self) -> list[int]:
        """The prompt lengths prefilled in captured graphs (a prompt takes the shortest that holds it)."""
        return sorted(self._prefills)

    def step(self, max_pos: int, sampling: bool = True, length: int | None = None) -> list[int]:
        """Synchronously: every slot's token and position from `host_ints`, one step; each slot's next token."""
        assert self._launched == self._collected, "a launched step is still to be collected"
        self.ints.copy_(self.host_ints)
        self.launch(max_pos, sampling, length)
        return self.collect()

    def launch(self, max_pos: int, sampling: bool = True, length: int | None = None) -> None:
        """Advance every slot one token without waiting for it (free slots too, harmlessly): from the tokens and
        positions on the device, with `host_floats` as the sampling inputs. At most two steps are left uncollected."""
        assert self._launched - self._collected < 2, "collect a step before launching a third"
        length = length or self.bucket(max_pos)
        i = self._launched % 2
        staged = self._staged[i]
        staged.copy_(self.host_floats)  # (its last copy was step k-1's, collected by now)
        self.floats.copy_(staged, non_blocking=True)
        if length in self._graphs:
            graph, (out, self.last_logits) = self._graphs[length]
            graph.replay()
        else:
            with torch.no_grad():
                out, self.last_logits = self._forward(self._positions(length), sampling)
        self._next[i].copy_(out, non_blocking=True)
        if self._done[i] is not None:
            self._done[i].record()
        self._launched += 1

    def collect(self) -> list[int]:
        """The oldest uncollected step's tokens, one per slot (waits for that step only)."""
        assert self._collected < self._launched, "no step to collect"
        i = self._collected % 2
        if self._done[i] is not None:
            self._done[i].synchronize()
        self._collected += 1
        return self._next[i].tolist()

    @property
    def in_flight(self) -> int:
        return self._launched - self._collected

    def set_row(self, slot: int, token: int, pos: int, live: bool = True) -> None:
        """A slot's next input token and position, written on the device after every step launched so far."""
        self.host_ints[0, slot], self.host_ints[1, slot] = token, pos
        self.ints[0, slot].fill_(token)
        self.ints[1, slot].fill_(pos)
        self.host_floats[4, slot] = float(live)

    def check_exact(self) -> dict:
        """Measure what the design relies on, with every slot decoding: the same inputs give the same logits twice
        (no run-to-run drift), a row's logits do not change when its neighbours' tokens and positions do, and a
        longer attention bucket gives a row the same logits. The largest logit difference seen, and which held."""
        rows = self.rows
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(3, 1000, (rows,), generator=g)
        pos = torch.randint(1, MIN_BUCKET - 1, (rows,), generator=g)
        for i in range(rows):  # (plan leaves the pool room for this)
            self.pages.reserve(i, MIN_BUCKET)

        def run(tok, p, length=None):
            self.host_ints[0], self.host_ints[1] = tok, p
            self.step(int(p.max()), length=length)
            return self.last_logits.clone()

        first = run(tokens, pos)
        again = run(tokens, pos)  # the same inputs rewrite the same keys/values: the state is as before
        longer = run(tokens, pos, self.buckets[1]) if len(self.buckets) > 1 else first
        others = tokens.clone()
        others[1:] = torch.randint(3, 1000, (rows - 1,), generator=g)
        other_pos = pos.clone()
        other_pos[1:] = torch.randint(1, MIN_BUCKET - 1, (rows - 1,), generator=g)
        # last: the neighbours write their caches at new positions, which would change their own later logits
        neighbours = run(others, other_pos)[0]
        for i in range(rows):
            self.clear(i)
        diffs = dict(repeat=(first - again).abs().max(), neighbours=(first[0] - neighbours).abs().max(),
                     bucket=(first - longer).abs().max())
        self.exactness = dict(strict=self.strict, buckets=len(self.buckets), **{k: float(v) for k, v in diffs.items()})
        return self.exactness

    # --- prompts ----------------------------------------------------------------------------------------------
    def prefill_length(self, n: int) -> int:
        """The length a prompt of n tokens is prefilled at: the shortest captured bucket that holds it, else n."""
        return next((b for b in self.prompt_buckets if b >= n), n)

    def prefill(self, slot: int, prompt: list[int], columns):
        """One prompt's prefill (see prefill_rows): its last position's logits."""
        return self.prefill_rows([(slot, prompt, columns)])[0]

    def prefill_rows(self, rows: list[tuple]) -> list:
        """Run one or two prompts of one prefill length, each (slot, token ids, adapter column mask), through the
        model together and store each one's keys/values in its slot; each one's last position's logits. Always
        PREFILL_ROWS rows of that length: a lone prompt runs twice (the same inputs give the same bits, written to
        the same slot), so a row's arithmetic is the same with either partner or none. In the captured graph of its
        bucket, else eagerly."""
        assert 1 <= len(rows) <= PREFILL_ROWS, len(rows)
        length = self.prefill_length(len(rows[0][1]))
        assert all(self.prefill_length(len(prompt)) == length for _, prompt, _ in rows), "prompts of two lengths"
        assert all(self.pages.held.get(slot) for slot, _, _ in rows), "a row without KV pages (Pages.reserve)"
        full = list(rows) + [rows[0]] * (PREFILL_ROWS - len(rows))
        self.prefill_slot.copy_(torch.tensor([slot for slot, _, _ in full]))
        self.prefill_last.copy_(torch.tensor([len(prompt) - 1 for _, prompt, _ in full]))
        self.columns.prefill_mask.copy_(torch.stack([columns for _, _, columns in full]))
        ids = torch.tensor([prompt + [0] * (length - len(prompt)) for _, prompt, _ in full])
        if length in self._prefills:
            graph, static_ids, logits = self._prefills[length]
            static_ids.copy_(ids)
            graph.replay()
        else:
            with torch.no_grad(), self._prefilling():
                logits = self._prompt_logits(ids.to(self.device), self.prefill_last)
        for slot, _, columns in rows:
            self.columns.decode_mask[slot].copy_(columns)
        # logits at every row's last position: row i's own is [i, i]
        return [logits[i, i].float() for i in range(len(rows))]

    def _prompt_logits(self, ids, last):
        """The logits at positions `last` of the prompts' forward whose keys/values go to slots `prefill_slot`."""
        self.pages.prompt = self.pages.index(self.kv_index[:ids.shape[1]], self.prefill_slot)
        cache = prefill_cache(self.cache, self.pages)
        return self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=last).logits

    @contextmanager
    def _prefilling(self):
        """The SlotLinears read the prompts' column masks (`prefill_mask`), the NF4Linears take bitsandbytes'
        path."""
        self.columns.mask = self.columns.prefill_mask
        self.columns.prefilling = True
        try:
            yield
        finally:
            self.columns.mask = self.columns.decode_mask
            self.columns.prefilling = False

    def first_token(self, logits, u: float, temperature: float, top_p: float, greedy: bool) -> int:
        f = lambda v: torch.tensor([v], dtype=torch.float32, device=self.device)  # noqa: E731
        return int(sample(logits[None], f(u), f(temperature), f(top_p), f(greedy) > 0.5)[0])

    def clear(self, slot: int) -> None:
        """A freed slot: no adapter columns, no pages, position 0, not live (it keeps decoding garbage into the trash
        page, which no one reads)."""
        self.columns.decode_mask[slot] = False
        self.pages.release(slot)
        self.set_row(slot, 0, 0, live=False)

    def row_kv(self, slot: int, n: int) -> list[tuple]:
        """A row's cached keys and values at positions 0..n-1, [kv heads, n, head width] each, layer by layer."""
        at = self.pages.index(self.kv_index[:n], torch.tensor([slot], device=self.device))[0]
        return [tuple(pool.view(-1, *pool.shape[2:])[at].transpose(0, 1) for pool in (layer.keys, layer.values))
                for layer in self.cache.layers]

    def close(self) -> None:
        """Give the model back as it was (its Linears, its attention) and drop the graphs and the cache."""
        self._graphs.clear()
        self._prefills.clear()
        self.columns.restore()
        self._unfuse()
        for c, name in self._configs:
            c._attn_implementation = name
        self._configs.clear()
        # what holds memory goes now, not when the garbage collector finds the decoder (its bound `_logits_fn` is a
        # cycle): a decoder a caller still holds must not keep the base or the KV cache on the card
        self.cache = self.last_logits = self._logits_fn = self.model = None


_side_streams: dict = {}  # device -> the one side stream every capture warms up on


def captured(fn, pool=None):
    """(a CUDA graph of fn's kernels, fn's output), after two warm runs on a side stream (compile, cuBLAS workspaces,
    bitsandbytes' lazy state). One side stream a device for every capture: cuBLAS keeps a workspace (~32 MB) per
    stream for the life of the process, so a new stream per capture held ~0.4 GB after an engine unloaded (the GPU
    test)."""
    device = torch.cuda.current_device()
    side = _side_streams.get(device) or _side_streams.setdefault(device, torch.cuda.Stream())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def open_decoder(model, rows: int, length: int, columns: int, capture: str | None, targets,
                 progress: Callable[[str], None] = lambda s: None, nf4: bool = False, fused: bool = False,
                 pages: int | None = None) -> SlotDecoder:
    """A captured SlotDecoder whose rows were measured exact on this card, tightened where they were not.

    `check_exact` runs right after capture. Run-to-run drift or a row that changes with its neighbours: capture
    again with the strict 4-bit path (dequantize + cuBLAS for every row count). A longer bucket that changes a row:
    one bucket, the whole slot, every step (exact, slower on long slots). What still differs is logged. `nf4`: the
    4-bit Linears' decode matmuls run the nf4mm kernel (the strict path replaces it too); `fused`: decodeops'
    attention and RMSNorm kernels."""
    decoder = SlotDecoder(model, rows, length, columns, capture, targets, nf4=nf4, fused=fused, pages=pages)
    if capture is None:
        return decoder
    try:
        decoder.capture(progress)
        report = decoder.check_exact()
        if report["repeat"] or report["neighbours"]:
            progress("rows drifted: capturing again with the strict 4-bit path")
            log.warning("chat: decode rows not exact (%s); capturing again with dequantize + cuBLAS", report)
            decoder.close()
            decoder = SlotDecoder(model, rows, length, columns, capture, targets, strict=True, fused=fused,
                                  pages=pages)
            decoder.capture(progress)
            report = decoder.check_exact()
        if report["bucket"]:
            progress("attention lengths drifted: capturing one length")
            log.warning("chat: a longer attention bucket changed a row's logits (%s); attending over the whole slot",
                        report)
            decoder.buckets = [decoder.length]
            decoder.capture(progress)
            report = decoder.check_exact()
    except BaseException:
        decoder.close()  # the model as it was, for the fallback
        raise
    if report["repeat"] or report["neighbours"]:
        log.warning("chat: decode rows still not bit-exact on this card: %s", report)
    return decoder


def plan(model, context: int, max_rows: int, targets=None, paged: bool = False, min_rows: int = 8,
         reserve_gib: float = 1.5) -> tuple[int, int, int, int | None]:
    """(rows, slot length, adapter columns, KV pages or None for fixed slots) that fit the memory left on the card
    after the base.

    `paged` (decodeops' attention runs: it reads each row's pages in place): `max_rows` rows, each up to `context`
    tokens, share a pool of KV pages, as many as the card holds and at most every row's whole slot; the pool holds at
    least one visitor's two panes at the full slot (else the slot gets shorter) and every row's exactness check
    (`check_exact`), with fewer rows where even that does not fit. Otherwise fixed slots (`Pages`' docstring says
    why): every slot holds a whole conversation where memory allows `max_rows` of them; where it does not (a T4), the
    slots get shorter so that at least `min_rows` (4 visitors) still fit; requests longer than a slot are told so. On
    the CPU there is no card to plan for: `max_rows` fixed slots of `context`.
    """
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    per_token = kv_bytes_per_token(model.config, torch.finfo(dtype).bits // 8)
    if model.device.type != "cuda":
        return max_rows, context, 256, None
    dev = model.device
    free, total = torch.cuda.mem_get_info(dev)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(dev)
    cap = fraction * total - torch.cuda.memory_reserved(dev)
    budget = min(free, cap) - reserve_gib * 2**30
    columns = 256 if budget > 20 * 2**30 else 128
    budget -= column_bytes(model, columns, torch.finfo(dtype).bits // 8, targets)
    too_little = MemoryError(f"{budget / 2**30:.1f} GiB left for the KV cache: too little for two chat rows")
    if not (paged and attention_fits(model.config)):
        rows, length = min(max_rows, int(budget // (context * per_token))), context
        if rows < min_rows:
            length = int(budget // (min_rows * per_token)) // MIN_BUCKET * MIN_BUCKET
            rows = min(max_rows, int(budget // max(1, length * per_token)))
        rows -= rows % 2
        if rows < 2 or length < MIN_BUCKET:
            raise too_little
        return rows, min(length, context), columns, None
    rows, length = max_rows - max_rows % 2, context
    pages = int(budget // (PAGE * per_token))
    while length > MIN_BUCKET and pages < 2 * math.ceil(length / PAGE) + 1:  # not one visitor's two whole panes
        length -= MIN_BUCKET
    width = math.ceil(length / PAGE)
    while rows > 2 and pages < rows * (MIN_BUCKET // PAGE) + 1:
        rows -= 2
    if pages < max(rows * (MIN_BUCKET // PAGE), 2 * width) + 1:
        raise too_little
    return rows, length, columns, min(pages, rows * width + 1)


RELOAD = "reload"  # batching.RELOAD: an adapter needs columns on Linears this capture has none on

# --- the scheduler's backend ---------------------------------------------------------------------------------
class SlotBackend:
    """`batching.Scheduler`'s protocol over a SlotDecoder: free slots, adapters resident in columns, each row's
    sampling inputs and its own generator (seeded from the visitor's seed, so a sample is the same alone or batched)."""

    def __init__(self, decoder: SlotDecoder, read: Callable[[Path], LoraWeights] = read_adapter):
        self.decoder, self._read = decoder, read
        self.model = decoder.model
        self.rows = decoder.rows
        self.free = list(range(decoder.rows))[::-1]  # slot 0 first
        self.active: dict[int, object] = {}
        self.users: dict[str, int] = {}  # adapter name -> rows using it now
        self.last_used: dict[str, float] = {}
        self.next_pos: dict[int, int] = {}  # slot -> the position its row's next launched step writes
        self.pending: list[list[tuple]] = []  # per uncollected step: (row, position) of the rows it advanced
        # steps in flight: two on a GPU (the host reads step k while step k+1 runs); on the CPU the host is the
        # device, so each step's tokens are read at once
        self.depth = 2 if decoder.device.type == "cuda" else 1

    def free_rows(self) -> int:
        return len(self.free)

    def wait_reason(self, rows) -> str | None:
        for row in rows:
            if len(row.prompt) >= self.decoder.length:
                raise ValueError(f"the conversation is {len(row.prompt)} tokens; a chat row on this server holds "
                                 f"{self.decoder.length} tokens, prompt and answer together: clear it and start again")
            if row.adapter is not None and row.adapter.rank > self.decoder.columns.columns:
                raise ValueError(f"the adapter's rank ({row.adapter.rank}) is over the chat engine's "
                                 f"{self.decoder.columns.columns} adapter columns")
            if row.adapter is not None and not row.adapter.modules <= set(self.decoder.columns.linears):
                outside = sorted(row.adapter.modules - self.decoder.columns.served)
                if outside:
                    raise ValueError(f"the adapter targets {outside[0]}, which is not a Linear of the model's decoder "
                                     "layers; the chat engine serves adapters on those")
                return RELOAD
        if len(self.free) < len(rows):
            return f"all {self.rows} rows are answering"
        pages = self.decoder.pages
        need = sum(pages.needed(self._tokens(row)) for row in rows)
        if need > pages.count - 1:
            raise ValueError(f"the conversation needs {need * PAGE} tokens of KV memory for its panes; this server's "
                             f"chat holds {(pages.count - 1) * PAGE}: clear it and start again")
        if not pages.can_take(need):
            return "the answers in progress hold the chat's memory"
        placed = dict(self.decoder.columns.placed)
        for name, rank in {r.adapter.name: r.adapter.rank for r in rows if r.adapter is not None}.items():
            if name not in placed and self._make_room(placed, round_up(rank, COLUMN_GRAIN)) is None:
                return "every adapter slot is in use by other visitors' adapters"
        return None

    def join(self, rows) -> None:
        """A visitor's rows take slots (their adapters columns) and are prefilled, two of one prefill length at a
        time (its two panes' first turn: one forward), each getting its first token."""
        joined = []
        try:
            for row in rows:
                name = row.adapter.name if row.adapter is not None else None
                if name is not None and name not in self.decoder.columns.placed:
                    weights = self._read(row.adapter.folder)
                    start = self._make_room(self.decoder.columns.placed, round_up(weights.rank, COLUMN_GRAIN))
                    self.decoder.columns.place(name, weights, start)
                row.slot = self.free.pop()
                joined.append(row)
                self.active[row.slot] = row
                self.decoder.pages.reserve(row.slot, self._tokens(row))
                if name is not None:
                    self.users[name] = self.users.get(name, 0) + 1
                row.rng = torch.Generator().manual_seed(row.settings.seed)
            for pair in self._prefill_groups(joined):
                masks = [self.decoder.columns.row_mask(r.adapter.name if r.adapter is not None else None) for r in pair]
                logits = self.decoder.prefill_rows([(r.slot, r.prompt, m) for r, m in zip(pair, masks)])
                for row, row_logits in zip(pair, logits):
                    s = row.settings
                    token = self.decoder.first_token(row_logits, self._u(row), s.temperature or 1.0, s.top_p,
                                                     s.greedy)
                    h = self.decoder.host_floats
                    h[1, row.slot], h[2, row.slot], h[3, row.slot] = s.temperature or 1.0, s.top_p, float(s.greedy)
                    self.decoder.set_row(row.slot, token, len(row.prompt))
                    self.next_pos[row.slot] = len(row.prompt)
                    self._advance(row, token, len(row.prompt))
        except BaseException:
            for row in joined:
                self.leave(row)
            raise

    def step(self) -> None:
        """Launch the next step for the rows still answering, then hand out the tokens of the step before it: the
        host's work on them overlaps the GPU's next step. A row that ended in that earlier step was also in the one
        just launched, which decodes a token nobody reads."""
        rows = [r for r in self.active.values() if not r.done]
        if rows:
            hf = self.decoder.host_floats
            for row in rows:
                hf[0, row.slot] = self._u(row)
            positions = [(row, self.next_pos[row.slot]) for row in rows]
            self.decoder.launch(max(pos for _, pos in positions), sampling=not all(r.settings.greedy for r in rows))
            self.pending.append(positions)
            for row, pos in positions:
                self.next_pos[row.slot] = min(pos + 1, self.decoder.length - 1)
        while self.pending and (len(self.pending) >= self.depth or not rows):
            tokens = self.decoder.collect()
            for row, pos in self.pending.pop(0):
                if not row.done and self.active.get(row.slot) is row:
                    self._advance(row, tokens[row.slot], pos + 1)
            rows = [r for r in rows if not r.done]  # none left: the step in flight is collected too (the GPU idle)

    def leave(self, row) -> None:
        slot = row.slot
        if slot is None or self.active.get(slot) is not row:
            return
        del self.active[slot]
        self.decoder.clear(slot)
        self.free.append(slot)
        row.slot = None
        if row.adapter is not None:
            self.users[row.adapter.name] -= 1
            self.last_used[row.adapter.name] = time.monotonic()

    def forget(self, names) -> None:
        for name in names:
            if not self.users.get(name):
                self.decoder.columns.placed.pop(name, None)
                self.users.pop(name, None)
                self.last_used.pop(name, None)

    def close(self) -> None:
        while self.decoder.in_flight:
            self.decoder.collect()
        self.pending.clear()
        self.decoder.close()

    # --- helpers ----------------------------------------------------------------------------------------------
    def _prefill_groups(self, rows) -> list[list]:
        """Rows in groups of up to PREFILL_ROWS that share a prefill length, in their order (a pane's prefill must
        not take its partner's longer bucket: its bits would then depend on the partner)."""
        groups: list[list] = []
        open_: dict[int, list] = {}
        for row in rows:
            length = self.decoder.prefill_length(len(row.prompt))
            group = open_.get(length)
            if group is None or len(group) == PREFILL_ROWS:
                group = open_[length] = []
                groups.append(group)
            group.append(row)
        return groups

    def _tokens(self, row) -> int:
        """The positions a row may write: its prompt and its longest answer, within the slot."""
        return min(len(row.prompt) + max(row.max_new, 1), self.decoder.length)

    def _u(self, row) -> float:
        return 0.0 if row.settings.greedy else float(torch.rand((), generator=row.rng))

    def _advance(self, row, token: int, pos: int) -> None:
        """The row's new token (the device already took it as the next step's input, at `pos`); a row whose slot is
        full ends."""
        row.add(token)
        if pos >= self.decoder.length:
            row.done = True

    def _make_room(self, placed: dict, width: int) -> int | None:
        """A first column for `width` columns, evicting idle adapters (least recently used first) as needed."""
        columns = self.decoder.columns.columns
        idle = sorted((n for n in placed if not self.users.get(n)), key=lambda n: self.last_used.get(n, 0.0))
        while (start := find_room(placed, width, columns)) is None and idle:
            placed.pop(idle.pop(0))
        return start
