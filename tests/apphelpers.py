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


def launch(runs_root: Path, admin_password: str | None = None, jobs=None):
    """The real app on a loopback port, and a gradio_client for it. `jobs`: its JobManager (pretend GPU counts)."""
    import app
    from gradio_client import Client

    demo = app.build_demo(jobs=jobs, runs_root=runs_root, admin_password=admin_password)
    kwargs = app.launch_kwargs("127.0.0.1", free_port(), share=False)
    demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    return demo, Client(f"http://127.0.0.1:{kwargs['server_port']}/", verbose=False)


def tiny_form(tiny: str, dataset: Path, admin: str, **overrides) -> dict:
    """The /start (and /preview, /preflight) form for a short 4-bit run of a tiny Llama on an uploaded file."""
    from gradio_client import handle_file

    form = dict(admin_password=admin, base_model=tiny, dataset_source="upload",
                upload=handle_file(str(dataset)), quantize="nf4", max_steps=3, max_length=64, batch_size=4,
                learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", gradient_checkpointing=False,
                group_by_length=False, lora_dropout=0.0, eval_fraction=0.0, sample_every=0, save_steps=0,
                optimizer="adamw_torch", precision="auto", target_modules="q_proj,v_proj", epochs=1.0)
    form.update(overrides)
    return form


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


def tiny_run(runs_root: Path, name: str, base_dir: Path, targets=("q_proj", "v_proj"), seed: int = 0,
             r: int = 8) -> Path:
    """A finished run folder (run.json, config.yaml, adapter/) holding a random LoRA adapter (B non-zero, so it
    changes the answers) for the tiny Llama at base_dir: what a training run leaves, without training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora import runs
    from qlora.config import TrainConfig

    run_dir = Path(runs_root) / name
    run_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, init_lora_weights=False, target_modules=(
        "all-linear" if list(targets) == ["all-linear"] else list(targets))))
    peft_model.save_pretrained(run_dir / runs.ADAPTER)
    cfg = TrainConfig(base_model=str(base_dir), dataset="sample", output_dir=str(runs_root), run_name=name,
                      quantize="nf4", lora_r=r, target_modules=list(targets))
    runs.write_text(run_dir / "config.yaml", cfg.to_yaml())
    runs.write_json(run_dir / "run.json", dict(status="finished", base_model=str(base_dir), dataset="sample",
                                               created=time.time(), step=1, final_loss=None))
    return run_dir


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
