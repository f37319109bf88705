"""nf4mm's tiles against bitsandbytes' 4-bit matmuls, on the 7B decoder's weight shapes (issue 14's lever).

For each weight shape: bitsandbytes' matmul at 16, 2 and 1 rows, and `qlora.nf4mm.matmul` at 16 rows with each
candidate tile, timed in CUDA graph replays (as the chat engine's captured step runs them); each candidate's largest
error against the fp64 product of bitsandbytes' dequantized weight, next to cuBLAS's on that weight, and whether its
rows are independent (row r of a 16-row call = row r of a 2-row call, bit for bit); the 4-bit work of one decode step
(224 weights) summed for bitsandbytes and for the fastest exact tile.

    python -m bench.nf4_probe [--dtype bf16|fp16] [--out DIR]

Run28 (bench/results/h200-run28-probe/) ran an earlier form of this script, which also held two other kernel shapes
(x read strided in the kernel; x held in registers): bench/README.md has their figures. Run32 compared the kernel's
present form (x read as it is, the split-K sum in the kernel) with run30's (x split by a copy kernel, a second kernel
summing) at commit 1b3f91d.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

SHAPES = [(4096, 4096, 4), (11008, 4096, 2), (4096, 11008, 1)]  # (out, in, per 7B layer)


def candidates():
    from qlora.nf4mm import Tile

    return [Tile(64, 8, 4, 2), Tile(64, 8, 4, 3), Tile(64, 8, 8, 2), Tile(128, 8, 4, 2), Tile(128, 8, 8, 2),
            Tile(64, 16, 4, 2), Tile(64, 4, 4, 2), Tile(32, 8, 4, 2), Tile(32, 16, 4, 2), Tile(128, 4, 8, 2),
            Tile(32, 8, 2, 2)]


def main() -> int:
    import types

    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    import torch

    from bench.matmul4bit import _time_graph
    from qlora import nf4mm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    report = dict(card=torch.cuda.get_device_name(0), dtype=a.dtype, when=time.strftime("%Y-%m-%d %H:%M"),
                  default_tile=str(nf4mm.TILE), shapes={})
    step = {"bnb16": 0.0, "bnb2": 0.0, "bnb1": 0.0, "nf4mm_best": 0.0, "nf4mm_default": 0.0}
    for n, k, per_layer in SHAPES:
        w16 = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        data, state = bf.quantize_4bit(w16, blocksize=64, compress_statistics=False, quant_type="nf4")
        del w16
        weight = bf.dequantize_4bit(data, state).to(dtype)
        w = nf4mm.Weight.of(types.SimpleNamespace(data=data, quant_state=state))
        x = torch.randn(16, k, device="cuda", dtype=dtype)
        exact = x.double() @ weight.double().t()
        fig = dict(bnb16_us=_time_graph(lambda: bnb.matmul_4bit(x, data.t(), quant_state=state)),
                   bnb2_us=_time_graph(lambda: bnb.matmul_4bit(x[:2], data.t(), quant_state=state)),
                   bnb1_us=_time_graph(lambda: bnb.matmul_4bit(x[:1], data.t(), quant_state=state)),
                   cublas_err=((x @ weight.t()).double() - exact).abs().max().item(), tiles={})
        for tile in candidates():
            try:
                got = nf4mm.matmul(x, w, tile)
                two = nf4mm.matmul(x[:2], w, tile)
                fig["tiles"][str(tile)] = dict(us=round(_time_graph(lambda: nf4mm.matmul(x, w, tile)), 1),
                                               err=(got.double() - exact).abs().max().item(),
                                               rows_exact=bool(torch.equal(two, got[:2])))
            except Exception as e:  # noqa: BLE001  (a tile that does not build on this card is the tile's)
                fig["tiles"][str(tile)] = dict(error=f"{type(e).__name__}: {str(e)[:120]}")
            print(n, k, tile, fig["tiles"][str(tile)], flush=True)
        ok = {t: v for t, v in fig["tiles"].items() if "us" in v and v["rows_exact"] and v["err"] <= 2 * fig["cublas_err"]}
        per_step = per_layer * 32 / 1000
        for key in ("bnb16", "bnb2", "bnb1"):
            step[key] += fig[f"{key}_us"] * per_step
        if ok:
            fig["best"] = min(ok, key=lambda t: ok[t]["us"])
            step["nf4mm_best"] += ok[fig["best"]]["us"] * per_step
        step["nf4mm_default"] += fig["tiles"].get(str(nf4mm.TILE), {}).get("us", float("nan")) * per_step
        report["shapes"][f"{n}x{k}"] = fig
        print(f"== {n}x{k}: bitsandbytes 16/2/1 rows {fig['bnb16_us']:.1f}/{fig['bnb2_us']:.1f}/{fig['bnb1_us']:.1f} us;"
              f" best tile {fig.get('best')}; cuBLAS error {fig['cublas_err']:.4g}", flush=True)
    report["step_ms"] = {key: round(v, 2) for key, v in step.items()}
    print("4-bit work of a decode step (7B, 224 weights), ms:", report["step_ms"], flush=True)
    if a.out:
        from pathlib import Path

        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, f"nf4_probe-{a.dtype}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
