"""Training on a host with several GPUs: the same CLI run in a child, under `accelerate launch` for several
processes, seeing only the cards it was given; its events relayed back.

Each process holds its own 4-bit base (how QLoRA scales: data parallel); rank 0 alone reports. The job manager uses
this when several GPUs are present, so the app gets the same events from one process or many, and chat keeps the
card the child does not see.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .device import visible_devices
from .events import Event, Failed, Finished, Stopped, from_record

log = logging.getLogger("qlora")
TOKEN_VAR = "QLORA_CHILD_HUB_TOKEN"  # set only in the child's environment, never in this process's


def accelerate_command(processes: int, cli_args: list[str]) -> list[str]:
    if processes == 1:  # one card: the plain CLI (accelerate's multi-GPU launcher wants two processes at least)
        return [sys.executable, "-m", "qlora", "train", *cli_args]
    # --multi_gpu is accelerate's torchrun launcher; on a machine without GPUs the processes use the CPU and gloo
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "qlora", "train", *cli_args]


def child_env(gpus: tuple[int, ...] | None, token: str | None, environ=None) -> dict[str, str]:
    """The child's environment: this one, seeing only the cards `gpus` (None: all of them), with the Hub token in a
    variable of its own. CUDA_VISIBLE_DEVICES is set here rather than through accelerate's --gpu_ids, which would
    name cards in the host's terms where this process may itself see a subset."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k != TOKEN_VAR}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus, environ.get("CUDA_VISIBLE_DEVICES", ""))
    if token:
        env[TOKEN_VAR] = token
    return env


def launched_train(processes: int, gpus: tuple[int, ...] | None = None) -> Callable:
    """A train() look-alike (same signature, same events) that runs `processes` data-parallel workers, on the cards
    `gpus` of this process (one per worker; None: every card it sees)."""
    if gpus is not None and len(gpus) != processes:
        raise ValueError(f"{processes} processes need {processes} GPUs, got {len(gpus)}")

    def train(cfg: TrainConfig, emit: Callable[[Event], None], stop: threading.Event, token: str | None = None,
              resume_from: str | Path | None = None) -> Path:
        with tempfile.TemporaryDirectory(prefix="qlora-launch-") as tmp:
            tmp = Path(tmp)
            (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
            events_path, stop_path = tmp / "events.jsonl", tmp / "stop"
            events_path.touch()
            args = ["--config", str(tmp / "config.yaml"), "--events-jsonl", str(events_path),
                    "--stop-file", str(stop_path), "--token-env", TOKEN_VAR]
            if resume_from:
                args += ["--resume-from", str(resume_from)]
            proc = subprocess.Popen(accelerate_command(processes, args), env=child_env(gpus, token),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            tail: collections.deque[str] = collections.deque(maxlen=40)
            reader = threading.Thread(target=lambda: tail.extend(proc.stdout), daemon=True)
            reader.start()
            last = None
            with open(events_path, encoding="utf-8") as events:
                while True:
                    done = proc.poll() is not None
                    for line in events.readlines():
                        last = from_record(json.loads(line))
                        emit(last)
                    if done:
                        break
                    if stop.is_set() and not stop_path.exists():
                        stop_path.touch()  # every rank watches it; they agree on the step to stop at
                    time.sleep(0.3)
            reader.join(timeout=5)
            if isinstance(last, (Finished, Stopped)) and proc.returncode == 0:
                return Path(last.run_dir)
            if not isinstance(last, Failed):
                log.error("the training child (%d processes) exited with %s:\n%s", processes, proc.returncode,
                          "".join(tail))
                emit(Failed(f"the {processes}-process run exited with status {proc.returncode}",
                            "see the server log"))
            raise RuntimeError(last.error if isinstance(last, Failed) else f"exit status {proc.returncode}")

    return train
