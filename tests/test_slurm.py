"""`slurm/sft.sbatch` on a real (local, one-node) Slurm cluster: srun's tasks find each other and train."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_resume import COMMON

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.skip(
            "no Slurm here (sbatch not found): slurm/local-cluster.sh starts a local cluster, as CI does"
        )
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no Slurm controller answers: {probe.stderr.strip()[:200]}")
    if not {"idle", "mix", "alloc"} & set(probe.stdout.split()):
        pytest.skip(f"the Slurm cluster has no node up (node states: {probe.stdout.split()})")


def test_sbatch_script_trains_with_two_tasks(cluster, tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["sbatch", "--wait", "--time=10", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    cmd += [f"--output={tmp_path}/slurm-%j.out", "slurm/sft.sbatch", *COMMON, "train.max_steps=2"]
    cmd += ["train.warmup_steps=1", f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[-4000:]
    assert "x 2 ranks" in logs and f"run_dir: {run_dir}" in logs, logs[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


@pytest.mark.badinput
def test_a_failing_rank_fails_the_job(cluster, tmp_path):
    """A bad override fails every task with the one-line error, and the job's exit code says so."""
    cmd = ["sbatch", "--wait", "--time=10", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    cmd += [f"--output={tmp_path}/slurm-%j.out", "slurm/sft.sbatch", "train.max_steps=-1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode != 0, logs[-3000:]
    # The launcher's own one-line error (srun adds lines of its own, "srun: error: ...").
    assert re.search(r"^error( \(rank \d\))?: invalid config: train.max_steps=-1 must be", logs, re.M), logs
    assert "Traceback" not in logs, logs[-3000:]
