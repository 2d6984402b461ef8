"""Shared test helpers: reference computations, tiny model configs per family, the ZeRO-3 dict, `run_cli`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from launcher.data.template import IGNORE_INDEX


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loss from whole [B, T, V] logits: (sum of next-token cross-entropies, target count); labels are
    unshifted (HF style). The production loss (`launcher.loss.target_token_loss`) must equal it."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()
