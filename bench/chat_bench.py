"""Chat serving benchmark: the slot engine (captured decode steps, many visitors in one batch) against today's eager
path, greedy, on the 7B-shaped random 4-bit base with random r=64 q/v adapters.

    python -m bench.chat_bench                                   # bf16
    python -m bench.chat_bench --capture graphs:bnb,graphs:nf4   # bitsandbytes' 4-bit decode matmuls vs nf4mm's
    QLORA_NO_BF16=1 python -m bench.chat_bench --gib 15 --tag t4  # T4 mode: fp16 compute, 15 GiB for this process

Reports, for each capture variant: the one-time load and capture seconds, the slots (rows x tokens) planned from the
memory left, one visitor's panes (both in one pass, and each alone), 1/2/4/8 concurrent visitors (time to first
token, tokens/s per pane, aggregate), whether every pane in every batch equals its answer alone, the teacher-forced
logits against eager transformers + peft, a kernel-time profile of the 16-row step, and peak memory. Today's eager path
(one peft `generate` per visitor, both panes batched) runs in the same process first.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from bench.common import build_random_model, cap_memory, card, ms_by_kind, versions, write_json
from qlora.errors import brief

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain how a transformer language model works, in three sentences."]


def random_adapter(model_dir: Path, run_dir: Path, r: int = 64, seed: int = 1) -> Path:
    """A LoRA adapter on q_proj/v_proj with random A and non-zero B (so it changes the answers), in a run folder."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    folder = run_dir / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
               base_model_name_or_path=str(model_dir)).save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(n):
        for m in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, h, generator=g) / h**0.5).half()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(h, r, generator=g) * 0.02).half()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return run_dir


def visitor_prompts(engine, n: int, max_tokens: int = 10**9, mix: str = "documents") -> list[str]:
    """n questions of very different lengths (a few tokens to ~1,300, at most max_tokens), so one batch spans several
    attention lengths; mix "questions": the one-visitor questions only (the same prefill work a visitor as there)."""
    from bench.common import DATA
    from qlora.data import prepare

    if mix == "questions":
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    convs = prepare(str(DATA / "guanaco-llama2-1k.parquet")).train
    texts = sorted((" ".join(m["content"] for m in c) for c in convs), key=len)
    out = []
    for i in range(n):
        if i % 4 == 0:
            out.append(PROMPTS[i // 4 % len(PROMPTS)])
        else:  # a long pasted document, cut to a length that grows with i
            doc = " ".join(texts[-(i + 1) * 3:])[: 700 * (i % 4) * (1 + i // 4)]
            while len(engine.prompt_ids([], f"Summarize this in one sentence:\n{doc}")) > max_tokens:
                doc = doc[: len(doc) * 4 // 5]  # (a slot shorter than the document)
            out.append(f"Summarize this in one sentence:\n{doc}")
    return out


# --- running requests -----------------------------------------------------------------------------------------
def run_request(engine, rows_spec, t0: float | None = None) -> dict:
    """Submit rows as one request and follow it: per row the token ids, first-token and end seconds since t0."""
    t0 = t0 if t0 is not None else time.perf_counter()
    ticket = engine.submit_rows(rows_spec)
    n = len(rows_spec)
    first, end = [None] * n, [None] * n
    for kind, value in ticket.events():
        now = time.perf_counter() - t0
        if kind == "tokens":
            for i, new in enumerate(value):
                if new and first[i] is None:
                    first[i] = now
    now = time.perf_counter() - t0
    ids = [list(r.ids) for r in ticket.rows]
    for i in range(n):
        end[i] = now
        first[i] = first[i] if first[i] is not None else now
    return dict(ids=ids, first=first, end=end)


def concurrent(engine, requests: list[list], barrier_timeout: float = 600) -> tuple[list[dict], float]:
    """Every request submitted at the same instant from its own thread (as many visitors would); results, wall s."""
    out: list = [None] * len(requests)
    start = threading.Barrier(len(requests) + 1)
    t0 = [0.0]

    def go(i):
        start.wait(barrier_timeout)
        try:
            out[i] = run_request(engine, requests[i], t0[0])
        except Exception as e:  # noqa: BLE001 (the visitor's error, reported in its place)
            out[i] = dict(error=brief(e, 300))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    start.wait(barrier_timeout)
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0[0]


def compare(prompt, ids, batched: dict, alone: list[dict]) -> dict:
    """One visitor's pass (both panes at once) against each pane alone; keeps the fields of earlier results."""
    n_b = [len(x) for x in batched["ids"]]
    n_s = [len(a["ids"][0]) for a in alone]
    b_end = max(batched["end"])
    s_wall = alone[0]["end"][0] + alone[1]["end"][0]
    return dict(
        prompt=prompt, prompt_tokens=len(ids),
        batched=dict(ttft_s=round(min(batched["first"]), 4), ttft_per_pane_s=[round(x, 4) for x in batched["first"]],
                     wall_s=round(b_end, 3), tokens=n_b,
                     tokens_per_s_per_pane=[round(n / e, 1) for n, e in zip(n_b, batched["end"])],
                     decode_tokens_per_s_per_pane=[round((n - 1) / max(e - f, 1e-9), 1) for n, f, e in
                                                   zip(n_b, batched["first"], batched["end"])],
                     combined_tokens_per_s=round(sum(n_b) / b_end, 1)),
        sequential=dict(ttft_s=[round(a["first"][0], 4) for a in alone],
                        ttft_from_click_s=[round(alone[0]["first"][0], 4),
                                           round(alone[0]["end"][0] + alone[1]["first"][0], 4)],
                        wall_s=round(s_wall, 3), tokens=n_s,
                        tokens_per_s_per_pane=[round(n_s[i] / alone[i]["end"][0], 1) for i in range(2)],
                        combined_tokens_per_s=round(sum(n_s) / s_wall, 1)),
        identical=[batched["ids"][0] == alone[0]["ids"][0], batched["ids"][1] == alone[1]["ids"][0]],
        first_difference=[next((k for k, (x, y) in enumerate(zip(batched["ids"][i], alone[i]["ids"][0])) if x != y),
                               None) for i in range(2)],
        adapter_changes_answer=batched["ids"][0] != batched["ids"][1])


def one_visitor(engine, adapter: str, settings, rounds: int, prompts=PROMPTS) -> dict:
    rows = []
    for _ in range(rounds):
        for prompt in prompts:
            ids = engine.prompt_ids([], prompt, "", adapter)  # both panes: the adapter's prompt format
            alone = [run_request(engine, [(ids, None, settings)]), run_request(engine, [(ids, adapter, settings)])]
            batched = run_request(engine, [(ids, None, settings), (ids, adapter, settings)])
            rows.append(r := compare(prompt, ids, batched, alone))
            print(f"  {prompt[:40]!r}: both panes {r['batched']['tokens_per_s_per_pane']} tok/s/pane, TTFT "
                  f"{r['batched']['ttft_s']} s; alone {r['sequential']['tokens_per_s_per_pane']}; identical "
                  f"{r['identical']}", flush=True)
    b = sum(sum(r["batched"]["tokens"]) for r in rows) / sum(r["batched"]["wall_s"] for r in rows)
    s = sum(sum(r["sequential"]["tokens"]) for r in rows) / sum(r["sequential"]["wall_s"] for r in rows)
    return dict(prompts=rows, combined_tokens_per_s=dict(batched=round(b, 1), sequential=round(s, 1)),
                speedup=round(b / s, 2), all_identical=all(all(r["identical"]) for r in rows),
                tokens_per_s_per_pane=round(sum(sum(r["batched"]["tokens"]) for r in rows) / 2
                                            / sum(r["batched"]["wall_s"] for r in rows), 1))


def visitors(engine, adapters: list[str], settings, counts: list[int], mix: str = "documents") -> dict:
    """N visitors at once (two rows each, own prompt, adapters alternating): TTFT, tok/s, and each equal to alone."""
    requests = visitor_requests(engine, adapters, settings, max(counts), mix)
    alone = [run_request(engine, r) for r in requests]  # each visitor alone: the reference
    out = {}
    for n in counts:
        results, wall = concurrent(engine, requests[:n])
        tokens = sum(len(x) for r in results for x in r["ids"])
        pane = [len(x) / e for r in results for x, e in zip(r["ids"], r["end"])]
        ttft = [min(r["first"]) for r in results]
        identical = [r["ids"] == a["ids"] for r, a in zip(results, alone[:n])]
        out[str(n)] = dict(visitors=n, prompt_tokens=[len(q[0][0]) for q in requests[:n]], wall_s=round(wall, 3),
                           aggregate_tokens_per_s=round(tokens / wall, 1),
                           tokens_per_s_per_pane=dict(min=round(min(pane), 1), mean=round(sum(pane) / len(pane), 1)),
                           ttft_s=dict(max=round(max(ttft), 3), mean=round(sum(ttft) / len(ttft), 3)),
                           all_identical_to_alone=all(identical), identical=identical)
        print(f"  {n} visitor(s): aggregate {out[str(n)]['aggregate_tokens_per_s']} tok/s, per pane "
              f"{out[str(n)]['tokens_per_s_per_pane']}, TTFT {out[str(n)]['ttft_s']}, identical to alone "
              f"{all(identical)}", flush=True)
    return out


def visitor_requests(engine, adapters: list[str], settings, n: int, mix: str = "documents") -> list[list]:
    """n visitors' requests (both panes, own prompt: `visitor_prompts`), adapters alternating."""
    decoder = getattr(engine._scheduler.backend, "decoder", None)
    prompts = visitor_prompts(engine, n, decoder.length - settings.max_new_tokens - 1 if decoder else 10**9, mix)
    requests = []
    for i, prompt in enumerate(prompts):
        ids = engine.prompt_ids([], prompt, "", adapters[i % len(adapters)])
        requests.append([(ids, None, settings), (ids, adapters[i % len(adapters)], settings)])
    return requests


def longest_prompt(engine, adapters: list[str], settings, others: int = 7) -> dict:
    """A visitor at the longest prompt the app takes (chat.MAX_PROMPT_TOKENS: prefilled without a graph past the
    last prompt bucket, its KV pages a large share of a T4's), alone and arriving with `others` document visitors:
    whether it is answered, its first token, and its answer in the crowd equal to alone."""
    import torch

    from qlora.chat import MAX_PROMPT_TOKENS

    ids = [1] + [500 + i % 1000 for i in range(MAX_PROMPT_TOKENS - 1)]
    request = [(ids, None, settings), (ids, adapters[0], settings)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    (alone,), wall = concurrent(engine, [request])
    out = dict(prompt_tokens=len(ids), others=others, alone_error=alone.get("error"))
    if "error" not in alone:
        out["alone"] = dict(ttft_s=round(min(alone["first"]), 3), wall_s=round(wall, 3),
                            tokens=[len(x) for x in alone["ids"]])
        crowd, wall = concurrent(engine, [request] + visitor_requests(engine, adapters, settings, others))
        out["errors_with_others"] = [r["error"] for r in crowd if "error" in r]
        if "error" not in crowd[0]:
            out["with_others"] = dict(ttft_s=round(min(crowd[0]["first"]), 3), wall_s=round(wall, 3),
                                      identical_to_alone=crowd[0]["ids"] == alone["ids"],
                                      others_ttft_max_s=round(max(min(r.get("first", [0])) for r in crowd[1:]), 3))
    out["peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None
    print("  longest prompt:", json.dumps(out), flush=True)
    return out


def sampled_alone_vs_batched(engine, adapter: str, new_tokens: int) -> bool:
    """A seeded sampling visitor gives the same answer alone and next to 3 other visitors."""
    from qlora.config import GenerationSettings

    s = GenerationSettings(max_new_tokens=new_tokens, temperature=0.8, top_p=0.9, seed=5)
    ids = engine.prompt_ids([], PROMPTS[1], "", adapter)
    req = [(ids, None, s), (ids, adapter, s)]
    alone = run_request(engine, req)
    others = [[(engine.prompt_ids([], p), None, s)] for p in PROMPTS]
    results, _ = concurrent(engine, [req] + others)
    return results[0]["ids"] == alone["ids"]


def teacher_forced(slot_engine, eager_engine, adapter_slot: str, adapter_eager: str, n: int) -> dict:
    """Largest |logit difference| between the captured step and eager transformers + peft on the same tokens."""
    import torch

    backend = slot_engine._scheduler.backend
    decoder = backend.decoder
    peft_model = eager_engine.model
    ids = slot_engine.prompt_ids([], PROMPTS[2], "", adapter_slot)
    forced = list(range(1000, 1000 + n))  # any tokens: the check is the arithmetic, not the answer
    out = {}
    for row_name, name_slot, name_eager in (("base", None, None), ("adapter", adapter_slot, adapter_eager)):
        if name_slot is not None and name_slot not in decoder.columns.placed:
            decoder.columns.place(name_slot, backend._read(slot_engine.adapters[name_slot].folder),
                                  backend._make_room(decoder.columns.placed, 64))
        decoder.pages.reserve(0, len(ids) + n)
        first = decoder.prefill(0, ids, decoder.columns.row_mask(name_slot))
        mine = [first]
        for k, t in enumerate(forced[:-1]):
            decoder.host_ints[0, 0], decoder.host_ints[1, 0] = t, len(ids) + k
            decoder.step(len(ids) + k)
            mine.append(decoder.last_logits[0].clone())
        decoder.clear(0)
        full = torch.tensor([ids + forced[:-1]], device=decoder.device)
        with torch.no_grad():
            if name_eager is None:
                with peft_model.disable_adapter():
                    ref = peft_model(input_ids=full).logits[0, len(ids) - 1:].float()
            else:
                peft_model.set_adapter(name_eager)
                ref = peft_model(input_ids=full).logits[0, len(ids) - 1:].float()
        mine_t = torch.stack(mine)
        diff = (mine_t - ref).abs()
        out[row_name] = dict(max_abs_diff=round(float(diff.max()), 5), mean_abs_diff=round(float(diff.mean()), 6),
                             logit_scale=round(float(ref.abs().max()), 3),
                             argmax_agree=round(float((mine_t.argmax(-1) == ref.argmax(-1)).float().mean()), 4))
    print("  teacher-forced logits vs eager peft:", json.dumps(out), flush=True)
    return out


def profile_step(slot_engine, steps: int = 20, pos: int = 300) -> dict:
    """Kernel time of the full-batch step (every slot decoding at position ~pos), by kind, from the eager (uncaptured)
    run of the same step code, plus the replayed graph's wall time per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    decoder = slot_engine._scheduler.backend.decoder
    rows = decoder.rows
    for i in range(rows):  # each row its own pages, as live visitors' rows (where the pool holds them)
        if decoder.pages.can_take(decoder.pages.needed(pos + 1)):
            decoder.pages.reserve(i, pos + 1)
    decoder.host_ints[0] = torch.arange(rows) + 500
    decoder.host_ints[1] = pos
    decoder.host_floats[1:3] = 1.0
    decoder.host_floats[3] = 1.0

    def ms_per_step() -> float:
        decoder.step(pos)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            decoder.step(pos)
        return 1000 * (time.perf_counter() - t) / steps

    graph_ms = ms_per_step()
    decoder.host_ints[1, 2:] = 0  # one visitor: two rows at pos, the other slots free (position 0)
    one_ms = ms_per_step()
    decoder.host_ints[1] = pos
    positions = decoder._positions(decoder.bucket(pos))
    with torch.no_grad():
        decoder._forward(positions)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                decoder._forward(positions)
            torch.cuda.synchronize()
    events = prof.key_averages()
    kinds = ms_by_kind(events, 5)
    top = sorted(((e.self_device_time_total / 1000 / 5, e.key[:90], e.count // 5) for e in events
                  if e.device_type.name == "CUDA" and e.self_device_time_total > 0), reverse=True)
    for i in range(rows):
        decoder.clear(i)
    out = dict(rows=rows, position=pos, bucket=decoder.bucket(pos), graph_ms_per_step=round(graph_ms, 3),
               graph_ms_two_rows_live=round(one_ms, 3),
               kernel_ms_per_step={k: round(v, 3) for k, v in kinds.items()},
               kernel_ms_total=round(sum(kinds.values()), 3),
               top_kernels=[dict(ms=round(ms, 3), kernel=k, per_step=c) for ms, k, c in top[:15]])
    print("  profile:", json.dumps({k: out[k] for k in ("graph_ms_per_step", "graph_ms_two_rows_live",
                                                         "kernel_ms_per_step")}), flush=True)
    return out


def profile_prefill(slot_engine, reps: int = 10, kernels_at: int = 512) -> dict:
    """A visitor's prefill: the captured graph's wall time per bucket (its two panes' rows), and kernel time by kind
    of one eager prefill of `kernels_at` tokens (what the 4-bit dequantize costs beside the matmuls)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    decoder = slot_engine._scheduler.backend.decoder
    columns = decoder.columns.row_mask(None)
    out = dict(graph_ms={})
    decoder.pages.reserve(0, max(decoder.prompt_buckets + [kernels_at]))
    for length in decoder.prompt_buckets:
        prompt = [500 + i % 1000 for i in range(length)]
        decoder.prefill(0, prompt, columns)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            decoder.prefill(0, prompt, columns)
        torch.cuda.synchronize()
        out["graph_ms"][length] = round(1000 * (time.perf_counter() - t) / reps, 2)
    prompt = list(range(500, 500 + kernels_at))
    saved, decoder._prefills = decoder._prefills, {}  # the prefill run eagerly: its kernels show by name
    try:
        decoder.prefill(0, prompt, columns)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder.prefill(0, prompt, columns)
            torch.cuda.synchronize()
    finally:
        decoder._prefills = saved
    decoder.clear(0)
    out.update(kernels_at=kernels_at, kernel_ms={k: round(v, 3) for k, v in ms_by_kind(prof.key_averages()).items()})
    print("  prefill:", json.dumps(out), flush=True)
    return out


def rows_sweep(engine, kind: str, rows_list: list[int], length: int = 1024) -> dict:
    """Step time of the captured decode at several slot counts (the engine's own decoder is given back first)."""
    import torch

    from qlora import slots

    backend = engine._scheduler.backend
    model, columns = backend.model, backend.decoder.columns.columns
    targets = set(backend.decoder.columns.linears)
    backend.decoder.close()
    out = {}
    for rows in rows_list:
        d = slots.SlotDecoder(model, rows, length, columns, capture=kind, targets=targets)
        d.buckets = [256, length]
        t = time.perf_counter()
        d.capture()
        cap = time.perf_counter() - t
        d.host_ints[0] = torch.arange(rows) + 500
        d.host_floats[1:4] = 1.0
        for i in range(rows):
            d.pages.reserve(i, length)
        res = dict(capture_s=round(cap, 1))
        for pos in (200, length - 100):
            d.host_ints[1] = pos
            d.step(pos)
            t = time.perf_counter()
            for _ in range(30):
                d.step(pos)
            ms = 1000 * (time.perf_counter() - t) / 30
            res[f"ms_per_step_at_{pos}"] = round(ms, 3)
            res[f"tokens_per_s_per_row_at_{pos}"] = round(1000 / ms, 1)
        out[str(rows)] = res
        print(f"  {rows} rows: {res}", flush=True)
        d.close()
        del d
        torch.cuda.empty_cache()
    return out


# --- main -----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llama7b-random")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke test of the script)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    ap.add_argument("--rounds", type=int, default=1, help="times over the one-visitor prompts")
    ap.add_argument("--capture", default="graphs",
                    help="slot-engine variants, comma-separated: graphs, compile, eager; a suffix of '+'-joined options "
                    "departs from the engine's default: 'bnb' bitsandbytes' 4-bit decode matmuls, 'nf4' nf4mm's, "
                    "'plain' SDPA and transformers' RMSNorm and rotary (no decodeops kernels), 'sync' "
                    "no step launched before the last one's tokens are read, e.g. graphs:bnb+plain+sync,graphs")
    ap.add_argument("--visitors", default="1,2,4,8")
    ap.add_argument("--longest", action="store_true",
                    help="also a visitor at the longest prompt the app takes, alone and next to 7 others")
    ap.add_argument("--questions-too", action="store_true",
                    help="also run the visitors with the one-visitor questions (no pasted documents to prefill)")
    ap.add_argument("--eager-prompts", type=int, default=1, help="prompts through today's eager path (0: skip it)")
    ap.add_argument("--eager-tokens", type=int, default=64)
    ap.add_argument("--gib", type=float, default=0.0, help="cap this process's GPU memory (15: a T4)")
    ap.add_argument("--profile", action="store_true", help="kernel-time profile of the full-batch step")
    ap.add_argument("--prefill-profile", action="store_true", help="prompt graphs' time per bucket, prefill kernels")
    ap.add_argument("--logits", action="store_true", help="teacher-forced logits against eager transformers + peft")
    ap.add_argument("--rows-sweep", default="", help="also time the captured step at these slot counts, e.g. 2,4,8,16")
    ap.add_argument("--no-buckets", action="store_true", help="attend over the whole slot every step (one graph)")
    ap.add_argument("--max-rows", type=int, default=0,
                    help="row slots of the slot engine (0: the engine's default); fewer rows, faster steps, fewer visitors")
    a = ap.parse_args(argv)

    import torch

    from bench.common import TINY
    from qlora import nf4mm, slots
    from qlora.chat import ChatEngine
    from qlora.config import GenerationSettings

    if a.no_buckets:
        slots.buckets = lambda length: [length]
    shape = TINY if a.tiny else None
    model_dir = build_random_model(Path(a.model), shape)  # (before the cap: it builds the 16-bit model on the card)
    if a.gib:
        import os

        os.environ["QLORA_GPU_MEMORY_GIB"] = str(a.gib)
        cap_memory(a.gib)
    runs_dir = Path(a.model).parent / (Path(a.model).name + "-chat-runs")  # adapters: not in the results
    run_a = random_adapter(model_dir, runs_dir / "a", seed=1)
    run_b = random_adapter(model_dir, runs_dir / "b", seed=2)
    settings = GenerationSettings(max_new_tokens=a.new_tokens, temperature=0.0)
    report = dict(card=card(), versions=versions(), new_tokens=a.new_tokens, rounds=a.rounds,
                  command="python -m bench.chat_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                  when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gib_cap=a.gib or None)
    peak = lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None  # noqa

    eager = None
    if a.eager_prompts:
        print("today's eager path (one peft generate per visitor):", flush=True)
        eager = ChatEngine(str(model_dir), "nf4", "auto", decode="generate")
        t = time.perf_counter()
        eager.load()
        name_e = eager.load_adapter(run_a)
        load_s = time.perf_counter() - t
        run_request(eager, [([1, 2, 3], None, GenerationSettings(max_new_tokens=4, temperature=0)),
                            ([1, 2, 3], name_e, GenerationSettings(max_new_tokens=4, temperature=0))])  # warm
        es = GenerationSettings(max_new_tokens=a.eager_tokens, temperature=0.0)
        report["eager"] = dict(load_s=round(load_s, 1), new_tokens=a.eager_tokens,
                               **one_visitor(eager, name_e, es, 1, PROMPTS[:a.eager_prompts]))
        report["precision"] = str(eager.model.dtype)
        if not a.logits:  # (only the teacher-forced check reads it later: its base would crowd a 15 GiB cap)
            eager.unload()
            eager = None
    variants = {}
    for variant in a.capture.split(","):
        kind, _, opts = variant.partition(":")
        opts = set(opts.split("+")) - {""}
        print(f"slot engine, {variant}:", flush=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        engine = ChatEngine(str(model_dir), "nf4", "auto", decode=kind,
                            nf4=False if "bnb" in opts else True if "nf4" in opts else None,
                            fused=False if "plain" in opts else None,
                            **({"max_rows": a.max_rows} if a.max_rows else {}))
        names = [engine.load_adapter(run_a), engine.load_adapter(run_b)]  # before loading: their layers get columns
        t = time.perf_counter()
        engine.load()
        load_s = time.perf_counter() - t
        decoder = getattr(engine._scheduler.backend, "decoder", None)
        if "sync" in opts and decoder is not None:  # each step's tokens read before the next step is launched
            engine._scheduler.backend.depth = 1
        v = dict(backend=engine.backend_kind, matmul=engine.matmul, kernels=engine.kernels,
                 steps_in_flight=getattr(engine._scheduler.backend, "depth", None),
                 nf4mm_tile=str(nf4mm.TILE) if engine.matmul == "nf4mm" else None,
                 fallback_reason=engine.fallback_reason,
                 load_s=round(load_s, 1),
                 capture_s=round(engine.capture_s, 1) if engine.capture_s else None,
                 rows=getattr(decoder, "rows", None), slot_tokens=getattr(decoder, "length", None),
                 kv_pool_tokens=(decoder.pages.count - 1) * slots.PAGE if decoder else None,
                 kv_paged=not decoder.pages.static if decoder else None,
                 adapter_columns=decoder.columns.columns if decoder else None,
                 buckets=getattr(decoder, "buckets", None), exactness=engine.exactness,
                 adapter_column_linears=len(decoder.columns.linears) if decoder else None, peak_gib_after_load=peak())
        print("  ", json.dumps(v), flush=True)
        run_request(engine, [([1, 2, 3], None, settings), ([1, 2, 3], names[0], settings)])  # adapters resident
        v["one_visitor"] = one_visitor(engine, names[0], settings, a.rounds)
        counts = [int(c) for c in a.visitors.split(",") if c]
        v["visitors"] = visitors(engine, names, settings, counts)
        if a.longest:
            v["longest_prompt"] = longest_prompt(engine, names, settings)
        if a.questions_too:
            print("  the same, every visitor asking a one-visitor question:", flush=True)
            v["visitors_questions"] = visitors(engine, names, settings, counts, "questions")
        v["sampled_alone_equals_batched"] = sampled_alone_vs_batched(engine, names[0], min(a.new_tokens, 48))
        if a.logits and eager is not None and decoder is not None:
            v["teacher_forced_logits"] = teacher_forced(engine, eager, names[0], name_e, 32)
        if a.profile and decoder is not None and torch.cuda.is_available():
            v["profile"] = profile_step(engine)
        if a.prefill_profile and decoder is not None and torch.cuda.is_available():
            v["prefill_profile"] = profile_prefill(engine)
        v["peak_gib"] = peak()
        if a.rows_sweep and kind == "graphs" and decoder is not None and torch.cuda.is_available():
            v["rows_sweep"] = rows_sweep(engine, kind, [int(r) for r in a.rows_sweep.split(",")])
        variants[variant] = v
        decoder = None  # (held past the unload, it kept the engine's KV cache alive while the next variant planned)
        engine.unload()
        report["variants"] = variants
        main_v = next(iter(variants.values()))
        report.update({k: main_v["one_visitor"][k] for k in ("prompts", "combined_tokens_per_s", "speedup",
                                                              "all_identical")})
        write_json(Path(a.out) / f"chat{'-' + a.tag if a.tag else ''}.json", report)  # after each variant
    if eager is not None:
        eager.unload()
    name_ = f"chat{'-' + a.tag if a.tag else ''}"
    md = markdown(report)
    (Path(a.out) / f"{name_}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


def markdown(rep: dict) -> str:
    c = rep["card"]
    lines = [f"Card: {c['name']}{' capped at %s GiB' % rep['gib_cap'] if rep.get('gib_cap') else ''}; "
             f"{rep.get('precision', '')}; {rep['new_tokens']} new tokens, greedy; {rep['when']}; "
             f"`{rep['command']}`", ""]
    if "eager" in rep:
        e = rep["eager"]
        lines += [f"Today's eager path ({e['new_tokens']} tokens, {len(e['prompts'])} prompt): both panes "
                  f"{e['tokens_per_s_per_pane']} tok/s a pane; identical to each pane alone: {e['all_identical']}", ""]
    lines += ["| engine | load s (capture s) | rows x tokens | 1 visitor tok/s a pane (alone) | TTFT s | "
              "identical | peak GiB |", "|---|---|---|---|---|---|---|"]
    for kind, v in rep["variants"].items():
        o = v["one_visitor"]
        alone = [p["sequential"]["tokens_per_s_per_pane"] for p in o["prompts"]]
        lines.append(f"| {kind} ({v['backend']}, {v.get('matmul')}) | {v['load_s']} ({v['capture_s']}) | "
                     f"{v['rows']} x {v['slot_tokens']} "
                     f"| {o['tokens_per_s_per_pane']} ({alone}) | "
                     f"{[p['batched']['ttft_s'] for p in o['prompts']]} | {o['all_identical']} | {v['peak_gib']} |")
    for kind, v in rep["variants"].items():
        for key, what in (("visitors", "own prompt"), ("visitors_questions", "one-visitor questions")):
            if key not in v:
                continue
            lengths = v[key][max(v[key], key=int)]["prompt_tokens"]
            lines += ["", f"**{kind}**: concurrent visitors (2 rows each, {what} of {min(lengths)}-{max(lengths)} "
                      "tokens, adapters alternating)",
                      "", "| visitors | aggregate tok/s | x one visitor | tok/s a pane (min / mean) | "
                      "TTFT s (max / mean) | every pane = alone |", "|---|---|---|---|---|---|"]
            for n, r in v[key].items():
                x = r["aggregate_tokens_per_s"] / v[key]["1"]["aggregate_tokens_per_s"] if "1" in v[key] else None
                lines.append(f"| {n} | {r['aggregate_tokens_per_s']} | {x and round(x, 2)} | "
                             f"{r['tokens_per_s_per_pane']['min']} / {r['tokens_per_s_per_pane']['mean']} | "
                             f"{r['ttft_s']['max']} / {r['ttft_s']['mean']} | {r['all_identical_to_alone']} |")
        lines.append(f"\nSampling (seed 5, T=0.8, top-p 0.9) alone = next to 3 visitors: "
                     f"{v['sampled_alone_equals_batched']}")
        if "longest_prompt" in v:
            lp = v["longest_prompt"]
            lines.append(f"Longest prompt ({lp['prompt_tokens']} tokens): alone {lp.get('alone') or lp['alone_error']}; "
                         f"next to {lp['others']} visitors {lp.get('with_others')}, errors "
                         f"{lp.get('errors_with_others')}; peak {lp['peak_gib']} GiB")
        if "teacher_forced_logits" in v:
            lines.append("Teacher-forced logits vs eager transformers + peft: "
                         f"{json.dumps(v['teacher_forced_logits'])}")
        if "profile" in v:
            p = v["profile"]
            lines.append(f"\nStep profile ({p['rows']} rows at position {p['position']}, bucket {p['bucket']}): graph "
                         f"{p['graph_ms_per_step']} ms a step ({p.get('graph_ms_two_rows_live')} with two rows live); "
                         f"kernel ms a step: {json.dumps(p['kernel_ms_per_step'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
