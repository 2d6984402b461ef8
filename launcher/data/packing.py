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


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity (longest first, tightest fit).

    Bins are kept by remaining capacity; a Python int is the bitset of capacities that have an open bin, so
    "tightest bin that still fits" is one shift and a lowest-set-bit: O(capacity / 64) word operations.
    Deterministic: ties are broken by example index, and among equally tight bins the last one opened.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an example of {int(lengths.max())} tokens exceeds the pack capacity {capacity}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    open_bins: list[list[int]] = [[] for _ in range(capacity + 1)]  # remaining capacity -> bin ids
    has_open = 0  # bit r set <=> open_bins[r] is non-empty
    bins: list[list[int]] = []
    for idx, need in zip(order.tolist(), lengths[order].tolist()):
        fits = has_open >> need
        if fits:
            remaining = need + (fits & -fits).bit_length() - 1  # lowest set bit: the tightest fit
            stack = open_bins[remaining]
            bin_id = stack.pop()
            if not stack:
                has_open ^= 1 << remaining
            bins[bin_id].append(idx)
        else:
            bin_id, remaining = len(bins), capacity
            bins.append([idx])
        remaining -= need
        if remaining:
            open_bins[remaining].append(bin_id)
            has_open |= 1 << remaining
    return bins


class PackedRows(Sequence):
    """Packed rows stored flat (all rows end to end, plus row offsets), as in an Arrow list column.

    `rows[i]` is one row as plain lists: `{"input_ids", "labels", "position_ids"}`.
    """

    def __init__(
        self, input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, offsets: np.ndarray
    ):
        assert len(input_ids) == len(labels) == len(position_ids) == offsets[-1], "ragged arrays disagree"
        self.input_ids, self.labels, self.position_ids, self.offsets = (
            input_ids,
            labels,
            position_ids,
            offsets,
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "input_ids": self.input_ids[a:b].tolist(),
            "labels": self.labels[a:b].tolist(),
            "position_ids": self.position_ids[a:b].tolist(),
        }

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedRows):
            return all(
                np.array_equal(getattr(self, k), getattr(other, k))
                for k in ("input_ids", "labels", "position_ids", "offsets")
            )
        return list(self) == other

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_trained(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))

    def costs(self) -> list[tuple[int, int]]:
        """Per row: (attention cost = sum of squared document lengths, tokens)."""
        starts = np.flatnonzero(self.position_ids == 0)
        lengths = np.diff(np.append(starts, len(self.position_ids)))
        row_of_doc = np.searchsorted(self.offsets, starts, side="right") - 1
        attn = np.bincount(row_of_doc, weights=lengths.astype(np.float64) ** 2, minlength=len(self))
        tokens = np.diff(self.offsets)
        return [(int(a), int(t)) for a, t in zip(attn, tokens)]

    def to_lists(self) -> list[dict[str, list[int]]]:
        return [self[i] for i in range(len(self))]


def pack_arrays(
    input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], max_length: int, seed: int | None = None
) -> PackedRows:
    """Best-fit-decreasing pack of many (input_ids, labels) arrays; see `pack_examples`."""
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    if len(lengths) and lengths.min() == 0:
        raise ValueError(f"example {int(np.argmin(lengths))} is empty")
    bins = best_fit_decreasing(lengths, max_length)
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(len(bins))
        bins = [bins[i] for i in perm]
    order = [i for b in bins for i in b]
    docs = lengths[order]
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([int(lengths[b].sum()) for b in bins])
    ids = (
        np.concatenate([input_ids[i] for i in order]).astype(np.int32, copy=False)
        if order
        else np.zeros(0, np.int32)
    )
    labs = (
        np.concatenate([labels[i] for i in order]).astype(np.int32, copy=True)
        if order
        else np.zeros(0, np.int32)
    )
    doc_starts = np.cumsum(docs) - docs
    # HF shifts labels inside the loss: position 0 of a document would be predicted from the previous
    # document's last token. It is never a target.
    labs[doc_starts] = IGNORE_INDEX
    positions = (np.arange(len(ids), dtype=np.int64) - np.repeat(doc_starts, docs)).astype(np.int32)
    return PackedRows(ids, labs, positions, offsets)


def pack_examples(
    examples: Sequence[dict[str, Any]], max_length: int, seed: int | None = None
) -> list[dict[str, list[int]]]:
    """Pack tokenized examples (`input_ids`, `labels`) into rows of at most `max_length` tokens.

    Args:
        examples: dicts with equal-length `input_ids` and `labels` (lists or arrays).
        max_length: row capacity in tokens; an example longer than this is an error.
        seed: if given, the order of rows is shuffled with it (the contents stay the same).

    Returns:
        rows with `input_ids`, `labels`, `position_ids` (lists, unpadded).
    """
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(f"example {i}: input_ids and labels differ in length")
        if not len(ex["input_ids"]):
            raise ValueError(f"example {i} is empty")
    ids = [np.asarray(ex["input_ids"], dtype=np.int64) for ex in examples]
    labels = [np.asarray(ex["labels"], dtype=np.int64) for ex in examples]
    return pack_arrays(ids, labels, max_length, seed).to_lists()


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
