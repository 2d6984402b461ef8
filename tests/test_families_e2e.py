"""Every family of the table trains end to end: `model=hf` on a tiny saved checkpoint with a real chat tokenizer,
ZeRO-3 over 2 CPU ranks, all families in one torchrun (tests/workers/families.py): 4 steps, the loss falls,
the export reloads with the engine's hidden states and logits, an MoE router's auxiliary loss is logged at every
step, the tiled loss equals the untiled one where the row allows it (and is
refused with the row's reason elsewhere), sequence parallelism (S=2) equals one rank where the row allows it and
is shown inexact or failing where it refuses it. Code shipped with a checkpoint (a model type no row knows) trains
packed only when the start-up self-check proves it exact, else one line names the layer and `data.pack=false`."""

from __future__ import annotations

import json
import re

import pytest

from launcher.long_context.sequence_parallel import check_sequence_parallel
from launcher.long_context.tiled_loss import tiled_loss_supported
from tests.helpers import FAMILY_CONFIGS, family_config, fixture_path, torchrun, worker

pytestmark = pytest.mark.slow
TOL = 1e-5
REMOTE = ["remote-llama3", "remote-qwen3_next"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    tokenizer = fixture_path("tokenizers", "tinyllama-1.1b-chat-v1.0")
    out = tmp_path_factory.mktemp("families")
    proc = torchrun([worker("families.py"), str(out), str(tokenizer)], 2, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


def family(key: str):
    from launcher.model.families import family_of

    return family_of(family_config(key))


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_every_family_trains_under_zero3_and_exports(results, key):
    r, row = results[key], family(key)
    assert "error" not in r, r.get("error")
    if row.packing:  # refused before any rank starts, with the way out; then trained that way
        assert "data.pack=false" in r["train_refused"] and row.name in r["train_refused"], r
    else:
        assert "train_refused" not in r, r["train_refused"]
        assert r["train"]["packing_check_rel"] <= 1e-4, r["train"]  # the start-up self-check ran and passed
    t = r["train"]
    assert t["steps"] == 4 and t["final_loss"] < t["first_loss"], t
    assert t["export_check_rel"] <= 1e-4, t
    # The router's auxiliary loss (asked for with train.router_aux_loss=true where the row has one): logged apart
    # at every step, a finite positive number.
    aux = t["aux_losses"]
    if row.moe is not None and row.moe.aux_loss:
        assert len(aux) == 4 and all(0 < a < 100 for a in aux), aux
    else:
        assert aux == [], aux


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_tiled_loss_equals_untiled_or_is_refused_with_the_reason(results, key):
    r, why = results[key], tiled_loss_supported(family_config(key))
    if why is None:
        first, tiled = r["train"]["first_loss"], r["tiled"]["first_loss"]
        assert abs(first - tiled) <= 1e-6 * abs(first), (first, tiled)
    else:
        assert r["tiled"]["refused"] == f"train.tiled_loss=true: {why}; set train.tiled_loss=false"


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_sequence_parallel_is_exact_or_refused(results, key):
    sp, row = results[key]["sp"], family(key)
    exact = "error" not in sp and sp["hidden_rel"] <= TOL and sp["grad_rel"] <= TOL
    if row.sequence_parallel is None:
        assert exact, sp
        check_sequence_parallel(2, family_config(key))
    else:
        assert not exact, f"{row.name} refuses sequence parallelism but it is exact: {sp}"
        with pytest.raises(ValueError, match=re.escape(row.sequence_parallel)):
            check_sequence_parallel(2, family_config(key))


def test_code_shipped_with_a_checkpoint_trains_packed_only_when_the_self_check_proves_it(results):
    llama, leaky = results["remote-llama3"], results["remote-qwen3_next"]
    assert "error" not in llama and llama["train"]["packing_check_rel"] <= 1e-4
    assert llama["train"]["final_loss"] < llama["train"]["first_loss"]
    error = leaky["error"]
    assert "\n" not in error and "packing self-check failed" in error, error
    assert "RemoteGatedDeltaNet (model.layers.0.linear_attn)" in error and "set data.pack=false" in error, (
        error
    )
    assert "check_packing=false" not in error, error  # the check cannot be turned off for such a model


def test_the_families_run_in_one_process_pair(results):
    assert sorted(results) == sorted([*FAMILY_CONFIGS, *REMOTE])
