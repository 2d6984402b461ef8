"""`slurm/sft.sbatch` on a real local Slurm cluster of two nodes (`slurm/local-cluster.sh`): srun's tasks find
each other across nodes and train; a signalled job checkpoints, requeues itself and resumes exactly; a dead rank
ends the job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import (
    ROOT,
    SHORT_TIMEOUT,
    SMALL_RUN,
    assert_same_steps,
    kill_rank_after_checkpoint,
    launch,
    ranks_running,
    train_rows,
)

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


@pytest.fixture(scope="module")
def two_nodes(cluster):
    """Names of the cluster's first two nodes that are up (slurm/local-cluster.sh starts two)."""
    probe = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    up = [
        line.split()[0] for line in probe.stdout.splitlines() if line.split()[1] in ("idle", "mix", "alloc")
    ]
    if len(up) < 2:
        pytest.skip(f"two Slurm nodes needed, up: {up} (slurm/local-cluster.sh starts two)")
    return up[:2]


def job_field(job: str, key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    found = re.search(rf"\b{key}=(\S+)", out)
    return found.group(1) if found else ""


def wait_for_job(job: str, timeout: float) -> str:
    """Poll until the job has ended (requeues included); returns its final state."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=30)
    raise AssertionError(f"job {job} did not end within {timeout}s (state {job_field(job, 'JobState')})")


def launched_on(job: str) -> list[str]:
    """Nodes whose slurmd log records launching a task of the job's first step."""
    from pathlib import Path

    return sorted(
        p.stem.removeprefix("slurmd-")
        for p in Path("/var/log/slurm").glob("slurmd-*.log")
        if f"launch task StepId={job}.0 " in p.read_text(errors="replace")
    )


def sbatch(args: list[str], cwd, env_extra: dict | None = None) -> str:
    """Submit slurm/sft.sbatch (not waiting); returns the job id."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    cmd = ["sbatch", "--parsable", *args]
    proc = subprocess.run(cmd, cwd=cwd, env={**env, **(env_extra or {})}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


@pytest.mark.multinode
def test_slurm_two_node_zero3_job_trains_and_exports(two_nodes, tmp_path):
    """`sbatch --nodes=2` of the real batch script: one ZeRO-3 job over gloo, a rank on each node, the
    rendezvous on the first node's address; it trains and exports a loadable Hugging Face model."""
    run_dir = tmp_path / "run"
    args = ["--time=10", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
    args += [f"--output={tmp_path}/slurm-%j.out", str(ROOT / "slurm" / "sft.sbatch"), *SMALL_RUN]
    args += ["train.max_steps=2", "train.warmup_steps=1", "train.export=true", f"run_dir={run_dir}"]
    job = sbatch([*args, f"cache_dir={tmp_path / 'cache'}"], tmp_path)
    state = wait_for_job(job, 600)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert state == "COMPLETED", logs[-4000:]
    assert f"2 tasks on {job_field(job, 'NodeList')}" in logs and "x 2 ranks" in logs, logs[-3000:]
    assert launched_on(job) == sorted(two_nodes), "one rank on each node"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert model.config.num_hidden_layers == 2


def test_sbatch_script_trains_with_two_tasks(cluster, tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["sbatch", "--wait", "--time=10", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    cmd += [f"--output={tmp_path}/slurm-%j.out", "slurm/sft.sbatch", *SMALL_RUN, "train.max_steps=2"]
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


@pytest.mark.resume
@pytest.mark.faults
@pytest.mark.parametrize("sig", ["USR1", "TERM"], ids=["time_limit_usr1", "preemption_term"])
def test_slurm_preempt_checkpoints_requeues_and_resumes_exactly(two_nodes, tmp_path, straight, sig):  # noqa: F811
    """SIGUSR1 (Slurm's warning before the time limit, `--signal`) or SIGTERM (what a preemption sends the job
    steps during the partition's GraceTime) to a running two-node job after its first checkpoint:
    the ranks agree on a step, checkpoint, exit with the lifecycle's code, the script requeues the job, and the
    requeued job (same id, so same run dir) resumes with the same losses as an uninterrupted run, appending to
    the same metrics.jsonl and continuing the same wandb run."""
    import time

    want, cache = straight
    args = ["--time=10", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
    args += [f"--output={tmp_path}/slurm-%j.out", str(ROOT / "slurm" / "sft.sbatch")]
    overrides = [o for o in SMALL_RUN if not o.startswith("logging.wandb_mode")] + [
        "logging.wandb_mode=offline"
    ]
    # The default run dir (runs/slurm-<job id> under the submit dir) and the default train.resume=auto.
    job = sbatch(
        [*args, *overrides, "train.max_steps=8", "train.save_every=2", f"cache_dir={cache}"], tmp_path
    )
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "latest").exists() and time.time() < deadline:
        if job_field(job, "JobState") not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.05)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert (run_dir / "checkpoints" / "latest").exists(), "no checkpoint while running:\n" + logs[-3000:]
    # To the job steps' tasks (the ranks), not the batch shell, as --signal and a preemption's SIGTERM do.
    subprocess.run(["scancel", f"--signal={sig}", job], check=True, timeout=30)
    state = wait_for_job(job, 600)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert state == "COMPLETED" and job_field(job, "Restarts") == "1", (state, logs[-4000:])
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name], "one run dir"
    stopped = int(re.search(rf"stopped on SIG{sig} after step (\d+)", logs).group(1))
    assert 2 <= stopped < 8 and f"resumed at step {stopped}" in logs, logs[-4000:]
    assert "requeueing" in logs and "job " + job + ": the run finished" in logs
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9)), "one file, both attempts' steps"
    got = train_rows(run_dir)
    assert_same_steps(got, want)
    print(
        f"SIG{sig}: stopped after step {stopped};",
        [(s, got[s]["loss"], want[s]["loss"]) for s in range(1, 9)],
    )
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and {p.name.rsplit("-", 1)[1] for p in attempts} == {wandb_id}, attempts


@pytest.mark.faults
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_slurm_rank_dies_ends_the_job(two_nodes, tmp_path, how):
    """Rank 1 (on the second node) SIGKILLed, or stopped (SIGSTOP: alive, answering nothing) mid-training: the
    job fails within a bounded time naming the lost task, no rank is left running, the last checkpoint loads.
    A hung rank shows the short collective timeout (30 s here) and srun --kill-on-bad-exit: rank 0's collective
    times out and its exit ends the step; without the flag the stopped rank would hold the job to its limit."""
    import signal
    import time

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = ["--time=10", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
    args += [
        f"--output={tmp_path}/slurm-%j.out",
        str(ROOT / "slurm" / "sft.sbatch"),
        *SMALL_RUN,
        SHORT_TIMEOUT,
    ]
    args += ["train.max_steps=1000", "train.save_every=3", f"run_dir={run_dir}", f"cache_dir={cache}"]
    job = sbatch(args, tmp_path)
    running = lambda: job_field(job, "JobState") in ("PENDING", "RUNNING")  # noqa: E731
    sig = signal.SIGKILL if how == "killed" else signal.SIGSTOP
    killed = kill_rank_after_checkpoint(run_dir, 1, running, sig)
    state = wait_for_job(job, 300)
    took, logs = time.time() - killed, "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert state == "FAILED" and took < 120, (state, took, logs[-3000:])
    if how == "killed":
        assert re.search(r"srun: error: \S+: task 1: Killed", logs), logs[-3000:]
    else:
        assert took >= 30 and "Timed out waiting 30000ms" in logs, (took, logs[-3000:])
        assert re.search(r"srun: error: \S+: task 0: Exited with exit code 1", logs), logs[-3000:]
        assert re.search(r"srun: error: \S+: task 1: ", logs), logs[-3000:]
    assert "training failed with exit code" in logs and "not requeued" in logs
    assert job_field(job, "Restarts") == "0"
    time.sleep(1)
    assert not ranks_running(run_dir), "a rank outlived the job"
    last = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    resume = ["train.resume=auto", "train.allow_config_change=true"]  # a shorter run: fewer warmup steps
    out = launch(run_dir, cache, f"train.max_steps={last + 1}", "train.warmup_steps=1", *resume)
    assert f"resumed at step {last}" in out, out[-2000:]
    print(f"job ended {took:.1f}s after rank 1 was {how}; checkpoint step{last} loads")


@pytest.mark.badinput
def test_slurm_check_plan_refuses_a_run_that_does_not_fit(cluster, tmp_path):
    """CHECK_PLAN: the job runs `sft plan --check` first and fails, before srun starts a rank, naming the gap."""
    args = ["--time=5", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    args += [f"--output={tmp_path}/slurm-%j.out", str(ROOT / "slurm" / "sft.sbatch"), *SMALL_RUN]
    job = sbatch([*args, f"run_dir={tmp_path / 'run'}"], tmp_path, {"CHECK_PLAN": "--gpu-memory-gb 0.5"})
    state = wait_for_job(job, 300)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert state == "FAILED" and job_field(job, "ExitCode") == "2:0", (state, logs[-3000:])
    assert "error: the plan does not fit" in logs and "world size 2 = 1 nodes x 2 GPUs" in logs, logs[-3000:]
    assert "srun" not in logs and not (tmp_path / "run").exists()


def _prepare_job(args: list[str], cwd) -> tuple[subprocess.CompletedProcess, str]:
    """`sbatch --wait slurm/prepare.sbatch ...`: (sbatch's result, the jobs' output so far)."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    cmd = ["sbatch", "--parsable", "--wait", "--time=10", f"--output={cwd}/slurm-%A_%a-%j.out"]
    cmd += [*args[:-1], str(ROOT / "slurm" / "prepare.sbatch"), *args[-1]]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return proc, "".join(p.read_text() for p in sorted(cwd.glob("slurm-*.out")))


def _prepare_recipe(tmp_path) -> tuple[list[str], object]:
    """A JSON Lines source of 12,000 conversations, the overrides that prepare it into tmp_path/cache, and the
    same preparation done here in one process (what the sharded jobs must equal)."""
    from launcher.config import compose
    from launcher.data.pipeline import prepare_data
    from launcher.model import load_tokenizer

    path = tmp_path / "mix.jsonl"
    with path.open("w") as f:
        for i in range(12_000):
            msgs = [
                {"role": "user", "content": f"q{i % 5000}"},
                {"role": "assistant", "content": f"a{i % 4000}"},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    overrides = [f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]", "data.eval_size=100"]
    overrides += ["data.dedup=true", "logging.progress=false", f"cache_dir={tmp_path / 'cache'}"]
    cfg = compose(overrides)
    return overrides, prepare_data(cfg.data, load_tokenizer(cfg.model))


def _prepared_here(overrides: list[str], tmp_path):
    from launcher.config import compose
    from launcher.data.pipeline import cached_prepare
    from launcher.model import load_tokenizer

    cfg = compose(overrides)
    return cached_prepare(cfg.data, load_tokenizer(cfg.model), None, str(tmp_path / "cache"), build=False)


@pytest.mark.multinode
def test_prepare_sbatch_shards_in_one_srun_step_over_two_nodes_then_merges(two_nodes, tmp_path):
    """`slurm/prepare.sbatch` on two nodes: a task per node encodes its shard, the script merges; the result is
    the one-process preparation, and a second preparation is a cache hit."""
    overrides, want = _prepare_recipe(tmp_path)
    proc, logs = _prepare_job(["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[-4000:]
    assert "2 shards on" in logs and "shard 0/2 encoded" in logs and "shard 1/2 encoded" in logs, logs[-3000:]
    assert "was not prepared" not in logs, "the merge found both shards"
    got = _prepared_here(overrides, tmp_path)
    assert got.train_rows == want.train_rows and got.eval_rows == want.eval_rows
    assert got.report["sources"] == want.report["sources"]
    proc, logs = _prepare_job(["--cpus-per-task=1", overrides], tmp_path)
    assert proc.returncode == 0 and "data cache hit: " in logs, logs[-3000:]


def test_prepare_sbatch_job_array_then_a_merge_job(cluster, tmp_path):
    """`sbatch --array=1-3 slurm/prepare.sbatch`: each array task encodes its shard; a merge job then finds all
    three and writes the one-process preparation."""
    overrides, want = _prepare_recipe(tmp_path)
    proc, logs = _prepare_job(["--array=1-3", "--cpus-per-task=1", overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[-4000:]
    assert all(f"shard {i}/3 encoded" in logs for i in range(3)), logs[-3000:]
    proc, logs = _prepare_job(["--cpus-per-task=1", overrides], tmp_path)
    assert proc.returncode == 0 and "was not prepared" not in logs, logs[-4000:]
    got = _prepared_here(overrides, tmp_path)
    assert got.train_rows == want.train_rows and got.eval_rows == want.eval_rows
    assert got.report["sources"] == want.report["sources"]
