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
