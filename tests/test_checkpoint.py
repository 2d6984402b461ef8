"""Which checkpoints count, which are rotated away, what a full disk says, and the export check's verdict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from launcher import checkpoint
from tests.helpers import ROOT, SMALL_RUN, logged_steps


def fake_checkpoint(root, step: int, complete: bool = True, files: dict[str, int] | None = None):
    tag = root / f"step{step}"
    tag.mkdir(parents=True)
    for name, size in (files or {"shard_rank0.pt": 10, "shard_rank1.pt": 12}).items():
        (tag / name).write_bytes(b"x" * size)
    if complete:
        listed = {p.name: p.stat().st_size for p in tag.iterdir()}
        (tag / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": listed}))
    return tag


def test_the_newest_complete_checkpoint_is_found_and_the_others_are_named(tmp_path):
    fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 6)
    truncated = fake_checkpoint(tmp_path, 9)
    (truncated / "shard_rank1.pt").write_bytes(b"x" * 5)
    fake_checkpoint(tmp_path, 12, complete=False)
    found, skipped = checkpoint.newest_complete(tmp_path)
    assert found == tmp_path / "step6"
    assert skipped == [
        (str(tmp_path / "step12"), "no manifest.json (the save did not finish)"),
        (str(tmp_path / "step9"), "shard_rank1.pt is 5 bytes, the manifest says 12"),
    ]
    (tmp_path / "step6" / "shard_rank0.pt").unlink()
    assert checkpoint.problem(tmp_path / "step6") == "shard_rank0.pt is missing"
    # A step dir named directly is that checkpoint or nothing.
    assert checkpoint.newest_complete(tmp_path / "step3")[0] == tmp_path / "step3"
    assert checkpoint.newest_complete(tmp_path / "step9")[0] is None


def test_rotation_keeps_the_newest_complete_ones_and_never_the_newest_complete(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 10, complete=False)  # a save that did not finish is not counted as one kept
    removed = checkpoint.rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step2", "step4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step10", "step6", "step8"]
    assert checkpoint.rotate(tmp_path, keep_last=0) == []
    checkpoint.rotate(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step10", "step8"]


def test_the_exactness_config_names_what_decides_the_run():
    from launcher.config import compose

    base = checkpoint.exactness_config(compose([]))
    assert base["data.max_length"] == 512 and "data.num_proc" not in base
    assert base["train.max_steps"] == 300  # the demo decays (cosine): its schedule depends on max_steps
    assert "train.save_every" not in base and "train.eval_every" not in base and "model.attention" not in base
    constant = checkpoint.exactness_config(compose(["train.schedule=constant"]))
    assert "train.max_steps" not in constant


def can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a small tmpfs as a full disk")
def test_a_full_disk_names_the_path_and_leaves_latest_on_the_previous_checkpoint(tmp_path):

    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(ckpts)], check=True)
    try:
        cmd = [
            sys.executable,
            "-m",
            "launcher.cli",
            "launch",
            "--nproc",
            "2",
            *SMALL_RUN,
            "train.max_steps=1000",
        ]
        cmd += ["train.save_every=10", f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not (ckpts / "step10" / checkpoint.MANIFEST).exists() and time.time() < deadline:
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.02)
        # The disk fills up while the run trains toward its next checkpoint.
        filler = ckpts / "filler"
        with filler.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(ckpts).free - 2**20)
        assert logged_steps(run_dir) < 20, "the next checkpoint was saved before the disk filled up"
        _, err = job.communicate(timeout=300)
        assert job.returncode != 0
        assert f"no space left on device for checkpoint {ckpts}/step20" in err, err[-3000:]
        assert (ckpts / "latest").read_text() == "step10"
        assert not (ckpts / "step20").exists()
        assert checkpoint.problem(ckpts / "step10") is None
    finally:
        subprocess.run(["umount", "-l", str(ckpts)], check=False)


def test_the_export_check_fails_loudly_when_the_export_is_not_the_trained_model(tmp_path, monkeypatch):
    """verify_export on a one-rank group: the trained weights pass; an export whose head differs fails."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.export import verify_export

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29400 + os.getpid() % 500))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        config = LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp_path / "good")
        engine = type("Engine", (), {"module": model})()
        row = {"input_ids": list(range(1, 30)), "labels": list(range(1, 30))}
        assert verify_export(engine, tmp_path / "good", row, "sdpa", 1e-4)["export_check_rel"] < 1e-5
        with torch.no_grad():
            model.lm_head.weight.mul_(1.01)  # the engine moved on: the export no longer matches it
        with pytest.raises(RuntimeError, match="export check failed: .* the export is not the trained model"):
            verify_export(engine, tmp_path / "good", row, "sdpa", 1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.badinput
def test_preflight_refuses_a_resume_with_other_ranks_or_a_changed_config(tmp_path):
    """What `sft launch` checks before any rank starts, from the newest complete checkpoint's manifest."""
    from launcher.config import compose

    run = [f"run_dir={tmp_path}", "train.resume=auto"]
    cfg = compose(run)
    tag = fake_checkpoint(tmp_path / "checkpoints", 6)
    manifest = json.loads((tag / checkpoint.MANIFEST).read_text())
    manifest.update(world_size=2, config=checkpoint.exactness_config(cfg))
    (tag / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    checkpoint.preflight(cfg, 2)  # the same run on the same ranks resumes
    with pytest.raises(ValueError, match="saved by 2 ranks and this run has 4: ZeRO shards belong"):
        checkpoint.preflight(cfg, 4)
    with pytest.raises(ValueError, match=r"differs from checkpoint .*step6's in train.lr \(0.002 -> 0.001\)"):
        checkpoint.preflight(compose([*run, "train.lr=1e-3"]), 2)
    checkpoint.preflight(compose([*run, "train.lr=1e-3", "train.allow_config_change=true"]), 2)
    checkpoint.preflight(compose([*run, "train.eval_every=7", "train.save_every=3"]), 2)  # cadence may change


def test_moved_paths_resume_only_with_the_same_prepared_data(tmp_path):
    """A path key that changed is a move, not a new run, when the prepared data's digest is the checkpoint's: the
    launcher's preflight lets it through (no data loaded yet), the ranks decide on the digest."""
    from launcher.config import compose

    run = [f"run_dir={tmp_path}", "train.resume=auto"]
    then = checkpoint.exactness_config(compose(run))
    manifest = {"world_size": 2, "config": then, "sampler": {"rows": 10, "steps_per_epoch": 5, "data": "abc"}}
    tag = tmp_path / "step6"
    moved = compose([*run, "model.tokenizer=/elsewhere/tokenizer"])
    assert checkpoint.check_compatible(manifest, moved, tag, None, 2) == []  # preflight: deferred
    same = {"rows": 10, "steps_per_epoch": 5, "data": "abc"}
    notes = checkpoint.check_compatible(manifest, moved, tag, same, 2)
    assert notes and "model.tokenizer" in notes[0] and "/elsewhere/tokenizer" in notes[0]
    with pytest.raises(
        ValueError, match=r"model.tokenizer .* moved and the prepared data differs .*data abc then"
    ):
        checkpoint.check_compatible(manifest, moved, tag, {**same, "data": "xyz"}, 2)
    evals = {**manifest, "sampler": {**same, "eval_data": "e1"}}  # moved eval files with other conversations
    with pytest.raises(ValueError, match="eval_data e1 then, e2 now"):
        checkpoint.check_compatible(evals, moved, tag, {**same, "eval_data": "e2"}, 2)
    old = {**manifest, "sampler": {"rows": 10, "steps_per_epoch": 5}}  # saved before content digests
    with pytest.raises(ValueError, match="data <not recorded> then"):
        checkpoint.check_compatible(old, moved, tag, same, 2)
    assert checkpoint.check_compatible(old, compose(run), tag, same, 2) == []  # nothing moved: as before
    with pytest.raises(ValueError, match=r"differs from checkpoint .* model.tokenizer .* train.lr"):
        checkpoint.check_compatible(
            manifest, compose([*run, "model.tokenizer=/x", "train.lr=1e-3"]), tag, same, 2
        )
