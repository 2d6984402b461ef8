"""The tiled LM-head loss and the tiled MLP compute the same loss and gradients as untiled (and their 2-rank
ZeRO-3 training runs the same losses and gradient norms: tests/test_long_context_dist.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.data import collate, pack_examples
from launcher.long_context.tiled_loss import tiled_target_token_loss, use_tiled_loss
from launcher.long_context.tiled_mlp import install_tiled_mlp
from launcher.loss import target_token_loss
from tests import helpers

TINY = {**helpers.TINY, "vocab_size": 1000}


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i, n in enumerate([9, 13, 6, 11, 7]):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        # Prompt tokens masked, the rest trained: targets at scattered positions of each packed row.
        docs.append({"input_ids": ids, "labels": [-100] * (i % 3 + 1) + ids[i % 3 + 1 :]})
    return collate(pack_examples(docs, max_length=24), "sdpa", 0)


def loss_and_grads(model, fn, b) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss_sum, n = fn(model, b)
    (loss_sum / n).backward()
    return loss_sum.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_tiles", [1, 3, 7])
def test_tiled_loss_equals_untiled_loss_and_gradients(tied, n_tiles):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", tie_word_embeddings=tied, **TINY)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    b = batch()
    ref_loss, ref = loss_and_grads(model, target_token_loss, b)
    loss, got = loss_and_grads(model, lambda m, x: tiled_target_token_loss(m, x, n_tiles=n_tiles), b)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    head = model.get_output_embeddings().weight
    assert head.grad.abs().sum() > 0  # the head is trained, so its gradient was compared


def test_tiled_loss_setting():
    small = AutoConfig.for_model("llama", **TINY)
    large = AutoConfig.for_model("llama", **{**TINY, "vocab_size": 32_000})
    assert not use_tiled_loss("auto", small) and use_tiled_loss("auto", large)
    assert use_tiled_loss("True", small) and not use_tiled_loss("false", large)
    capped = AutoConfig.for_model("gemma2", **{**TINY, "vocab_size": 256_000, "head_dim": 8})
    assert not use_tiled_loss("auto", capped)  # soft-capped logits: the head is not a plain projection
    with pytest.raises(ValueError, match="train.tiled_loss=true: gemma2 post-processes its logits"):
        use_tiled_loss("true", capped)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("n_tiles", [2, 5])
def test_tiled_mlp_equals_untiled_loss_and_gradients(n_tiles, checkpointing):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", **TINY)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    b = batch()
    ref_loss, ref = loss_and_grads(model, target_token_loss, b)
    assert install_tiled_mlp(model, n_tiles=n_tiles) == TINY["num_hidden_layers"]
    loss, got = loss_and_grads(model, target_token_loss, b)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    assert ref["model.layers.0.mlp.down_proj.weight"].abs().sum() > 0
