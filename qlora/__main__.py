"""The command line over the same core: `python -m qlora train|chat|eval|export ...`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import threading
import typing
from pathlib import Path

from .config import EMBEDDED_MODEL, GenerationSettings, TrainConfig, embedded_defaults, read_yaml_fields

USAGE_ERROR = 2
# Linux's limits on a file name and a path, in bytes; a run adds up to ~320 bytes below --output-dir
# (a 200-byte run name, checkpoints/checkpoint-N/..., the adapter's temp folder and files).
NAME_MAX, PATH_MAX, RUN_TREE_BYTES = 255, 4096, 320


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora", description="QLoRA fine-tuning and side-by-side chat.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a base model with QLoRA",
                       description="Fine-tune with QLoRA. Order of precedence: defaults < the embedded preset "
                                   f"(--model {EMBEDDED_MODEL}) < --config < flags.")
    t.add_argument("--config", help="a YAML file of TrainConfig fields")
    t.add_argument("--model", dest="base_model", help=f"Hub id, local folder, or {EMBEDDED_MODEL} (offline)")
    t.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding a Hub token (never a flag: "
                                                           "flags end up in shell history and process lists)")
    t.add_argument("--resume-from", help="a run folder whose last checkpoint to resume (runs saved with --save-steps)")
    t.add_argument("--dry-run", action="store_true", help="print the preflight (card, plan, estimated peak memory, "
                                                          "disk) and exit without loading the model")
    t.add_argument("--events-jsonl", help=argparse.SUPPRESS)  # used by qlora.launch to relay events
    t.add_argument("--stop-file", help=argparse.SUPPRESS)  # qlora.launch creates it to ask every rank to stop
    for f in dataclasses.fields(TrainConfig):
        if f.name != "base_model":
            t.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=f"TrainConfig.{f.name}")

    c = sub.add_parser("chat", help="answer one prompt with the base and the fine-tuned adapter, side by side")
    c.add_argument("--adapter", required=True, help="a run folder (or its adapter/ subfolder)")
    c.add_argument("--system", default="", help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=GenerationSettings.temperature,
                   help="sampling temperature, 0 = greedy (default %(default)s, as in the app)")
    c.add_argument("--top-p", type=float, default=GenerationSettings.top_p, help="(default %(default)s, as in the app)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("prompt", help="the question; on a terminal both answers stream in, elsewhere (a pipe, a file) "
                                  "they are printed once, complete")

    e = sub.add_parser("eval", help="the evaluation card: base vs adapter on held-out rows, saved as eval.json")
    e.add_argument("--adapter", required=True, help="a run folder (or its adapter/ subfolder)")
    e.add_argument("--dataset", help="an eval file or Hub dataset id, every row held out (default: the run's own "
                                     "eval split)")
    e.add_argument("--rows", type=int, default=0, help="only the first N rows (default 0: all)")
    e.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding a Hub token")

    x = sub.add_parser("export", help="merge the adapter into the base's own weights: a standalone model folder")
    x.add_argument("--adapter", required=True, help="a run folder (or its adapter/ subfolder)")
    x.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding a Hub token")

    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return {"train": _train, "chat": _chat, "eval": _eval, "export": _export}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # DataError, ModelError and bad config values are ValueErrors
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return USAGE_ERROR


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """defaults < embedded preset < --config file < explicit flags."""
    values: dict[str, typing.Any] = {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None)
             is not None}
    where, from_file = read_yaml_fields(Path(args.config)) if args.config else ("", {})
    if args.config:
        try:  # the file must be valid on its own, so its errors name it
            TrainConfig.from_dict(from_file)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    if (flags.get("base_model") or from_file.get("base_model")) == EMBEDDED_MODEL:
        values.update(embedded_defaults())
    values.update(from_file)  # only the fields the file sets override the preset
    hints = typing.get_type_hints(TrainConfig)
    for name, raw in flags.items():
        values[name] = _convert(name, raw, hints[name])
    return TrainConfig.from_dict(values)


def _convert(name: str, raw: str, hint) -> typing.Any:
    try:
        if hint is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if typing.get_origin(hint) is list:
            return [x.strip() for x in raw.split(",") if x.strip()]
        return raw
    except ValueError:
        kind = getattr(hint, "__name__", str(hint))
        raise ValueError(f"--{name.replace('_', '-')}: expected {kind}, got {raw!r}") from None


def check_output_dir(folder: str) -> None:
    """Refuse an --output-dir that cannot hold run folders (a file in the way, no write access, too long a path)
    now, before any model loads. Creates nothing: the probe folder is removed at once."""
    path = Path(folder).expanduser().absolute()
    longest = max(len(os.fsencode(part)) for part in path.parts)
    if longest > NAME_MAX:
        raise ValueError(f"--output-dir: a folder name in it is {longest} bytes long; at most {NAME_MAX}")
    size = len(os.fsencode(str(path)))
    if size > PATH_MAX - RUN_TREE_BYTES:
        raise ValueError(f"--output-dir: the path is {size} bytes long; at most {PATH_MAX - RUN_TREE_BYTES} leaves "
                         "room for the run folders inside it")
    existing = path
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output-dir: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qlora-probe-", dir=existing))
    except OSError as e:
        raise ValueError(f"--output-dir: cannot create folders in {existing} ({e.strerror or e})") from None



def _train(args) -> int:
    from . import runs
    from .preflight import preflight

    cfg = config_from_args(args)
    check_output_dir(cfg.output_dir)
    token = _token(args)
    first = os.environ.get("RANK", "0") == "0"  # under `accelerate launch` rank 0 checks and recovers for all
    checked = preflight(cfg, token, cfg.output_dir) if first else None
    if checked is not None:
        print(checked.text(), file=sys.stdout if args.dry_run else sys.stderr)
    if args.dry_run:
        return 0
    if checked is not None and not checked.ok:
        raise ValueError(f"preflight: {checked.reasons[0]}")
    if first:
        for done in runs.recover_all(cfg.output_dir):  # what a killed earlier run left behind
            print(f"recovered {done}", file=sys.stderr)
    from tqdm import tqdm

    from .events import Failed, Finished, Log, Progress, Started, Stopped, to_record
    from .train import StopBeforeStart, distributed, train

    bar = None
    stop = threading.Event()
    events_out = open(args.events_jsonl, "a", encoding="utf-8") if args.events_jsonl else None
    if args.stop_file:
        def watch() -> None:
            while not stop.wait(0.5):
                if Path(args.stop_file).exists():
                    stop.set()

        threading.Thread(target=watch, daemon=True).start()

    def show(event) -> None:
        nonlocal bar
        if events_out is not None:
            events_out.write(json.dumps(to_record(event), default=str) + "\n")
            events_out.flush()
        if isinstance(event, Started):
            bar = tqdm(total=event.total_steps, desc="training", unit="step", file=sys.stderr)
        elif isinstance(event, Progress) and bar is not None:
            bar.update(event.step - bar.n)
            bar.set_postfix(loss=f"{event.loss:.3f}" if event.loss is not None else "?",
                            tok_s=f"{event.tokens_per_s:.0f}")
        elif isinstance(event, Log) and not event.line.startswith("step "):
            (bar.write if bar else print)(event.line, file=sys.stderr)
        elif isinstance(event, (Finished, Stopped, Failed)) and bar is not None:
            bar.close()

    rank = distributed().process_index  # under `accelerate launch` only rank 0 speaks (train() emits there alone)
    try:
        run_dir = train(cfg, show, stop, token=token, resume_from=args.resume_from)
    except (KeyboardInterrupt, ValueError, OSError):
        raise  # main() prints these as one line, exit status 2
    except StopBeforeStart:
        print("stopped before training started; nothing was saved", file=sys.stderr)
        return 0
    except Exception as e:
        print(f"error: {f'[rank {rank}] ' if rank else ''}training failed: {_one_line(e)}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"adapter saved: {run_dir / 'adapter'}")
        print(f"chat with it:  python -m qlora chat --adapter {run_dir} \"your question\"")
    return 0


def _chat(args) -> int:
    from .chat import ChatEngine

    from . import runs

    if not args.prompt.strip():  # as the app: nothing is loaded for an empty question
        raise ValueError("the prompt is empty: give a question to ask both models")
    run_dir = _run_folder(args.adapter)
    cfg = runs.run_config(run_dir)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, system_prompt=args.system)
    print(f"loading the model… {cfg.base_model} and the adapter of run {run_dir.name}", file=sys.stderr, flush=True)
    print(f"sampling (both answers): temperature {settings.temperature}{' (greedy)' if settings.greedy else ''}, "
          f"top-p {settings.top_p}, seed {settings.seed}, up to {settings.max_new_tokens} new tokens",
          file=sys.stderr, flush=True)
    engine = ChatEngine(cfg.base_model, cfg.quantize, cfg.precision)
    name = engine.load_adapter(run_dir)
    labels = (f"base ({cfg.base_model})", f"fine-tuned ({run_dir.name})")
    answers, waiting = ("", ""), None
    with _Blocks(labels) as blocks:  # on a terminal the two blocks grow in place; elsewhere they print once, at the end
        for update in engine.stream([], [], args.prompt, settings, name):
            if update.waiting is not None:
                if update.waiting != waiting:  # the engine repeats it while it waits
                    waiting = update.waiting
                    print(f"… {waiting}", file=sys.stderr, flush=True)
                continue
            answers = (update.base, update.tuned)
            blocks.show(*answers)
        blocks.show(*answers, final=True)
    return 0


class _Blocks:
    """The two answers as labelled blocks on stdout: redrawn as they grow when stdout is a terminal (rich's Live),
    printed once and complete otherwise, so scripts and tests read the same text."""

    def __init__(self, labels: tuple[str, str]):
        self.labels = labels
        self.live = None
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(file=sys.stdout), auto_refresh=False)

    def __enter__(self) -> "_Blocks":
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None and self.live.is_started:
            self.live.stop()  # leaves the last drawing on the screen, in full

    def text(self, base: str, tuned: str) -> str:
        return f"=== {self.labels[0]} ===\n{base}\n\n=== {self.labels[1]} ===\n{tuned}"

    def show(self, base: str, tuned: str, final: bool = False) -> None:
        if self.live is not None:
            from rich.text import Text  # plain text: a model's "[bold]" is not markup

            if not self.live.is_started:  # drawn from the first token on, not while the model loads
                self.live.start()
            self.live.update(Text(self.text(base, tuned)), refresh=True)
        elif final:
            print(self.text(base, tuned), flush=True)


def _eval(args) -> int:
    from tqdm import tqdm

    from . import runs
    from .evaluate import evaluate_run, summary

    if args.rows < 0:
        raise ValueError(f"--rows: must be 0 (all) or more, got {args.rows}")
    run_dir = _run_folder(args.adapter)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="evaluating", unit="step", file=sys.stderr)
        bar.update(done - bar.n)

    card = evaluate_run(run_dir, args.dataset, args.rows, _token(args), progress)
    if bar is not None:
        bar.close()
    print("\n".join(summary(card)))
    for title, rows in (("helped most", card["helped_most"]), ("hurt most", card["hurt_most"])):
        for r in rows:
            print(f"\n{title}: row {r['row']}, loss {r['base_loss']:.4f} -> {r['adapter_loss']:.4f}\n"
                  f"  {_indent(r['text'])}")
    for a in card["answers"]:
        print(f"\n=== prompt ===\n{a['prompt']}\n--- base ---\n{a['base']}\n--- fine-tuned ---\n{a['adapter']}")
    print(f"\nsaved: {run_dir / runs.EVAL_CARD}")
    return 0


def _export(args) -> int:
    from .export import export_run

    out = export_run(_run_folder(args.adapter), _token(args),
                     lambda line: print(line, file=sys.stderr))
    print(f"merged model: {out}")
    print(f"load it:      AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _run_folder(adapter: str) -> Path:
    """The run folder --adapter names, with what a killed process left in it undone before it is read."""
    from . import runs

    run_dir = runs.run_folder(adapter)
    runs.recover(run_dir)  # an adapter or export swap cut short by a kill is put back first
    return run_dir


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # the libraries' own bars (trl's dataset passes, shard writing) come once per rank and say nothing the user can
    # act on; the CLI draws its own training bar
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logger = logging.getLogger("qlora")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):  # main() may run many times in one process
        logger.addHandler(_Stderr())


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes, not as it was when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _token(args) -> str | None:
    """The Hub token: the environment variable --token-env names, else the one `hf auth login` stored on this machine
    (the CLI's user owns both; the core never picks one itself)."""
    from huggingface_hub import get_token

    return os.environ.get(args.token_env) or get_token()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
