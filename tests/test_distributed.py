"""The real DeepSpeed ZeRO-3 engine on CPU ranks (gloo): loss normalisation invariance."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ROOT, SMALL_RUN, torchrun, worker


@pytest.mark.slow
def test_loss_and_update_invariant_to_micro_batch_accumulation_and_world_size(tmp_path):
    # (micro-batch, accumulation, world size): the same 4 rows and the same optimizer step every time.
    results = {}
    for micro, accum, world in [(4, 1, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)]:
        out = tmp_path / f"{micro}-{accum}-{world}.pt"
        proc = torchrun([worker("loss.py"), str(micro), str(accum), str(out)], world, ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[(micro, accum, world)] = torch.load(out)
    ref = results[(4, 1, 1)]
    for key, got in results.items():
        assert got["tokens"] == ref["tokens"], key
        assert abs(got["loss"] - ref["loss"]) < 1e-5, (key, got["loss"], ref["loss"])
        torch.testing.assert_close(got["weights"], ref["weights"], atol=2e-6, rtol=1e-5, msg=str(key))
    # The step moved the weights by exactly one SGD step (lr=1) on the token-mean loss computed the plain way
    # (each document alone, no packing, no DeepSpeed): w1 = w0 - grad. Not untouched initialisations, not a
    # mis-scaled gradient (a per-row or per-micro-batch mean, or a missing x world, moves them by other amounts).
    assert abs(ref["loss"] - ref["expected_loss"]) < 1e-5, (ref["loss"], ref["expected_loss"])
    moved = (ref["weights"] - ref["initial"]).norm()
    expected_move = (ref["expected"] - ref["initial"]).norm()
    assert expected_move > 1e-3, "the reference step must move the weights measurably"
    assert abs(moved - expected_move) < 1e-4 * expected_move, (moved, expected_move)
    torch.testing.assert_close(ref["weights"], ref["expected"], atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_sft_train(tmp_path):
    """`deepspeed --module launcher.cli train ...`: its `--local_rank=N` argument is accepted, both ranks train."""
    import json
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29731"]
    cmd += ["--module", "launcher.cli", "train", *SMALL_RUN, "train.max_steps=2", "train.warmup_steps=1"]
    cmd += [f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout, proc.stdout[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


@pytest.mark.slow
@pytest.mark.multinode
def test_two_nodes_share_one_cache_and_train_as_one_job(tmp_path):
    """Two torchrun agents as two nodes of one rank each (static rendezvous on this machine), one shared
    cache_dir: both nodes' local rank 0 build the data cache at once, one copy lands, both ranks train."""
    import json
    import os
    import subprocess
    import sys

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}"]
        cmd += ["--nproc_per_node=1", "--master_addr=127.0.0.1", "--master_port=29733"]
        cmd += ["-m", "launcher.cli", "train", *SMALL_RUN, "train.max_steps=2", "train.warmup_steps=1"]
        cmd += [f"run_dir={run_dir}", f"cache_dir={cache}"]
        with open(tmp_path / f"node{node}.log", "w") as log:  # the child keeps its own copy of the file
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "x 2 ranks" in logs[0]
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name], "one cache, no leftovers"
    assert next(cache.iterdir()).name.startswith("prepared-")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
