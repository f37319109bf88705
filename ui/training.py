"""The Training tab: the form, preflight, dataset preview, Train/Stop, live progress, past runs, download and push
(a run's evaluation card and merged export: ui/runcard.py)."""
from __future__ import annotations

import dataclasses
import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from qlora import runs
from qlora.config import DEFAULT_MODEL, EMBEDDED_MODEL, PROMPT_FORMATS, SAMPLE_DATASET, TrainConfig, is_hub_id
from qlora.data import SUFFIXES, DataError
from qlora.events import JobState
from qlora.device import BusyError
from qlora.model import MODELS_DIR_ENV, ModelError, local_models
from qlora.preflight import preflight

from . import hub, render, runcard
from .context import LOCKED, AppContext

log = logging.getLogger("qlora.app")

SOURCES = [("built-in sample", "sample"), ("Hub dataset id", "hub"), ("uploaded file", "upload")]
QUANTIZE = [("nf4: 4-bit (QLoRA)", "nf4"), ("none: no 4-bit quantization", "none")]
TARGETS = [("q_proj, v_proj (reference)", "q_proj,v_proj"), ("all linear layers (QLoRA paper)", "all-linear")]
PREVIEW_ROWS = 5
MAX_TEXT = 200  # free-text fields: Gradio does not enforce max_length on the server, we do
STARTED = "▶️"  # begins Train's and Resume's answer when the click started a job (app.py: stale once that job ends)


def preset_title(d: dict[str, Any]) -> str:
    """The Hyperparameters accordion's title: which preset the form holds, and why that one (form_defaults)."""
    if d["base_model"] == EMBEDDED_MODEL:
        return f"Hyperparameters: the embedded CPU preset ({EMBEDDED_MODEL}, {d['max_steps']} steps): no GPU here"
    if d["base_model"] == DEFAULT_MODEL and d["quantize"] == "nf4":
        return f"Hyperparameters: the reference recipe (Llama-2-7B, nf4 + LoRA r={d['lora_r']}): a GPU is here"
    return "Hyperparameters"


def presets_note() -> str:
    """Both presets in one line each, read from where they are defined (TrainConfig, embedded_defaults)."""
    from qlora.config import embedded_defaults

    ref, cpu = TrainConfig(), embedded_defaults()
    return (f"Without a GPU the form starts from the embedded CPU preset: {EMBEDDED_MODEL} on the built-in sample, "
            f"{cpu['max_steps']} steps, {', '.join(cpu['target_modules'])}, lr {cpu['learning_rate']:g}, no 4-bit "
            f"quantization (its weights are already 4-bit): a few minutes on a CPU. With a GPU, from the reference "
            f"recipe: {ref.base_model} on {ref.dataset}, 4-bit {ref.quantize} + LoRA r={ref.lora_r}, alpha "
            f"{ref.lora_alpha}, dropout {ref.lora_dropout} on {', '.join(ref.target_modules)}, "
            f"lr {ref.learning_rate:g}.")


def form_defaults(cuda: bool) -> dict[str, Any]:
    """The reference recipe on a GPU (a Space T4); the embedded model and the sample on a CPU."""
    from qlora.config import embedded_defaults

    values = TrainConfig().to_dict()
    if not cuda:
        values.update(embedded_defaults())
    # a held-out slice for the eval curve, and sample answers a few times a run (each costs a few generations)
    values.update(eval_fraction=0.1 if not cuda else 0.05, sample_every=15 if not cuda else 50)
    return values


# --- form -> config --------------------------------------------------------------------------------------
def dataset_source(source: str, hub_dataset: str | None, upload: str | None) -> str:
    if source == "sample":
        return SAMPLE_DATASET
    if source == "hub":
        name = (hub_dataset or "").strip()
        if len(name) > MAX_TEXT or not is_hub_id(name):
            raise ValueError("dataset: give a Hub dataset id like mlabonne/guanaco-llama2-1k")
        return name
    if source == "upload":
        if not upload:
            raise ValueError("dataset: upload a .jsonl, .json, .csv or .parquet file first")
        if Path(upload).suffix.lower() not in SUFFIXES:
            raise ValueError(f"dataset: {Path(upload).name}: use a .jsonl, .json, .csv or .parquet file")
        return str(upload)
    raise ValueError(f"dataset source: pick one of {', '.join(v for _, v in SOURCES)}")


def form_to_config(runs_root: Path, form: dict[str, Any]) -> TrainConfig:
    """The form's values as a validated TrainConfig; a ValueError names the field that is wrong."""
    values = dict(form)
    base = str(values.get("base_model") or "").strip()
    if len(base) > MAX_TEXT:
        raise ValueError("base_model: at most 200 characters")
    values["base_model"] = base
    source = values.pop("dataset_source", "sample")
    values["dataset"] = dataset_source(source, values.pop("hub_dataset", ""), values.pop("upload", None))
    # A visitor's ids are resolved on the Hub only (the core enforces it); a local file comes only as an upload,
    # whose path Gradio vouches for ("was not uploaded by a user" otherwise).
    values["allow_local_model"] = False
    values["allow_local_dataset"] = source == "upload"
    values["run_name"] = str(values.get("run_name") or "").strip()
    values["output_dir"] = str(runs_root)
    for name, f in ((f.name, f) for f in dataclasses.fields(TrainConfig)):
        if name in values and f.type in ("int", int) and isinstance(values[name], float):
            if values[name] != int(values[name]):
                raise ValueError(f"{name}: must be a whole number (got {values[name]})")
            values[name] = int(values[name])
        if name in values and values[name] is None:
            raise ValueError(f"{name}: must not be empty")
    return TrainConfig.from_dict(values)


# --- handlers (each one is also an API endpoint: the admin check lives here, not in the page) -------------
def make_handlers(ctx: AppContext):
    def check(admin_password: str = "", hf_token: str = "", upload: str | None = None, **form) -> str:
        if not ctx.is_admin(admin_password):
            return LOCKED
        try:
            cfg = form_to_config(ctx.runs_root, dict(form, upload=upload))
        except ValueError as e:
            return f"❌ {html.escape(str(e))}"
        return render.preflight_markdown(preflight(cfg, ctx.token(hf_token), ctx.runs_root,
                                                   placement=ctx.jobs.cards.placement()))

    def preview(admin_password: str = "", hf_token: str = "", upload: str | None = None, **form):
        """The first rows exactly as the trainer will see them: formatted text, token count, flags."""
        import pandas as pd

        from qlora import data, prompts
        from qlora.model import load_tokenizer, resolve

        empty = pd.DataFrame(columns=["text", "tokens", "flags"])
        if not ctx.is_admin(admin_password):
            return empty, LOCKED
        try:
            cfg = form_to_config(ctx.runs_root, dict(form, upload=upload))
            token = ctx.token(hf_token)
            prepared = data.prepare(cfg.dataset, 0.0, cfg.seed, token=token, max_rows=max(PREVIEW_ROWS, 50),
                                    allow_local=cfg.allow_local_dataset)
            tokenizer = load_tokenizer(resolve(cfg.base_model, cfg.allow_local_model, token, weights=False), token)
            fmt = prompts.choose(tokenizer, cfg.prompt_format)
            rows = data.preview(prepared.train, tokenizer, PREVIEW_ROWS, cfg.max_length, fmt)
            _, lost = data.keep_answered(data.tokenize(prepared.train, tokenizer, cfg.max_length, fmt),
                                         cfg.max_length, required=False)
        except (ValueError, DataError, ModelError, OSError) as e:
            return empty, f"❌ {html.escape(hub.redact(str(e), ctx.token(hf_token)))}"
        note = "; ".join(x for x in (
            f"{prepared.source}: {prepared.shape} format, first {len(rows)} rows as the trainer sees them",
            fmt.describe(), prepared.skipped(),
            f"⚠️ {lost} (of the first {len(prepared.train)} rows)" if lost else "") if x)
        return pd.DataFrame(rows), html.escape(note)

    def start(admin_password: str = "", hf_token: str = "", upload: str | None = None, **form) -> str:
        if not ctx.is_admin(admin_password):
            return LOCKED
        state = ctx.jobs.state()
        if state.active:
            return f"⏳ Busy: {html.escape(state.summary())}. Stop it or wait for it to end."
        try:
            cfg = form_to_config(ctx.runs_root, dict(form, upload=upload))
        except ValueError as e:
            return f"❌ {html.escape(str(e))}"
        token = ctx.token(hf_token)
        checked = preflight(cfg, token, ctx.runs_root, placement=ctx.jobs.cards.placement())
        if not checked.ok:
            return render.preflight_markdown(checked)
        try:
            ctx.jobs.start(cfg, token=token)
        except BusyError as e:
            return f"⏳ Busy: {html.escape(str(e))}"
        where = _made_room(ctx)
        log.info("training started: %s on %s%s", cfg.base_model, cfg.dataset, where)
        return (f"{STARTED} Started: {html.escape(cfg.base_model)} on {html.escape(cfg.dataset)}{html.escape(where)}. "
                "Progress shows below.")

    def stop(admin_password: str = "") -> str:
        if not ctx.is_admin(admin_password):
            return LOCKED
        state = ctx.jobs.state()
        if not state.active:
            return f"Nothing is running ({html.escape(state.status)})."
        ctx.jobs.stop()
        if not state.total_steps:  # still loading: train() ends before its first step and saves nothing
            return "⏹️ Stopping: the model is still loading, so the run ends before training starts; nothing is saved."
        return "⏹️ Stopping at the end of the current step; the partial adapter will be saved and offered in Chat."

    def download(run: str, admin_password: str = ""):
        if not ctx.is_admin(admin_password):
            return None, LOCKED
        try:
            info = runs.usable_run(ctx.runs_root, run)
        except ValueError as e:
            return None, f"❌ {html.escape(str(e))}"
        return str(hub.zip_run(info)), f"📦 {html.escape(info.name)}: adapter zip ready."

    push = hub.push_handler(ctx, hub.push_run)

    def job_status() -> dict[str, Any]:
        """The server-side job as JSON, for API clients and tests."""
        s = ctx.jobs.state()
        return {"status": s.status, "summary": s.summary(), "step": s.step, "total_steps": s.total_steps,
                "run": Path(s.run_dir).name if s.run_dir else "", "losses": [list(x) for x in s.losses],
                "eval_losses": [list(x) for x in s.eval_losses], "samples": len(s.samples),
                "latest_samples": [{"step": x.step, "prompt": x.prompt, "base": x.base, "tuned": x.tuned}
                                   for x in s.samples[-2:]],
                "tokens_per_s": s.tokens_per_s, "eta_s": s.eta_s, "error": s.error, "logs": list(s.logs[-5:]),
                "gpus": _where(ctx.jobs.placement) if s.active else ""}

    def run_curve(run: str):
        try:
            return render.run_losses(runs.usable_run(ctx.runs_root, run).path)
        except ValueError:
            return render.loss_frame(JobState())

    def resume(run: str = "", admin_password: str = "", hf_token: str = "") -> str:
        """Continue an interrupted run (the app or the machine restarted) from its last checkpoint."""
        if not ctx.is_admin(admin_password):
            return LOCKED
        try:
            info = runs.find_run(ctx.runs_root, str(run or ""))
        except ValueError:
            info = None
        if info is None or info.status != "interrupted":
            return "❌ pick an interrupted run: only a run whose process died can be resumed"
        if runs.latest_checkpoint(info.path) is None:
            return (f"❌ {html.escape(info.name)} saved no checkpoint to resume from: set 'Checkpoint every N steps' "
                    "before training")
        try:
            cfg = runs.run_config(info.path)
            ctx.jobs.start(cfg, token=ctx.token(hf_token), resume_from=info.path)
        except ValueError as e:
            return f"❌ {html.escape(str(e))}"
        except BusyError as e:
            return f"⏳ Busy: {html.escape(str(e))}"
        where = _made_room(ctx)
        return (f"{STARTED} Resuming {html.escape(info.name)} from its last checkpoint{html.escape(where)}. Progress shows "
                "below.")

    return dict(run_curve=run_curve, check=check, preview=preview, start=start, stop=stop, download=download, push=push,
                job_status=job_status, resume=resume)


def _made_room(ctx: AppContext) -> str:
    """After a start: free the chat model if the run trains on its card (one GPU; several, when none was loaded), since
    the run holds that card now and no chat is mid-answer. Returns ', <where the run trains>' for the message."""
    if ctx.jobs.placement.shared:
        ctx.engines.unload_all()
    where = _where(ctx.jobs.placement)
    return f", {where}" if where else ""


def _where(placement) -> str:
    """'training on GPUs 1-3, chat on GPU 0' on a host with several GPUs; '' on one GPU or the CPU (as before)."""
    return placement.describe() if placement is not None and placement.gpus > 1 else ""


def resumable_choices(runs_root: Path) -> list[str]:
    return [r.name for r in runs.resumable_runs(runs_root)]


# --- layout ---------------------------------------------------------------------------------------------
def build(ctx: AppContext, defaults: dict[str, Any]) -> dict[str, Any]:
    """Lay out the tab and wire its events; returns the components the app wires across tabs."""
    h = make_handlers(ctx)
    d = defaults
    c: dict[str, Any] = {}
    admin = gr.Textbox("", label="Admin password", type="password", visible=ctx.locked, max_length=200,
                       info="Training, uploads, downloads and pushes need it; chat does not.")
    with gr.Row():
        with gr.Column(scale=3):
            form = {
                "base_model": gr.Dropdown([DEFAULT_MODEL, EMBEDDED_MODEL, *local_models()], value=d["base_model"],
                                          label="Base model", allow_custom_value=True,
                                          info=f"a Hub id, the embedded {EMBEDDED_MODEL} (offline), or a folder of "
                                               f"the server's models folder ({MODELS_DIR_ENV})"),
            }
            with gr.Row():  # only the input the chosen source uses is shown (the radio toggles them, below)
                src = "sample" if d["dataset"] == SAMPLE_DATASET else "hub"
                form["dataset_source"] = gr.Radio(SOURCES, value=src, label="Dataset", elem_id="dataset-source")
                form["hub_dataset"] = gr.Textbox(d["dataset"] if src == "hub" else "mlabonne/guanaco-llama2-1k",
                                                 label="Hub dataset id", max_length=MAX_TEXT, visible=src == "hub",
                                                 elem_id="hub-dataset")
            form["upload"] = gr.File(label="Dataset file: .jsonl, .json, .csv or .parquet", file_types=list(SUFFIXES),
                                     type="filepath", height=150, visible=False, elem_id="upload-file",
                                     elem_classes=["upload-box"])
            upload_note = gr.Markdown("Rows of `text` (Llama 2 format), `messages` (role/content) or "
                                      "`instruction`/`input`/`output`.", visible=False)
        with gr.Column(scale=2):
            token = gr.Textbox("", label="HF token (optional)", type="password", max_length=200,
                               info="for gated models and pushing; behind the admin password, falls back to the HF_TOKEN secret; never stored")
            form["run_name"] = gr.Textbox("", label="Run name (optional)", max_length=100, placeholder="run-<date>-<time>")
    with gr.Accordion(preset_title(d), open=False, elem_id="hyperparameters"):
        gr.Markdown(presets_note())
        with gr.Row():
            form["quantize"] = gr.Dropdown(QUANTIZE, value=d["quantize"], label="Quantize base",
                                           info="nf4 = QLoRA")
            form["target_modules"] = gr.Dropdown(TARGETS, value=",".join(d["target_modules"]), label="LoRA targets")
            form["lora_r"] = gr.Number(d["lora_r"], label="LoRA r", precision=0, minimum=1, maximum=1024)
            form["lora_alpha"] = gr.Number(d["lora_alpha"], label="LoRA alpha", minimum=0.001, maximum=4096)
            form["lora_dropout"] = gr.Number(d["lora_dropout"], label="LoRA dropout", minimum=0, maximum=0.99)
        with gr.Row():
            form["batch_size"] = gr.Number(d["batch_size"], label="Batch size", precision=0, minimum=1, maximum=1024)
            form["grad_accum"] = gr.Number(d["grad_accum"], label="Grad accumulation", precision=0, minimum=1,
                                           maximum=1024)
            form["learning_rate"] = gr.Number(d["learning_rate"], label="Learning rate", minimum=1e-8, maximum=1)
            form["lr_scheduler"] = gr.Dropdown(["cosine", "linear", "constant", "constant_with_warmup"],
                                               value=d["lr_scheduler"], label="Scheduler")
            form["warmup_ratio"] = gr.Number(d["warmup_ratio"], label="Warmup ratio", minimum=0, maximum=0.99)
        with gr.Row():
            form["epochs"] = gr.Number(d["epochs"], label="Epochs", minimum=0.01, maximum=100)
            form["max_steps"] = gr.Number(d["max_steps"], label="Max steps (-1: use epochs)", precision=0,
                                          minimum=-1, maximum=1_000_000)
            form["max_length"] = gr.Number(d["max_length"], label="Max length (tokens)", precision=0, minimum=16,
                                           maximum=32768)
            form["weight_decay"] = gr.Number(d["weight_decay"], label="Weight decay", minimum=0, maximum=1)
            form["max_grad_norm"] = gr.Number(d["max_grad_norm"], label="Max grad norm", minimum=1e-6, maximum=1000)
        with gr.Row():
            form["optimizer"] = gr.Dropdown(["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch",
                                             "adamw_torch_fused"], value=d["optimizer"], label="Optimizer")
            form["precision"] = gr.Dropdown(["auto", "bf16", "fp16", "fp32"], value=d["precision"],
                                            label="Precision", info="auto: bf16 where the card has it, else fp16")
            form["eval_fraction"] = gr.Number(d["eval_fraction"], label="Eval fraction", minimum=0, maximum=0.5)
            form["max_rows"] = gr.Number(d["max_rows"], label="Max rows (0: all)", precision=0, minimum=0,
                                         maximum=10_000_000)
            form["seed"] = gr.Number(d["seed"], label="Seed", precision=0, minimum=0, maximum=2**32 - 1)
        with gr.Row():
            form["sample_every"] = gr.Number(d["sample_every"], label="Sample answers every N steps (0: off)",
                                             precision=0, minimum=0, maximum=1_000_000)
            form["save_steps"] = gr.Number(d["save_steps"], label="Checkpoint every N steps (0: end only)",
                                           precision=0, minimum=0, maximum=1_000_000)
            form["group_by_length"] = gr.Checkbox(d["group_by_length"], label="Group by length")
            form["gradient_checkpointing"] = gr.Checkbox(d["gradient_checkpointing"], label="Gradient checkpointing")
            form["padding_free"] = gr.Checkbox(d["padding_free"], label="Padding-free batches")
            form["prompt_format"] = gr.Dropdown(list(PROMPT_FORMATS), value=d["prompt_format"], label="Prompt format",
                                                info="auto: the model's own (Llama 2, or its chat template)")
    with gr.Row():
        check_btn = gr.Button("Preflight check")
        preview_btn = gr.Button("Preview dataset")
        c["start"] = gr.Button("Train", variant="primary", elem_id="start-btn")  # its API name stays /start
        c["stop"] = gr.Button("Stop", variant="stop", elem_id="stop-btn")
    c["message"] = gr.Markdown(elem_id="train-message")
    # Train's and Resume's answers land here first: app.py shows each with the job it started, in one update, so the
    # message never says "Started" above the previous run's bar
    c["answer"] = gr.Markdown(visible=False)
    with gr.Accordion("Dataset preview", open=False) as preview_box:
        preview_note = gr.Markdown()
        preview_table = gr.Dataframe(headers=["text", "tokens", "flags"], interactive=False, wrap=True,
                                     max_height=400, column_widths=["76%", "8%", "16%"])
    c["progress"] = gr.HTML(render.progress_html(ctx.jobs.state()), elem_id="progress")
    c["status"] = gr.Markdown(render.status_markdown(ctx.jobs.state()), elem_id="job-status")
    with gr.Row():
        # gradio redraws a plot's data only (a changed setting redraws it empty), so the empty state is ui/page.py's
        c["plot"] = gr.LinePlot(render.loss_frame(ctx.jobs.state()), x="step", y="loss", color="series",
                                color_map=render.LOSS_COLOURS, title="Loss", height=260, elem_id="loss-plot",
                                elem_classes=["loss-plot"], scale=3)
        with gr.Column(scale=2):
            # pinned to the newest line by ui/page.py's script (gradio's autoscroll follows only the first update)
            c["logs"] = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, interactive=False,
                                   autoscroll=False, elem_id="train-log", elem_classes=["pin-bottom"])
    with gr.Accordion("Sample answers: base vs the adapter as it trains", open=True):
        c["samples"] = gr.Markdown(render.samples_markdown(ctx.jobs.state()), elem_id="samples")
    with gr.Accordion("Past runs", open=True):
        c["runs"] = gr.Dataframe(render.runs_frame(ctx.runs_root), interactive=False, wrap=True, max_height=300,
                                 column_widths=render.run_column_widths(), elem_id="runs-table")
        with gr.Row():  # custom values: the list changes as runs end; handlers check the name against the disk
            # min_width: on a narrow page the buttons wrap below rather than the run's name being cut
            c["run_pick"] = gr.Dropdown(render.adapter_choices(ctx.runs_root), label="Run (finished or stopped)",
                                        allow_custom_value=True, scale=2, min_width=480, elem_id="run-pick")
            download_btn = gr.Button("Download adapter (.zip)")
            refresh_btn = gr.Button("Refresh list")
        with gr.Row():
            zip_file = gr.File(label="Adapter zip", interactive=False, height=120, scale=1)
            with gr.Column(scale=2):
                repo = gr.Textbox("", label="Push to Hub repo (owner/name)", max_length=MAX_TEXT)
                with gr.Row():
                    private = gr.Checkbox(True, label="Private repo")
                    push_btn = gr.Button("Push to Hub")
        with gr.Row():  # a run cut short by a restart continues from its last checkpoint
            resume_pick = gr.Dropdown(resumable_choices(ctx.runs_root), label="Interrupted run",
                                      allow_custom_value=True, scale=2)
            resume_btn = gr.Button("Resume from last checkpoint")
        c["run_message"] = gr.Markdown()
        c["run_plot"] = gr.LinePlot(render.loss_frame(JobState()), x="step", y="loss", color="series",
                                    color_map=render.LOSS_COLOURS, title="Loss of the picked run", height=220,
                                    elem_id="run-plot", elem_classes=["loss-plot"])
        runcard.build(ctx, c["run_pick"], admin, token, repo, private)  # evaluation card, merged export

    # Events. Every handler checks the admin password itself: the API runs the same code as the buttons.
    def source_inputs(source: str):
        return gr.Textbox(visible=source == "hub"), gr.File(visible=source == "upload"), gr.Markdown(
            visible=source == "upload")

    form["dataset_source"].change(source_inputs, form["dataset_source"], [form["hub_dataset"], form["upload"],
                                                                         upload_note], queue=False,
                                  api_visibility="private")
    protected = dict(admin_password=admin, hf_token=token, **form)
    check_btn.click(h["check"], inputs_kwargs=protected, outputs=c["message"], api_name="preflight",
                    concurrency_id="train")
    preview_btn.click(h["preview"], inputs_kwargs=protected, outputs=[preview_table, preview_note],
                      api_name="preview", concurrency_id="train").then(lambda: gr.Accordion(open=True), None,
                                                                       preview_box, api_visibility="private")
    c["start_event"] = c["start"].click(h["start"], inputs_kwargs=protected, outputs=c["answer"], api_name="start",
                                        concurrency_limit=1, concurrency_id="train", trigger_mode="once")
    # Stop must never queue behind anything.
    c["stop"].click(h["stop"], inputs_kwargs=dict(admin_password=admin), outputs=c["message"], api_name="stop",
                    queue=False)
    download_btn.click(h["download"], inputs_kwargs=dict(run=c["run_pick"], admin_password=admin),
                       outputs=[zip_file, c["run_message"]], api_name="download")
    push_btn.click(h["push"], inputs_kwargs=dict(run=c["run_pick"], repo_id=repo, private=private, hf_token=token,
                                                 admin_password=admin),
                   outputs=c["run_message"], api_name="push")
    c["resume_event"] = resume_btn.click(h["resume"], inputs_kwargs=dict(run=resume_pick, admin_password=admin,
                                                                         hf_token=token),
                                         outputs=c["answer"], api_name="resume", concurrency_limit=1,
                                         concurrency_id="train")
    refresh_btn.click(lambda: gr.Dropdown(choices=resumable_choices(ctx.runs_root)), None, resume_pick,
                      api_visibility="private")
    # on the page's load too: a reloaded page shows the picked run's curve, not an empty plot under its name
    gr.on(None, h["run_curve"], c["run_pick"], c["run_plot"], api_visibility="private")
    c["refresh"] = refresh_btn
    gr.api(h["job_status"], api_name="job_status", queue=False)
    return c
