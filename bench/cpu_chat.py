"""Chat on the CPU with the embedded model: today's CPU default (one peft `generate` per visitor, one visitor at a time)
against the slot engine without graphs (`QLORA_CHAT_DECODE=eager`: every visitor's rows in one batch), for 1, 4 and 8
visitors at once, each asking its own question in both panes (base, greedy).

    python -m bench.cpu_chat [--new-tokens 32] [--visitors 1,4,8] [--out bench/results]

Runs where the project's tests run (no GPU): the embedded SmolLM2-135M in fp32, as the CPU preset trains it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.chat_bench import concurrent

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain what a transformer is.",
             "Give me three tips for sleeping well.", "What is 17 times 23?", "Name a famous painter.",
             "How do plants make food?", "Translate 'good morning' to Spanish."]


def measure(decode: str, counts: list[int], new_tokens: int) -> dict:
    from qlora.chat import ChatEngine
    from qlora.config import GenerationSettings
    from qlora.model import materialize_embedded

    engine = ChatEngine(str(materialize_embedded()), "none", "fp32", decode=decode)
    rss = _rss_gib()
    t = time.perf_counter()
    engine.load()
    out = dict(decode=decode, backend=engine.backend_kind, load_s=round(time.perf_counter() - t, 1), visitors={})
    decoder = getattr(engine._scheduler.backend, "decoder", None)
    if decoder is not None:
        out["slots"] = f"{decoder.rows} rows x {decoder.length} tokens"
    out["rss_added_gib"] = round(_rss_gib() - rss, 2)  # the engine's memory: base, and the slot engine's KV cache
    settings = GenerationSettings(temperature=0, max_new_tokens=new_tokens)
    requests = [[(ids, None, settings)] * 2 for ids in (engine.prompt_ids([], q) for q in QUESTIONS)]
    concurrent(engine, requests[:1])  # warm
    try:
        for n in counts:
            results, wall = concurrent(engine, requests[:n])
            tokens = sum(len(x) for r in results for x in r["ids"])
            out["visitors"][str(n)] = dict(wall_s=round(wall, 2), tokens=tokens, aggregate_tokens_per_s=round(tokens / wall, 1),
                                           ttft_max_s=round(max(min(r["first"]) for r in results), 2),
                                           answers=[r["ids"][0] for r in results])
            print(f"  {decode}: {n} visitor(s): {out['visitors'][str(n)]['aggregate_tokens_per_s']} tok/s in all, "
                  f"first tokens within {out['visitors'][str(n)]['ttft_max_s']} s ({wall:.2f} s)", flush=True)
    finally:
        engine.unload()
    return out


def _rss_gib() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--visitors", default="1,4,8")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    counts = [int(c) for c in a.visitors.split(",")]
    report = dict(threads=torch.get_num_threads(), new_tokens=a.new_tokens, when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  engines=[measure(d, counts, a.new_tokens) for d in ("generate", "eager")])
    gen, slot = (e["visitors"] for e in report["engines"])
    report["same_answers"] = all(gen[k]["answers"] == slot[k]["answers"] for k in gen)
    print("same answers from both engines:", report["same_answers"])
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "cpu-chat.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
