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


def exact_bins(lengths: np.ndarray, capacity: int, max_gap_bins: int = 20_000) -> list[list[int]]:
    """Best-fit decreasing, refined toward the lower bound ceil(sum / capacity) bins (small inputs only).

    The refinement (gap-closing swaps, then emptying the least-full bin) runs while it saves bins; it is
    skipped when more than `max_gap_bins` bins have gaps. Its steps are linear in the bins with gaps and it runs
    once per bin saved, so it is superlinear overall: `pack_plan` uses it up to `EXACT_MAX_DOCS` documents.
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


EXACT_MAX_DOCS = (
    8192  # up to here the exact search above also runs (and wins ties): small sets pack as before
)


def _bits(present: list[int]) -> int:
    """A Python int with bit L set where present[L] is non-zero (the lengths still available)."""
    return int("".join("1" if c else "0" for c in reversed(present)), 2)


def _reversed(x: int, width: int) -> int:
    return int(format(x, f"0{width}b")[::-1], 2)


def _sums(avail: int, capacity: int) -> int:
    """Bitset of the totals in [0, capacity] that the available lengths make (each any number of times)."""
    full = (1 << (capacity + 1)) - 1
    reach, a = 1, avail
    while a:
        y = a.bit_length() - 1
        a ^= 1 << y
        step = y
        while step <= capacity:  # doubling: multiples of y up to the capacity in log steps
            grown = (reach | (reach << step)) & full
            if grown == reach:
                break
            reach, step = grown, step * 2
    return reach


def fill_patterns(
    lengths: np.ndarray, capacity: int, budget: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fill one row at a time, keeping what is left of it a total the remaining lengths can still make.

    Works on the counts of each length, not on documents: a row is filled largest length first, always taking
    the largest length whose remainder is still an exact sum of available lengths (`_sums`), so rows close
    exactly full while the data allows. The same row recipe is then repeated as often as the counts allow
    (hundreds of rows at a time on real mixes), so the cost grows with the number of distinct lengths, not of
    documents. The sums are recomputed only when a recipe leaves room after some length ran out, within
    `budget` machine-word operations (default 64 n + 2^26, a few seconds at most); past it stale sums only cost
    exactness in some rows. Deterministic.

    Returns (order, starts): document indices in packed order, and where each row starts in `order`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if budget is None:
        budget = 64 * n + (1 << 26)
    words = capacity // 64 + 1
    counts = np.bincount(lengths, minlength=capacity + 1).tolist()
    avail = _bits(counts)
    reach_rev = _reversed(_sums(avail, capacity), capacity + 1)  # bit (capacity - s) set: s is a sum
    budget -= 2 * words * bin(avail).count("1")
    sums_for = avail

    def recipe_for(avail: int, reach_rev: int) -> tuple[list[int], dict[int, int], int]:
        recipe: list[int] = []
        uses: dict[int, int] = {}
        a, room = avail, capacity
        while room and a:
            fits = a & ((1 << (room + 1)) - 1)
            exact = fits & (reach_rev >> (capacity - room))  # y fits and room - y is a sum
            pick = exact or fits
            if not pick:
                break
            y = pick.bit_length() - 1
            recipe.append(y)
            uses[y] = uses.get(y, 0) + 1
            if uses[y] == counts[y]:
                a ^= 1 << y
            room -= y
        return recipe, uses, room

    recipes: list[tuple[list[int], int]] = []
    while avail:
        recipe, uses, room = recipe_for(avail, reach_rev)
        if room and avail != sums_for and budget > 0:  # stale sums may have misled this row: refresh them
            reach_rev = _reversed(_sums(avail, capacity), capacity + 1)
            budget -= 2 * words * bin(avail).count("1")
            sums_for = avail
            recipe, uses, room = recipe_for(avail, reach_rev)
        times = min(counts[y] // u for y, u in uses.items())
        for y, u in uses.items():
            counts[y] -= times * u
            if not counts[y]:
                avail ^= 1 << y
        recipes.append((recipe, times))
    # Rows -> documents: the k-th placement of length L (in row order) takes the k-th document of that length.
    per_row = np.repeat([len(r) for r, _ in recipes], [t for _, t in recipes])
    placed = (
        np.concatenate([np.tile(np.asarray(r, dtype=np.int64), t) for r, t in recipes])
        if recipes
        else lengths[:0]
    )
    by_length = np.lexsort((np.arange(n), -lengths))  # documents by length, longest first, then index
    order = np.empty(n, dtype=np.int64)
    order[np.argsort(-placed, kind="stable")] = by_length
    return order, np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)


def best_fit_counts(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing on the counts of each length: the same bins as placing documents one at a time,
    in batches (all documents of one length that go to equally full bins at once). Returns (order, starts) as
    `fill_patterns` does."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    by_length = np.lexsort((np.arange(n), -lengths))
    values, counts = np.unique(-lengths, return_counts=True)
    levels: list[list[list[int]]] = [
        [] for _ in range(capacity + 1)
    ]  # room left -> stack of [first bin, bins]
    has_room = 0
    next_bin = 0
    runs: list[tuple[int, int, int]] = []  # (first bin, bins, documents each): in placement order
    for size, left in zip((-values).tolist(), counts.tolist()):
        while left:
            fits = has_room >> size
            if fits:  # the tightest bins that still fit one more
                room = size + (fits & -fits).bit_length() - 1
                stack = levels[room]
                first, k = stack[-1]
                each = room // size
                full = min(left // each, k)
                rest = left - full * each if full < k else 0
                used = full + (1 if rest else 0)
                if used == k:
                    stack.pop()
                    if not stack:
                        has_room ^= 1 << room
                else:
                    stack[-1] = [first + used, k - used]
            else:  # new bins
                room, first = capacity, next_bin
                each = capacity // size
                full, rest = divmod(left, each)
                next_bin += full + (1 if rest else 0)
            for start, bins, per in ((first, full, each), (first + full, 1 if rest else 0, rest)):
                if bins:
                    runs.append((start, bins, per))
                    after = room - per * size
                    if after:
                        levels[after].append([start, bins])
                        has_room |= 1 << after
                    left -= bins * per
    first, bins, per = (np.asarray(c, dtype=np.int64) for c in zip(*runs)) if runs else (lengths[:0],) * 3
    ends = np.cumsum(bins)
    bin_ids = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - bins - first, bins)
    bin_of_sorted = np.repeat(bin_ids, np.repeat(per, bins))
    order = by_length[np.argsort(bin_of_sorted, kind="stable")]
    sizes = np.bincount(bin_of_sorted, minlength=next_bin)
    return order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _plan_of(bins: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64)
    return order, np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)


def pack_plan(lengths: Sequence[int] | np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole documents into rows of at most `capacity` tokens, in as few rows as we can find quickly.

    Returns (order, starts): document indices in packed order, and the row boundaries in `order` (row r holds
    `order[starts[r]:starts[r + 1]]`). The fewest rows of `fill_patterns` and `best_fit_counts` (both
    O(n log n), a few seconds for 10M documents), and for up to `EXACT_MAX_DOCS` documents also of the exact
    search (`exact_bins`), which wins ties so that small sets pack exactly as they always have. Deterministic.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an example of {int(lengths.max())} tokens exceeds the pack capacity {capacity}")
    if len(lengths) and lengths.min() <= 0:
        raise ValueError(f"example {int(np.argmin(lengths))} is empty")
    if not len(lengths):
        return lengths[:0], np.zeros(1, dtype=np.int64)
    plans = [fill_patterns(lengths, capacity)]
    if len(lengths) <= EXACT_MAX_DOCS:
        plans.insert(0, _plan_of(exact_bins(lengths, capacity)))
    else:
        plans.append(best_fit_counts(lengths, capacity))
    return min(plans, key=lambda p: len(p[1]))  # the first of the fewest rows


def pack_bins(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """`pack_plan` as a list of rows, each a list of document indices."""
    order, starts = pack_plan(lengths, capacity)
    return [order[a:b].tolist() for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]


def lower_bound_rows(lengths: np.ndarray, capacity: int) -> int:
    """Rows no packing can beat: ceil(tokens / capacity), and a document too long to share a row with even the
    shortest one has a row to itself."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return 0
    alone = lengths > capacity - lengths.min()
    if alone.all():
        return len(lengths)
    return int(alone.sum()) + int(-(-int(lengths[~alone].sum()) // capacity))


HASH_CHUNK = 1 << 24  # elements per digest update: hashing never copies a whole array


def rows_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 of (input_ids, labels, position_ids as int32, offsets as int64), read in slices."""
    h = hashlib.sha256()
    for a, dtype in zip(arrays, (np.int32, np.int32, np.int32, np.int64)):
        for s in range(0, len(a), HASH_CHUNK):
            h.update(np.ascontiguousarray(a[s : s + HASH_CHUNK], dtype=dtype).data)
    return h.hexdigest()[:16]


def position_checksum(ids: np.ndarray, positions: np.ndarray) -> int:
    """sum(id x (position in its document + 1)): equal for a conversation encoded and the same tokens written
    into packed rows only if every token landed, once, at its own position (a plain sum misses swaps)."""
    return int(np.dot(ids.astype(np.int64), positions.astype(np.int64) + 1))


class OffsetSequence(Sequence):
    """A sequence whose item i lives between `offsets[i]` and `offsets[i + 1]` of some storage: `_item(a, b)` reads
    it. Slices give lists; negative indices count from the end."""

    offsets: Any

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(int(self.offsets[i]), int(self.offsets[i + 1]))

    def _item(self, a: int, b: int) -> Any:
        raise NotImplementedError


class PackedRows(OffsetSequence):
    """Packed rows stored flat (all rows end to end, plus row offsets), as in an Arrow list column.

    `rows[i]` is one row as plain lists: `{"input_ids", "labels", "position_ids"}`. The arrays may be memory-mapped
    (`launcher.data.store`); `docs` (document lengths in row order), `digest` and `trained` are then read from the
    cache's index, so no rank scans the token arrays for them.
    """

    def __init__(
        self,
        input_ids: np.ndarray,
        labels: np.ndarray,
        position_ids: np.ndarray,
        offsets: np.ndarray,
        docs: np.ndarray | None = None,
        digest: str | None = None,
        trained: int | None = None,
    ):
        assert len(input_ids) == len(labels) == len(position_ids) == offsets[-1], "ragged arrays disagree"
        assert docs is None or int(np.sum(docs, dtype=np.int64)) == offsets[-1], "document lengths disagree"
        self.input_ids, self.labels, self.position_ids, self.offsets = (
            input_ids,
            labels,
            position_ids,
            offsets,
        )
        self.docs, self._digest, self._trained = docs, digest, trained

    def _item(self, a: int, b: int) -> dict:
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
        files it came from live. Computed once when the cache is written (about 1 s per GB)."""
        if self._digest is None:
            self._digest = rows_digest((self.input_ids, self.labels, self.position_ids, self.offsets))
        return self._digest

    @property
    def num_trained(self) -> int:
        if self._trained is None:
            self._trained = int(np.count_nonzero(self.labels != IGNORE_INDEX))
        return self._trained

    def doc_lengths(self) -> np.ndarray:
        """Lengths of all documents, in row order."""
        if self.docs is None:
            starts = np.flatnonzero(self.position_ids == 0)
            self.docs = np.diff(np.append(starts, len(self.position_ids)))
        return self.docs

    def costs(self) -> list[tuple[int, int]]:
        """Per row: (attention cost = sum of squared document lengths, tokens)."""
        lengths = np.asarray(self.doc_lengths(), dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        row_of_doc = np.searchsorted(self.offsets, starts, side="right") - 1
        attn = np.bincount(row_of_doc, weights=lengths.astype(np.float64) ** 2, minlength=len(self))
        tokens = np.diff(self.offsets)
        return [(int(a), int(t)) for a, t in zip(attn, tokens)]

    def to_lists(self) -> list[dict[str, list[int]]]:
        return [self[i] for i in range(len(self))]


def shuffle_rows(order: np.ndarray, starts: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same rows in a seeded random order (their contents unchanged)."""
    sizes = np.diff(starts)
    perm = np.random.default_rng(seed).permutation(len(sizes))
    new_sizes = sizes[perm]
    new_starts = np.concatenate([[0], np.cumsum(new_sizes)]).astype(np.int64)
    take = np.arange(int(new_starts[-1])) - np.repeat(new_starts[:-1] - starts[:-1][perm], new_sizes)
    return order[take], new_starts


def pack_arrays(
    input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], max_length: int, seed: int | None = None
) -> PackedRows:
    """Pack many (input_ids, labels) arrays held in memory; see `pack_examples`."""
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    order, starts = pack_plan(lengths, max_length)
    if seed is not None:
        order, starts = shuffle_rows(order, starts, seed)
    order_l = order.tolist()
    docs = lengths[order]
    offsets = np.cumsum(np.concatenate([[0], docs]))[starts].astype(np.int64)
    ids = (
        np.concatenate([input_ids[i] for i in order_l]).astype(np.int32, copy=False)
        if order_l
        else np.zeros(0, np.int32)
    )
    labs = (
        np.concatenate([labels[i] for i in order_l]).astype(np.int32, copy=True)
        if order_l
        else np.zeros(0, np.int32)
    )
    doc_starts = np.cumsum(docs) - docs
    # HF shifts labels inside the loss: position 0 of a document would be predicted from the previous
    # document's last token. It is never a target.
    labs[doc_starts] = IGNORE_INDEX
    positions = (np.arange(len(ids), dtype=np.int64) - np.repeat(doc_starts, docs)).astype(np.int32)
    return PackedRows(ids, labs, positions, offsets, docs=docs.astype(np.int32))


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
