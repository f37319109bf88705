"""JobState, run folders and the preflight -> what the page shows: progress bar HTML, loss table, log tail, samples,
runs table, the preflight's verdict.

Pure functions, no gradio: everything a user sees is escaped here, since model output and file names are not ours.
"""
from __future__ import annotations

import html
import time
from pathlib import Path

from qlora import runs
from qlora.events import JobState
from qlora.preflight import Preflight

LOG_TAIL = 25
LOSS_COLOURS = {"train": "#3b82f6", "eval": "#f97316"}  # fixed, so the legend holds even before the first point
RUN_COLUMNS = ["run", "status", "base model", "dataset", "step", "final loss", "eval loss", "tokens/s", "created"]
# shares of the table's width, so it fits the page (800 px too) instead of scrolling sideways; a column missing here
# gets the default share
RUN_WIDTHS = {"run": "17%", "status": "11%", "base model": "15%", "dataset": "11%", "step": "7%", "final loss": "9%",
              "eval loss": "9%", "tokens/s": "11%", "created": "10%"}


def run_column_widths() -> list[str]:
    return [RUN_WIDTHS.get(name, "9%") for name in RUN_COLUMNS]


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_html(s: JobState) -> str:
    """A bar with step/total, elapsed, ETA and tokens/s; colour says the status."""
    pct = 100 * s.fraction
    colour = {"failed": "#d9534f", "stopped": "#f0ad4e", "stopping": "#f0ad4e", "finished": "#5cb85c"}.get(
        s.status, "#3b82f6")
    steps = f"step {s.step}/{s.total_steps}" if s.total_steps else ("loading model and data…" if s.active else "")
    figures = " · ".join(x for x in (
        steps, f"{pct:.0f}%" if s.total_steps else "", f"elapsed {clock(s.elapsed_s)}" if s.step else "",
        f"ETA {clock(s.eta_s)}" if s.active and s.total_steps else "",
        f"{s.tokens_per_s:,.0f} tokens/s" if s.tokens_per_s else "") if x)
    return (f'<div id="job-progress" data-status="{html.escape(s.status)}" data-step="{s.step}" '
            f'data-total="{s.total_steps}">'
            f'<div style="display:flex;justify-content:space-between;font-size:0.9em">'
            f'<b>{html.escape(s.status)}</b><span>{html.escape(figures)}</span></div>'
            f'<div style="background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden">'
            f'<div class="bar" style="width:{pct:.1f}%;background:{colour};height:100%"></div></div></div>')


def status_markdown(s: JobState) -> str:
    if s.status == "idle":
        return "No run yet. Check the form, then **Train**."
    text = html.escape(s.summary())
    if s.status == "stopped" and s.run_dir:
        text += " — the partial adapter is saved and listed in the **Chat** tab."
    elif s.status == "finished":
        text += " — pick it in the **Chat** tab."
    return text


def loss_frame(s: JobState):
    rows = [(step, loss, "train") for step, loss in s.losses] + [(step, loss, "eval") for step, loss in s.eval_losses]
    return _loss_table(rows)


def _loss_table(rows: list[tuple[int, float, str]]):
    """Typed columns, and both series present from the first frame.

    gradio 6.31's plot fixes its colour domain from the first value it draws, so a series that shows up later is
    drawn without a colour (invisible). One empty (NaN, not drawn) point per series keeps the domain complete.
    """
    import pandas as pd

    first = min((r[0] for r in rows), default=1)
    rows = [(first, float("nan"), name) for name in LOSS_COLOURS] + list(rows)
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                         "series": pd.Series([r[2] for r in rows], dtype="category")})


def log_tail(s: JobState) -> str:
    return "\n".join(s.logs[-LOG_TAIL:])


def samples_markdown(s: JobState) -> str:
    """The newest answer per fixed prompt: base vs the adapter as it is at that step."""
    if not s.samples:
        return "_Sample answers appear here every N steps when \"sample every\" is above 0._"
    latest = {}
    for sample in s.samples:
        latest[sample.prompt] = sample
    out = []
    for sample in latest.values():
        out.append(f"**{_md(sample.prompt)}** (step {sample.step})\n\n"
                   f"| base | fine-tuned |\n|---|---|\n| {_md(sample.base)} | {_md(sample.tuned)} |")
    return "\n\n".join(out)


def _md(text: str) -> str:
    """Escape for a markdown table cell: HTML, pipes and newlines."""
    return html.escape(text or "(empty: the model ended its answer at once)").replace("|", "\\|").replace("\n", "<br>")


def runs_frame(runs_root: str | Path):
    import pandas as pd

    rows = []
    for info in runs.list_runs(runs_root):
        status = (f"damaged: {info.damaged}" if info.damaged else
                  info.status + ("" if info.usable or info.status not in runs.USABLE else " (no adapter)"))
        rows.append([info.name, status, info.base_model, Path(info.dataset).name if "/" in info.dataset
                     and Path(info.dataset).suffix else info.dataset, info.step, _num(info.final_loss),
                     _num(info.metrics.get("final_eval_loss")), _num(runs.history(info.path).tokens_per_s),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created))])
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def run_losses(run_dir: Path):
    """A past run's loss curve, from its metrics.jsonl."""
    h = runs.history(run_dir)
    return _loss_table([(step, loss, "train") for step, loss in h.losses]
                       + [(step, loss, "eval") for step, loss in h.eval_losses])


def _num(v) -> float | None:
    return round(float(v), 4) if isinstance(v, (int, float)) else None


def adapter_choices(runs_root: str | Path) -> list[tuple[str, str]]:
    """(label, run name) for every run whose adapter can be loaded, newest first."""
    return [(f"{r.name} — {r.status} at step {r.step} ({r.base_model})", r.name) for r in runs.usable_runs(runs_root)]


def preflight_markdown(pf: Preflight) -> str:
    """The core's preflight as the page shows it (its lines name model ids and paths: escaped)."""
    return f"**Preflight: {pf.verdict}.**\n\n" + "\n".join(f"- {html.escape(line, quote=False)}" for line in pf.lines)


def eval_card_markdown(card: dict | None) -> str:
    """A run's evaluation card: the figures (as the CLI prints them), rows helped and hurt most, greedy answers."""
    from qlora.evaluate import summary

    if not card:
        return ("_No evaluation card for this run yet: press **Evaluate** (held-out rows: the run's own eval split, or "
                "an uploaded file)._")
    # inside a code fence nothing is markup, except a backtick run that would close it (a file name may hold one)
    out = ["**Evaluation card**", "", "```", *(line.replace("`", "'") for line in summary(card)), "```"]
    for title, rows in (("Rows the adapter helped most", card.get("helped_most")),
                        ("Rows the adapter hurt most", card.get("hurt_most"))):
        if rows:
            out += ["", f"**{title}**", "", "| row | base loss | adapter loss | text |", "|---|---|---|---|"]
            out += [f"| {r['row']} | {r['base_loss']:.3f} | {r['adapter_loss']:.3f} | {_md(r['text'])} |" for r in rows]
    if card.get("answers"):
        out += ["", "**Greedy answers to held-out prompts**", "", "| prompt | base | fine-tuned |", "|---|---|---|"]
        out += [f"| {_md(a['prompt'])} | {_md(a['base'])} | {_md(a['adapter'])} |" for a in card["answers"]]
    return "\n".join(out)
