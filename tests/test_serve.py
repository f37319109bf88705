"""The chat engine that serves many visitors (issue 14): slot decoding on the real 4-bit path with a tiny Llama.

On the CPU the product falls back to today's eager generate path (logged once); QLORA_CHAT_DECODE=eager runs the slot
engine itself without graphs, which is what most tests here do: the scheduler, the slots, the per-row adapter columns
and the per-row sampling are the same code the CUDA graphs capture on a GPU.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time

import pytest

from apphelpers import Records, tiny_run
from qlora.chat import ChatEngine
from qlora.config import GenerationSettings
from qlora.device import BusyError, gpu_lock

QUESTIONS = ["What is the secret word?", "Who guards the gate? Tell me all you know about the gate and its guard.",
             "Hi", "How many moons are there, and what are their names?"]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("serve-runs")
    tiny_run(root, "qv", tiny_llama_dir, seed=1)
    tiny_run(root, "qv2", tiny_llama_dir, seed=2, r=16)
    tiny_run(root, "all", tiny_llama_dir, targets=("all-linear",), seed=3)
    return root


@pytest.fixture(scope="module", params=[1, 2], ids=["each-step-read-at-once", "one-step-launched-ahead"])
def engine(request, tiny_llama_dir, runs_root):
    """The slot engine without graphs. Its second form launches each step before the host reads the step before (as
    on a GPU), which the CPU would not do by itself: answers, stops and freed slots must be the same. The KV pool's
    free pages are shuffled, so every row's pages lie apart and out of order, as after a busy hour."""
    import random

    from qlora import slots

    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=4)
    e.load_adapter(runs_root / "qv")
    e.load_adapter(runs_root / "qv2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slots, "plan", pooled(slots.plan))
        e.load()
    e._scheduler.backend.depth = request.param
    random.Random(0).shuffle(e._scheduler.backend.decoder.pages.free)
    yield e
    e.unload()


def pooled(plan):
    """slots.plan as on a card where decodeops' attention runs: the rows share a pool of KV pages (the CPU's plan gives
    fixed slots), here as many as every row's whole slot."""
    def wrapped(*args, **kwargs):
        from qlora.slots import PAGE

        rows, length, columns, _ = plan(*args, **kwargs)
        return rows, length, columns, rows * -(-length // PAGE) + 1

    return wrapped


def greedy(n=10, **kw):
    return GenerationSettings(temperature=0, max_new_tokens=n, **kw)


def reference(tiny_llama_dir, run_dir, prompt_ids, n):
    """Eager transformers + peft on the same 4-bit weights: generate's tokens, base (adapter off) and adapter."""
    import torch
    from peft import PeftModel

    from qlora.model import load_base

    model = PeftModel.from_pretrained(load_base(str(tiny_llama_dir), "nf4", "fp32"), str(run_dir / "adapter"))
    model.eval()
    ids = torch.tensor([prompt_ids])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
              temperature=None, top_p=None, top_k=None, pad_token_id=2, eos_token_id=2)
    with torch.no_grad():
        tuned = model.generate(**kw)[0, ids.shape[1]:].tolist()
        with model.disable_adapter():
            base = model.generate(**kw)[0, ids.shape[1]:].tolist()
    return [t for t in base if t != 2], [t for t in tuned if t != 2], model


def test_slot_engine_greedy_answers_equal_generate_for_base_and_adapter_rows(engine, tiny_llama_dir, runs_root):
    import torch

    name = engine.load_adapter(runs_root / "qv")
    ids = engine.prompt_ids([], QUESTIONS[0])
    base, tuned = engine.rows_ids([(ids, None, greedy(12)), (ids, name, greedy(12))])
    ref_base, ref_tuned, peft_model = reference(tiny_llama_dir, runs_root / "qv", ids, 12)
    assert base == ref_base and tuned == ref_tuned
    assert base != tuned  # the adapter changes the answer
    assert engine.backend_kind == "eager"
    # teacher-forced: the slot step's logits are eager peft's within fp32 rounding
    decoder = engine._scheduler.backend.decoder
    decoder.pages.reserve(0, len(ids) + len(tuned))
    logits = [decoder.prefill(0, ids, decoder.columns.row_mask(name))]
    for k, t in enumerate(tuned[:-1]):
        decoder.host_ints[0, 0], decoder.host_ints[1, 0] = t, len(ids) + k
        decoder.step(len(ids) + k)
        logits.append(decoder.last_logits[0].clone())
    decoder.clear(0)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor([ids + tuned[:-1]])).logits[0, len(ids) - 1:]
    torch.testing.assert_close(torch.stack(logits), ref, rtol=1e-4, atol=1e-4)


def test_visitors_in_one_batch_each_get_their_answer_alone(engine, runs_root):
    """Visitors with different prompts, lengths, adapters (or none), greedy or seeded sampling, arriving at once: more
    rows than slots, so some wait; every visitor's two panes equal what that visitor gets alone, and each pane alone."""
    names = [engine.load_adapter(runs_root / n) for n in ("qv", "qv2")]
    settings = [greedy(10), GenerationSettings(temperature=0.9, top_p=0.8, seed=7, max_new_tokens=10),
                greedy(6, system_prompt="Be brief."), GenerationSettings(temperature=1.2, top_p=1.0, seed=1,
                                                                         max_new_tokens=8)]
    requests = [(q, settings[i], names[i % 2] if i != 2 else None) for i, q in enumerate(QUESTIONS)]
    alone = [list(engine.stream_pair([], [], q, s, a))[-1] for q, s, a in requests]
    panes = [engine.generate_sequential(q, s, a) if a else None for q, s, a in requests[:2]]
    assert panes == alone[:2]  # each pane alone (a one-row request) = that pane in its visitor's pair
    waits, out = [], [None] * len(requests)

    def visit(i):
        q, s, a = requests[i]
        for update in engine.stream([], [], q, s, a):
            if update.waiting:
                waits.append(update.waiting)
            else:
                out[i] = (update.base, update.tuned)

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == alone
    assert alone[1][0] != alone[1][1] and alone[0] != alone[1]
    assert any("waiting for a free chat slot" in w for w in waits), waits  # 4 slots, 8 rows: some waited


def test_stop_and_disconnect_end_only_that_visitors_rows(engine, runs_root):
    name = engine.load_adapter(runs_root / "qv")
    long = greedy(200)
    solo = list(engine.stream_pair([], [], QUESTIONS[3], greedy(30), name))[-1]
    stop = threading.Event()
    stopped = engine.stream_pair([], [], QUESTIONS[1], long, name, stop)
    gone = engine.stream_pair([], [], QUESTIONS[0], long, name)
    next(stopped), next(gone)
    result = {}
    other = threading.Thread(target=lambda: result.setdefault("x", list(engine.stream_pair(
        [], [], QUESTIONS[3], greedy(30), name))[-1]))
    other.start()
    stop.set()  # the visitor's Stop
    gone.close()  # the client went away: its stream is closed
    rest = list(stopped)
    other.join(120)
    assert len(rest) < 10 and result["x"] == solo  # the third visitor never noticed
    backend = engine._scheduler.backend
    deadline = time.monotonic() + 10
    while backend.free_rows() < backend.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.free_rows() == backend.rows  # every slot came back
    assert not gpu_lock.locked()  # idle: the GPU is free for training


def test_chat_during_training_says_busy_at_once_and_loads_nothing(tiny_llama_dir, runs_root):
    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2)
    name = e.load_adapter(runs_root / "qv")
    with gpu_lock:  # what a training run holds
        t0 = time.perf_counter()
        with pytest.raises(BusyError, match="the GPU is busy"):
            next(e.stream_pair([], [], "hi", greedy(), name))
        assert time.perf_counter() - t0 < 1 and e.model is None
    assert list(e.stream_pair([], [], "hi", greedy(4), name))[-1][1]  # afterwards chat answers
    e.unload()


def test_fallback_to_the_eager_generate_path_is_used_and_logged_once(tiny_llama_dir, runs_root):
    records = Records()
    logging.getLogger("qlora.chat").addHandler(records)
    try:
        auto = ChatEngine(str(tiny_llama_dir), "nf4", "fp32")  # the CPU default
        name = auto.load_adapter(runs_root / "qv")
        first = list(auto.stream_pair([], [], QUESTIONS[0], greedy(6), name))[-1]
        list(auto.stream_pair([], [], QUESTIONS[1], greedy(6), name))
        assert auto.backend_kind == "generate"
        lines = [line for line in records.lines if "using the eager generate path" in line]
        assert len(lines) == 1 and "no CUDA device" in lines[0], records.lines
        forced = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="graphs")  # capture fails on a CPU
        name = forced.load_adapter(runs_root / "qv")
        assert list(forced.stream_pair([], [], QUESTIONS[0], greedy(6), name))[-1] == first
        lines = [line for line in records.lines if "using the eager generate path" in line]
        assert len(lines) == 2 and "capturing the decode step failed" in lines[1], lines
    finally:
        logging.getLogger("qlora.chat").removeHandler(records)
        auto.unload()
        forced.unload()


@pytest.mark.parametrize("decode", ["eager", "generate"])
def test_a_replaced_adapter_is_reloaded_and_gone_folders_are_dropped(decode, tiny_llama_dir, tmp_path):
    """Issue 12 item 5: a run folder deleted and another adapter copied under its name answers with the new weights;
    entries of folders that are gone are dropped."""
    tiny_run(tmp_path / "a", "same", tiny_llama_dir, seed=11)
    tiny_run(tmp_path / "b", "same", tiny_llama_dir, seed=12)
    tiny_run(tmp_path / "c", "other", tiny_llama_dir, seed=13)
    live = tmp_path / "runs"
    live.mkdir()
    shutil.copytree(tmp_path / "a" / "same", live / "same")
    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode=decode, max_rows=2)
    fresh = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode=decode, max_rows=2)
    try:
        old = e.load_adapter(live / "same")
        before = list(e.stream_pair([], [], QUESTIONS[0], greedy(8), old))[-1][1]
        shutil.rmtree(live / "same")
        shutil.copytree(tmp_path / "b" / "same", live / "same", copy_function=shutil.copy2)  # keeps mtimes
        new = e.load_adapter(live / "same")
        assert new != old and old not in e.adapters
        after = list(e.stream_pair([], [], QUESTIONS[0], greedy(8), new))[-1][1]
        expected = list(fresh.stream_pair([], [], QUESTIONS[0], greedy(8), fresh.load_adapter(tmp_path / "b" / "same"))
                        )[-1][1]
        assert after == expected and after != before
        shutil.rmtree(live / "same")
        e.load_adapter(tmp_path / "c" / "other")
        assert new not in e.adapters  # its folder is gone
        with pytest.raises(ValueError, match="not loaded"):
            next(e.stream_pair([], [], "hi", greedy(), new))
    finally:
        e.unload()
        fresh.unload()


def test_an_adapter_on_other_layers_reloads_the_engine_and_is_served(tiny_llama_dir, runs_root):
    """Adapter columns exist only on the Linears the registered adapters target; an adapter on other layers waits for
    the current answers, the engine loads again with columns there, and it answers as a fresh engine would."""
    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2)
    qv = e.load_adapter(runs_root / "qv")
    list(e.stream_pair([], [], "hi", greedy(4), qv))
    assert len(e._scheduler.backend.decoder.columns.linears) == 4  # q and v of 2 layers
    everything = e.load_adapter(runs_root / "all")
    answer = list(e.stream_pair([], [], QUESTIONS[0], greedy(8), everything))[-1]
    assert len(e._scheduler.backend.decoder.columns.linears) == 14
    fresh = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2)
    assert answer == list(fresh.stream_pair([], [], QUESTIONS[0], greedy(8), fresh.load_adapter(runs_root / "all"))
                          )[-1]
    e.unload()
    fresh.unload()


def test_a_conversation_longer_than_a_slot_is_refused_with_the_limit(tiny_llama_dir, runs_root, monkeypatch):
    from qlora import slots

    monkeypatch.setattr(slots, "plan", lambda *a, **k: (2, 256, 64, 2 * 4 + 1))  # 2 rows of 256 tokens, whole
    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager")
    name = e.load_adapter(runs_root / "qv")
    with pytest.raises(ValueError, match="a chat row on this server holds 256 tokens"):
        list(e.stream_pair([], [], "word " * 300, greedy(), name))
    assert list(e.stream_pair([], [], "hi", greedy(4), name))[-1][1]  # and the engine goes on
    e.unload()


def test_rows_share_a_pool_of_kv_pages_and_a_visitor_waits_for_memory_with_rows_free(tiny_llama_dir, runs_root,
                                                                                       monkeypatch):
    """Where the card holds fewer KV tokens than rows x slot (a T4), the rows share a pool of pages (slots.Pages): a
    row takes pages for its prompt and its longest answer as it joins and gives them back as it leaves. A visitor who
    finds rows free but not the memory waits, told why, and is answered once it frees; panes that could never fit the
    pool are refused with the limit; the pages all come back."""
    from qlora import slots

    # 4 rows of up to 256 tokens sharing 6 pages (384 tokens): one visitor at 3 pages a pane fills the pool
    monkeypatch.setattr(slots, "plan", lambda *a, **k: (4, 256, 64, 6 + 1))
    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager")
    try:
        name = e.load_adapter(runs_root / "qv")
        question = QUESTIONS[1]
        n = len(e.prompt_ids([], question))
        with pytest.raises(ValueError, match="needs 512 tokens of KV memory for its panes; this server's chat holds "
                                             "384"):
            list(e.stream([], [], question, greedy(256), name))  # two whole slots: 4 pages a pane
        first = e.stream([], [], question, greedy(3 * slots.PAGE - n), name)  # 3 pages a pane
        while next(first).waiting is not None:
            pass
        pages = e._scheduler.backend.decoder.pages
        assert len(pages.free) == 0 and e._scheduler.backend.free_rows() == 2
        second = e.stream([], [], QUESTIONS[2], greedy(4), name)
        assert next(second).waiting == ("waiting for a free chat slot (the answers in progress hold the chat's "
                                        "memory; you are next)")
        with pytest.raises(ValueError, match="holds 384"):  # queued behind the second: refused at once all the same
            list(e.stream([], [], question, greedy(256), name))
        first.close()  # the first visitor leaves: its pages serve the second
        assert [u for u in second if u.waiting is None][-1].tuned
        assert len(pages.free) == pages.count - 1 and not pages.table.any()
    finally:
        e.unload()


def test_the_exactness_check_run_after_capture_is_clean_and_leaves_the_slots_free(tiny_llama_dir):
    """`check_exact` (run on the GPU right after capture) on the CPU's eager step: no drift, no neighbour effect, no
    bucket effect; it must compare like with like (a check that rewrites a neighbour's cache then reads it is wrong)."""
    from qlora import slots
    from qlora.model import load_base

    model = load_base(str(tiny_llama_dir), "nf4", "fp32")
    model.config.use_cache = True
    decoder = slots.SlotDecoder(model, 16, 1024, 64, capture=None)
    try:
        report = decoder.check_exact()
        assert report == dict(strict=False, buckets=3, repeat=0.0, neighbours=0.0, bucket=0.0)
        assert decoder.host_ints.abs().sum() == 0 and not decoder.columns.decode_mask.any()
        assert not decoder.pages.held  # every row's pages given back
    finally:
        decoder.close()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # the model is given back as it was


def test_a_full_queue_says_so_and_loading_is_shown_as_a_waiting_state(tiny_llama_dir, runs_root):
    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2)
    name = e.load_adapter(runs_root / "qv")
    first = e.stream([], [], QUESTIONS[1], greedy(300), name)
    updates = [next(first)]
    while updates[-1].waiting is not None:  # the model loads while this visitor waits: it is told so
        updates.append(next(first))
    assert any(u.waiting and u.waiting.startswith("loading the chat model") for u in updates), updates
    e._scheduler.max_waiting = 1
    second = e.stream([], [], QUESTIONS[0], greedy(4), name)
    assert "waiting for a free chat slot" in next(second).waiting  # both rows are taken by the first visitor
    with pytest.raises(BusyError, match=r"the chat is full \(1 visitor waiting\)"):
        next(e.stream([], [], QUESTIONS[2], greedy(4), name))
    first.close()  # the first visitor leaves: the second is answered
    assert [u for u in second if u.waiting is None][-1].tuned
    e.unload()


@pytest.mark.parametrize("decode", ["eager", "generate"])
def test_a_row_ends_at_any_of_its_stop_ids(decode, tiny_llama_dir, runs_root):
    """Issue 19: a row ends at any of its prompt format's stop ids (prompts.stop_ids: the EOS and the end-of-turn
    token), a set per row: the slot engine decides on the host, the eager path hands the set to generate. Both panes
    end where their answers first reach an extra stop id, and the stop id itself is not shown."""
    from qlora.batching import Row

    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode=decode, max_rows=2)
    try:
        name = e.load_adapter(runs_root / "qv")
        ids, s = e.prompt_ids([], QUESTIONS[0], "", name), greedy(12)
        full = e.rows_ids([(ids, None, s), (ids, name, s)])  # the format's own stops: {EOS}
        assert all(len(f) == 12 for f in full)  # no early EOS: the cut below is the extra stop id's
        extra = [next(t for t in f if f.index(t) >= 2) for f in full]  # a token first met after 2 others
        rows = [Row(list(ids), e.adapters[name] if i else None, s, 12, frozenset({2, extra[0], extra[1]}))
                for i in range(2)]
        for _ in e._submit(rows, None).events():
            pass
        want = [f[:min(f.index(t) for t in extra if t in f)] for f in full]
        assert [r.ids for r in rows] == want and all(len(w) < 12 for w in want)  # both cut, each where it must be
    finally:
        e.unload()


def test_a_prompt_fills_its_slot_with_the_keys_and_values_a_dynamic_cache_holds(tiny_llama_dir):
    """The prefill writes each layer's keys/values straight into the row's slot (slots.prefill_cache; the captured
    prompt graphs on a GPU run the same code): the same tensors transformers' own DynamicCache holds after a forward
    of the same rows (a lone prompt runs as two rows, slots.PREFILL_ROWS), in that row only, and the same last
    logits."""
    import torch
    from transformers import DynamicCache

    from qlora import slots
    from qlora.model import load_base

    model = load_base(str(tiny_llama_dir), "nf4", "fp32")
    prompt = [1, 450, 4996, 17354, 1701, 29916, 432]
    n = len(prompt)
    decoder = slots.SlotDecoder(model, rows=3, length=64, columns=16, capture=None)
    try:
        decoder.pages.reserve(1, n)
        logits = decoder.prefill(1, prompt, decoder.columns.row_mask(None))
        slot_keys = [(k.clone(), v.clone()) for k, v in decoder.row_kv(1, slots.PAGE)]
        (page,) = decoder.pages.held[1]
        others = [torch.cat([layer.keys[:page], layer.keys[page + 1:]]) for layer in decoder.cache.layers]
    finally:
        decoder.close()  # the model's own Linears again, for the reference
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt] * slots.PREFILL_ROWS), cache=cache, use_cache=True,
                    logits_to_keep=torch.tensor([n - 1] * slots.PREFILL_ROWS))  # (each row's last position)
    assert torch.equal(logits, ref.logits[0, 0].float())
    for (keys, values), theirs, rest in zip(slot_keys, cache.layers, others, strict=True):
        assert torch.equal(keys[:, :n], theirs.keys[0]) and torch.equal(values[:, :n], theirs.values[0])
        assert not rest.any() and not keys[:, n:].any()  # nothing else written, in the row's page or another


def test_a_prompt_padded_to_its_bucket_gives_the_logits_and_keys_of_the_prompt_alone(tiny_llama_dir):
    """What a captured prompt graph runs on a GPU (`SlotDecoder._capture_prompts`), run eagerly here: the prompt padded
    at its end to the bucket's length, the logits taken at its last position. Causal attention keeps the pads out of
    the prompt's positions, so logits and keys equal the prompt's own up to the rounding of other matmul shapes."""
    import torch

    from qlora import slots
    from qlora.model import load_base

    model = load_base(str(tiny_llama_dir), "nf4", "fp32")
    decoder = slots.SlotDecoder(model, rows=2, length=128, columns=16, capture=None)
    try:
        prompt = [1, 450, 4996, 17354, 1701, 29916, 432, 975, 278, 17366]
        n, bucket = len(prompt), slots.PREFILL_BUCKETS[0]
        decoder.pages.reserve(0, n)
        decoder.pages.reserve(1, bucket)
        mask = decoder.columns.row_mask(None)
        alone = decoder.prefill(0, prompt, mask)  # no graphs on the CPU: the eager prefill
        decoder.prefill_slot.fill_(1)
        decoder.prefill_last.fill_(n - 1)
        decoder.columns.prefill_mask.copy_(mask[None])  # what prefill() sets before a graph's replay
        with torch.no_grad(), decoder._prefilling():
            ids = torch.tensor([prompt + [0] * (bucket - n)] * slots.PREFILL_ROWS)
            padded = decoder._prompt_logits(ids, decoder.prefill_last)[0, 0]
        torch.testing.assert_close(padded.float(), alone, rtol=1e-4, atol=1e-4)
        for (keys, values), (keys0, values0) in zip(decoder.row_kv(1, bucket), decoder.row_kv(0, n)):
            torch.testing.assert_close(keys[:, :n], keys0, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(values[:, :n], values0, rtol=1e-4, atol=1e-4)
        assert keys[:, n:bucket].abs().sum() > 0  # the pads' keys land past the prompt (decode overwrites)
    finally:
        decoder.close()


def test_a_visitors_two_panes_prefill_in_one_forward_and_each_gets_its_bits_alone(tiny_llama_dir, runs_root):
    """Both panes of a visitor (base and adapter, the first turn's one prompt or two of one length) run through the
    model as the two rows of one forward: one pass over the 4-bit weights. Each pane's logits and keys are, bit for
    bit, what it gets prefilled alone (a lone row runs as two copies of itself: the same shapes). Panes whose prompts
    take different lengths are prefilled apart, so no pane is padded to its partner's length."""
    import torch

    from qlora import slots
    from qlora.batching import Row
    from qlora.columns import read_adapter
    from qlora.config import GenerationSettings
    from qlora.model import load_base

    model = load_base(str(tiny_llama_dir), "nf4", "fp32")
    decoder = slots.SlotDecoder(model, rows=4, length=64, columns=16, capture=None)
    forwards = []
    own = decoder._prompt_logits
    decoder._prompt_logits = lambda ids, last: forwards.append(ids.shape) or own(ids, last)
    backend = slots.SlotBackend(decoder)
    try:
        decoder.columns.place("qv", read_adapter(runs_root / "qv" / "adapter"), 0)
        base_mask, tuned_mask = decoder.columns.row_mask(None), decoder.columns.row_mask("qv")
        first = [1, 450, 4996, 17354, 1701, 29916, 432]
        other = [1, 450, 4996, 17354, 1701, 29916, 975]  # the other pane's history, the same length
        longer = first + [278, 17366, 975]
        for slot in (0, 1, 3):
            decoder.pages.reserve(slot, len(longer))

        def alone(prompt, mask):
            logits = decoder.prefill(3, prompt, mask)
            return logits, [k.clone() for k, _ in decoder.row_kv(3, len(prompt))]

        for pair in ([(first, base_mask), (first, tuned_mask)], [(first, base_mask), (other, tuned_mask)]):
            forwards.clear()
            logits = decoder.prefill_rows([(slot, prompt, mask) for slot, (prompt, mask) in enumerate(pair)])
            assert forwards == [(2, len(first))]  # one forward of the two panes
            for slot, ((prompt, mask), got) in enumerate(zip(pair, logits)):
                want, keys = alone(prompt, mask)
                assert torch.equal(got, want)
                assert all(torch.equal(mine, k) for (mine, _), k in zip(decoder.row_kv(slot, len(prompt)), keys))
        with pytest.raises(AssertionError, match="two lengths"):
            decoder.prefill_rows([(0, first, base_mask), (1, longer, tuned_mask)])
        for slot in range(4):
            decoder.clear(slot)
        # the backend groups a visitor's rows by length: one forward for the first turn, two for panes apart
        settings = GenerationSettings(temperature=0, max_new_tokens=2)
        for prompts, expected in (((first, first), [(2, 7)]), ((first, longer), [(2, 7), (2, 10)])):
            forwards.clear()
            rows = [Row(prompt=list(p), adapter=None, settings=settings) for p in prompts]
            backend.join(rows)
            assert forwards == expected
            for row in rows:
                backend.leave(row)
    finally:
        decoder.close()


def test_a_load_asked_for_as_chat_unloads_is_told_busy_not_left_waiting():
    """The Chat tab asks for the model as it opens (ui/chat.py prepare); a training run may close the engine while
    that load waits behind another. Both the load asked for during the close and the one after it hear why, at once."""
    import threading

    from qlora.batching import Scheduler
    from qlora.device import BusyError

    class Backend:  # the scheduler's protocol, as far as a load and a close use it
        def close(self):
            pass

    loading, release = threading.Event(), threading.Event()

    def open_backend(progress):
        loading.set()
        release.wait(30)
        return Backend()

    scheduler = Scheduler(open_backend)
    first = threading.Thread(target=scheduler.open, kwargs=dict(timeout=30))
    first.start()
    assert loading.wait(10)  # the scheduler's thread is loading for the first asker
    second: list = []

    def ask_again():
        try:
            scheduler.open(timeout=10)
            second.append("loaded")
        except BaseException as e:  # noqa: BLE001
            second.append(e)

    waiter = threading.Thread(target=ask_again)
    waiter.start()
    time.sleep(0.2)  # the second asker waits behind the first load
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    time.sleep(0.2)
    release.set()
    for t in (first, waiter, closer):
        t.join(20)
    assert len(second) == 1 and isinstance(second[0], BusyError), second  # (without the fix: a TimeoutError)
    assert "unloaded" in str(second[0])
    with pytest.raises(BusyError, match="being unloaded"):
        scheduler.open(timeout=5)  # after the close: at once


def test_a_decoder_still_held_after_unload_keeps_neither_base_nor_cache(tiny_llama_dir):
    """Whoever still holds the closed decoder (a bench variable, a log record's argument) must not keep the base and
    the KV cache on the card: a training run starts by unloading chat (run36's second engine planned around the
    first's memory)."""
    import gc
    import weakref

    e = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2)
    e.load()
    decoder = e._scheduler.backend.decoder
    base, keys = weakref.ref(e._base), weakref.ref(decoder.cache.layers[0].keys)
    e.unload()
    gc.collect()
    assert decoder is not None and base() is None and keys() is None


def test_the_plan_shares_a_t4s_kv_memory_as_pages_among_sixteen_rows_of_the_whole_context(monkeypatch):
    """slots.plan on a T4 after a 7B base (card and base faked: this machine has no GPU). Where decodeops' attention
    runs, sixteen rows of the whole 4,096-token context share the pages the card holds; without it (a real T4: the
    model's own attention would gather every row's bucket from the pages each step) fixed slots, eight rows of 2,304.
    Less memory shortens the slots, too little is refused."""
    import types

    import torch
    from transformers import LlamaConfig

    from qlora import slots

    gib = 2**30
    model = types.SimpleNamespace(config=LlamaConfig(), device=torch.device("cuda"),  # Llama-2-7B's shape
                                  parameters=lambda: iter([torch.zeros(1, dtype=torch.float16)]))
    per_page = slots.PAGE * slots.kv_bytes_per_token(model.config, 2)  # 32 MiB: 64 positions of 32 layers

    def card(free_gib):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free_gib * gib, 15 * gib))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: (15 - free_gib) * gib)

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: 1.0, raising=False)
    monkeypatch.setattr(slots, "column_bytes", lambda *a: gib // 16)
    card(11.0)  # 15 GiB less a 4-bit 7B base
    rows, length, columns, pages = slots.plan(model, 4096, 16, paged=True)
    assert (rows, length, columns) == (16, 4096, 128)
    assert pages == int((11.0 - 1.5 - 1 / 16) * gib // per_page) == 302  # less the trash page: 19,264 tokens
    assert slots.plan(model, 4096, 16) == (8, 2304, 128, None)  # fixed slots: 18,432 tokens, 4 visitors
    card(4.0)
    rows, length, _, pages = slots.plan(model, 4096, 16, paged=True)
    assert rows == 16 and length < 4096 and pages > 2 * length // slots.PAGE  # one visitor's two whole panes
    card(1.6)
    for paged in (True, False):
        with pytest.raises(MemoryError, match="too little for two chat rows"):
            slots.plan(model, 4096, 16, paged=paged)
