"""Training benchmark: the seed stack vs the project's own path, same recipe, data and order, each arm in its own process.

    python -m bench.train_bench                      # H100 mode and T4 mode, seed vs project, writes bench/results/
    python -m bench.train_bench --modes h100 --arms seed,project,project:fused=0 --steps 40

Arms: `seed` is the plain seed recipe built directly with trl + peft (fp16 compute, fp32 LoRA weights, gradient
checkpointing on every layer, padded batches). `project` is qlora.train.build_trainer with the plan qlora/speed.py
picks for the card. `project:key=value+key=value` overrides that plan to measure one lever (arms are separated by
commas, overrides by '+'; OVERRIDES below lists the keys): lean, causal, pf, ckpt, lora32, fused, and the levers of a
compute-poor card: keep_mlp (layers keeping gate/up on every batch), shorter (more layers keeping on shorter
batches; 0: none), keep_bits (16 or 8), fewer (fewer elementwise passes), compiled (the elementwise steps compiled),
tdq (nf4 dequantized by qlora/dequant.py's Triton kernel), trope (RoPE's backward by qlora/ropegrad.py's), clora
(LoRA's sums in the compiled steps), expandable (the allocator's expandable segments), mm4bit (bitsandbytes' gemm_4bit
forward), lora16 (LoRA matmuls in fp16; 0: fp32), metrics (trl's per-step metrics), head (the LM head's gradient taken
in its forward), optim (adamw_torch_fused or paged_adamw_32bit, the Trainer's optimizer), attn (flash, efficient or
math).
Modes: `h100` uses the card as it is, except that the project arm plans for a T4's 15 GiB (target: fits a T4);
`card` lets the project plan for the whole card; `t4` caps every arm at 15 GiB and forces fp16 (no bf16); `t4c` is
`t4` with every arm's process also held to a T4's compute by NVIDIA MPS (bench/mps.py: the bench starts the daemon,
calibrates the thread percentage on a large fp16 matmul, and stops it; it says so and skips the mode where MPS is
missing) and to a T4's kernels: no FlashAttention or cuDNN attention for any arm, and the project plans for compute
capability 7.5 at the calibrated TFLOP/s. `--parallel N` runs the t4c arms N at a time (each under its own MPS share
of the multiprocessors), so one call can measure many levers side by side with the seed.

Each arm's JSON also gives, per step, the seconds Python's garbage collector took and the CUDA allocator's trips to
the driver. `BENCH_PROFILE_ARM=arm,... BENCH_PROFILE_STEP=k`: those arms' steps k to k+2 under torch.profiler (kernel
time by kind, the GPU's idle gaps by where the host was); `BENCH_SYNC_ARM=arm,...` (same steps): where the host waited
for the GPU in them (torch's sync debug mode), by call site.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import T4_GIB, StepMeter, build_random_model, card, cap_memory, guanaco_ids, versions, write_json
from bench.mps import T4Compute

RESULTS = Path(__file__).resolve().parent / "results"


# --- one arm, in this process ----------------------------------------------------------------------------
def recipe(steps: int, out_dir: str):
    """The reference recipe (DESIGN.md) as a TrainConfig, cut to `steps` steps."""
    from qlora.config import TrainConfig

    return TrainConfig(base_model="(bench)", dataset="(bench)", output_dir=out_dir, max_steps=steps,
                       logging_steps=1, seed=42)


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {value!r}")
    return value == "1"


def _one_of(*choices):
    def parse(value: str):
        kind = type(choices[0])
        if kind(value) not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return kind(value)
    return parse


def _off(value: str) -> list:
    if value != "0":
        raise ValueError(f"only 0 (off) is a value here, got {value!r}")
    return []


# project:key=value -> the Plan field it sets and how its value reads
OVERRIDES = {"causal": ("causal_attention", _flag), "pf": ("padding_free", _flag), "ckpt": ("checkpoint_layers", int),
             "lora32": ("lora_fp32", _flag), "lean": ("lean", _flag), "fused": ("fused", _flag),
             "keep_mlp": ("keep_mlp", int), "shorter": ("keep_upto_tokens", _off),
             "keep_bits": ("keep_bits", _one_of(16, 8)),
             "fewer": ("fewer_passes", _flag), "mm4bit": ("gemm_4bit", _flag), "lora16": ("lora_fp16", _flag),
             "metrics": ("trl_metrics", _flag), "head": ("head_in_forward", _flag), "compiled": ("compiled", _flag),
             "tdq": ("triton_dequant", _flag),
             "trope": ("triton_rope", _flag), "clora": ("compiled_lora", _flag),
             "expandable": ("expandable_segments", _flag),
             "optim": ("optimizer", _one_of("adamw_torch_fused", "paged_adamw_32bit")),
             "attn": ("attention", _one_of("flash", "efficient", "math"))}


def parse_overrides(overrides: str) -> list[tuple[str, object]]:
    """(Plan field, value) for each override an arm names ("keep_mlp=32+fewer=0"); SystemExit names a bad one."""
    out = []
    for item in filter(None, overrides.split("+")):
        key, _, value = item.partition("=")
        if key not in OVERRIDES:
            raise SystemExit(f"unknown override {key!r} in {overrides!r}; known: {', '.join(OVERRIDES)}")
        field, parse = OVERRIDES[key]
        try:
            out.append((field, parse(value)))
        except ValueError as e:
            raise SystemExit(f"override {item!r}: {e}") from None
    return out


def apply_overrides(plan, overrides: str, cfg, arch) -> None:
    """Set the plan fields an arm names, then re-estimate its memory (and re-plan the layers that keep on shorter
    batches around a changed keep count or width, unless the arm turns them off)."""
    from qlora import speed

    named = parse_overrides(overrides)
    for field, value in named:
        setattr(plan, field, value)
        plan.notes.append(f"override {field}={getattr(plan, field)}")
    fields = {field for field, _ in named}
    if plan.keep_upto_tokens and fields & {"keep_mlp", "keep_bits"} and "keep_upto_tokens" not in fields:
        speed.keep_on_shorter_batches(plan, cfg, arch)
        upto = plan.keep_upto_tokens
        plan.notes.append(f"re-planned: {len(upto)} more layers keep on shorter batches"
                          + (f" (all up to {upto[-1]:,} tokens)" if upto else ""))
    if plan.padding_free:
        plan.causal_attention = False  # packed rows need their block mask
    plan.estimated_peak_gib = plan.estimate(cfg, arch)


def run_arm(arm: str, model_dir: str, steps: int, mode: str, out: Path) -> dict:
    import torch

    from qlora import speed
    from qlora.device import pick_precision
    from qlora.model import load_base, load_tokenizer

    if mode in ("t4", "t4c"):
        cap_memory(T4_GIB)
    cuda = torch.cuda.is_available()
    if mode == "t4c" and cuda:  # a T4 has neither FlashAttention-2 nor cuDNN attention: no arm may use them
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    tok = load_tokenizer(model_dir)
    ids = guanaco_ids(tok)
    cfg = recipe(steps, str(out.parent / "runs"))
    t0 = time.perf_counter()
    name, _, overrides = arm.partition(":")
    if name == "seed":
        precision = "fp16" if cuda else "fp32"  # the seed computes in fp16 on every card
        model = load_base(model_dir, "nf4", precision)
        trainer = seed_trainer(cfg, model, tok, ids, precision, out.parent / "runs" / "seed")
        plan = None
    else:
        precision = pick_precision("auto")
        model = load_base(model_dir, "nf4", precision)
        arch = speed.Arch.of(model.config)
        plan = speed.plan(cfg, arch, precision)
        apply_overrides(plan, overrides, cfg, arch)
        from qlora.train import build_trainer

        trainer = build_trainer(cfg, model, tok, ids, [], precision, out.parent / "runs" / arm.replace(":", "_"),
                                plan=plan)
    meter = StepMeter(trainer.model)
    trainer.add_callback(meter.callback())
    profiled = os.environ.get("BENCH_PROFILE_ARM", "").split(",")  # arms, comma-separated
    profile = Profile(int(os.environ.get("BENCH_PROFILE_STEP", "0")) if arm in profiled else 0)
    if profile.at and cuda:
        trainer.add_callback(profile.callback())
    syncs = SyncSites(int(os.environ.get("BENCH_PROFILE_STEP", "0"))
                      if arm in os.environ.get("BENCH_SYNC_ARM", "").split(",") else 0)
    if syncs.at and cuda:
        trainer.add_callback(syncs.callback())
    setup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with speed.allocator(plan) if plan is not None else contextlib.nullcontext():
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # the caching allocator's trips to the driver and its retries at the cap: each a host stall the GPU may wait on
    stats = torch.cuda.memory_stats() if cuda else {}
    allocator = {k: stats.get(k) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                           "num_sync_all_streams")}
    return dict(arm=arm, mode=mode, precision=precision, plan=plan.to_dict() if plan else None, setup_s=setup_s,
                step_s=meter.times, step_tokens=meter.tokens, step_gc_s=meter.gc_s,
                step_device_allocs=meter.device_allocs, syncs=syncs.sites, loss=losses,
                peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None, allocator=allocator,
                profile=profile.table)


class Profile:
    """torch.profiler over 3 steps from step `at`: where the time goes (kernels by CUDA time, CPU total)."""

    def __init__(self, at: int):
        self.at, self.prof, self.table = at, None, None

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == outer.at:
                    import torch

                    outer.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                    torch.profiler.ProfilerActivity.CUDA])
                    outer.prof.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if outer.prof is not None and state.global_step == outer.at + 3:
                    import torch

                    from bench.common import ms_by_kind

                    torch.cuda.synchronize()
                    outer.prof.__exit__(None, None, None)
                    ka = outer.prof.key_averages()
                    kinds = ms_by_kind(ka)
                    busy = sum(kinds.values()) / 1000
                    by_kind = "\n".join(f"  {k}: {ms / 1000:.3f} s" for k, ms in kinds.items())
                    outer.table = (f"GPU busy {busy:.3f} s over 3 steps, by kind:\n{by_kind}\n{_idle(outer.prof)}\n" +
                                   ka.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70) +
                                   ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
                    outer.prof = None

        return _Cb()


class SyncSites:
    """Where the host waits for the GPU, over 3 steps from step `at`: torch's sync debug mode warns at each
    synchronizing call (`.item()`, a blocking copy, ...); counted by the innermost frames outside torch."""

    def __init__(self, at: int):
        self.at, self.sites, self._saved = at, None, None

    def _record(self, message, category, filename, lineno, file=None, line=None):
        import traceback

        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "/warnings.py" not in f.filename and "train_bench.py" not in f.filename]
        where = " < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                           for f in frames[-3:][::-1])
        self.sites[where] = self.sites.get(where, 0) + 1

    def callback(self):
        import warnings

        from transformers import TrainerCallback

        outer = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == outer.at:
                    import torch

                    outer.sites, outer._saved = {}, (warnings.showwarning, warnings.filters[:])
                    warnings.simplefilter("always")
                    warnings.showwarning = outer._record
                    torch.cuda.set_sync_debug_mode("warn")

            def on_step_end(self, args, state, control, **kw):
                if outer._saved is not None and state.global_step == outer.at + 3:
                    import torch

                    torch.cuda.set_sync_debug_mode("default")
                    warnings.showwarning, warnings.filters[:] = outer._saved
                    outer._saved = None
                    outer.sites = dict(sorted(outer.sites.items(), key=lambda kv: -kv[1]))

        return _Cb()


def _idle(prof) -> str:
    """The profile's GPU idle time and its largest gaps by where the host was (bench.common.idle_gaps)."""
    import tempfile

    from bench.common import idle_gaps

    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        gaps = idle_gaps(json.loads(Path(f"{d}/trace.json").read_text()))
    if not gaps:
        return "GPU idle: no kernels in the trace"
    rows = "\n".join(f"  {g['ms']:8.2f} ms in {g['n']:4d} gaps: {g['where']}" for g in gaps["largest"])
    return (f"GPU idle {gaps['idle_ms']:.1f} ms of {gaps['wall_ms']:.1f} ms from first kernel to last "
            f"({gaps['gaps']} gaps of 50 us or more); the largest, by where the host was:\n{rows}")


def seed_trainer(cfg, model, tok, ids, precision, run_dir):
    """The seed stack, built directly: trl's SFTTrainer with a peft LoraConfig and the recipe's arguments."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(run_dir), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        optim="paged_adamw_32bit" if cuda else "adamw_torch", max_steps=cfg.max_steps,
        train_sampling_strategy="group_by_length", gradient_checkpointing=True,
        fp16=precision == "fp16", bf16=False, max_length=cfg.max_length, logging_steps=1, seed=cfg.seed,
        data_seed=cfg.seed, save_strategy="no", report_to="none", disable_tqdm=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, peft_config=lora,
                         train_dataset=Dataset.from_dict({"input_ids": [r.ids for r in ids]}))
    trainer.remove_callback(PrinterCallback)
    for p in trainer.model.parameters():  # fp32 trainable weights (trl casts them to bf16; fp16's scaler needs fp32)
        if p.requires_grad:
            p.data = p.data.float()
    return trainer


# --- the driver ------------------------------------------------------------------------------------------
def summarize(r: dict, warmup: int, epoch_tokens: int) -> dict:
    t, n = r["step_s"][warmup:], r["step_tokens"][warmup:]
    tps = sum(n) / sum(t) if t and sum(t) > 0 else 0.0
    return dict(tokens_per_s=round(tps, 1), s_per_step=round(sum(t) / max(1, len(t)), 4),
                epoch_s_est=round(epoch_tokens / tps, 1) if tps else None,
                peak_allocated_gib=r["peak_allocated_gib"] and round(r["peak_allocated_gib"], 2),
                peak_reserved_gib=r["peak_reserved_gib"] and round(r["peak_reserved_gib"], 2),
                final_loss=r["loss"][-1] if r["loss"] else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llama7b-random", help="model folder; built (7B shape) if missing")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model instead (a CPU smoke test)")
    ap.add_argument("--arms", default="seed,project")
    ap.add_argument("--modes", default="h100,t4")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="file name suffix")
    ap.add_argument("--arm-timeout", type=int, default=420)
    ap.add_argument("--mps-percentage", type=int, help="t4c: this thread percentage instead of calibrating one")
    ap.add_argument("--parallel", type=int, default=1,
                    help="t4c: run this many arms at once, each under its own MPS share (at most 8 on a 141 GB card: "
                         "every arm may take 15 GiB)")
    ap.add_argument("--run-arm", help=argparse.SUPPRESS)
    ap.add_argument("--build-model", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="h100", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.run_arm:  # child process
        result = run_arm(a.run_arm, a.model, a.steps, a.mode, Path(a.json))
        write_json(Path(a.json), result)
        return 0
    if a.build_model:  # child process
        from bench.common import TINY

        shape = TINY if a.tiny else None
        build_random_model(Path(a.model), shape)
        return 0

    for arm in a.arms.split(","):  # a typo or a bad value fails now, not minutes later in a child
        parse_overrides(arm.partition(":")[2])
    t0 = time.perf_counter()
    # in a child: this process must hold no CUDA context of its own while the t4c mode's MPS daemon runs
    build = [sys.executable, "-m", "bench.train_bench", "--build-model", "--model", a.model] + (["--tiny"] * a.tiny)
    subprocess.run(build, check=True)
    model_dir = Path(a.model)
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
    from qlora.model import load_tokenizer

    epoch_tokens = sum(len(r.ids) for r in guanaco_ids(load_tokenizer(str(model_dir))))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = a.modes.split(",")
    results = run_arms(a, model_dir, [m for m in modes if m != "t4c"], out, epoch_tokens)
    t4c = None
    if "t4c" in modes:  # last, with the MPS daemon up only for it
        with T4Compute(percentage=a.mps_percentage) as t4c:
            if t4c.available and a.parallel > 1:
                try:
                    t4c.concurrent_tflops(min(a.parallel, len(a.arms.split(","))))
                except RuntimeError as e:  # said in the report; the arms still run
                    print(f"t4c: the probe with several clients failed: {e}", flush=True)
            print(f"t4c: {json.dumps(t4c.to_dict())}", flush=True)
            if t4c.available:
                results += run_arms(a, model_dir, ["t4c"], out, epoch_tokens, t4c, a.parallel)
            else:
                print(f"t4c skipped: {t4c.why}", flush=True)
    report = dict(card=card(), versions=versions(), steps=a.steps, warmup=a.warmup, epoch_tokens=epoch_tokens,
                  command="python -m bench.train_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                  when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), arms=results,
                  t4c=t4c.to_dict() if t4c is not None else None, parallel=a.parallel)
    report["speedup"] = speedups(results)
    name = f"train{'-' + a.tag if a.tag else ''}"
    write_json(out / f"{name}.json", report)
    (out / f"{name}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


def run_arms(a, model_dir: Path, modes: list[str], out: Path, epoch_tokens: int, t4c=None,
             parallel: int = 1) -> list[dict]:
    """Each (mode, arm) in its own process, so one arm's memory and compiled state never reach the next; `parallel`
    of them at once (t4c only: elsewhere arms would share the whole card and measure each other)."""
    jobs = [(mode, arm) for mode in modes for arm in a.arms.split(",")]
    pending, running, done = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < max(1, parallel):
            running.append(_start_arm(a, model_dir, *pending.pop(0), out, t4c))
        time.sleep(0.2)
        for job in list(running):
            if job["proc"].poll() is None and time.perf_counter() - job["t1"] < a.arm_timeout:
                continue
            running.remove(job)
            done[job["key"]] = _finish_arm(a, job, epoch_tokens)
    return [done[key] for key in jobs]


def _start_arm(a, model_dir: Path, mode: str, arm: str, out: Path, t4c) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")
    for name in ("QLORA_GPU_MEMORY_GIB", "QLORA_NO_BF16", "QLORA_GPU_CAPABILITY", "QLORA_GPU_TFLOPS"):
        env.pop(name, None)
    if mode in ("h100", "t4", "t4c"):
        env["QLORA_GPU_MEMORY_GIB"] = str(T4_GIB)  # the project plans for a T4's memory
    if mode in ("t4", "t4c"):
        env["QLORA_NO_BF16"] = "1"
    if mode == "t4c":  # a T4's compute: MPS's share of the card, and the plan told what card it is on
        env = t4c.env(env)
        env["QLORA_GPU_CAPABILITY"] = "7.5"
        env["QLORA_GPU_TFLOPS"] = f"{t4c.measured_tflops:.1f}"
    tmp = out / f".arm-{mode}-{arm.replace(':', '_').replace(',', '_').replace('=', '').replace('+', '_')}.json"
    cmd = [sys.executable, "-m", "bench.train_bench", "--run-arm", arm, "--mode", mode, "--model",
           str(model_dir), "--steps", str(a.steps), "--json", str(tmp)]
    print(f"== {mode} {arm}", flush=True)
    log = open(tmp.with_suffix(".log"), "w+", encoding="utf-8")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return dict(key=(mode, arm), mode=mode, arm=arm, proc=proc, log=log, tmp=tmp, t1=time.perf_counter())


def _finish_arm(a, job: dict, epoch_tokens: int) -> dict:
    proc, log, tmp, mode, arm = job["proc"], job["log"], job["tmp"], job["mode"], job["arm"]
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        err = f"timed out after {a.arm_timeout} s"
    else:
        log.seek(0)
        err = None if proc.returncode == 0 else log.read()[-3000:]
    log.close()
    Path(log.name).unlink(missing_ok=True)
    if err:
        print(f"== {mode} {arm} FAILED: {err}", flush=True)
        return dict(arm=arm, mode=mode, error=err)
    r = json.loads(tmp.read_text())
    tmp.unlink()
    r.update(summarize(r, a.warmup, epoch_tokens), wall_s=round(time.perf_counter() - job["t1"], 1))
    print(f"== {mode} {arm}: {r['tokens_per_s']:.0f} tok/s, {r['s_per_step']:.3f} s/step, peak "
          f"{r['peak_allocated_gib']} GiB alloc / {r['peak_reserved_gib']} reserved, loss {r['final_loss']}, wall "
          f"{r['wall_s']} s{', plan: ' + '; '.join(r['plan']['notes']) if r.get('plan') else ''}", flush=True)
    if r.get("profile"):
        print(r["profile"], flush=True)
    return r


def speedups(results: list[dict]) -> dict:
    """tokens/s of each arm over the seed's in the same mode, the same by step (the batches' lengths differ, and so
    does the share of attention and of fixed per-step work in them), and how close its loss curve is to the seed's."""
    out = {}
    seeds = {r["mode"]: r for r in results if r["arm"] == "seed" and "error" not in r}
    for r in results:
        s = seeds.get(r["mode"])
        if "error" in r or s is None or r is s or not s["tokens_per_s"]:
            continue
        n = min(len(r["loss"]), len(s["loss"]))
        diffs = [abs(x - y) for x, y in zip(r["loss"][:n], s["loss"][:n])]
        out[f"{r['mode']}:{r['arm']}"] = dict(
            x=round(r["tokens_per_s"] / s["tokens_per_s"], 2),
            loss_max_abs_diff=round(max(diffs), 4) if diffs else None,
            loss_mean_abs_diff=round(sum(diffs) / n, 4) if n else None,
            by_step=[[tokens, round(seed_s / arm_s, 2)] for tokens, seed_s, arm_s in zip(s["step_tokens"], s["step_s"],
                                                                                        r["step_s"])]
            if s["step_tokens"] == r["step_tokens"] else None)
    return out


def markdown(report: dict) -> str:
    c = report["card"]
    lines = [f"Card: {c['name']} ({c.get('memory_gib')} GiB); {report['steps']} steps, timing after "
             f"{report['warmup']} warm-up steps; {report['when']}; `{report['command']}`", ""]
    m = report.get("t4c")
    if m:
        lines += [f"t4c: MPS at {m['percentage']}% of the multiprocessors, a large fp16 matmul at "
                  f"{m['measured_tflops']} TFLOP/s (target {m['target_tflops']}, whole card {m['full_card_tflops']}); "
                  f"calibration {m['calibration']}" if m["available"] else f"t4c: not run ({m['why']})", ""]
        if m["available"]:
            copy = next((c["copy_gbs"] for c in m["calibration"] if c["percentage"] == m["percentage"]), None)
            lines += [f"t4c memory: a 1 GiB copy at {copy} GB/s under that share (a T4: {m['t4_copy_gbs']:.0f})", ""]
        if m["available"] and m.get("concurrent"):
            c = m["concurrent"]
            lines += [f"t4c arms ran {report['parallel']} at a time; the probe in {c['clients']} processes at once: "
                      f"{c['tflops']} TFLOP/s and {c['copy_gbs']} GB/s each", ""]
    lines += [
             "| mode | arm | tokens/s | x seed | s/step | epoch s (est.) | peak alloc GiB | peak reserved GiB | "
             "plan's estimate GiB | final loss | max abs loss diff vs seed |", "|---" * 11 + "|"]
    for r in report["arms"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['arm']} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        s = report["speedup"].get(f"{r['mode']}:{r['arm']}", {})
        lines.append(f"| {r['mode']} | {r['arm']} | {r['tokens_per_s']:.0f} | {s.get('x', '1.00')} | "
                     f"{r['s_per_step']:.3f} | {r['epoch_s_est']} | {r['peak_allocated_gib']} | "
                     f"{r['peak_reserved_gib']} | {(r.get('plan') or {}).get('estimated_peak_gib', '')} | "
                     f"{r['final_loss']:.4f} | {s.get('loss_max_abs_diff', '')} |")
    steps = {k: v["by_step"] for k, v in report["speedup"].items() if v.get("by_step")}
    if steps:
        lines += ["", f"x seed by step (the step's tokens: the seed's time over the arm's; the first {report['warmup']} "
                      "are warm-up):"]
        lines += [f"- {k}: " + ", ".join(f"{t}: {x}" for t, x in v) for k, v in steps.items()]
    plans = {f"{r['mode']}:{r['arm']}": "; ".join(r["plan"]["notes"]) for r in report["arms"] if r.get("plan")}
    lines += ["", "Plans:"] + [f"- {k}: {v}" for k, v in plans.items()]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
