"""A dead rank ends the job: one rank SIGKILLed mid-training while the other waits in a collective; the job
exits non-zero within a bounded time, the lost rank is named, no process is left behind, and the last complete
checkpoint still loads. (Under srun: tests/test_slurm.py.)"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    ROOT,
    SHORT_TIMEOUT,
    SMALL_RUN,
    kill_rank_after_checkpoint,
    launch,
    logged_steps,
    rank_pid,
    ranks_running,
    sft_cmd,
    train_rows,
)


@pytest.mark.slow
@pytest.mark.faults
def test_rank_dies_under_torchrun_ends_the_job(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cmd = sft_cmd("launch", "--nproc", "2", *SMALL_RUN, SHORT_TIMEOUT)
    cmd += ["train.max_steps=1000", "train.save_every=3", f"run_dir={run_dir}", f"cache_dir={cache}"]
    with open(tmp_path / "job.log", "w") as out:
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    killed = kill_rank_after_checkpoint(run_dir, 1, lambda: job.poll() is None)
    try:
        code = job.wait(timeout=120)
    finally:
        os.killpg(job.pid, signal.SIGKILL) if job.poll() is None else None
    took, log = time.time() - killed, (tmp_path / "job.log").read_text()
    assert code != 0 and took < 90, (code, took, log[-3000:])
    # The launcher's one line names the lost rank and how it died.
    assert "error: rank 1 (SIGKILL) died after" in log and "Traceback" not in log, log[-3000:]
    time.sleep(1)
    assert not ranks_running(run_dir), "a rank or the agent outlived the job"
    last = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    resume = ["train.resume=auto", "train.allow_config_change=true"]  # a shorter run: fewer warmup steps
    out = launch(run_dir, cache, f"train.max_steps={last + 1}", "train.warmup_steps=1", *resume)
    assert f"resumed at step {last}" in out, out[-2000:]
    print(f"job ended {took:.1f}s after rank 1 was killed; checkpoint step{last} loads")


@pytest.mark.slow
@pytest.mark.faults
def test_rank_dies_silently_the_collective_timeout_ends_the_job(tmp_path):
    """Rank 1 stopped (SIGSTOP: alive, its connections open, answering nothing), as a hung GPU or node would be:
    the other rank's collective times out after deepspeed.timeout_minutes and the job ends, naming the timeout."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cmd = sft_cmd("launch", "--nproc", "2", *SMALL_RUN, SHORT_TIMEOUT)
    cmd += ["train.max_steps=1000", "train.save_every=3", f"run_dir={run_dir}", f"cache_dir={cache}"]
    with open(tmp_path / "job.log", "w") as out:
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while logged_steps(run_dir) < 4 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = rank_pid(run_dir, 1)
    assert pid is not None and job.poll() is None, "the job was not training"
    os.kill(pid, signal.SIGSTOP)
    stopped = time.time()
    try:
        code = job.wait(timeout=240)
    finally:
        os.killpg(job.pid, signal.SIGKILL) if job.poll() is None else None
        for leftover in ranks_running(run_dir):
            os.kill(leftover, signal.SIGKILL)
    took, log = time.time() - stopped, (tmp_path / "job.log").read_text()
    assert code != 0 and 30 <= took < 150, (code, took, log[-3000:])
    # rank 0's collective timed out; torchrun then gave the stopped rank 30 s to end before SIGKILL.
    assert "error: rank 1 (SIGKILL) died after" in log and "Timed out waiting 30000ms" in log, log[-3000:]
    print(f"job ended {took:.1f}s after rank 1 stopped answering (collective timeout 30 s)")


def start_launch(run_dir: Path, cache: Path, *extra: str, model: list[str] = SMALL_RUN) -> subprocess.Popen:
    """`sft launch --nproc 2` as a terminal runs it: the launcher leads its own process group. Its stderr goes to
    `<run_dir>.err` (read while it runs)."""
    cmd = sft_cmd("launch", "--nproc", "2", *model, *extra)
    cmd += [f"run_dir={run_dir}", f"cache_dir={cache}"]
    with open(f"{run_dir}.err", "w") as err:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )


def signal_at_step(proc: subprocess.Popen, run_dir: Path, step: int, sig: int) -> None:
    """Ctrl-C in a terminal (SIGINT to the foreground process group), or another signal, once `step` is logged."""
    deadline = time.time() + 300
    while logged_steps(run_dir) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before the signal"
    os.killpg(proc.pid, sig)


def wait_for(path: str, text: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while text not in Path(path).read_text() and time.time() < deadline:
        time.sleep(0.01)
    assert text in Path(path).read_text(), Path(path).read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.resume
def test_ctrl_c_on_sft_launch_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    """Ctrl-C reaches the launcher (the agent and ranks have sessions of their own): the ranks agree on a step,
    save it, and the launcher says where and how to resume, in one line, exit 75; the printed command resumes."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = start_launch(run_dir, cache, "train.max_steps=60")
    signal_at_step(proc, run_dir, 3, signal.SIGINT)
    proc.communicate(timeout=300)
    err = Path(f"{run_dir}.err").read_text()
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    found = re.search(r"^stopped on SIGINT: checkpoint (\S+)/step(\d+) saved; resume with: (.+)$", err, re.M)
    assert found, err[-3000:]
    step = int(found[2])
    assert 3 <= step < 60 and Path(found[1]) == run_dir / "checkpoints"
    assert not ranks_running(run_dir)
    again = shlex.split(found[3])
    assert again[:4] == ["sft", "launch", "--nproc", "2"] and again[-1] == "train.resume=auto"
    resumed = subprocess.run(
        sft_cmd(*again[1:]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {step}" in resumed.stdout
    assert sorted(train_rows(run_dir)) == list(range(1, 61))


@pytest.mark.slow
@pytest.mark.faults
def test_a_second_signal_ends_the_ranks_at_once(tmp_path):
    """SIGTERM, then SIGTERM again before the ranks have saved (an impatient scheduler, or Ctrl-C twice): no
    waiting for the checkpoint, nothing left running, exit 128 + 15, and the line says there is no checkpoint.
    The demo's model size: a step and a save take long enough to signal twice in between."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    model = [c for c in SMALL_RUN if not c.startswith("model.init.")]
    proc = start_launch(run_dir, cache, "train.max_steps=400", "train.save_every=0", model=model)
    signal_at_step(proc, run_dir, 2, signal.SIGTERM)
    wait_for(f"{run_dir}.err", "sft launch: SIGTERM: the ranks stop after the current step")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    err = Path(f"{run_dir}.err").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"stopped on SIGTERM at once, on a second signal: no checkpoint in {run_dir}" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert logged_steps(run_dir) < 400
    deadline = time.time() + 10
    while ranks_running(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    assert not ranks_running(run_dir)


@pytest.mark.slow
@pytest.mark.faults
def test_ctrl_c_with_the_output_through_tee_still_saves_a_checkpoint(tmp_path):
    """`sft launch ... | tee log` and Ctrl-C: the terminal's SIGINT also ends tee, so every later line the
    launcher and the ranks write meets a closed pipe. The stop still happens: checkpoint saved, exit 75."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cmd = sft_cmd("launch", "--nproc", "2", *SMALL_RUN, "train.max_steps=200")
    cmd += ["train.save_every=0", f"run_dir={run_dir}", f"cache_dir={cache}"]
    # As a terminal runs `{ sft launch ...; echo $? > code; } 2>&1 | tee log`: one process group, which the
    # Ctrl-C reaches whole (bash waits for the launcher and only then records its exit code).
    script = (
        f"{{ {shlex.join(cmd)}; echo $? > {tmp_path / 'code'}; }} 2>&1 | tee {tmp_path / 'log'} >/dev/null"
    )
    launcher = subprocess.Popen(["bash", "-c", script], cwd=ROOT, start_new_session=True)
    signal_at_step(launcher, run_dir, 3, signal.SIGINT)
    launcher.wait(timeout=300)
    log = (tmp_path / "log").read_text()
    assert "stopped on SIGINT" not in log, (
        "tee should have died of the Ctrl-C, before the launcher's last line"
    )
    assert (tmp_path / "code").read_text().strip() == "75", log[-3000:]
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert len(saved) == 1 and (run_dir / "checkpoints" / saved[0] / "manifest.json").exists()
    assert not ranks_running(run_dir)


@pytest.mark.slow
@pytest.mark.faults
def test_a_stop_while_the_ranks_start_is_kept(tmp_path):
    """SIGTERM as soon as the launcher starts the agent (the ranks not yet up): the request waits for each rank
    to catch it, and the run stops after its first step with a checkpoint, rather than being lost or killing a
    rank that is still starting."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    prepare = sft_cmd("prepare", *SMALL_RUN, f"cache_dir={cache}")
    subprocess.run(
        prepare, cwd=ROOT, check=True, capture_output=True, timeout=300
    )  # the launch starts at once
    proc = start_launch(run_dir, cache, "train.max_steps=200", "train.save_every=0")
    deadline = time.time() + 120
    while not (ranks := [p for p in ranks_running(run_dir) if p != proc.pid]) and time.time() < deadline:
        time.sleep(0.01)
    assert ranks, "the agent never started"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=300)
    err = Path(f"{run_dir}.err").read_text()
    assert proc.returncode == 75, err[-3000:]
    assert re.search(r"^stopped on SIGTERM: checkpoint \S+/step1 saved", err, re.M), err[-3000:]
    assert "Traceback" not in err and max(train_rows(run_dir)) == 1


def test_the_launcher_asks_only_ranks_that_catch_the_stop_signal(tmp_path):
    """A rank still starting (no SIGTERM handler yet) would be killed by the request: it is asked on a later
    round, once it catches SIGTERM. Real processes: an "agent" with two children, one of which catches SIGTERM."""
    from launcher.launch.lifecycle import LaunchStop, child_pids

    child = (
        "import os, signal, sys, time\n"
        "if sys.argv[1] == 'ready':\n"
        "    signal.signal(signal.SIGTERM, lambda *a: open(sys.argv[2] + '.asked', 'w').close())\n"
        "open(sys.argv[2], 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    agent = (
        "import subprocess, sys, time\n"
        f"kids = [subprocess.Popen([sys.executable, '-c', {child!r}, m, sys.argv[1] + m]) for m in ('ready', 'starting')]\n"
        "time.sleep(60)\n"
    )
    where = str(tmp_path / "pid-")
    proc = subprocess.Popen([sys.executable, "-c", agent, where])
    try:
        deadline = time.time() + 30
        while not all(Path(where + m).exists() for m in ("ready", "starting")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the pid is written after the handler is in place
        ready, starting = (int(Path(where + m).read_text()) for m in ("ready", "starting"))
        stop = LaunchStop()
        stop.agent, stop.signame = proc, "SIGTERM"
        stop._forward()
        assert stop.asked == {ready}, (stop.asked, ready, starting)
        deadline = time.time() + 10
        while not Path(where + "ready.asked").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert Path(where + "ready.asked").exists() and Path(f"/proc/{starting}").exists()
    finally:
        for pid in child_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
