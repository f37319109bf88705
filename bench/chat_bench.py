"""Side-by-side chat benchmark: one batched 2-row pass (base + adapter) vs two sequential generations, greedy.

    python -m bench.chat_bench                 # 7B-shaped random 4-bit base, random r=64 q/v adapter, 128 new tokens

Reports time to first token and tokens/s per pane, the combined speedup, and whether the outputs are identical.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from bench.common import build_random_model, card, versions, write_json

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


def timed(rows_iter, engine, t0):
    """Consume a generation; (time to first yield, end time, token ids per row)."""
    first = None
    for _ in rows_iter:
        if first is None:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, [list(r) for r in engine.last_streamer.ids]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llama7b-random")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke test)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    ap.add_argument("--row-by-row", default=None,
                    help="variants of qlora.chat.ROW_BY_ROW to measure, e.g. 'none;linear;linear,attention' "
                         "(default: the product's setting)")
    ap.add_argument("--rounds", type=int, default=1, help="times over the prompts (each pass next to its reference)")
    ap.add_argument("--stock-lora", action="store_true",
                    help="peft's own mixed-adapter forward (rows picked by lists, the adapter in fp32): the path before")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile N greedy tokens of each path: CUDA syncs, launches and GPU-busy share")
    a = ap.parse_args(argv)

    import torch

    from bench.common import LLAMA_7B
    from qlora import chat
    from qlora.chat import BASE, ChatEngine
    from qlora.config import GenerationSettings

    shape = dict(LLAMA_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4) if a.tiny else None
    if a.stock_lora:
        chat.adapter_rows_as_slices = lambda model: contextlib.nullcontext()
    model_dir = build_random_model(Path(a.model), shape)
    run_dir = random_adapter(model_dir, Path(a.out) / ".chat-run")
    engine = ChatEngine(str(model_dir), "nf4", "auto")
    t0 = time.perf_counter()
    name = engine.load_adapter(run_dir)
    load_s = time.perf_counter() - t0
    settings = GenerationSettings(max_new_tokens=a.new_tokens, temperature=0.0)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    # warm-up: kernels, allocator, both code paths
    warm = GenerationSettings(max_new_tokens=8, temperature=0.0)
    for _ in engine.stream_pair([], [], PROMPTS[0], warm, name):
        pass
    engine.generate_sequential(PROMPTS[0], warm, name)

    variants = [tuple(p for p in v.split(",") if p and p != "none") for v in a.row_by_row.split(";")] \
        if a.row_by_row is not None else [tuple(chat.ROW_BY_ROW)]
    for variant in variants:  # warm each variant's kernels
        chat.ROW_BY_ROW = variant
        for _ in engine.stream_pair([], [], PROMPTS[0], warm, name):
            pass
    # The host's speed drifts by tens of percent over minutes (decoding here is bound by the CPU launching kernels),
    # so each batched pass runs right after its sequential reference, prompt by prompt, round by round.
    rows: list[list[dict]] = [[] for _ in variants]
    for _round in range(a.rounds):
        for prompt in PROMPTS:
            ids = engine.prompt([], prompt, "", name).token_ids
            seq = []
            for adapter in (BASE, name):  # the reference: each pane on its own, one row
                sync()
                t = time.perf_counter()
                seq.append(timed(engine._generate([ids], [adapter], settings, None), engine, t))
            for variant, vrows in zip(variants, rows):
                chat.ROW_BY_ROW = variant
                sync()
                t = time.perf_counter()
                b_first, b_end, b_ids = timed(engine.stream_pair([], [], prompt, settings, name), engine, t)
                vrows.append(r := compare(prompt, ids, seq, b_first, b_end, b_ids))
                print(f"[{','.join(variant) or 'none'}] {prompt[:40]!r}: batched "
                      f"{r['batched']['combined_tokens_per_s']} tok/s combined, TTFT {r['batched']['ttft_s']} s; "
                      f"sequential {r['sequential']['combined_tokens_per_s']} tok/s, TTFT {r['sequential']['ttft_s']}; "
                      f"identical {r['identical']} (first difference at {r['first_difference']})", flush=True)
    reports = []
    for variant, vrows in zip(variants, rows):
        b = sum(sum(r["batched"]["tokens"]) for r in vrows) / sum(r["batched"]["wall_s"] for r in vrows)
        s = sum(sum(r["sequential"]["tokens"]) for r in vrows) / sum(r["sequential"]["wall_s"] for r in vrows)
        reports.append(dict(row_by_row=list(variant), prompts=vrows,
                            combined_tokens_per_s=dict(batched=round(b, 1), sequential=round(s, 1)),
                            speedup=round(b / s, 2), all_identical=all(all(r["identical"]) for r in vrows)))
    profiles = {path: profile(engine, names, a.profile) for path, names in
                (("base", [BASE]), ("adapter", [name]), ("batched", [BASE, name]))} if a.profile else None
    report = dict(card=card(), versions=versions(), new_tokens=a.new_tokens, rounds=a.rounds,
                  adapter_load_s=round(load_s, 2),
                  lora_rows="peft lists" if a.stock_lora else "slices", profiles=profiles,
                  precision=str(engine.model.dtype) if engine.model is not None else None,
                  command="python -m bench.chat_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                  when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), variants=reports,
                  **{k: reports[0][k] for k in ("prompts", "combined_tokens_per_s", "speedup", "all_identical")})
    name_ = f"chat{'-' + a.tag if a.tag else ''}"
    write_json(Path(a.out) / f"{name_}.json", report)
    md = markdown(report)
    (Path(a.out) / f"{name_}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


def compare(prompt, ids, seq, b_first, b_end, b_ids) -> dict:
    """One prompt's batched pass against its two sequential generations (each: first-yield s, end s, ids per row)."""
    s_wall = seq[0][1] + seq[1][1]
    n_b = [len(x) for x in b_ids]
    n_s = [len(s[2][0]) for s in seq]
    return dict(
        prompt=prompt, prompt_tokens=len(ids),
        batched=dict(ttft_s=round(b_first, 4), wall_s=round(b_end, 3), tokens=n_b,
                     tokens_per_s_per_pane=[round(n / b_end, 1) for n in n_b],
                     combined_tokens_per_s=round(sum(n_b) / b_end, 1)),
        sequential=dict(ttft_s=[round(seq[0][0], 4), round(seq[1][0], 4)],
                        ttft_from_click_s=[round(seq[0][0], 4), round(seq[0][1] + seq[1][0], 4)],
                        wall_s=round(s_wall, 3), tokens=n_s,
                        tokens_per_s_per_pane=[round(n_s[i] / seq[i][1], 1) for i in range(2)],
                        combined_tokens_per_s=round(sum(n_s) / s_wall, 1)),
        identical=[b_ids[0] == seq[0][2][0], b_ids[1] == seq[1][2][0]],
        first_difference=[next((k for k, (x, y) in enumerate(zip(b_ids[i], seq[i][2][0])) if x != y), None)
                          for i in range(2)],
        adapter_changes_answer=b_ids[0] != b_ids[1])


def profile(engine, adapter_names: list[str], tokens: int) -> dict:
    """Per generated token: CUDA runtime calls that make the CPU wait (syncs, blocking copies), kernel launches, and
    GPU time against wall time (well under 1 means the GPU waits on Python)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from qlora import chat
    model = engine.model
    adapter = next((n for n in adapter_names if n != "__base__"), None)
    ids = torch.tensor([engine.prompt([], PROMPTS[0], "", adapter).token_ids] * len(adapter_names),
                       device=model.device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                  do_sample=False, temperature=None, top_p=None, top_k=None, adapter_names=adapter_names,
                  pad_token_id=engine.tokenizer.pad_token_id)
    parts = chat.ROW_BY_ROW if len(adapter_names) > 1 else ()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode(), chat.adapter_rows_as_slices(model), chat.one_row_at_a_time(model, parts):
        model.generate(**kwargs)  # warm
        sync()
        t = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(**kwargs)
            sync()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    calls = {e.key: e.count for e in events}
    waits = {k: v for k, v in calls.items() if "Synchronize" in k or k in ("cudaMemcpy", "cudaMemcpyAsync")}
    gpu_s = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    out = dict(rows=adapter_names, tokens=tokens, wall_ms_per_token=round(1000 * wall / tokens, 2),
               gpu_ms_per_token=round(1000 * gpu_s / tokens, 2),
               waits_per_token={k: round(v / tokens, 1) for k, v in waits.items()},
               launches_per_token=round(sum(v for k, v in calls.items() if "LaunchKernel" in k) / tokens, 1),
               top_cpu_ops_ms_per_token={e.key: round(e.self_cpu_time_total / 1000 / tokens, 2) for e in top})
    print("profile", json.dumps(out), flush=True)
    return out


def markdown(rep: dict) -> str:
    c = rep["card"]
    lines = [f"Card: {c['name']}; {rep['new_tokens']} new tokens, greedy; {rep['when']}; `{rep['command']}`; "
             f"adapter rows picked by {rep['lora_rows']}"]
    for v in rep["variants"]:
        lines += ["", f"Rows computed one at a time in the batched pass: {', '.join(v['row_by_row']) or 'none'}. "
                  f"Combined tokens/s: batched {v['combined_tokens_per_s']['batched']}, sequential "
                  f"{v['combined_tokens_per_s']['sequential']}: **{v['speedup']}x**; outputs identical: "
                  f"{v['all_identical']}", "",
                  "| prompt | batched TTFT s | batched tok/s per pane | sequential TTFT s (own; from click) | "
                  "sequential tok/s per pane | identical (base, tuned) | adapter changes answer |",
                  "|---|---|---|---|---|---|---|"]
        for r in v["prompts"]:
            b, s = r["batched"], r["sequential"]
            lines.append(f"| {r['prompt'][:30]} | {b['ttft_s']} | {b['tokens_per_s_per_pane']} | {s['ttft_s']}; "
                         f"{s['ttft_from_click_s']} | {s['tokens_per_s_per_pane']} | {r['identical']} | "
                         f"{r['adapter_changes_answer']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
