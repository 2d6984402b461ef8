"""Prepared data on disk: encoded parts written as chunks arrive, packed rows gathered from them, memory-mapped.

    part = PartWriter(dir, keep_messages); part.add(chunk_result) ...; part.finish(counts)
    index = write_rows(out_dir, parts, doc_part, doc_start, doc_len, row_starts)
    rows = load_rows(out_dir)          # PackedRows over np.load(..., mmap_mode="r"): no copy per rank

Layout (Megatron's indexed dataset: token ids in one flat binary file, an index of offsets, memory-mapped):
- an encoded part (one source, one shard): `ids.bin` (int32 token ids of every encoded conversation, end to
  end), `mask.bin` (uint8, 1 where the token is trained), one flat file per candidate column (`hashes.bin`,
  `status.bin`, `lengths.bin`, ...: one entry per conversation that reached the duplicate check),
  `messages.bin` + `message_sizes.bin` (JSON of each conversation, for eval sources only) and `report.json`
  (counts; written last, so a part without it is incomplete).
- packed rows (`train/`, `eval/`): `input_ids.npy`, `labels.npy`, `position_ids.npy` (int32, all rows end to
  end), `offsets.npy` (int64 row starts), `docs.npy` (int32 document lengths in row order) and `index.json`
  (rows, tokens, trained tokens, digest, checksum). Plain .npy files: `np.load(path, mmap_mode="r")` reads them.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.packing import OffsetSequence, PackedRows, position_checksum
from launcher.data.template import IGNORE_INDEX

# One entry per candidate conversation (see launcher.data.encode.ChunkResult), with its dtype.
CANDIDATE_COLUMNS = {
    "hashes": np.uint64,
    "status": np.uint8,
    "lengths": np.int32,
    "trained": np.int32,
    "truncated": np.uint8,
    "lost": np.int32,
    "id_sums": np.int64,
}
GATHER_TOKENS = 1 << 22  # tokens gathered per step when writing packed rows (a few tens of MB of buffers)
# Documents gathered per step: each document read through a memory map faults in the pages around it too
# (the kernel's fault-around, 64 KiB windows, whatever madvise says), so the mapped pages resident between two
# releases grow with the documents, not the tokens: 2048 documents keep them to a few hundred MiB at any size
# (at most two windows per document in each of the ids and mask maps).
GATHER_DOCS = 2048
READ_BYTES = 1 << 24


class PartWriter:
    """Appends chunk results to an encoded part's files as they arrive (nothing is kept in memory); `finish`
    writes `report.json`, after which the part is complete."""

    def __init__(self, path: Path, keep_messages: bool):
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        names = ("ids", "mask", *CANDIDATE_COLUMNS)
        assert len(set(names)) == len(names), "two columns would share a file"
        self.files = {k: (path / f"{k}.bin").open("wb") for k in names}
        if keep_messages:
            self.files["messages"] = (path / "messages.bin").open("wb")
            self.files["message_sizes"] = (path / "message_sizes.bin").open("wb")
        self.tokens = self.length_sum = 0

    def _put(self, name: str, a: np.ndarray, dtype: Any) -> None:
        self.files[name].write(np.ascontiguousarray(a, dtype=dtype).data)

    def add(self, result: Any) -> None:
        self._put("ids", result.ids, np.int32)
        self._put("mask", result.mask, np.uint8)
        for k, dtype in CANDIDATE_COLUMNS.items():
            self._put(k, getattr(result, k), dtype)
        self.tokens += len(result.ids)
        self.length_sum += int(result.lengths.sum())
        if "messages" in self.files:
            sizes = np.zeros(len(result.lengths), np.int64)
            sizes[result.lengths > 0] = [len(m) for m in result.messages]
            self._put("message_sizes", sizes, np.int64)
            for m in result.messages:
                self.files["messages"].write(m)

    def finish(self, counts: dict[str, Any]) -> None:
        for f in self.files.values():
            f.close()
        assert self.length_sum == self.tokens, "part tokens disagree with their lengths"
        (self.path / "report.json").write_text(json.dumps(counts))


class _Mapped:
    """A read-only memory map of a flat file as a NumPy array; `release` drops its pages from this process's
    resident set (the page cache keeps them), so gathering from it never grows RSS by the file's size."""

    def __init__(self, path: Path, dtype: Any):
        self.file = path.open("rb")
        size = os.fstat(self.file.fileno()).st_size
        self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.array = np.frombuffer(self.map, dtype=dtype) if self.map is not None else np.zeros(0, dtype)

    def release(self) -> None:
        if self.map is not None and hasattr(self.map, "madvise"):
            self.map.madvise(mmap.MADV_DONTNEED)


class EncodedPart:
    """An encoded part read back: the per-candidate columns in memory (a few tens of bytes per conversation),
    the tokens memory-mapped on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.columns = {
            k: np.fromfile(path / f"{k}.bin", dtype=dtype) for k, dtype in CANDIDATE_COLUMNS.items()
        }
        self.counts = json.loads((path / "report.json").read_text())
        lengths = self.columns["lengths"].astype(np.int64)
        self.starts = np.cumsum(lengths) - lengths  # token offset of each candidate (OK ones have tokens)
        self.n = len(lengths)
        self._maps: tuple[_Mapped, _Mapped] | None = None

    def __len__(self) -> int:
        return self.n

    def maps(self) -> tuple[_Mapped, _Mapped]:
        if self._maps is None:
            self._maps = (
                _Mapped(self.path / "ids.bin", np.int32),
                _Mapped(self.path / "mask.bin", np.uint8),
            )
        return self._maps

    def messages(self, candidates: np.ndarray) -> list[bytes]:
        sizes = np.fromfile(self.path / "message_sizes.bin", dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        with (self.path / "messages.bin").open("rb") as f:
            out = []
            for k in candidates.tolist():
                f.seek(int(offsets[k]))
                out.append(f.read(int(offsets[k + 1] - offsets[k])))
        return out

    def release(self) -> None:
        if self._maps is not None:
            for m in self._maps:
                m.release()


def is_complete(path: Path) -> bool:
    return (path / "report.json").exists()


def _npy_writer(path: Path, dtype: Any, n: int) -> Any:
    f = path.open("wb")
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
    )
    return f


def _aranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[i], starts[i] + lengths[i])."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) + np.repeat(
        starts - (ends - lengths), lengths
    )


def _blocks(ends: np.ndarray) -> Iterator[tuple[int, int]]:
    """Documents [d, e) of at most GATHER_TOKENS tokens and GATHER_DOCS documents each (at least one document),
    given their cumulative ends."""
    d = 0
    while d < len(ends):
        e = max(d + 1, int(np.searchsorted(ends, (ends[d - 1] if d else 0) + GATHER_TOKENS, side="right")))
        e = min(e, d + GATHER_DOCS)
        yield d, e
        d = e


def write_rows(
    out: Path,
    parts: Sequence[EncodedPart],
    doc_part: np.ndarray,
    doc_start: np.ndarray,
    doc_len: np.ndarray,
    row_starts: np.ndarray,
    progress: Any = None,
) -> dict[str, Any]:
    """Write packed rows: documents (part, token offset, length) in packed order, rows at `row_starts` (indices
    into the documents). Tokens are gathered from the parts' memory maps a few million at a time; a document's
    first label is never a target and its positions restart at 0. Returns the index (also `index.json`)."""
    out.mkdir(parents=True, exist_ok=True)
    doc_len = np.asarray(doc_len, dtype=np.int64)
    ends = np.cumsum(doc_len)
    total = int(ends[-1]) if len(ends) else 0
    offsets = np.concatenate([[0], ends])[row_starts].astype(np.int64)
    np.save(out / "offsets.npy", offsets)
    np.save(out / "docs.npy", doc_len.astype(np.int32))
    files = {
        k: _npy_writer(out / f"{k}.npy", np.int32, total) for k in ("input_ids", "labels", "position_ids")
    }
    h_ids = hashlib.sha256()
    trained = ids_sum = 0
    for d, e in _blocks(ends):
        lens = doc_len[d:e]
        starts = np.cumsum(lens) - lens
        n = int(lens.sum())
        ids = np.empty(n, np.int32)
        mask = np.empty(n, np.uint8)
        for p in np.unique(doc_part[d:e]).tolist():
            sel = doc_part[d:e] == p
            src = _aranges(doc_start[d:e][sel], lens[sel])
            dst = _aranges(starts[sel], lens[sel])
            part_ids, part_mask = parts[p].maps()
            ids[dst] = part_ids.array[src]
            mask[dst] = part_mask.array[src]
            parts[p].release()
        labels = np.where(mask.astype(bool), ids, np.int32(IGNORE_INDEX)).astype(np.int32)
        # HF shifts labels inside the loss: position 0 of a document would be predicted from the previous
        # document's last token. It is never a target.
        labels[starts] = IGNORE_INDEX
        positions = (np.arange(n, dtype=np.int64) - np.repeat(starts, lens)).astype(np.int32)
        files["input_ids"].write(ids.data)
        files["labels"].write(labels.data)
        files["position_ids"].write(positions.data)
        h_ids.update(ids.data)
        trained += int(np.count_nonzero(labels != IGNORE_INDEX))
        ids_sum += position_checksum(ids, positions)
        if progress is not None:
            progress.advance(tokens=n)
    for f in files.values():
        f.close()
    # The digest is PackedRows.digest(): sha256 over input_ids, labels, position_ids, offsets, in that order.
    # input_ids were hashed as written; labels are read back once; positions are recomputed.
    h = h_ids
    _hash_npy(out / "labels.npy", h)
    for d, e in _blocks(ends):  # bounded by tokens: 10M documents' positions at once would be tens of GB
        lens = doc_len[d:e]
        starts = np.cumsum(lens) - lens
        h.update((np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(starts, lens)).astype(np.int32).data)
    h.update(offsets.data)
    index = {
        "rows": len(offsets) - 1,
        "documents": len(doc_len),
        "tokens": total,
        "trained": trained,
        "digest": h.hexdigest()[:16],
        "ids_sum": ids_sum,
    }
    (out / "index.json").write_text(json.dumps(index))
    return index


def _hash_npy(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        assert version == (1, 0), version
        np.lib.format.read_array_header_1_0(f)
        buf = bytearray(READ_BYTES)
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])


def load_rows(path: Path) -> PackedRows:
    """Packed rows, memory-mapped: ranks share the page cache, nothing is read into RAM up front."""
    if not (path / "index.json").exists():  # nothing stored (no eval set): no rows
        return PackedRows(*(np.zeros(0, np.int32) for _ in range(3)), np.zeros(1, np.int64))
    index = json.loads((path / "index.json").read_text())
    arrays = [
        np.load(path / f"{k}.npy", mmap_mode="r") if index["tokens"] else np.zeros(0, np.int32)
        for k in ("input_ids", "labels", "position_ids")
    ]
    return PackedRows(
        *arrays,
        np.load(path / "offsets.npy"),
        docs=np.load(path / "docs.npy"),
        digest=index["digest"],
        trained=index["trained"],
    )


class JsonLines(OffsetSequence):
    """A list of JSON values stored one per line, read on demand (`eval_conversations`: usually only the first
    few hundred are generated from). The file stays open, so it outlives its directory."""

    def __init__(self, path: Path):
        self.offsets = np.load(path.with_suffix(".offsets.npy")) if path.exists() else np.zeros(1, np.int64)
        self.file = path.open("rb") if path.exists() else None

    @staticmethod
    def write(path: Path, items: Sequence[bytes]) -> None:
        sizes = [len(b) + 1 for b in items]
        with path.open("wb") as f:
            for b in items:
                f.write(b + b"\n")
        np.save(path.with_suffix(".offsets.npy"), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    def _item(self, a: int, b: int) -> Any:
        return json.loads(os.pread(self.file.fileno(), b - a, a))

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented
