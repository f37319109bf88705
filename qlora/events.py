"""What a training run reports (event dataclasses) and what the UI shows (JobState, folded by a pure reducer). stdlib only."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(frozen=True)
class Started:
    run_dir: str
    total_steps: int
    base_model: str
    dataset: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    loss: float | None
    learning_rate: float | None
    tokens_per_s: float
    elapsed_s: float
    eta_s: float | None
    epoch: float | None = None


@dataclass(frozen=True)
class EvalLoss:
    step: int
    loss: float


@dataclass(frozen=True)
class Log:
    line: str


@dataclass(frozen=True)
class Sample:
    """Answers to one fixed prompt from the base and from the adapter as it is at `step`."""

    step: int
    prompt: str
    base: str
    tuned: str


@dataclass(frozen=True)
class Finished:
    run_dir: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Stopped:
    """The user asked to stop; the partial adapter at `step` was saved to run_dir. An empty run_dir: it stopped
    before training began, and nothing was saved."""

    run_dir: str
    step: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    error: str  # one line, safe to show: no traceback, no secret
    hint: str = ""  # which knob to change, where we know
    run_dir: str = ""


Event = Union[Started, Progress, EvalLoss, Log, Sample, Finished, Stopped, Failed]

ACTIVE = ("starting", "running", "stopping")
MAX_LOG_LINES = 200


@dataclass(frozen=True)
class JobState:
    """Everything the page shows about the current (or last) run. Lives on the server, not in the browser."""

    status: str = "idle"  # idle | starting | running | stopping | finished | stopped | failed
    run_dir: str = ""
    base_model: str = ""
    dataset: str = ""
    started_at: float | None = None
    step: int = 0
    total_steps: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    tokens_per_s: float = 0.0
    learning_rate: float | None = None
    losses: tuple[tuple[int, float], ...] = ()
    eval_losses: tuple[tuple[int, float], ...] = ()
    logs: tuple[str, ...] = ()
    samples: tuple[Sample, ...] = ()
    error: str = ""
    hint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def summary(self) -> str:
        """One line for a status box or a busy message."""
        where = f"step {self.step}/{self.total_steps}" if self.total_steps else "loading"
        if self.status in ACTIVE:
            when = f", started {time.strftime('%H:%M', time.localtime(self.started_at))}" if self.started_at else ""
            return f"{self.status}: {self.base_model} on {self.dataset}, {where}{when}"
        if self.status == "failed":
            return f"failed: {self.error}" + (f" ({self.hint})" if self.hint else "")
        if self.status == "stopped" and not self.run_dir:
            return "stopped before training started; nothing was saved"
        if self.status in ("finished", "stopped"):
            return f"{self.status} at {where}; adapter in {self.run_dir}"
        return self.status

    def apply(self, event: Event) -> "JobState":
        """The next state after `event`; never mutates self."""
        r = dataclasses.replace
        if isinstance(event, Started):
            return r(self, status="running", run_dir=event.run_dir, total_steps=event.total_steps,
                     base_model=event.base_model, dataset=event.dataset, started_at=self.started_at or event.at)
        if isinstance(event, Progress):
            losses = self.losses + ((event.step, event.loss),) if event.loss is not None else self.losses
            return r(self, step=event.step, total_steps=event.total_steps, elapsed_s=event.elapsed_s,
                     eta_s=event.eta_s, tokens_per_s=event.tokens_per_s, learning_rate=event.learning_rate,
                     losses=losses)
        if isinstance(event, EvalLoss):
            return r(self, eval_losses=self.eval_losses + ((event.step, event.loss),))
        if isinstance(event, Log):
            return r(self, logs=(self.logs + (event.line,))[-MAX_LOG_LINES:])
        if isinstance(event, Sample):
            return r(self, samples=self.samples + (event,))
        if isinstance(event, Finished):
            return r(self, status="finished", run_dir=event.run_dir, metrics=dict(event.metrics), eta_s=0.0)
        if isinstance(event, Stopped):
            return r(self, status="stopped", run_dir=event.run_dir, step=event.step, metrics=dict(event.metrics),
                     eta_s=None)
        if isinstance(event, Failed):
            return r(self, status="failed", error=event.error, hint=event.hint,
                     run_dir=event.run_dir or self.run_dir, eta_s=None)
        raise TypeError(f"unknown event {event!r}")


_EVENT_TYPES = {cls.__name__: cls for cls in (Started, Progress, EvalLoss, Log, Sample, Finished, Stopped, Failed)}


def to_record(event: Event) -> dict[str, Any]:
    """A JSON-ready dict: how events cross a process boundary (accelerate launch) or land in a file."""
    return {"type": type(event).__name__, **dataclasses.asdict(event)}


def from_record(record: dict[str, Any]) -> Event:
    fields = {k: v for k, v in record.items() if k != "type"}
    return _EVENT_TYPES[record["type"]](**fields)
