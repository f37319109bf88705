"""Data-parallel training through accelerate: 2 CPU processes (gloo) on a tiny 4-bit model."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_two_processes_shard_rows_average_loss_and_only_rank0_writes(tiny_llama_dir, tmp_path):
    from qlora.config import TrainConfig

    data = tmp_path / "rows.jsonl"
    # 16 distinct rows, batch 2 per process: 4 steps per epoch over 2 ranks
    data.write_text("".join(json.dumps({"instruction": f"Question number {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(16)))
    cfg = TrainConfig(base_model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / "runs"),
                      batch_size=2, epochs=1, max_length=64, learning_rate=1e-2, lr_scheduler="constant",
                      warmup_ratio=0.0, gradient_checkpointing=False, group_by_length=False, lora_dropout=0.0,
                      optimizer="adamw_torch", logging_steps=1)
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # accelerate's --multi_gpu launcher is torchrun; with no GPU the processes fall back to the CPU and gloo
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "cfg.yaml"), str(out)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    # each rank sees its own half of the rows
    rows0 = json.loads((out / "rows-0.json").read_text())
    rows1 = json.loads((out / "rows-1.json").read_text())
    assert len(rows0) == len(rows1) == 8
    assert not {tuple(x) for x in rows0} & {tuple(x) for x in rows1}

    # one run folder, written by rank 0 alone; both ranks agree on its path
    run_dir = (out / "run_dir-0.txt").read_text()
    assert (out / "run_dir-1.txt").read_text() == run_dir
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [os.path.basename(run_dir)]
    assert (tmp_path / "runs" / os.path.basename(run_dir) / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "events-0.json").read_text())[-1] == "Finished"
    assert json.loads((out / "events-1.json").read_text()) == []  # rank 1 reports nothing

    # the logged loss of a step is the mean of the two ranks' losses for that step
    logged = {}
    for line in (tmp_path / "runs" / os.path.basename(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "Progress":
            logged[rec["step"]] = rec["loss"]
    per_rank = [{}, {}]
    for rank in (0, 1):
        for line in (out / f"loss-{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            per_rank[rank][rec["step"]] = rec["loss"]
    assert sorted(logged) == [1, 2, 3, 4]
    for step, loss in logged.items():
        mean = (per_rank[0][step] + per_rank[1][step]) / 2
        assert abs(loss - mean) < 1e-4 * max(1, abs(mean)), (step, loss, per_rank[0][step], per_rank[1][step])
    assert per_rank[0][1] != per_rank[1][1]  # different rows, different losses: the mean is a real average


def test_job_manager_runs_several_processes_and_stops_them_together(tiny_cfg):
    """The app's path on a multi-GPU host: JobManager -> accelerate launch -> events relayed -> Stop reaches all ranks."""
    import threading

    from qlora.jobs import JobManager
    from qlora.launch import launched_train

    jobs = JobManager(train_fn=launched_train(2))
    jobs.start(tiny_cfg(max_steps=400, optimizer="adamw_torch"))
    for _ in range(1200):
        if jobs.state().step >= 2 or not jobs.state().active:
            break
        threading.Event().wait(0.1)
    assert jobs.state().status == "running", jobs.state().summary()
    jobs.stop()
    state = jobs.wait(300)
    assert state.status == "stopped", state.summary()
    assert 2 <= state.step < 400 and state.losses
    from qlora import runs

    [info] = runs.list_runs(os.path.dirname(state.run_dir))
    assert info.usable and info.status == "stopped"


def test_the_cli_under_accelerate_launch_speaks_from_rank_0_alone(tiny_llama_dir, tmp_path):
    """What a user sees from `accelerate launch --num_processes 2 -m qlora train`: one bar, one final line."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(16)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "qlora", "train", "--model", str(tiny_llama_dir), "--dataset", str(data),
                        "--output-dir", str(tmp_path / "runs"), "--batch-size", "2", "--max-steps", "4",
                        "--max-length", "64", "--optimizer", "adamw_torch", "--group-by-length", "false",
                        "--gradient-checkpointing", "false", "--learning-rate", "0.01"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("adapter saved:") == 1 and r.stdout.count("chat with it:") == 1, r.stdout
    screen = r.stderr.replace("\r", "\n")
    assert screen.count("training:   0%") == 1, screen  # one progress bar
    assert screen.count("data: 16 train rows") == 1 and screen.count("loading ") == 1, screen
    for noise in ("[rank1]", "[rank0]", "find_unused_parameters", "Building labels", "Writing model shards",
                  "kernels-community"):
        assert noise not in screen, (noise, screen)
    # the bar's last loss is the logged one: the mean over both ranks that metrics.jsonl records
    [run] = list((tmp_path / "runs").iterdir())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [rec for rec in logged if rec["type"] == "Progress"][-1]
    assert f"loss={last['loss']:.3f}" in screen.split("training:")[-1], screen[-500:]
