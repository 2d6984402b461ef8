"""Best-fit-decreasing packing of whole conversations into fixed-capacity rows, and rank balancing.

    rows = pack_examples(examples, max_length=2048)

Every example lands in exactly one row, contiguous and never split. Inside a row, `position_ids` restart at 0
for each document and the label of each document's first token is -100, so no document is trained to
continue the one before it. Pure Python/NumPy: no torch, no distributed state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from launcher.data.template import IGNORE_INDEX


class _CapacityTree:
    """Bins grouped by remaining capacity; finds the tightest bin that still fits in O(log capacity)."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = np.zeros(2 * self.size, dtype=np.int64)
        self.bins: list[list[int]] = [[] for _ in range(capacity + 1)]

    def add(self, remaining: int, bin_id: int) -> None:
        self.bins[remaining].append(bin_id)
        i = remaining + self.size
        while i:
            self.count[i] += 1
            i //= 2

    def pop_tightest(self, need: int) -> tuple[int, int] | None:
        """Remove and return (remaining, bin_id) with the smallest remaining >= need, or None."""
        remaining = self._first(1, 0, self.size - 1, need)
        if remaining is None:
            return None
        bin_id = self.bins[remaining].pop()
        i = remaining + self.size
        while i:
            self.count[i] -= 1
            i //= 2
        return remaining, bin_id

    def _first(self, node: int, lo: int, hi: int, need: int) -> int | None:
        # Iterative descent: leftmost non-empty leaf with index >= need.
        stack = [(node, lo, hi)]
        while stack:
            node, lo, hi = stack.pop()
            if hi < need or self.count[node] == 0:
                continue
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            stack.append((2 * node + 1, mid + 1, hi))
            stack.append((2 * node, lo, mid))
        return None


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity (longest first, tightest fit).

    Deterministic: ties are broken by example index.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an example of {int(lengths.max())} tokens exceeds the pack capacity {capacity}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    tree = _CapacityTree(capacity)
    bins: list[list[int]] = []
    for idx in order.tolist():
        n = int(lengths[idx])
        hit = tree.pop_tightest(n)
        if hit is None:
            bins.append([idx])
            remaining = capacity - n
            bin_id = len(bins) - 1
        else:
            remaining, bin_id = hit
            bins[bin_id].append(idx)
            remaining -= n
        tree.add(remaining, bin_id)
    return bins


def concat_pack(examples: Sequence[dict[str, Any]], indices: Sequence[int]) -> dict[str, list[int]]:
    """Concatenate examples into one row with per-document positions and no cross-document label."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for i in indices:
        ex = examples[i]
        n = len(ex["input_ids"])
        input_ids.extend(ex["input_ids"])
        doc_labels = list(ex["labels"])
        # HF shifts labels inside the loss: position 0 of a document would be predicted from the previous
        # document's last token. It is never a target.
        doc_labels[0] = IGNORE_INDEX
        labels.extend(doc_labels)
        position_ids.extend(range(n))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def pack_examples(
    examples: Sequence[dict[str, Any]], max_length: int, seed: int | None = None
) -> list[dict[str, list[int]]]:
    """Pack tokenized examples (`input_ids`, `labels`) into rows of at most `max_length` tokens.

    Args:
        examples: dicts with equal-length `input_ids` and `labels` lists.
        max_length: row capacity in tokens; an example longer than this is an error.
        seed: if given, the order of rows is shuffled with it (the contents stay the same).

    Returns:
        rows with `input_ids`, `labels`, `position_ids` (lists, unpadded).
    """
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(f"example {i}: input_ids and labels differ in length")
        if not ex["input_ids"]:
            raise ValueError(f"example {i} is empty")
    bins = best_fit_decreasing([len(ex["input_ids"]) for ex in examples], max_length)
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(len(bins))
        bins = [bins[i] for i in perm]
    return [concat_pack(examples, b) for b in bins]


def doc_lengths(position_ids: Sequence[int]) -> list[int]:
    """Lengths of the documents in a packed row, read off the position resets."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


def balance_step(costs: Sequence[tuple[int, int]], world_size: int, per_rank: int) -> list[list[int]]:
    """Assign one optimizer step's packs to ranks, balancing attention cost then tokens (LPT greedy).

    Args:
        costs: per pack, (attention cost = sum of squared document lengths, tokens).
        world_size: number of data-parallel ranks.
        per_rank: packs each rank must receive (micro-batch x accumulation steps).

    Returns:
        for each rank, the indices into `costs` it trains on.
    """
    assert len(costs) == world_size * per_rank, (len(costs), world_size, per_rank)
    order = sorted(range(len(costs)), key=lambda i: (-costs[i][0], -costs[i][1], i))
    load = [(0, 0)] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        rank = min((r for r in range(world_size) if len(out[r]) < per_rank), key=lambda r: (load[r], r))
        out[rank].append(i)
        load[rank] = (load[rank][0] + costs[i][0], load[rank][1] + costs[i][1])
    return out
