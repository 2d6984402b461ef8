"""The real DeepSpeed ZeRO-3 engine on CPU ranks (gloo): loss normalisation invariance."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, torchrun


@pytest.mark.slow
def test_loss_and_update_invariant_to_micro_batch_accumulation_and_world_size(tmp_path):
    # (micro-batch, accumulation, world size): the same 4 rows and the same optimizer step every time.
    results = {}
    for micro, accum, world in [(4, 1, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)]:
        out = tmp_path / f"{micro}-{accum}-{world}.pt"
        proc = torchrun(
            ["tests/dist_loss_worker.py", str(micro), str(accum), str(out)], world, ROOT, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[(micro, accum, world)] = torch.load(out)
    ref = results[(4, 1, 1)]
    for key, got in results.items():
        assert got["tokens"] == ref["tokens"], key
        assert abs(got["loss"] - ref["loss"]) < 1e-5, (key, got["loss"], ref["loss"])
        torch.testing.assert_close(got["weights"], ref["weights"], atol=2e-6, rtol=1e-5, msg=str(key))
    # The step moved the weights: the comparison above is not between untouched initialisations.
    assert ref["weights"].abs().sum() > 0


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_sft_train(tmp_path):
    """`deepspeed --module launcher.cli train ...`: its `--local_rank=N` argument is accepted, both ranks train."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_resume import COMMON

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29731"]
    cmd += ["--module", "launcher.cli", "train", *COMMON, "train.max_steps=2", "train.warmup_steps=1"]
    cmd += [f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout, proc.stdout[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
