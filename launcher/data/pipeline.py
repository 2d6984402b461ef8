"""The data stage of a run: sources -> filtered messages -> tokens + masks -> packed rows, cached by content.

    prepared = cached_prepare(cfg.data, tokenizer, chat_template, cache_dir, build=True)
    prepared.train_rows, prepared.eval_rows, prepared.report

It streams, in bounded memory: sources are read in blocks, encoded by a pool of `data.num_proc` processes
(`launcher.data.encode`) and written to an encoded part on disk as results arrive, in file order. Then, from
the per-conversation columns alone (lengths, duplicate keys, statuses: a few bytes per conversation), the
duplicates, drops, eval split and mixture are decided, the rows are packed (`launcher.data.packing.pack_plan`)
and written by gathering tokens from the memory-mapped parts (`launcher.data.store`). Ranks memory-map the
result.

Across nodes, `sft prepare --shard i/N` encodes shard i of every source (JSON Lines by byte range, other
sources whole, dealt round-robin) into `<cache_dir>/prepared-<hash>.shards/`; the next `sft prepare` (or the
training job's first rank per node) merges the shards, preparing any missing one itself. Everything here is
deterministic for a seed and free of torch.distributed: the caller decides which rank builds the cache (see
`launcher.run.build_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from launcher.data import sources as src_io
from launcher.data.encode import (
    OK,
    STATUS_REASON,
    ChunkRunner,
    JsonlBlock,
    RowsBlock,
    SourceSpec,
    default_num_proc,
    encode_chunk,
)
from launcher.data.packing import lower_bound_rows, pack_plan
from launcher.data.sources import (
    RowError,
    SourceReport,
    detect_format,
    passes_filters,
    read_rows,
    sample_positions,
    source_name,
)
from launcher.data.store import EncodedPart, JsonLines, PartWriter, load_rows, write_rows
from launcher.data.template import IGNORE_INDEX

# 5: streamed preparation; rows as flat memory-mapped .npy files; counts-based packing beyond 8192 conversations
CACHE_VERSION = 6
ROWS_PER_CHUNK = (
    1024  # rows per chunk for sources that are not JSON Lines (JSON arrays, CSV, parquet, datasets)
)


@dataclass
class Prepared:
    train_rows: Any  # PackedRows
    eval_rows: Any
    eval_conversations: Sequence[list[dict[str, Any]]]
    report: dict[str, Any]


# ---- progress ----


class Progress:
    """One status line on stderr: rows/s and tokens/s while encoding, then packing and writing. On a terminal
    it is redrawn in place twice a second; in a log file a line is written every 30 s (none for a preparation
    shorter than that)."""

    def __init__(self, enabled: bool, stream: Any = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self.every = 0.5 if self.tty else 30.0
        self.stage, self.total, self.unit = "", 0, "bytes"
        self.rows = self.tokens = self.bytes = 0
        self.start = self.last = time.perf_counter()

    def begin(self, stage: str, total: int = 0, unit: str = "bytes") -> None:
        self.done()  # on a terminal the finished stage's last figures stay on screen
        self.stage, self.total, self.unit = stage, total, unit
        self.rows = self.tokens = self.bytes = 0
        self.start = time.perf_counter()

    def advance(self, rows: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        s = max(now - self.start, 1e-9)
        done = getattr(self, self.unit)
        pct = f" {100 * done / self.total:3.0f}%" if self.total else ""
        line = (
            f"data: {self.stage}{pct} | {self.rows:,} rows, {self.rows / s:,.0f} rows/s | "
            f"{self.tokens:,} tokens, {self.tokens / s:,.0f} tokens/s | {s:,.0f} s"
        )
        self.stream.write(("\r" + line + "\033[K" + end) if self.tty else line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and (self.rows or self.tokens):
            self._draw(time.perf_counter(), "\n")
            self.rows = self.tokens = 0


def tell(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- what to encode ----


def _all_sources(data_cfg: Any) -> list[tuple[Any, bool]]:
    """(source, is eval) for every source, training sources first: the order parts are numbered in."""
    return [(s, bool(s.eval)) for s in data_cfg.sources] + [(s, True) for s in data_cfg.eval_sources]


def _split_needed(data_cfg: Any) -> bool:
    has_eval = any(is_eval for _, is_eval in _all_sources(data_cfg))
    return not has_eval and bool(data_cfg.eval_size or data_cfg.eval_fraction)


def _is_jsonl(src: Any) -> bool:
    p = Path(str(src.path)).expanduser()
    return p.is_file() and p.suffix.lower() == ".jsonl"


def _first_rows(src: Any, on_error: str) -> Iterator[tuple[int, str, dict]]:
    """(position, location, row) from the start of a source, as the workers will number them."""
    if _is_jsonl(src):
        path = Path(str(src.path)).expanduser()
        scratch = SourceReport("")
        for offset, lineno, data in src_io.jsonl_blocks(path, block_bytes=1 << 16):
            yield from src_io.parse_jsonl_block(path, data, offset, lineno, on_error, scratch)
    else:
        for i, (where, row) in enumerate(read_rows(src, on_error, SourceReport(""))):
            yield i, where, row


def _detected(src: Any, on_error: str) -> tuple[int, str] | None:
    """(position, format) of the row whose columns decide the source's format: the first that passes the
    filters and is recognised. None when there is none, or when a row before it will raise (on_error=raise)."""
    if src.format.value != "auto":
        return None
    try:
        for pos, _, row in _first_rows(src, on_error):
            if passes_filters(row, src):
                continue
            try:
                return pos, detect_format(row, dict(src.columns))
            except RowError:
                if on_error != "skip":
                    return None
    except (RowError, ValueError):  # a bad line: the worker that reads it says where
        return None
    return None


def _flat_oasst(src: Any) -> bool:
    """A flat OpenAssistant message table is assembled into trees first: read it as rows."""
    if src.format.value not in ("auto", "oasst"):
        return False
    try:
        first = next(_first_rows(src, "skip"), None)
    except (RowError, ValueError):
        return False
    return first is not None and src_io._is_flat_oasst(first[2])


def _spec(src: Any, data_cfg: Any, keep_messages: bool) -> SourceSpec:
    on_error = data_cfg.on_error.value
    return SourceSpec(
        name=source_name(src),
        fmt=None if src.format.value == "auto" else src.format.value,
        detected=_detected(src, on_error),
        columns=dict(src.columns),
        include={k: list(v) for k, v in src.include.items()},
        exclude={k: list(v) for k, v in src.exclude.items()},
        tree_paths=src.tree_paths.value,
        system_prompt=src.system_prompt.value,
        max_turns=src.max_turns,
        max_tokens=src.max_tokens,
        on_error=on_error,
        keep_messages=keep_messages,
    )


def _payloads(
    src: Any, k: int, shard: int, shards: int, on_error: str, report: SourceReport
) -> tuple[int, Iterator]:
    """(bytes to read, chunks) of source k's share in shard `shard` of `shards`. JSON Lines are split by byte
    range; any other source belongs whole to shard k mod shards (its rows are read here, in this process)."""
    if _is_jsonl(src) and not _flat_oasst(src):
        path = Path(str(src.path)).expanduser()
        start, end = src_io.jsonl_range(path, shard, shards)
        blocks = (
            JsonlBlock(str(path), offset, lineno, data)
            for offset, lineno, data in src_io.jsonl_blocks(path, start, end, src_io.BLOCK_BYTES)
        )
        return end - start, blocks
    if k % shards != shard:
        return 0, iter(())

    def batches() -> Iterator[RowsBlock]:
        batch: list[tuple[int, str, dict]] = []
        for i, (where, row) in enumerate(read_rows(src, on_error, report)):
            batch.append((i, where, row))
            if len(batch) == ROWS_PER_CHUNK:
                yield RowsBlock(batch)
                batch = []
        if batch:
            yield RowsBlock(batch)

    return 0, batches()


def _runner(data_cfg: Any, tok: Any, template: str | None) -> ChunkRunner:
    return ChunkRunner(
        tok,
        template,
        data_cfg.train_on.value,
        data_cfg.max_length,
        data_cfg.overlong.value,
        data_cfg.num_proc or default_num_proc(),
    )


def encode_shard(
    data_cfg: Any,
    tok: Any,
    template: str | None,
    out: Path,
    shard: int = 0,
    shards: int = 1,
    progress: Progress | None = None,
) -> None:
    """Encode shard `shard` of `shards` of every source into `out/src<k>/` (one encoded part each)."""
    progress = progress or Progress(False)
    split = _split_needed(data_cfg)
    runner = _runner(data_cfg, tok, template)
    try:
        for k, (src, is_eval) in enumerate(_all_sources(data_cfg)):
            spec = _spec(src, data_cfg, keep_messages=is_eval or split)
            report = SourceReport(spec.name)  # rows the reader itself drops (e.g. not a JSON object)
            size, payloads = _payloads(src, k, shard, shards, spec.on_error, report)
            progress.begin(f"encode {spec.name}" + (f" (shard {shard}/{shards})" if shards > 1 else ""), size)
            writer = PartWriter(out / f"src{k}", spec.keep_messages)
            seconds: Counter = Counter()
            workers: dict[int, int] = {}
            for result in runner.run(spec, payloads):
                if result.error is not None:
                    raise result.error
                writer.add(result)
                report.rows_read += result.rows_read
                report.dropped.update(result.dropped)
                report.extra_from_trees += result.extra_from_trees
                seconds.update(result.seconds)
                workers[result.worker[0]] = max(workers.get(result.worker[0], 0), result.worker[1])
                progress.advance(rows=result.rows_read, tokens=result.tokens, nbytes=result.size)
            writer.finish(
                {
                    "rows_read": report.rows_read,
                    "dropped": dict(report.dropped),
                    "extra_from_trees": report.extra_from_trees,
                    "seconds": dict(seconds),
                    "peak_rss_kib": {str(pid): rss for pid, rss in workers.items()},
                }
            )
    finally:
        runner.close()


# ---- from candidates to kept conversations ----


def account(columns: dict[str, np.ndarray], dedup: bool, report: SourceReport) -> np.ndarray:
    """Which candidates are kept (bool per candidate), counting every drop in `report`, in file order: an exact
    repeat of an earlier conversation is a duplicate (dropped with data.dedup) before anything else is said
    of it, as when the conversations are read one by one."""
    hashes, status = columns["hashes"], columns["status"]
    first = np.zeros(len(hashes), dtype=bool)
    first[np.unique(hashes, return_index=True)[1]] = True
    report.duplicates += int((~first).sum())
    live = first if dedup else np.ones(len(hashes), dtype=bool)
    if dedup and (~first).any():
        report.drop("duplicate", int((~first).sum()))
    report.truncated += int(columns["truncated"][live].sum())
    report.truncated_trained_tokens += int(columns["lost"][live].sum())
    for code, n in zip(*np.unique(status[live], return_counts=True)):
        if code != OK:
            report.drop(STATUS_REASON[int(code)], int(n))
    return live & (status == OK)


@dataclass
class Items:
    """Kept conversations of all sources, flat: where their tokens are and what they weigh."""

    part: np.ndarray  # int32 index into the list of parts
    start: np.ndarray  # int64 token offset in that part
    length: np.ndarray  # int32
    trained: np.ndarray  # int32
    id_sum: np.ndarray  # int64
    candidate: np.ndarray  # int64 candidate index in its part (to read its messages)


ITEM_DTYPES = {
    "part": np.int32,
    "start": np.int64,
    "length": np.int32,
    "trained": np.int32,
    "id_sum": np.int64,
}


def _gather_items(parts: list[EncodedPart], keep: list[np.ndarray], base: int) -> Items:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in Items.__dataclass_fields__}
    for p, (part, kept) in enumerate(zip(parts, keep)):
        idx = np.flatnonzero(kept)
        cols["part"].append(np.full(len(idx), base + p, np.int32))
        cols["start"].append(part.starts[idx])
        cols["length"].append(part.columns["lengths"][idx])
        cols["trained"].append(part.columns["trained"][idx])
        cols["id_sum"].append(part.columns["id_sums"][idx])
        cols["candidate"].append(idx.astype(np.int64))
        part.columns, part.starts = {}, None  # what is left of a part: its files
    return Items(
        **{k: np.concatenate(v) if v else np.zeros(0, ITEM_DTYPES.get(k, np.int64)) for k, v in cols.items()}
    )


def _source_report(name: str, parts: list[EncodedPart], dedup: bool) -> tuple[SourceReport, list[np.ndarray]]:
    """The source's report and, per part, which of its candidates are kept."""
    report = SourceReport(name)
    for part in parts:
        report.rows_read += part.counts["rows_read"]
        report.dropped.update(part.counts["dropped"])
        report.extra_from_trees += part.counts["extra_from_trees"]
    columns = {
        k: np.concatenate([p.columns[k] for p in parts]) for k in ("hashes", "status", "truncated", "lost")
    }
    kept = account(columns, dedup, report)
    del columns
    sizes = np.cumsum([0] + [len(p) for p in parts])
    return report, [kept[a:b] for a, b in zip(sizes[:-1], sizes[1:])]


# ---- merge: reports, split, mixture, packing, writing ----


def merge(
    data_cfg: Any, parts_of: list[list[EncodedPart]], out: Path, progress: Progress | None = None
) -> dict[str, Any]:
    """Decide and write the prepared data from the encoded parts of every source (in `_all_sources` order,
    each source's parts in shard order). Writes out/train, out/eval, out/eval_conversations.jsonl; returns the
    report."""
    progress = progress or Progress(False)
    flat: list[EncodedPart] = []
    per_source: list[tuple[Any, bool, SourceReport, Items]] = []
    for (src, is_eval), parts in zip(_all_sources(data_cfg), parts_of):
        report, keep = _source_report(source_name(src), parts, data_cfg.dedup)
        per_source.append((src, is_eval, report, _gather_items(parts, keep, len(flat))))
        flat += parts

    def take(items: Items, pos: np.ndarray) -> Items:
        return Items(**{k: getattr(items, k)[pos] for k in Items.__dataclass_fields__})

    def cat(chunks: list[Items]) -> Items:
        return Items(
            **{
                k: np.concatenate([getattr(c, k) for c in chunks])
                if chunks
                else np.zeros(0, ITEM_DTYPES.get(k, np.int64))
                for k in Items.__dataclass_fields__
            }
        )

    reports = [r for _, is_eval, r, _ in per_source if not is_eval]
    eval_reports = []
    eval_chunks: list[Items] = []
    for _, is_eval, report, items in per_source:
        if is_eval:
            report.kept = len(items.length)
            report.tokens, report.trained_tokens = int(items.length.sum()), int(items.trained.sum())
            eval_chunks.append(items)
            eval_reports.append(report)
    split = _split_needed(data_cfg)
    total = sum(len(items.length) for _, is_eval, _, items in per_source if not is_eval) or 1
    mixed: list[Items] = []
    for src, is_eval, report, items in per_source:
        if is_eval:
            continue
        n = len(items.length)
        if split:  # hold out from each source before weighting, so no eval row is repeated into training
            perm = list(range(n))
            random.Random(f"{data_cfg.seed}:eval:{report.name}").shuffle(perm)
            order = np.asarray(perm, dtype=np.int64)
            del perm
            n_eval = (
                round(data_cfg.eval_size * n / total)
                if data_cfg.eval_size
                else round(n * data_cfg.eval_fraction)
            )
            eval_chunks.append(take(items, order[:n_eval]))
            report.drop("held_out_for_eval", n_eval)
            items = take(items, order[n_eval:])
        picked = take(items, sample_positions(len(items.length), src, data_cfg.seed, report))
        report.kept = len(picked.length)
        report.tokens, report.trained_tokens = int(picked.length.sum()), int(picked.trained.sum())
        mixed.append(picked)
    train, evals = cat(mixed), cat(eval_chunks)
    if not len(train.length):
        # Said here in full: the report table is printed only after a successful preparation.
        why = "; ".join(
            f"{r.name}: read {r.rows_read}, dropped "
            + (", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items()) if v) or "none")
            for r in reports
        )
        raise ValueError(f"no training rows left (data.max_length={data_cfg.max_length}): {why}")

    seconds: dict[str, float] = {}
    indexes = {}
    for name, items in (("train", train), ("eval", evals)):
        t0 = time.perf_counter()
        progress.begin(f"pack {name}")
        if data_cfg.pack:
            order, starts = pack_plan(items.length, data_cfg.max_length)
        else:
            order, starts = np.arange(len(items.length)), np.arange(len(items.length) + 1)
        t1 = time.perf_counter()
        progress.begin(f"write {name}", int(items.length.sum()), "tokens")
        if len(items.length):
            index = write_rows(
                out / name, flat, items.part[order], items.start[order], items.length[order], starts, progress
            )
            # Tokens in = tokens out: every kept conversation's ids, each at its own position, once per time it
            # was picked (checksums compared modulo 2**64, as numpy sums them).
            want = (int(items.length.sum()), int(items.id_sum.sum(dtype=np.uint64)))
            got = (index["tokens"], index["ids_sum"] % 2**64)
            if got != want:
                raise RuntimeError(
                    f"packed {name} rows differ from the encoded conversations (tokens, checksum: {got} vs "
                    f"{want}): a bug in packing, nothing was cached"
                )
        else:
            index = {"rows": 0, "tokens": 0, "trained": 0}
        indexes[name] = index
        seconds[f"pack_{name}"] = t1 - t0
        seconds[f"write_{name}"] = time.perf_counter() - t1
        for part in flat:
            part.release()

    # Eval conversations (for generation metrics), in eval-row order of selection.
    messages: list[bytes] = [b""] * len(evals.length)
    for p in np.unique(evals.part).tolist():
        sel = np.flatnonzero(evals.part == p)
        for i, m in zip(sel.tolist(), flat[p].messages(evals.candidate[sel])):
            messages[i] = m
    JsonLines.write(out / "eval_conversations.jsonl", messages)

    t = indexes["train"]
    capacity = t["rows"] * data_cfg.max_length
    stage = Counter()
    rss: dict[str, int] = {}
    for part in flat:
        stage.update(part.counts.get("seconds", {}))
        rss.update(part.counts.get("peak_rss_kib", {}))
    return {
        "sources": [r.as_dict() for r in reports],
        "eval_sources": [r.as_dict() for r in eval_reports],
        "train": {
            "conversations": len(train.length),
            "packed_rows": t["rows"],
            "tokens": t["tokens"],
            "trained_tokens": t["trained"],
            "trained_fraction": t["trained"] / max(t["tokens"], 1),
            "packing_efficiency": t["tokens"] / max(capacity, 1),
            "docs_per_pack": len(train.length) / max(t["rows"], 1),
            "lower_bound_rows": lower_bound_rows(train.length, data_cfg.max_length)
            if data_cfg.pack
            else len(train.length),
        },
        "eval": {"conversations": len(evals.length), "packed_rows": indexes["eval"]["rows"]},
        "stages": {
            "read": stage["read"],
            "render": stage["render"],
            "tokenize": stage["tokenize"],
            "encode": stage["encode"],
            "pack": seconds["pack_train"] + seconds["pack_eval"],
            "write": seconds["write_train"] + seconds["write_eval"],
        },
        "encode_peak_rss_gb": {pid: kib / 2**20 for pid, kib in rss.items()},
    }


# ---- whole preparations ----


def fingerprint(data_cfg: Any, tok: Any, template: str | None) -> str:
    """Content hash of everything that decides the prepared data."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}".encode())
    recipe = OmegaConf.to_container(data_cfg, resolve=True, enum_to_str=True)
    recipe.pop("num_proc")  # how many processes prepare the data does not change the data
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update((template or tok.chat_template or "").encode())
    h.update(json.dumps(sorted(map(str, tok.all_special_tokens))).encode())
    for src in list(data_cfg.sources) + list(data_cfg.eval_sources):
        p = Path(str(src.path)).expanduser()
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():  # by content, so a copy of the data on another node's disk is the same data
                with f.open("rb") as fh:
                    h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:".encode())
                    h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _build(
    data_cfg: Any,
    tok: Any,
    template: str | None,
    out: Path,
    shards_dir: Path | None = None,
    progress: Progress | None = None,
) -> None:
    """Encode (or take the shards already encoded in `shards_dir`), merge, and write everything into `out`."""
    start = time.perf_counter()
    progress = progress or Progress(False)
    done = _complete_shards(shards_dir) if shards_dir is not None else {}
    shards = max(done, key=lambda n: (len(done[n]), n)) if done else 1
    dirs = []
    for i in range(shards):
        if i in done.get(shards, set()):
            dirs.append(shards_dir / f"{i}-of-{shards}")
            continue
        if shards > 1:
            tell(
                f"data: shard {i}/{shards} was not prepared (sft prepare --shard {i}/{shards}): preparing it here"
            )
        dirs.append(out / "encoded" / f"{i}-of-{shards}")
        encode_shard(data_cfg, tok, template, dirs[-1], i, shards, progress)
    t_encoded = time.perf_counter()
    parts_of = []
    for k in range(len(_all_sources(data_cfg))):
        parts = [EncodedPart(d / f"src{k}") for d in dirs if (d / f"src{k}" / "report.json").exists()]
        parts_of.append(parts)
    report = merge(data_cfg, parts_of, out, progress)
    progress.done()
    shutil.rmtree(out / "encoded", ignore_errors=True)
    report["seconds"] = time.perf_counter() - start
    report["stages"]["encode_wall"] = t_encoded - start
    report["peak_rss_gb"] = _peak_rss_gb()
    report["shards"] = shards
    (out / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, "report": report}))


def _complete_shards(shards_dir: Path) -> dict[int, set[int]]:
    """{N: {i, ...}}: the shards i of N that are fully encoded."""
    done: dict[int, set[int]] = {}
    if shards_dir.is_dir():
        for d in shards_dir.iterdir():
            name = d.name.split("-of-")
            if len(name) == 2 and name[0].isdigit() and name[1].isdigit():
                done.setdefault(int(name[1]), set()).add(int(name[0]))
    return done


def load_prepared(path: Path) -> Prepared:
    """The prepared data at `path` (a `prepared-<hash>` dir that exists), memory-mapped; report["cache"] says so."""
    prepared = _load(path)
    prepared.report["cache"] = {"path": str(path), "hit": True}
    return prepared


def _load(path: Path) -> Prepared:
    meta = json.loads((path / "meta.json").read_text())
    return Prepared(
        load_rows(path / "train"),
        load_rows(path / "eval"),
        JsonLines(path / "eval_conversations.jsonl"),
        meta["report"],
    )


def _scratch_name(path: Path) -> Path:
    # Unique per builder: on a shared file system each node's local rank 0 builds at once, and pids can repeat.
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def prepare_data(
    data_cfg: Any, tok: Any, template: str | None = None, workdir: str | None = None
) -> Prepared:
    """Build train/eval packed rows and the data report from the recipe, without the cache (in a scratch
    directory under `workdir`, default the system's temporary directory; the rows stay readable after it is
    removed)."""
    with tempfile.TemporaryDirectory(prefix="sft-prepare-", dir=workdir) as scratch:
        _build(data_cfg, tok, template, Path(scratch))
        return _load(Path(scratch))


def cached_prepare(
    data_cfg: Any, tok: Any, template: str | None, cache_dir: str, build: bool, progress: bool = False
) -> Prepared:
    """Load the prepared data for this content hash, building it first when `build` (one rank per node).

    On disk: `<cache_dir>/prepared-<hash>/` with `train/`, `eval/` (memory-mapped rows, see
    `launcher.data.store`), `eval_conversations.jsonl` and `meta.json` (the report). Shards encoded by
    `sft prepare --shard i/N` (`prepared-<hash>.shards/`) are merged instead of encoding again.
    """
    path = Path(cache_dir) / f"prepared-{fingerprint(data_cfg, tok, template)}"
    if not (path / "meta.json").exists():
        if not build:
            raise FileNotFoundError(
                f"prepared data {path} is missing: the building rank should have written it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _scratch_name(path)
        shutil.rmtree(tmp, ignore_errors=True)
        shards_dir = path.with_name(path.name + ".shards")
        try:
            _build(data_cfg, tok, template, tmp, shards_dir, Progress(progress))
            tmp.rename(path)  # atomic: a waiting rank never sees a half-written cache
        except OSError:
            if not (path / "meta.json").exists():
                raise
            # another node's builder (shared file system) got there first: same content
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shards_dir, ignore_errors=True)
        prepared = _load(path)
        prepared.report["cache"] = {"path": str(path), "hit": False}
        return prepared
    return load_prepared(path)


def prepare_shard(
    data_cfg: Any,
    tok: Any,
    template: str | None,
    cache_dir: str,
    shard: int,
    shards: int,
    progress: bool = False,
) -> str:
    """Encode shard `shard` of `shards` into the shared cache (`prepared-<hash>.shards/<i>-of-<N>`); returns
    a one-line account of what was done."""
    path = Path(cache_dir) / f"prepared-{fingerprint(data_cfg, tok, template)}"
    if (path / "meta.json").exists():
        return f"data cache hit: {path} is prepared already; nothing to do for shard {shard}/{shards}"
    target = path.with_name(path.name + ".shards") / f"{shard}-of-{shards}"
    if target.exists():
        return f"shard {shard}/{shards} is encoded already: {target}"
    tmp = _scratch_name(target)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        p = Progress(progress)
        encode_shard(data_cfg, tok, template, tmp, shard, shards, p)
        p.done()
        tmp.rename(target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (
        f"shard {shard}/{shards} encoded in {time.perf_counter() - start:.1f} s: {target} "
        f"(a plain `sft prepare` with the same config merges the shards)"
    )


# ---- one source in memory (tests, benchmarks) ----


def load_source(src: Any, data_cfg: Any, tok: Any, template: str | None) -> tuple[list[tuple], SourceReport]:
    """Read, filter, normalise and encode one source in this process. Returns [(messages, encoded)] of the kept
    conversations (`encoded`: int32 `input_ids` and `labels`) and its report."""
    spec = _spec(src, data_cfg, keep_messages=True)
    report = SourceReport(spec.name)
    _, payloads = _payloads(src, 0, 0, 1, spec.on_error, report)
    cfg = {
        "train_on": data_cfg.train_on.value,
        "max_length": data_cfg.max_length,
        "overlong": data_cfg.overlong.value,
    }
    results = []
    for payload in payloads:
        result = encode_chunk(tok, template, cfg, spec, payload)
        if result.error is not None:
            raise result.error
        report.rows_read += result.rows_read
        report.dropped.update(result.dropped)
        report.extra_from_trees += result.extra_from_trees
        results.append(result)
    if not results:
        return [], report
    columns = {
        k: np.concatenate([getattr(r, k) for r in results]) for k in ("hashes", "status", "truncated", "lost")
    }
    kept = account(columns, data_cfg.dedup, report)
    ids = np.concatenate([r.ids for r in results])
    mask = np.concatenate([r.mask for r in results]).astype(bool)
    lengths = np.concatenate([r.lengths for r in results]).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    messages = [m for r in results for m in r.messages]
    ok = np.flatnonzero(lengths > 0)
    out = []
    for j, k in enumerate(ok.tolist()):
        if kept[k]:
            a, b = int(starts[k]), int(starts[k] + lengths[k])
            labels = np.where(mask[a:b], ids[a:b], np.int32(IGNORE_INDEX)).astype(np.int32)
            out.append((json.loads(messages[j]), {"input_ids": ids[a:b].copy(), "labels": labels}))
    return out, report


# ---- report ----


def format_report(report: dict[str, Any]) -> str:
    """A plain table of rows read / dropped / kept / tokens per source, then packing, time and memory."""
    lines = []
    cache = report.get("cache")
    if cache and cache.get("hit"):
        lines.append(f"data cache hit: {cache['path']} (nothing prepared; delete it to prepare again)")
    lines.append(f"{'source':<28}{'read':>8}{'kept':>8}{'tokens':>11}{'trained':>10}  dropped")
    for r in report["sources"] + report["eval_sources"]:
        dropped = ", ".join(f"{k}={v}" for k, v in r["dropped"].items() if v) or "-"
        if r.get("duplicates") and not r["dropped"].get("duplicate"):
            dropped += f"  ({r['duplicates']} exact duplicates kept; data.dedup=true drops them)"
        if r.get("extra_from_trees"):
            dropped += f"  (+{r['extra_from_trees']} conversations from tree paths)"
        lines.append(
            f"{r['name'][:27]:<28}{r['rows_read']:>8}{r['kept']:>8}{r['tokens']:>11}{r['trained_tokens']:>10}  {dropped}"
        )
    t = report["train"]
    lines.append(
        f"packed {t['conversations']} conversations into {t['packed_rows']} rows: efficiency "
        f"{t['packing_efficiency']:.4f}, {t['docs_per_pack']:.1f} docs/pack, trained fraction {t['trained_fraction']:.3f}"
    )
    s = report.get("stages")
    if s and not (cache and cache.get("hit")):
        workers = report.get("encode_peak_rss_gb", {})
        lines.append(
            f"prepared in {report['seconds']:.1f} s: encode {s['encode_wall']:.1f} s (process-seconds: read "
            f"{s['read']:.1f}, render {s['render']:.1f}, tokenize {s['tokenize']:.1f}), pack {s['pack']:.1f} s, "
            f"write {s['write']:.1f} s; peak RSS {report['peak_rss_gb']:.2f} GB"
            + (
                f"; {len(workers)} encoding processes, {max(workers.values()):.2f} GB each at most"
                if workers
                else ""
            )
        )
    return "\n".join(lines)
