"""Best-fit-decreasing packing of whole conversations into fixed-capacity rows, and rank balancing.

    rows = pack_examples(examples, max_length=2048)

Every example lands in exactly one row, contiguous and never split. Inside a row, `position_ids` restart at 0
for each document and the label of each document's first token is -100, so no document is trained to
continue the one before it. Pure Python/NumPy: no torch, no distributed state.
"""

from __future__ import annotations

import hashlib
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


def refine_bins(
    bins: list[list[int]], lengths: np.ndarray, capacity: int, rounds: int = 20
) -> list[list[int]]:
    """Close the small gaps best-fit leaves, then repack what was set aside: fewer bins, same items.

    Best-fit decreasing leaves most bins a few tokens short; no whole conversation fits those gaps, so it
    cannot do better by itself. Here the least-full bins are emptied into a bank, and every other bin with a
    gap swaps one of its items for a bank item longer by up to the gap (exactly the gap when the bank has
    it). Bins fill up, the bank shrinks, and the bank is repacked best-fit. Deterministic; a round that neither
    saves a bin nor gathers the free space into fewer bins is discarded, and the search stops.
    """
    lengths_l = lengths.tolist()
    for _ in range(rounds):
        total = sum(lengths_l[i] for b in bins for i in b)
        lower = -(-total // capacity)
        excess = len(bins) - lower
        if excess <= 0:
            break
        load = [sum(lengths_l[i] for i in b) for b in bins]
        order = sorted(range(len(bins)), key=lambda j: (load[j], j))
        n_bank = min(len(bins), 4 * excess + 12)
        bank_ids, keep_ids = order[:n_bank], sorted(order[n_bank:])
        bank: dict[int, list[int]] = {}
        for j in bank_ids:
            for i in bins[j]:
                bank.setdefault(lengths_l[i], []).append(i)
        kept = [list(bins[j]) for j in keep_ids]
        for b in kept:
            gap = capacity - sum(lengths_l[i] for i in b)
            while gap > 0:
                swap = None
                for d in range(gap, 0, -1):  # the largest gain first: d == gap fills the bin exactly
                    for pos, i in enumerate(b):
                        if bank.get(lengths_l[i] + d):
                            swap = pos, i, d
                            break
                    if swap:
                        break
                if swap is None:
                    break
                pos, i, d = swap
                b[pos] = bank[lengths_l[i] + d].pop()
                bank.setdefault(lengths_l[i], []).append(i)
                gap -= d
        rest = sorted(i for items in bank.values() for i in items)
        repacked = [[rest[k] for k in b] for b in best_fit_decreasing([lengths_l[i] for i in rest], capacity)]
        candidate = kept + repacked
        # Better = fewer bins, else slack gathered into fewer bins (sum of squared loads up): that is what lets
        # a later round empty one more bin.
        score = (-len(candidate), sum(sum(lengths_l[i] for i in b) ** 2 for b in candidate))
        if score <= (-len(bins), sum(x * x for x in load)):
            break
        bins = candidate
    return bins


def drain_emptiest(bins: list[list[int]], lengths: list[int], capacity: int) -> list[list[int]] | None:
    """Empty the least-full bin into the others' gaps, or None when it cannot be done.

    Gaps left after `refine_bins` are mostly smaller than the shortest conversation, so the emptiest bin's
    items are placed in two kinds of steps: (1) its longest item that fits a gap goes into the tightest gap
    that holds it; (2) otherwise two bins with gaps swap items so that one becomes exactly full and the
    other's gap grows by as much (the largest gap grows first), until an item fits. Every step either places
    an item or makes a bin full, so it ends.
    """
    load = [sum(lengths[i] for i in b) for b in bins]
    e = min(range(len(bins)), key=lambda j: (load[j], j))
    todo = sorted(bins[e], key=lambda i: (-lengths[i], i))
    others = [list(b) for j, b in enumerate(bins) if j != e]
    gap = [capacity - x for j, x in enumerate(load) if j != e]
    if sum(lengths[i] for i in todo) > sum(gap):
        return None
    while todo:
        holes = sorted((g, j) for j, g in enumerate(gap) if g > 0)
        placed = False
        for k, x in enumerate(todo):
            fit = next((j for g, j in holes if g >= lengths[x]), None)
            if fit is not None:
                others[fit].append(todo.pop(k))
                gap[fit] -= lengths[x]
                placed = True
                break
        if placed:
            continue
        index: dict[int, list[tuple[int, int]]] = {}
        for _, j in holes:
            for pos, i in enumerate(others[j]):
                index.setdefault(lengths[i], []).append((j, pos))
        swap = None
        for g, a in holes:
            for pa, ia in enumerate(others[a]):
                for b, pb in index.get(lengths[ia] + g, ()):
                    if b != a and (swap is None or gap[b] > gap[swap[2]]):
                        swap = (a, pa, b, pb)
            if swap:
                break
        if swap is None:
            # No exact fill: move part of a small gap into a bin whose gap is at least as large. The sum of
            # squared gaps grows with every such move, so this cannot cycle either.
            best = None
            for g, a in holes:
                for pa, ia in enumerate(others[a]):
                    for d in range(g - 1, 0, -1):
                        for b, pb in index.get(lengths[ia] + d, ()):
                            if b != a and gap[b] >= g and (best is None or (d, gap[b]) > best[0]):
                                best = ((d, gap[b]), (a, pa, b, pb))
                if best:
                    break
            swap = best[1] if best else None
        if swap is None:
            return None
        a, pa, b, pb = swap
        moved = lengths[others[b][pb]] - lengths[others[a][pa]]
        others[a][pa], others[b][pb] = others[b][pb], others[a][pa]
        gap[a] -= moved
        gap[b] += moved
    return others


def pack_bins(lengths: np.ndarray, capacity: int, max_gap_bins: int = 20_000) -> list[list[int]]:
    """Best-fit decreasing, refined toward the lower bound ceil(sum / capacity) bins.

    The refinement (gap-closing swaps, then emptying the least-full bin) runs while it saves bins; it is
    skipped when more than `max_gap_bins` bins have gaps (its steps are linear in them).
    """
    bins = best_fit_decreasing(lengths, capacity)
    lengths_l = lengths.tolist()
    lower = -(-sum(lengths_l) // capacity)
    if len(bins) <= lower:
        return bins
    bins = refine_bins(bins, lengths, capacity)
    while len(bins) > lower:
        if sum(1 for b in bins if sum(lengths_l[i] for i in b) < capacity) > max_gap_bins:
            break
        drained = drain_emptiest(bins, lengths_l, capacity)
        if drained is None:
            break
        bins = drained
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

    def digest(self) -> str:
        """Content hash of the rows (tokens, labels, row boundaries): what the run trains on, wherever the
        files it came from live. Reads the memory-mapped arrays once (about 1 s per GB)."""
        h = hashlib.sha256()
        for a in (self.input_ids, self.labels, self.position_ids, self.offsets):
            h.update(np.ascontiguousarray(a, dtype=np.int64 if a is self.offsets else np.int32).tobytes())
        return h.hexdigest()[:16]

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
    bins = pack_bins(lengths, max_length)
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
