"""One background training job at a time: its thread, its stop flag, its cards, and its state, which outlives a page."""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .data import display_name
from .device import TRAIN, BusyError, Cards, Placement
from .device import cards as host_cards
from .events import Event, Failed, JobState, Log


class JobManager:
    """Starts train() in a daemon thread and folds its events into a JobState that any page can read.

    Only one run at a time: a second start() while one is active raises BusyError saying what is running. The run's
    cards (`device.Cards.take_training`: the one GPU, or on several every card but a loaded chat's) are taken before
    the thread starts and given back when it ends, so chat cannot grab a card the run trains on.
    """

    def __init__(self, train_fn: Callable | None = None, cards: Cards | None = None):
        self._train_fn = train_fn
        self.cards = cards or host_cards
        self.placement: Placement | None = None  # the cards of the current (or last) run
        self._lock = threading.Lock()
        self._state = JobState()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[Event], None]] = []

    def state(self) -> JobState:
        with self._lock:
            return self._state

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Also pass every event to listener (the CLI's progress bar); called on the training thread."""
        self._listeners.append(listener)

    def holds_chat_card(self) -> bool:
        """Is a run training on chat's card (one GPU, or every GPU), so that chat must wait for it?"""
        with self._lock:
            return self._state.active and self.placement is not None and self.placement.shared

    def start(self, cfg: TrainConfig, token: str | None = None, resume_from: str | Path | None = None) -> JobState:
        with self._lock:
            if self._state.active:
                raise BusyError(f"a run is already active ({self._state.summary()}); stop it or wait")
            placement = self.cards.take_training()
            self.placement = placement
            self._stop = threading.Event()
            # the start time is the click's: the page says "started HH:MM" while the model still loads
            self._state = JobState(status="starting", base_model=cfg.base_model, dataset=display_name(cfg.dataset),
                                   started_at=time.time())
            if placement.gpus > 1:
                self._state = self._state.apply(Log(f"GPUs: {placement.describe()}"))
            self._thread = threading.Thread(target=self._run, args=(cfg, token, resume_from, self._stop, placement),
                                            name="qlora-train", daemon=True)
            self._thread.start()
            return self._state

    def stop(self) -> JobState:
        """Ask the run to end at the next step; it saves the partial adapter. A no-op when nothing runs."""
        with self._lock:
            if self._state.active:
                self._stop.set()
                self._state = self._state.apply(Log("stop requested: ending after the current step"))
                self._state = replace(self._state, status="stopping")
            return self._state

    def wait(self, timeout: float | None = None) -> JobState:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state()

    def _emit(self, event: Event) -> None:
        with self._lock:
            stopping = self._state.status == "stopping"
            self._state = self._state.apply(event)
            if stopping and self._state.status == "running":  # progress after a stop request keeps "stopping"
                self._state = replace(self._state, status="stopping")
        for listener in self._listeners:
            listener(event)

    def _run(self, cfg: TrainConfig, token: str | None, resume_from, stop: threading.Event,
             placement: Placement) -> None:
        try:
            train_fn = self._train_fn or default_train_fn(placement)
            train_fn(cfg, self._emit, stop, token=token, resume_from=resume_from)
        except BaseException as e:  # train() has emitted Failed/Stopped already; make sure the state says so
            if self.state().active:
                self._emit(Failed(f"{type(e).__name__}: {str(e)[:300]}"))
        finally:
            self.cards.give_back(TRAIN, placement.train)


def default_train_fn(placement: Placement) -> Callable:
    """train() in this process on one GPU or the CPU. On a host with several GPUs, a child run that sees only the
    placement's cards (data parallel through accelerate when they are several), so chat keeps its own card."""
    if placement.gpus > 1:
        from .launch import launched_train

        return launched_train(len(placement.train), placement.train)
    from .train import train  # heavy imports only when a run really starts

    return train
