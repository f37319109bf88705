"""A T4's compute on a big card: NVIDIA MPS caps each process's share of the multiprocessors (the `t4c` bench mode).

    with T4Compute() as t4:          # starts the MPS daemon, finds the thread percentage, stops the daemon after
        env = t4.env(os.environ)     # run each arm's process with this environment

MPS (`nvidia-cuda-mps-control -d`) lets every client process use only CUDA_MPS_ACTIVE_THREAD_PERCENTAGE % of the
multiprocessors. The percentage is calibrated so that a large fp16 matmul runs at about what cuBLAS reaches on a T4
(TARGET_TFLOPS); memory bandwidth and the host CPU stay those of the big card, which the bench report says (the
bench also turns off the attention kernels a T4 lacks, and tells the project's plan it is on a 7.5 card at this
rate). Where MPS is not there (no control binary, no permission), `available` is False and `why` says so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT
from qlora.device import T4_MATMUL_TFLOPS

# A T4's fp16 tensor-core peak is 65 TFLOP/s; a large cuBLAS fp16 matmul reaches about 40 at its 70 W power cap
# (qlora/device.py owns the figure: the plan weighs the same fact).
TARGET_TFLOPS = round(T4_MATMUL_TFLOPS)
CONTROL = "nvidia-cuda-mps-control"

_PROBE = r"""
import json, torch
from bench.common import cuda_seconds as timed
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.float16)
b = torch.randn(n, n, device="cuda", dtype=torch.float16)
tflops = 2 * n ** 3 / timed(lambda: a @ b) / 1e12
del a, b
x = torch.empty(2 ** 29, device="cuda", dtype=torch.float16)  # 1 GiB, copied: what memory-bound kernels get
y = torch.empty_like(x)
copy_gbs = 2 * 2 ** 30 / timed(lambda: y.copy_(x)) / 1e9
print(json.dumps({"tflops": tflops, "copy_gbs": copy_gbs}))
"""
T4_COPY_GBS = 320.0  # a T4's memory bandwidth (datasheet); the probe reports what t4c leaves an arm beside it


class T4Compute:
    """The MPS daemon for the bench's lifetime, and the thread percentage that gives a T4's matmul rate."""

    def __init__(self, target_tflops: float = TARGET_TFLOPS, percentage: int | None = None):
        self.target = target_tflops
        self.percentage = percentage  # None: calibrate
        self.measured_tflops: float | None = None
        self.full_tflops: float | None = None
        self.available = False
        self.why = ""
        self.calibration: list[dict] = []
        self.concurrent: dict | None = None  # the probe's rate with several clients at once (bench --parallel)
        self._dirs: Path | None = None

    # --- the daemon --------------------------------------------------------------------------------------
    def __enter__(self) -> "T4Compute":
        if shutil.which(CONTROL) is None:
            self.why = f"{CONTROL} is not on PATH: MPS is unavailable, so t4c cannot cap the card's compute"
            return self
        self._dirs = Path(tempfile.mkdtemp(prefix="mps-"))
        started = subprocess.run([CONTROL, "-d"], env=self._daemon_env(), capture_output=True, text=True)
        if started.returncode != 0:
            self.why = f"{CONTROL} -d failed ({(started.stderr or started.stdout).strip()[:200]})"
            return self
        time.sleep(1)
        self.available = True
        try:
            self._calibrate()
        except RuntimeError as e:
            self.available, self.why = False, str(e)
        return self

    def __exit__(self, *exc) -> None:
        if self._dirs is not None:
            subprocess.run([CONTROL], input="quit\n", env=self._daemon_env(), capture_output=True, text=True)
            time.sleep(1)
            shutil.rmtree(self._dirs, ignore_errors=True)

    def _daemon_env(self) -> dict:
        env = dict(os.environ)
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(self._dirs / "pipe")
        env["CUDA_MPS_LOG_DIRECTORY"] = str(self._dirs / "log")
        (self._dirs / "pipe").mkdir(exist_ok=True)
        (self._dirs / "log").mkdir(exist_ok=True)
        return env

    def env(self, base: dict, percentage: int | None = None) -> dict:
        """The environment a client process runs under: the daemon's pipe and the thread percentage."""
        env = dict(base)
        env.update({k: v for k, v in self._daemon_env().items() if k.startswith("CUDA_MPS_")})
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(percentage or self.percentage)
        return env

    # --- calibration -------------------------------------------------------------------------------------
    def matmul_tflops(self, percentage: int) -> float:
        """A large fp16 matmul's rate in a fresh process under `percentage` % of the multiprocessors (the same probe
        measures a 1 GiB copy's bandwidth: both go into `calibration`)."""
        result = self._probes(self.env(os.environ, percentage), 1)[0]
        self.calibration.append(dict(percentage=percentage, **result))
        return result["tflops"]

    def concurrent_tflops(self, clients: int) -> list[float]:
        """The probe in `clients` processes at once, each under the calibrated percentage: whether arms run side by
        side (bench --parallel) still get a T4's matmul rate and their bandwidth each, or crowd each other out."""
        results = self._probes(self.env(os.environ), clients)
        self.concurrent = dict(clients=clients, tflops=[r["tflops"] for r in results],
                               copy_gbs=[r["copy_gbs"] for r in results])
        return self.concurrent["tflops"]

    def _probes(self, env: dict, clients: int) -> list[dict]:
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(clients)]
        results = []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"the matmul probe under MPS failed: {err.strip()[-300:]}")
            found = json.loads(out.strip().splitlines()[-1])
            results.append({k: round(v, 1) for k, v in found.items()})
        return results

    def _calibrate(self) -> None:
        """Rate is close to proportional to the share of multiprocessors: measure at 100 %, scale, check, refine."""
        self.full_tflops = self.matmul_tflops(100)
        if self.percentage is None:
            pct = max(1, min(100, round(100 * self.target / self.full_tflops)))
            rate = self.matmul_tflops(pct)
            for _ in range(3):  # a few steps of the proportional guess: MPS rounds to whole multiprocessors
                better = max(1, min(100, round(pct * self.target / rate)))
                if better == pct:
                    break
                pct, rate = better, self.matmul_tflops(better)
            self.percentage = pct
            self.measured_tflops = rate
        else:
            self.measured_tflops = self.matmul_tflops(self.percentage)

    def to_dict(self) -> dict:
        return dict(available=self.available, why=self.why, target_tflops=self.target, percentage=self.percentage,
                    measured_tflops=self.measured_tflops and round(self.measured_tflops, 1),
                    full_card_tflops=self.full_tflops and round(self.full_tflops, 1), calibration=self.calibration,
                    concurrent=self.concurrent, t4_copy_gbs=T4_COPY_GBS)
