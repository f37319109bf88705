"""Helpers the app's tests share: a free loopback port, a log recorder, a launched app and its client, polling."""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Records(logging.Handler):
    """Every log record written while installed, tracebacks included (searched for leaked secrets)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage() + ("\n" + record.exc_text if record.exc_text else ""))


def launch(runs_root: Path, admin_password: str | None = None):
    """The real app on a loopback port, and a gradio_client for it."""
    import app
    from gradio_client import Client

    demo = app.build_demo(runs_root=runs_root, admin_password=admin_password)
    kwargs = app.launch_kwargs("127.0.0.1", free_port(), share=False)
    demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    return demo, Client(f"http://127.0.0.1:{kwargs['server_port']}/", verbose=False)


def wait_for(client, until, timeout: float = 240, every: float = 0.5) -> dict:
    """Poll /job_status until `until(status)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        s = client.predict(api_name="/job_status")
        if until(s):
            return s
        assert time.monotonic() < deadline, f"timed out; last status {s}"
        time.sleep(every)


def start_at_once(clients, form: dict) -> list[str]:
    """Every client presses Start at the same instant (a barrier); their answers, in client order."""
    barrier = threading.Barrier(len(clients))
    answers = [""] * len(clients)

    def press(i):
        barrier.wait()
        answers[i] = clients[i].predict(**form, api_name="/start")

    threads = [threading.Thread(target=press, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answers


def tiny_runs(root: Path, base: Path, names: dict[str, dict]) -> tuple[Path, Path]:
    """(runs folder, memo file): one short 4-bit tiny-Llama run per name (with its TrainConfig overrides)."""
    import json

    from qlora.config import TrainConfig
    from qlora.train import train

    memo = root / "memo.jsonl"
    memo.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(8)), encoding="utf-8")
    runs_root = root / "runs"
    for name, overrides in names.items():
        train(TrainConfig(**dict(dict(base_model=str(base), dataset=str(memo), output_dir=str(runs_root),
                                      run_name=name, quantize="nf4", batch_size=4, max_steps=2, max_length=64,
                                      gradient_checkpointing=False, group_by_length=False, lora_dropout=0.0),
                                 **overrides)))
    return runs_root, memo
