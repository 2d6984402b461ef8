"""Which checkpoints count, which are rotated away, what a full disk says, and the export check's verdict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher import checkpoint
from tests.helpers import ROOT, SMALL_RUN, logged_steps


def fake_checkpoint(root, step: int, complete: bool = True, files: dict[str, int] | None = None):
    tag = root / f"step{step}"
    tag.mkdir(parents=True)
    for name, size in (files or {"shard_rank0.pt": 10, "shard_rank1.pt": 12}).items():
        (tag / name).write_bytes(bytes(range(1, size + 1)))
    if complete:
        listed = {p.name: checkpoint.file_record(p) for p in tag.iterdir()}
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


def test_a_same_size_change_is_caught_by_the_content_hash(tmp_path):
    """A flipped bit and a zero-filled file (what a crash before the data reached the disk leaves) keep their
    size: the manifest's SHA-256 catches both; sizes alone (rotation, the launcher's preflight) do not."""
    for step, corrupt in ((3, "flip"), (6, "zeros")):
        tag = fake_checkpoint(tmp_path, step)
        shard = tag / "shard_rank1.pt"
        data = bytearray(shard.read_bytes())
        if corrupt == "flip":
            data[len(data) // 2] ^= 0x01
        else:
            data = bytearray(len(data))
        shard.write_bytes(bytes(data))
        why = "shard_rank1.pt does not match its sha256 in the manifest (its content changed after the save)"
        assert checkpoint.problem(tag) == why, corrupt
        assert checkpoint.problem(tag, content=False) is None
    fake_checkpoint(tmp_path, 2)
    found, skipped = checkpoint.newest_complete(tmp_path)
    assert found == tmp_path / "step2" and [s[0] for s in skipped] == [
        str(tmp_path / f"step{n}") for n in (6, 3)
    ]
    # A manifest from before content hashes (sizes only) still counts.
    old = fake_checkpoint(tmp_path, 9)
    manifest = json.loads((old / checkpoint.MANIFEST).read_text())
    manifest["files"] = {k: v["bytes"] for k, v in manifest["files"].items()}
    (old / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.problem(old) is None and checkpoint.newest_complete(tmp_path)[0] == old


@pytest.mark.slow
def test_a_save_is_durable_before_its_manifest_and_each_rank_hashes_what_it_wrote(tmp_path):
    """A real ZeRO-3 save on 2 ranks, with fsync, renames and hashing recorded (tests/workers/checkpoint.py): each
    rank fsyncs and hashes exactly the files it wrote; every file, the step dir and the checkpoints dir are
    fsynced before the manifest is renamed into place, the manifest's own data before its name, `latest` after it;
    and the manifest's hashes are the files' own."""
    import hashlib

    from tests.helpers import torchrun, worker

    proc = torchrun([worker("checkpoint.py"), str(tmp_path)], 2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    root = tmp_path / "checkpoints"
    tag = root / "step1"
    files = json.loads((tag / checkpoint.MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in tag.iterdir() if p.name != checkpoint.MANIFEST)
    for name, record in files.items():
        data = (tag / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    for r in (0, 1):
        hashed = sorted(p for what, p, _ in events[r] if what == "hash")
        mine = sorted(str(tag / n) for n in files if f"rank_{r}_" in n or n == f"rng_rank{r}.pt")
        assert hashed == mine and len(mine) == 3, (r, hashed)

    def when(what: str, path, rank: int | None = None) -> list[int]:
        ranks = [rank] if rank is not None else [0, 1]
        return [t for r in ranks for w, p, t in events[r] if w == what and p == str(path)]

    (manifest_at,) = when("replace", tag / checkpoint.MANIFEST)
    (latest_at,) = when("replace", root / "latest")
    for name in files:
        assert when("fsync", tag / name) and max(when("fsync", tag / name)) < manifest_at, name
    last_file = max(t for name in files for t in when("fsync", tag / name))
    for d in (tag, root):  # the new names in each, after the last file and before the manifest
        assert any(last_file < t < manifest_at for t in when("fsync", d, 0)), d
    tmps = [p for w, p, t in events[0] if w == "fsync" and ".tmp" in p]
    assert [Path(p).name.split(".tmp")[0] for p in tmps] == [checkpoint.MANIFEST, "latest"]
    assert max(when("fsync", tmps[0])) < manifest_at < min(t for t in when("fsync", tag) if t > manifest_at)
    assert manifest_at < max(when("fsync", tmps[1])) < latest_at < max(when("fsync", root))
    assert (root / "latest").read_text() == "step1"


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


def mount_small_tmpfs(where: Path) -> None:
    """Mount a 64 MiB tmpfs at `where` (a disk to fill), or skip saying why it cannot be mounted here: not root,
    no `mount`, or a container that does not permit it, whatever the uid."""
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small tmpfs as a full disk")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        why = (proc.stderr.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        pytest.skip(f"cannot mount a small tmpfs as a full disk here (uid {os.geteuid()}): {why}")


def test_the_full_disk_test_skips_where_mount_fails(tmp_path, monkeypatch):
    """`mount` refused (not permitted in this container, whatever the uid): a skip naming why, not an error."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mount").write_text("#!/bin/sh\necho 'mount: permission denied (are you root?)' >&2\nexit 32\n")
    (fake / "mount").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(pytest.skip.Exception, match="cannot mount .*: mount: permission denied"):
        mount_small_tmpfs(tmp_path)


@pytest.mark.slow
@pytest.mark.faults
def test_a_full_disk_names_the_path_and_leaves_latest_on_the_previous_checkpoint(tmp_path):

    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    mount_small_tmpfs(ckpts)
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
