"""Exact resume on 2 CPU ranks: stop at step 6, resume to 8, and match an uninterrupted 8-step run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, sft_launch

# A constant schedule after warmup keeps the lr independent of max_steps (the only thing that differs between
# the runs); a scheduler that was not restored would restart warmup at step 7 and show in the lr.
COMMON = [
    "model.init.num_hidden_layers=2",
    "model.init.hidden_size=64",
    "model.init.intermediate_size=128",
    "data.max_length=256",
    "train.warmup_steps=5",
    "train.schedule=constant",
    "train.lr=3e-3",
    "train.log_every=1",
    "train.exact_match_eval=false",
    "train.export=false",
    "train.check_packing=false",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
]


def launch(run_dir, cache, *extra):
    return sft_launch([*COMMON, *extra], run_dir, cache, timeout=600)


def train_rows(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.resume
def test_resume_continues_exactly(tmp_path):
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch(straight, cache, "train.max_steps=8")
    launch(split, cache, "train.max_steps=6")
    out = launch(split, cache, "train.max_steps=8", "train.resume=auto")
    assert "resumed at step 6" in out
    a, b = train_rows(straight), train_rows(split)
    assert sorted(b) == list(range(1, 9)), "steps 1-6 from the first run, 7-8 from the resumed one"
    for step in range(1, 9):
        for key in ("loss", "lr", "grad_norm", "trained_tokens"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.badinput
def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "train",
        *COMMON,
        "train.max_steps=6",
        f"train.resume={tmp_path / 'nothing'}",
        f"run_dir={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'c'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no DeepSpeed checkpoint there" in proc.stderr and "Traceback" not in proc.stderr
