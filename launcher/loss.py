"""The training loss: summed next-token cross-entropy over target tokens, and the step's target count.

    loss_sum, n = target_token_loss(model, collate(rows, attention))
    (loss_sum / n_global_targets).backward()

Every micro-batch returns a *sum*; the caller divides by the target tokens of the whole optimizer step over all
ranks (`launcher.train.train_step`), so every token weighs the same whatever the packing or batch shape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from launcher.data.template import IGNORE_INDEX


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Everything but labels: the loss is ours, summed over target tokens (see target_token_loss)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}


def next_token_targets(batch: dict[str, Any]) -> torch.Tensor:
    """[B, T] target of each position: the next label in the row, or `shift_labels` when the batch holds a
    slice of the rows (sequence parallelism: the next label may live on another rank)."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    return F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]


def target_token_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies, number of target tokens) of a collated batch; the LM head runs only
    at positions that predict a target.

    Assistant-only SFT trains a fraction of the tokens, and for large vocabularies the [T, V] logits (and their
    gradient) dominate activation memory: `logits_to_keep` slices the hidden states before the projection.
    """
    targets = next_token_targets(batch)
    keep = (targets != IGNORE_INDEX).any(0).nonzero().flatten()  # positions with a target in any row
    logits = model(**model_inputs(batch), logits_to_keep=keep).logits  # [B, K, V]
    kept = targets[:, keep].reshape(-1)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), kept, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (kept != IGNORE_INDEX).sum()


def count_targets(rows: list[dict]) -> int:
    """Next-token targets in packed rows: the labels after each row's first position (the loss shifts labels
    within a row)."""
    return sum(len(r["labels"]) - 1 - list(r["labels"][1:]).count(IGNORE_INDEX) for r in rows)
