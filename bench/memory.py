"""The memory model against the card: the preflight's estimate (the plan's own) beside the measured peak, per setting.

    python -m bench.memory                                   # the reference recipe and batch 4 x 2048, T4 budget
    python -m bench.memory --set ref= --set long=max_length=4096+batch_size=2 --budget 80
    python -m bench.memory --tiny                             # a 2-layer model on the CPU: a smoke test of the script

Each setting runs in its own process (a clean card): the preflight, then a few steps of the real recipe
(qlora.train.build_trainer) on the 7B-shaped model, every row `max_length` tokens long, so the longest batch the
estimate assumes is the batch that runs. It prints the preflight's figure, the plan's (they must agree), and
torch.cuda's peak allocated and reserved memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import T4_GIB, TINY, build_random_model, card, guanaco_ids

SETTINGS = {"reference": "", "len2048": "max_length=2048"}


def measure(model_dir: str, overrides: str, steps: int) -> dict:
    """In this process: preflight, then `steps` steps of the recipe; the estimate and the measured peak."""
    import torch
    import yaml

    from qlora.config import TrainConfig
    from qlora.data import Row
    from qlora.device import pick_precision
    from qlora.model import load_base, load_tokenizer
    from qlora.preflight import preflight
    from qlora.train import build_trainer

    values = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in filter(None, overrides.split("+")))}
    cfg = TrainConfig.from_dict(dict(base_model=model_dir, dataset="(bench)", max_steps=steps, logging_steps=1,
                                     **values))
    pf = preflight(cfg, runs_root="/tmp")
    tok = load_tokenizer(model_dir)
    flat = [t for row in guanaco_ids(tok, max_length=10**6) for t in row.ids]
    # rows of exactly max_length tokens: the longest batch the estimate assumes is the batch that runs
    rows = [Row(ids, ids, [True] * len(ids)) for ids in (flat[i:i + cfg.max_length] for i in range(
        0, cfg.batch_size * (steps + 1) * cfg.max_length, cfg.max_length))]
    precision = pick_precision(cfg.precision)
    model = load_base(model_dir, cfg.quantize, precision)
    trainer = build_trainer(cfg, model, tok, rows, [], precision, Path("/tmp/bench-memory"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return dict(setting=overrides or "reference", preflight_estimate_gib=pf.estimate_gib,
                plan_estimate_gib=trainer.speed_plan.estimated_peak_gib, verdict=pf.verdict, preflight=pf.lines,
                peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llama7b-random", help="model folder; built (7B shape) if missing")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model instead (a CPU smoke test)")
    ap.add_argument("--set", action="append", help="NAME=field=value+field=value (TrainConfig fields); repeatable")
    ap.add_argument("--budget", type=float, default=T4_GIB, help="GiB the plan may use (QLORA_GPU_MEMORY_GIB)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run is not None:  # child process
        print("RESULT " + json.dumps(measure(a.model, a.run, a.steps)), flush=True)
        return 0
    shape = TINY if a.tiny else None
    model_dir = build_random_model(Path(a.model if not a.tiny else "/tmp/llama-tiny-random"), shape)
    settings = dict(s.split("=", 1) for s in a.set) if a.set else SETTINGS
    env = dict(os.environ, QLORA_GPU_MEMORY_GIB=str(a.budget), PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")
    print(f"card: {card()}; plans for a {a.budget} GiB budget")
    print("| setting | preflight estimate GiB | plan estimate GiB | measured peak allocated GiB | peak reserved GiB |")
    print("|---|---|---|---|---|")
    for name, overrides in settings.items():
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--model", str(model_dir), "--run", overrides,
                              "--steps", str(a.steps)], env=env, capture_output=True, text=True)
        result = next((json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            print(f"| {name} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:120]} |")
            continue
        print(f"| {name} ({overrides or 'reference recipe'}) | {result['preflight_estimate_gib']} | "
              f"{result['plan_estimate_gib']} | {result['peak_allocated_gib']} | {result['peak_reserved_gib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
