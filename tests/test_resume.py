"""Exact resume on 2 CPU ranks: stop at step 6, resume to 8, and match an uninterrupted 8-step run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import (
    ROOT,
    SMALL_RUN,
    assert_same_steps,
    launch,
    logged_steps,
    ranks_running,
    sft_cmd,
    train_rows,
)


def own_copy(run_dir, tmp_path):
    """A copy of a shared fixture's run dir for one test, so that no test sees another's launches and none
    depends on the order they run in."""
    return shutil.copytree(run_dir, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.resume
def test_resume_continues_exactly(tmp_path, straight):
    want, cache = straight
    split = tmp_path / "split"
    launch(split, cache, "train.max_steps=6")
    out = launch(split, cache, "train.max_steps=8", "train.resume=auto")
    assert "resumed at step 6" in out
    assert_same_steps(train_rows(split), want)  # steps 1-6 from the first run, 7-8 from the resumed one


@pytest.mark.slow
@pytest.mark.resume
@pytest.mark.faults
def test_a_killed_job_resumes_exactly_from_its_last_checkpoint(tmp_path, straight):
    """SIGKILL to `sft launch` of a running job (a preemption, an OOM kill) after its first checkpoint: the agent
    and the ranks die with it, `train.resume=auto` picks up from the last complete checkpoint, and the steps
    equal an uninterrupted run."""
    import os
    import signal
    import time

    want, cache = straight
    run_dir = tmp_path / "run"
    # The same run, but long enough that it is still training when the kill comes (the schedule is constant).
    cmd = sft_cmd("launch", "--nproc", "2", *SMALL_RUN, "train.max_steps=1000")
    cmd += ["train.save_every=3", f"run_dir={run_dir}", f"cache_dir={cache}"]
    job = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # Step 4 is logged after the step-3 checkpoint is complete on every rank: kill then, mid-training.
    latest, deadline = run_dir / "checkpoints" / "latest", time.time() + 300
    while logged_steps(run_dir) < 4 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)  # `sft launch` alone: the torchrun agent and the ranks must follow
    job.wait()
    assert latest.exists(), "the job ended or timed out before its first checkpoint"
    deadline = time.time() + 30
    while ranks_running(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    assert not ranks_running(run_dir), "the agent or ranks outlived their killed launcher"
    killed_at = max(train_rows(run_dir))
    assert killed_at < 1000, "the job was killed while training"
    out = launch(run_dir, cache, "train.max_steps=8", "train.resume=auto")
    resumed_from = int(out.split("resumed at step ")[1].split()[0])
    assert resumed_from % 3 == 0 and resumed_from <= killed_at
    # A second job on the same data and tokenizer prepares nothing: one line says so.
    assert out.count("data cache hit: ") == 1 and "(nothing prepared" in out, out[-3000:]
    assert_same_steps({k: v for k, v in train_rows(run_dir).items() if k <= 8}, want)


@pytest.mark.slow
@pytest.mark.resume
def test_resuming_a_finished_run_exits_0_with_its_results_and_first_loss(tmp_path, straight_run):
    """What a requeued or resubmitted job sees once the run is done: nothing to train, exit 0, results.json
    with the run's real first and last loss, and this launch's config kept beside the first one's."""
    want, cache, finished = straight_run
    run_dir = own_copy(finished, tmp_path)
    config_before = (run_dir / "config.yaml").read_text()
    (run_dir / "results.json").unlink()
    out = launch(run_dir, cache, "train.max_steps=8", "train.resume=auto")
    assert "resumed at step 8" in out and "already finished (step 8 of 8)" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["first_loss"] == pytest.approx(want[1]["loss"], rel=1e-12)
    assert results["final_loss"] == pytest.approx(want[8]["loss"], rel=1e-12) and results["steps"] == 8
    assert f"final: loss {want[1]['loss']:.4f} -> {want[8]['loss']:.4f}" in out
    assert (run_dir / "config.yaml").read_text() == config_before
    assert sorted(p.name for p in (run_dir / "launches").iterdir()) == ["1.yaml", "2.yaml"]
    assert "resume: auto" in (run_dir / "launches" / "2.yaml").read_text()


@pytest.mark.slow
@pytest.mark.resume
@pytest.mark.badinput
def test_a_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, straight_run):
    _, cache, finished = straight_run
    run_dir = own_copy(finished, tmp_path)
    cmd = sft_cmd("launch", "--nproc", "2", *SMALL_RUN, "train.max_steps=8")
    cmd += ["train.resume=auto", "data.max_length=128", "train.lr=1e-3"]
    cmd += [f"run_dir={run_dir}", f"cache_dir={cache}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.max_length (256 -> 128)" in proc.stderr and "train.lr (0.003 -> 0.001)" in proc.stderr
    assert "train.allow_config_change=true" in proc.stderr and "Traceback" not in proc.stderr
    assert "launching:" not in proc.stdout, "refused before any rank started"
    # Asked for explicitly, the same resume goes ahead.
    allowed = ["train.resume=auto", "train.lr=1e-3", "train.allow_config_change=true"]
    out = launch(run_dir, cache, "train.max_steps=8", *allowed)
    assert "resumed at step 8" in out


def demo_sources(where) -> str:
    """The demo's sources (same names, same content) from a folder of copies."""
    return (
        f"data.sources=[{{path: {where}/train.jsonl, name: demo-train}}, "
        f"{{path: {where}/eval.jsonl, name: demo-eval, eval: true}}]"
    )


@pytest.mark.slow
@pytest.mark.resume
def test_a_run_whose_data_moved_resumes_exactly_and_changed_data_is_refused(tmp_path, straight):
    """Data files moved (another machine, container or clone): the ranks compare the prepared data's content
    digest with the checkpoint's and resume, saying so; the steps equal the uninterrupted run. The same move with
    one conversation edited is refused on one line."""
    import shutil

    want, cache = straight
    split, old, new = tmp_path / "split", tmp_path / "old", tmp_path / "new"
    shutil.copytree(ROOT / "launcher" / "assets" / "demo", old)
    launch(split, cache, "train.max_steps=6", demo_sources(old))
    old.rename(new)
    out = launch(split, cache, "train.max_steps=8", "train.resume=auto", demo_sources(new))
    assert "resumed at step 6" in out
    assert (
        f"resuming with moved paths, the same prepared data: data.sources.0.path ('{old}/train.jsonl' ->"
        in out
    )
    assert_same_steps(train_rows(split), want)

    lines = (new / "train.jsonl").read_text().splitlines()
    edited = tmp_path / "edited"
    shutil.copytree(new, edited)
    (edited / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # one conversation fewer
    cmd = sft_cmd("launch", "--nproc", "2", *SMALL_RUN, "train.max_steps=8")
    cmd += ["train.resume=auto", demo_sources(edited), f"run_dir={split}", f"cache_dir={cache}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.sources.0.path" in proc.stderr and "moved and the prepared data differs" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.badinput
def test_resume_auto_with_the_default_timestamped_run_dir_is_refused():
    proc = subprocess.run(
        sft_cmd("launch", "train.resume=auto"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.resume=auto needs the run's own run_dir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def saved_at_3_and_6(tmp_path_factory, straight):
    """The first 6 steps of the straight run, saved at steps 3 and 6 (each test damages its own copy)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    launch(run_dir, straight[1], "train.max_steps=6", "train.save_every=3")
    return run_dir


def damage(shard, how: str) -> str:
    """Damage a shard as a crash or a bad disk does; returns what the resume must say about it."""
    size = shard.stat().st_size
    if how == "truncated":  # a save killed mid-write, or out of space
        with shard.open("r+b") as f:
            f.truncate(size // 2)
        return f"{shard.name} is {size // 2} bytes, the manifest says {size}"
    data = bytearray(shard.read_bytes())
    if how == "byte_flipped":  # one byte of the tensor data inverted: the size is unchanged
        data[size // 2] ^= 0xFF
    else:  # zero_filled: the file's blocks never reached the disk before a crash; same size
        data = bytearray(size)
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size
    return f"{shard.name} does not match its sha256 in the manifest (its content changed after the save)"


@pytest.mark.slow
@pytest.mark.resume
@pytest.mark.faults
@pytest.mark.parametrize("how", ["truncated", "byte_flipped", "zero_filled"])
def test_a_damaged_shard_is_skipped_and_the_previous_checkpoint_resumes_exactly(
    tmp_path, straight, saved_at_3_and_6, how
):
    """Each damage falls back to the step-3 checkpoint with one line naming the file and why, and the resumed
    steps equal the uninterrupted run's (without the content hash, a byte-flipped or zero-filled shard of the
    right size is loaded: a crash or a different run)."""
    want, cache = straight
    run_dir = own_copy(saved_at_3_and_6, tmp_path)
    why = damage(run_dir / "checkpoints" / "step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", how)
    out = launch(run_dir, cache, "train.max_steps=8", "train.resume=auto")
    skipped = [line for line in out.splitlines() if "skipping checkpoint" in line]
    assert skipped == [f"skipping checkpoint {run_dir}/checkpoints/step6: {why}"], skipped
    assert "resumed at step 3" in out
    assert_same_steps(train_rows(run_dir), want)


@pytest.mark.slow
@pytest.mark.resume
def test_a_run_with_dropout_resumes_exactly_and_keeps_its_wandb_run(tmp_path):
    """Every rank's RNG state is saved and restored: with attention dropout on, the resumed steps draw the same
    masks as an uninterrupted run. The wandb run id is kept in the run dir and reused."""
    common = ["+model.init.attention_dropout=0.2", "logging.wandb_mode=offline"]
    launch(tmp_path / "straight", tmp_path / "cache", *common, "train.max_steps=8")
    want = train_rows(tmp_path / "straight")
    split = tmp_path / "split"
    launch(split, tmp_path / "cache", *common, "train.max_steps=6")
    out = launch(split, tmp_path / "cache", *common, "train.max_steps=8", "train.resume=auto")
    assert "resumed at step 6" in out
    assert_same_steps(train_rows(split), want)
    run_id = (split / "wandb_id").read_text().strip()
    runs = sorted(p.name for p in (split / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), (run_id, runs)


@pytest.mark.badinput
def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "train",
        *SMALL_RUN,
        "train.max_steps=6",
        f"train.resume={tmp_path / 'nothing'}",
        f"run_dir={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'c'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no complete checkpoint there" in proc.stderr and "Traceback" not in proc.stderr
