"""One background training job at a time: its thread, its stop flag, and its state, which outlives any page."""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .events import Event, Failed, JobState, Log
from .device import BusyError, gpu_count, gpu_lock


class JobManager:
    """Starts train() in a daemon thread and folds its events into a JobState that any page can read.

    Only one run at a time: a second start() while one is active raises BusyError saying what is running. The GPU
    lock is taken before the thread starts and released when it ends, so chat cannot grab the card mid-run.
    """

    def __init__(self, train_fn: Callable | None = None):
        self._train_fn = train_fn
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

    def start(self, cfg: TrainConfig, token: str | None = None, resume_from: str | Path | None = None) -> JobState:
        with self._lock:
            if self._state.active:
                raise BusyError(f"a run is already active ({self._state.summary()}); stop it or wait")
            if not gpu_lock.acquire(blocking=False):
                raise BusyError("the GPU is busy answering a chat; try again in a moment")
            self._stop = threading.Event()
            # the start time is the click's: the page says "started HH:MM" while the model still loads
            self._state = JobState(status="starting", base_model=cfg.base_model, dataset=cfg.dataset,
                                   started_at=time.time())
            self._thread = threading.Thread(target=self._run, args=(cfg, token, resume_from, self._stop),
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

    def _run(self, cfg: TrainConfig, token: str | None, resume_from, stop: threading.Event) -> None:
        try:
            train_fn = self._train_fn or default_train_fn()
            train_fn(cfg, self._emit, stop, token=token, resume_from=resume_from)
        except BaseException as e:  # train() has emitted Failed/Stopped already; make sure the state says so
            if self.state().active:
                self._emit(Failed(f"{type(e).__name__}: {str(e)[:300]}"))
        finally:
            gpu_lock.release()


def default_train_fn() -> Callable:
    """train() in this process on one GPU or the CPU; data parallel over every GPU through accelerate when several."""
    if gpu_count() > 1:
        from .launch import launched_train

        return launched_train(gpu_count())
    from .train import train  # heavy imports only when a run really starts

    return train
