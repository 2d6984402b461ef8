"""Long-context features on the real DeepSpeed ZeRO-3 engine, 2 CPU ranks (gloo)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, torchrun


@pytest.mark.slow
@pytest.mark.parametrize("tied", ["tied", "untied"])
def test_tiled_loss_trains_like_untiled_under_zero3(tmp_path, tied):
    """Three AdamW steps with the LM head partitioned by ZeRO-3 (and tied to the embedding or not), 3 tiles per
    micro-batch, ranks with different target counts: the same losses and gradient norms as untiled, step for
    step (each step's norm is what clipping and the update see, so a mis-reduced head gradient shows here)."""
    out = tmp_path / "r.pt"
    proc = torchrun(["tests/dist_tiled_worker.py", tied, "3", str(out)], 2, ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    ref, tiled = got["untiled"], got["tiled"]
    assert len(ref["loss"]) == len(tiled["loss"]) == 3
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(ref[key], tiled[key], strict=True)):
            assert abs(a - b) <= 1e-5 * abs(a), (key, step, a, b)
    assert ref["grad_norm"][0] > 0 and ref["loss"][0] != ref["loss"][-1]  # it trained
