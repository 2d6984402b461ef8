"""Gradient checkpointing on packed rows: the same gradients as without it, and activations really recomputed."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from launcher.data import collate, pack_examples
from launcher.loss import target_token_loss
from launcher.model import build_model


def grads_and_saved(checkpointing: bool) -> tuple[torch.Tensor, int]:
    """Gradients of one packed batch, and the elements autograd saved for backward during the forward."""
    model_cfg = OmegaConf.create(
        {
            "name_or_path": None,
            "trust_remote_code": False,
            "init": {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
        }
    )
    torch.manual_seed(0)
    model = build_model(model_cfg, 61, "sdpa", torch.float32)
    if checkpointing:  # as launcher.train does for model.gradient_checkpointing=true
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(1)
    docs = [{"input_ids": torch.randint(1, 61, (n,), generator=g).tolist()} for n in (7, 5, 9, 11)]
    for d in docs:
        d["labels"] = [-100, *d["input_ids"][1:]]
    batch = collate(pack_examples(docs, max_length=16), "sdpa")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss_sum, n = target_token_loss(model, batch)
    (loss_sum / n).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return grads, sum(saved)


def test_gradient_checkpointing_same_grads_less_saved_and_recomputed():
    plain, saved_plain = grads_and_saved(False)
    ckpt, saved_ckpt = grads_and_saved(True)
    torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-5)
    assert plain.abs().max() > 1e-4
    # Only the layer inputs are kept for backward; the layers' own activations are recomputed there.
    assert saved_ckpt < 0.3 * saved_plain, (saved_ckpt, saved_plain)
