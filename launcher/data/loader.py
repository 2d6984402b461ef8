"""Turn packed rows into model inputs, and pack rows into per-rank optimizer steps.

    batch = collate(rows, attention="sdpa")   # rows from pack_examples
    logits = model(**batch).logits

The collator builds exactly what the attention backend needs (see launcher.data.masks): never an all-ones
mask, and `use_cache=False` so transformers cannot silently fall back to a cache-based mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from launcher.data.masks import (
    MASK_BACKENDS,
    VARLEN_BACKENDS,
    block_causal_float_mask,
    cu_seq_lens,
    document_block_mask,
)
from launcher.data.packing import balance_step, doc_lengths
from launcher.data.template import IGNORE_INDEX


def collate(
    rows: Sequence[dict[str, Sequence[int]]],
    attention: str = "sdpa",
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Stack packed rows into tensors for the given attention backend.

    Args:
        rows: dicts with `input_ids`, `labels`, `position_ids` (as from `pack_examples`).
        attention: backend name (sdpa, eager, flex_attention, torch_varlen, flash_attention_2/3).
        pad_id: token id used to pad rows to the longest one (padding never carries a label).
        device: where the batch goes (default CPU). Token tensors are built on the CPU and copied; a mask is
            built on the device itself: a [B, 1, T, T] float mask is cheaper to make there than to copy, and a
            flex BlockMask must be made where it is used.

    Returns:
        `input_ids`, `labels`, `position_ids` and the backend's document metadata, with `use_cache=False`.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if not rows:
        raise ValueError("collate() got no rows")
    if attention in VARLEN_BACKENDS:
        # Padding-free: every row's documents are laid end to end in one [1, N] sequence.
        ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.long)[None]
        labels = torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.long)[None]
        pos = torch.tensor([t for r in rows for t in r["position_ids"]], dtype=torch.long)[None]
        cu, max_len = cu_seq_lens(pos)  # on the CPU: max_len is a Python int, read without a device sync
        cu = _move(cu, device)
        return {
            "input_ids": _move(ids, device),
            "labels": _move(labels, device),
            "position_ids": _move(pos, device),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max_len,
            "max_length_k": max_len,
            "use_cache": False,
        }
    if attention not in (*MASK_BACKENDS, "flex_attention"):
        raise ValueError(f"collate(attention={attention!r}): unknown backend")
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
    # Padding is its own document (positions restart at 0), so it attends only to itself.
    pos = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        pos[i, :n] = torch.as_tensor(r["position_ids"])
        pos[i, n:] = torch.arange(t - n)
    pos = _move(pos, device)
    mask = document_block_mask(pos) if attention == "flex_attention" else block_causal_float_mask(pos)
    return {
        "input_ids": _move(ids, device),
        "labels": _move(labels, device),
        "position_ids": pos,
        "attention_mask": mask,
        "use_cache": False,
    }


def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    # Pinned host memory lets the copy run asynchronously, overlapped with the previous micro-batch's kernels.
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def pack_cost(row: dict[str, Sequence[int]]) -> tuple[int, int]:
    """(attention cost = sum of squared document lengths, tokens) of a packed row."""
    lengths = doc_lengths(row["position_ids"])
    return sum(n * n for n in lengths), len(row["input_ids"])


class StepSampler:
    """Yields, per optimizer step, this rank's packs, reshuffled every epoch and balanced across ranks.

    Each step takes `world_size * per_rank` packs; within a step they are dealt to ranks by attention cost
    (largest first to the least-loaded rank), so no rank waits on a rank with a heavier batch.
    """

    def __init__(self, rows: Sequence[dict], world_size: int, rank: int, per_rank: int, seed: int):
        self.rows, self.world_size, self.rank, self.per_rank, self.seed = (
            rows,
            world_size,
            rank,
            per_rank,
            seed,
        )
        # PackedRows computes all costs at once from its flat arrays; a plain list goes row by row.
        self.costs = rows.costs() if hasattr(rows, "costs") else [pack_cost(r) for r in rows]
        self.per_step = world_size * per_rank
        if len(rows) < self.per_step:
            raise ValueError(
                f"only {len(rows)} packed rows but one step needs {self.per_step} "
                f"(world size {world_size} x {per_rank} per rank): add data or lower train.global_batch_size"
            )
        self.steps_per_epoch = len(rows) // self.per_step
        self.balance: dict[str, float] = {}

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        """This rank's pack indices for every step of `epoch` (the tail that fills no step waits a reshuffle)."""
        perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))
        steps, loads = [], np.zeros((self.world_size, 2))
        for s in range(self.steps_per_epoch):
            chunk = perm[s * self.per_step : (s + 1) * self.per_step].tolist()
            by_rank = balance_step([self.costs[i] for i in chunk], self.world_size, self.per_rank)
            for r, picks in enumerate(by_rank):
                loads[r] += np.sum([self.costs[chunk[i]] for i in picks], axis=0)
            steps.append([chunk[i] for i in by_rank[self.rank]])
        mean = loads.mean(axis=0)
        self.balance = {
            "attn_cost_max_over_mean": float(loads[:, 0].max() / mean[0]) if mean[0] else 1.0,
            "tokens_max_over_mean": float(loads[:, 1].max() / mean[1]) if mean[1] else 1.0,
        }
        return steps

    def steps_from(self, step: int) -> Iterator[list[int]]:
        """This rank's packs for every step from `step` on: the order is a pure function of (seed, epoch)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            yield from self.epoch_steps(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        return self.steps_from(0)
