"""The recipe, top to bottom: data -> tokenizer -> 4-bit base -> LoRA -> SFTTrainer -> atomic save -> free memory."""
from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import prompts, runs, speed
from .callbacks import EventCallback, SampleCallback
from .config import TrainConfig
from .data import DataError, keep_answered, prepare, tokenize
from .device import cuda_available, free_memory, peak_allocated_gib, pick_precision
from .errors import brief, message
from .events import Event, Failed, Finished, Log, Stopped
from .model import ModelError, load_base, load_tokenizer, lora_config, resolve

if TYPE_CHECKING:
    from .data import Row

log = logging.getLogger("qlora")


class StopBeforeStart(Exception):
    """Stop was pressed while the model was still loading."""


def train(cfg: TrainConfig, emit: Callable[[Event], None] = lambda e: None, stop: threading.Event | None = None,
          token: str | None = None, resume_from: str | Path | None = None) -> Path:
    """Fine-tune cfg.base_model on cfg.dataset; returns the run folder. Emits events; raises on failure (after Failed).

    `token` is a Hub token for gated models; it is passed to each call and never stored or logged.
    """
    stop = stop or threading.Event()
    dist = distributed()  # under `accelerate launch`: one process per GPU, each with its own 4-bit base
    main = dist.is_main_process
    if not main:
        emit = _silent  # only rank 0 reports, writes the run folder and saves
    run_dir: Path | None = None
    trainer = model = None
    try:
        # 1. Data: validated before any model is touched, so bad input costs seconds and writes nothing.
        data = prepare(cfg.dataset, cfg.eval_fraction, cfg.seed, token=token, max_rows=cfg.max_rows,
                       allow_local=cfg.allow_local_dataset)
        emit(Log(f"data: {len(data.train)} train rows, {len(data.eval)} eval rows ({data.shape} format"
                 + (f"; {data.skipped()})" if data.dropped else ")")))

        # 2. Tokenizer, prompt format and tokens: the format is the model's own (prompts.choose), chosen once (a
        # resumed run keeps its own); rows are tokenized by their structure, so text in them is never a special token.
        model_path = resolve(cfg.base_model, cfg.allow_local_model, token)
        tokenizer = load_tokenizer(model_path, token)
        fmt = runs.prompt_format(Path(resume_from)) if resume_from else prompts.choose(tokenizer, cfg.prompt_format)
        emit(Log(fmt.describe()))
        train_rows, lost = keep_answered(tokenize(data.train, tokenizer, cfg.max_length, fmt), cfg.max_length)
        if lost:
            emit(Log(f"warning: {lost}"))
        eval_rows, _ = keep_answered(tokenize(data.eval, tokenizer, cfg.max_length, fmt), cfg.max_length, "eval",
                                    required=False)
        if stop.is_set():
            raise StopBeforeStart()

        # 3. The frozen base: 4-bit nf4, compute in bf16 where the card has it, fp16 on a T4, fp32 on the CPU.
        precision = pick_precision(cfg.precision)
        emit(Log(f"loading {cfg.base_model} ({cfg.quantize_words}, {precision})"))
        model = load_base(model_path, cfg.quantize, precision, token)
        if stop.is_set():
            raise StopBeforeStart()

        # 4. The run folder exists only once data and model are known good.
        run_dir = _shared_run_dir(cfg, resume_from, dist)
        if main:
            runs.start(run_dir, cfg, precision, fmt.to_json(), library_versions())

        # 5. SFTTrainer with LoRA on the frozen base.
        trainer = build_trainer(cfg, model, tokenizer, train_rows, eval_rows, precision, run_dir)
        emit(Log("speed: " + "; ".join(trainer.speed_plan.notes)))  # what qlora/speed.py picked for this card
        events = EventCallback(runs.recording(emit, run_dir) if main else emit, stop, str(run_dir), cfg.base_model,
                               data.source)
        trainer.add_callback(events)
        if cfg.sample_every:
            trainer.add_callback(SampleCallback(emit, tokenizer, fmt, cfg.sample_every))
        checkpoint = runs.latest_checkpoint(run_dir) if resume_from else None
        with speed.allocator(trainer.speed_plan):
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

        # 6. Save, whatever made training end; a NaN loss is a failure, not an adapter.
        step = trainer.state.global_step
        if events.bad_loss_step is not None:
            raise FloatingPointError(f"the loss became NaN/inf at step {events.bad_loss_step}")
        if main:
            runs.save_adapter_atomically(run_dir, trainer.model.save_pretrained)
        dist.wait_for_everyone()
        metrics = final_metrics(trainer, result, tokenizer)
        status = "stopped" if events.stop_requested and step < trainer.state.max_steps else "finished"
        if main:
            runs.finish(run_dir, status, step, metrics)
            if status == "finished" and eval_rows:
                # the evaluation card, on the model still in memory: it logs and goes on, it never fails the run
                from .evaluate import end_of_run

                end_of_run(run_dir, trainer.model, tokenizer, fmt, data.eval, data.source, cfg,
                           lambda line: emit(Log(line)), stop)
        emit(Stopped(str(run_dir), step, metrics) if status == "stopped" else Finished(str(run_dir), metrics))
        return run_dir
    except BaseException as e:
        error, hint = describe_failure(e)
        if run_dir is not None and main:
            try:
                runs.finish(run_dir, "stopped" if isinstance(e, StopBeforeStart) else "failed",
                            trainer.state.global_step if trainer else 0, {"error": error})
            except Exception:  # a full disk or a removed folder must not hide the error that ended the run
                log.exception("could not record the failure in %s", run_dir / "run.json")
        if isinstance(e, StopBeforeStart):
            emit(Stopped(str(run_dir or ""), 0, {}))
            raise
        if not isinstance(e, (DataError, ModelError, ValueError, FloatingPointError)):
            log.error("training failed: %s", "".join(traceback.format_exception(e)))
        emit(Failed(error, hint, str(run_dir or "")))
        raise
    finally:
        del trainer, model
        free_memory()


def distributed():
    """accelerate's view of the launch: a single process unless started by `accelerate launch`."""
    from accelerate import PartialState

    return PartialState(cpu=not cuda_available())  # cpu=True: several CPU processes talk over gloo


def _silent(event: Event) -> None:
    pass


def _shared_run_dir(cfg: TrainConfig, resume_from, dist) -> Path:
    """Rank 0 creates the run folder; every rank learns its path (the Trainer's output_dir must agree)."""
    if resume_from:
        return Path(resume_from)
    name = [str(runs.new_run_dir(cfg.output_dir, cfg.run_name)) if dist.is_main_process else None]
    if dist.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(name)
    return Path(name[0])


def build_trainer(cfg: TrainConfig, model, tokenizer, train_rows: "list[Row]", eval_rows: "list[Row]", precision: str,
                  run_dir: Path, plan: "speed.Plan | None" = None):
    """SFTTrainer for the recipe on pre-tokenized rows (data.tokenize: ids, and labels with -100 where the loss does
    not train); `plan` (default: picked from the card by qlora/speed.py) is the fast path."""
    from peft import get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    on_gpu = cuda_available()
    if plan is None:
        plan = speed.plan(cfg, speed.Arch.of(model.config), precision)
    padding_free = cfg.padding_free if plan.padding_free is None else plan.padding_free
    checkpointing = cfg.gradient_checkpointing if plan.checkpoint_layers < 0 else plan.checkpoint_layers > 0
    speed.before_peft(model, plan)
    optimizer = plan.optimizer or (cfg.optimizer if on_gpu or not cfg.optimizer.startswith("paged")
                                   else "adamw_torch")  # paged needs CUDA
    args = SFTConfig(
        output_dir=str(runs.checkpoints_dir(run_dir)),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim=optimizer,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        activation_checkpointing=checkpointing,  # transformers 5's name (gradient_checkpointing is deprecated)
        fp16=precision == "fp16", bf16=precision == "bf16",  # explicit: trl turns bf16 on by default, a T4 has none
        # rows come pre-truncated (data.tokenize); trl refuses max_length with padding_free, which needs none
        max_length=None if padding_free else cfg.max_length, padding_free=padding_free,
        logging_steps=cfg.logging_steps, seed=cfg.seed, data_seed=cfg.seed,
        eval_strategy="steps" if eval_rows else "no", eval_steps=0.2 if eval_rows else None,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500, save_total_limit=2,
        # padding-free batches have no padding to leave out of the count; padded ones do
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        report_to="none", disable_tqdm=True, hub_token=None, push_to_hub=False,
        use_cpu=not on_gpu,  # without it, several CPU processes (gloo) would each train alone
        # the Trainer's default replaces a NaN/inf step loss by the window's mean in the logs, which would hide it
        # from EventCallback's NaN check: report the real loss
        logging_nan_inf_filter=False,
        # every LoRA weight gets a gradient each step; the Trainer's default (True without checkpointing) costs DDP a
        # second pass over the graph per step and prints a warning from every rank
        ddp_find_unused_parameters=False,
    )
    # LoRA's A matrices start random: seed them from the config, or a second run in the same process (the app)
    # would start from other weights than the first with the same seed
    set_seed(cfg.seed)
    peft_model = get_peft_model(model, lora_config(cfg))
    if cfg.target_modules != ["all-linear"]:  # peft only warns; the adapter would then read as half-complete
        found = peft_model.base_model.targeted_module_names
        unmatched = [t for t in cfg.target_modules if not any(runs.targets_module(t, n) for n in found)]
        if unmatched:
            raise ValueError(f"target_modules: {', '.join(unmatched)} matches no module of {cfg.base_model}")
    trainer = SFTTrainer(
        model=peft_model, args=args, processing_class=tokenizer,
        train_dataset=_dataset(train_rows), eval_dataset=_dataset(eval_rows) if eval_rows else None,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; our events report progress instead
    speed.after_trainer(trainer, plan)  # LoRA weights in fp32 unless bf16 (undoing trl's cast), layers, fusing
    trainer.speed_plan = plan  # read by the benchmark and the run folder
    return trainer


def _dataset(rows: "list[Row]"):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r.ids for r in rows], "labels": [r.labels for r in rows]})


def final_metrics(trainer, result, tokenizer) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    m = dict(result.metrics) if result is not None else {}
    m.update(step=trainer.state.global_step, max_steps=trainer.state.max_steps,
             first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
             final_eval_loss=evals[-1] if evals else None, tokens_seen=trainer.state.num_input_tokens_seen)
    peak = peak_allocated_gib()
    if peak is not None:
        m["peak_gpu_memory_gib"] = peak
    return m


def describe_failure(e: BaseException) -> tuple[str, str]:
    """(message, hint) for the user: one line, no traceback, the knob to turn where we know it."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return ("out of GPU memory", "lower batch_size or max_length, or turn gradient_checkpointing on")
    if isinstance(e, FloatingPointError):
        return (str(e), "lower learning_rate, or use bf16 where the card has it")
    if isinstance(e, StopBeforeStart):
        return ("stopped before training started", "")
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        return ("disk full while saving; the previous adapter is untouched", "free disk space and train again")
    if isinstance(e, (DataError, ModelError, ValueError)):
        return (message(e, 500), "")
    return (brief(e, 300), "see the server log")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
