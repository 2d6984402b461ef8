"""Encode sources chunk by chunk, in this process or a pool of worker processes, results in file order.

    runner = ChunkRunner(tok, template, train_on, max_length, overlong, num_proc)
    for result in runner.run(chunks_of(spec)):   # ChunkResult per chunk, in order
        ...
    runner.close()

A chunk is one source's next block of JSON Lines (raw bytes, parsed in the worker) or a list of rows. The worker
does everything per row that the data recipe asks (parse, filter, normalise, template + assistant mask, overlong
handling) and returns flat arrays: one entry per conversation that reached the duplicate check ("candidates"),
the token ids and trained flags of the ones that encoded, and counts of what it dropped before. Duplicates are
decided later, in file order, by whoever reads the results (`launcher.data.pipeline`): a chunk never needs to
see another. The same chunk gives the same bytes in any process, so the prepared data does not depend on
`data.num_proc` or on how the sources were cut into chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.packing import position_checksum
from launcher.data.sources import (
    RowError,
    SourceReport,
    apply_system_policy,
    conversation_problem,
    detect_format,
    parse_jsonl_block,
    passes_filters,
    read_tools,
    role_order_problem,
    to_conversations,
)
from launcher.data.template import (
    IGNORE_INDEX,
    TemplateError,
    ToolsNotRendered,
    encode_conversation,
    encode_many,
)

# What became of each candidate (a conversation that passed the row checks): only OK ones have tokens.
OK, TOOLS_NOT_RENDERED, TEMPLATE_MISMATCH, OVERLONG, MAX_TOKENS, NO_TRAINED = range(6)
STATUS_REASON = {
    TOOLS_NOT_RENDERED: "tools_not_rendered",
    TEMPLATE_MISMATCH: "template_mismatch",
    OVERLONG: "overlong",
    MAX_TOKENS: "max_tokens",
    NO_TRAINED: "no_trained_tokens",
}


@dataclass(frozen=True)
class SourceSpec:
    """What a worker needs to know of a source (plain values: sent with every chunk)."""

    name: str
    fmt: str | None  # set by the config, or None: detected from the first row that passes the filters
    detected: tuple[int, str] | None  # (position, format) of that row, found by `launcher.data.pipeline`
    columns: dict[str, str]
    include: dict[str, list]
    exclude: dict[str, list]
    tree_paths: str
    system_prompt: str
    max_turns: int | None
    max_tokens: int | None
    on_error: str
    keep_messages: bool  # eval conversations are kept as JSON (for generation metrics)


@dataclass
class JsonlBlock:
    """Whole lines of a JSON Lines file: `data` starts at byte `offset`, on 1-based line `lineno`."""

    path: str
    offset: int
    lineno: int
    data: bytes


@dataclass
class RowsBlock:
    """Rows already read: (position, location, row)."""

    rows: list[tuple[int, str, dict]]


@dataclass
class ChunkResult:
    hashes: np.ndarray  # uint64 per candidate: the duplicate key
    status: np.ndarray  # uint8 per candidate
    lengths: np.ndarray  # int32 per candidate (0 unless OK)
    trained: np.ndarray  # int32 per candidate: trained tokens (labels != -100)
    truncated: np.ndarray  # uint8 per candidate: cut at a turn boundary (data.overlong=truncate)
    lost: np.ndarray  # int32 per candidate: trained tokens the cut removed
    id_sums: (
        np.ndarray
    )  # int64 per candidate: sum of id x (position + 1) over its tokens (the tokens-in checksum)
    ids: np.ndarray  # int32: the OK candidates' tokens, end to end
    mask: np.ndarray  # uint8 per token: 1 where trained
    messages: list[bytes] | None  # JSON of each OK candidate's messages, when the source keeps them
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    extra_from_trees: int = 0
    error: Exception | None = None  # the first user error in this chunk (data.on_error=raise)
    seconds: dict[str, float] = field(default_factory=dict)
    worker: tuple[int, int] = (0, 0)  # (pid, peak RSS in KiB) of the process that encoded it
    size: int = 0  # bytes of JSON Lines read

    @property
    def rows(self) -> int:
        return self.rows_read

    @property
    def tokens(self) -> int:
        return len(self.ids)


def key_of(msgs: list[dict], tools: Any) -> int:
    """The duplicate key of a conversation: 64 bits of sha256 over its normalised messages and tools."""
    digest = hashlib.sha256(json.dumps([msgs, tools], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def fit(tok: Any, msgs: list[dict], tools: Any, enc: dict, template: str | None, cfg: dict) -> tuple:
    """A conversation longer than max_length: (encoding or None when dropped, truncated?, trained tokens lost)."""
    if len(enc["input_ids"]) <= cfg["max_length"]:
        return enc, False, 0
    if cfg["overlong"] == "drop":
        return None, False, 0
    # Truncate at a turn boundary: keep the longest prefix that ends on an assistant turn and fits.
    for k in range(len(msgs) - 1, 0, -1):
        if msgs[k - 1]["role"] != "assistant":
            continue
        shorter = encode_conversation(tok, msgs[:k], cfg["train_on"], template, tools)
        shorter = {key: np.asarray(v, dtype=np.int32) for key, v in shorter.items()}
        if len(shorter["input_ids"]) <= cfg["max_length"]:
            return shorter, True, _n_trained(enc["labels"]) - _n_trained(shorter["labels"])
    return None, False, 0


def _n_trained(labels: Any) -> int:
    return int(np.count_nonzero(np.asarray(labels) != IGNORE_INDEX))


def _rows_of(spec: SourceSpec, payload: JsonlBlock | RowsBlock, report: SourceReport) -> Iterator[tuple]:
    if isinstance(payload, RowsBlock):
        return iter(payload.rows)
    return parse_jsonl_block(
        Path(payload.path), payload.data, payload.offset, payload.lineno, spec.on_error, report
    )


def encode_chunk(
    tok: Any, template: str | None, cfg: dict, spec: SourceSpec, payload: JsonlBlock | RowsBlock
) -> ChunkResult:
    """One chunk of one source: rows -> checks -> candidates -> tokens. Errors come back in the result."""
    t0 = time.perf_counter()
    report = SourceReport(spec.name)
    pending: list[tuple[str, list[dict], Any]] = []
    keys: list[int] = []
    error: Exception | None = None
    try:
        for pos, where, row in _rows_of(spec, payload, report):
            report.rows_read += 1
            reason = passes_filters(row, spec)
            if reason:
                report.drop(reason)
                continue
            fmt = spec.fmt or (spec.detected[1] if spec.detected and pos >= spec.detected[0] else None)
            try:
                fmt = fmt or detect_format(row, spec.columns)
                convs = to_conversations(row, fmt, spec.columns, where, spec.tree_paths)
                tools = read_tools(row, spec.columns, where)
            except RowError as e:
                if spec.on_error == "skip":
                    report.drop("malformed_row")
                    continue
                raise RowError(f"data source {spec.name}: {e}") from None
            report.extra_from_trees += len(convs) - 1
            for msgs in convs:
                msgs = apply_system_policy(msgs, spec.system_prompt)
                problem = conversation_problem(msgs)
                if problem:
                    report.drop(problem)
                    continue
                order = role_order_problem(msgs)
                if order:
                    if spec.on_error == "skip":
                        report.drop(order[0])
                        continue
                    raise RowError(
                        f"data source {spec.name}: {where}: {order[1]} "
                        "(data.on_error=skip drops and counts these)"
                    )
                if (
                    spec.max_turns is not None
                    and sum(m["role"] == "assistant" for m in msgs) > spec.max_turns
                ):
                    report.drop("max_turns")
                    continue
                keys.append(key_of(msgs, tools))
                pending.append((where, msgs, tools))
    except (RowError, ValueError) as e:  # rows before it are still encoded: an earlier template error wins
        error = e
    t1 = time.perf_counter()
    seconds: dict[str, float] = {"read": t1 - t0, "render": 0.0, "tokenize": 0.0}
    encoded = encode_many(
        tok, [m for _, m, _ in pending], cfg["train_on"], template, [t for *_, t in pending], timings=seconds
    )
    c = len(pending)
    status = np.zeros(c, np.uint8)
    lengths, trained, lost = (np.zeros(c, np.int32) for _ in range(3))
    truncated = np.zeros(c, np.uint8)
    id_sums = np.zeros(c, np.int64)
    ids, masks, messages = [], [], [] if spec.keep_messages else None
    for k, ((where, msgs, tools), enc) in enumerate(zip(pending, encoded)):
        if isinstance(enc, ToolsNotRendered):  # would teach calls to functions the model was never shown
            status[k] = TOOLS_NOT_RENDERED
            continue
        if isinstance(enc, TemplateError):
            if spec.on_error == "skip":
                status[k] = TEMPLATE_MISMATCH
                continue
            error = TemplateError(f"{where}: {enc}")
            keys, status, lengths, trained, truncated, lost, id_sums = (
                x[:k] for x in (keys, status, lengths, trained, truncated, lost, id_sums)
            )
            break
        fitted, truncated[k], lost[k] = fit(
            tok, msgs, tools, {"input_ids": enc[0], "labels": enc[1]}, template, cfg
        )
        if fitted is None:
            status[k] = OVERLONG
            continue
        n_ids, labels = fitted["input_ids"], fitted["labels"]
        n_trained = _n_trained(labels)
        trained[k] = n_trained
        if spec.max_tokens is not None and len(n_ids) >= spec.max_tokens:
            status[k] = MAX_TOKENS
            continue
        if n_trained == 0:
            status[k] = NO_TRAINED
            continue
        mask = labels != IGNORE_INDEX
        assert np.array_equal(labels[mask], n_ids[mask]), "a trained label is not its token"
        lengths[k] = len(n_ids)
        id_sums[k] = position_checksum(n_ids, np.arange(len(n_ids)))
        ids.append(n_ids.astype(np.int32, copy=False))
        masks.append(mask.astype(np.uint8))
        if messages is not None:
            messages.append(json.dumps(msgs).encode())
    seconds["encode"] = time.perf_counter() - t1
    return ChunkResult(
        hashes=np.asarray(keys, dtype=np.uint64),
        status=status,
        lengths=lengths,
        trained=trained,
        truncated=truncated,
        lost=lost,
        id_sums=id_sums,
        ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
        mask=np.concatenate(masks) if masks else np.zeros(0, np.uint8),
        messages=messages,
        rows_read=report.rows_read,
        dropped=report.dropped,
        extra_from_trees=report.extra_from_trees,
        error=error,
        seconds=seconds,
        worker=(os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        size=len(payload.data) if isinstance(payload, JsonlBlock) else 0,
    )


# ---- processes ----


def _write_frame(f: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(len(data).to_bytes(8, "little"))
    f.write(data)
    f.flush()


def _read_frame(f: Any) -> Any:
    head = f.read(8)
    if len(head) < 8:
        return EOFError
    return pickle.loads(f.read(int.from_bytes(head, "little")))


def serve() -> None:
    """A worker process: reads (tokenizer, template, cfg, threads), then (spec, payload) frames on stdin, and
    writes a ChunkResult frame for each on stdout. Ends when stdin closes."""
    from launcher.data import template as template_module

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the results
    inp = sys.stdin.buffer
    tok, template, cfg, threads = _read_frame(inp)
    # The cores are shared among the workers: each tokenizes on its share of them beside its own rendering.
    template_module.TOKENIZE_THREADS = threads
    while (task := _read_frame(inp)) is not EOFError:
        spec, payload = task
        try:
            result = encode_chunk(tok, template, cfg, spec, payload)
        except Exception:  # a bug, not a data error: the parent re-raises it with the worker's traceback
            result = RuntimeError(f"data worker {os.getpid()} failed:\n{traceback.format_exc()}")
        try:
            _write_frame(out, result)
        except BrokenPipeError:  # the parent is gone: so is the work
            return


class _Worker:
    """One `serve()` process and the thread that feeds it tasks and reads its results, in order."""

    def __init__(self, setup: bytes):
        import launcher

        env = dict(os.environ)
        # The child imports this package from where the parent did (a checkout on sys.path works too).
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(launcher.__file__).resolve().parent.parent), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from launcher.data.encode import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.tasks: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, args=(setup,), daemon=True)
        self.thread.start()

    def submit(self, spec: SourceSpec, payload: Any) -> Future:
        future: Future = Future()
        self.tasks.put(((spec, payload), future))
        return future

    def _loop(self, setup: bytes) -> None:
        failed: BaseException | None = None
        try:
            self.proc.stdin.write(setup)
            self.proc.stdin.flush()
        except OSError as e:
            failed = e
        while (item := self.tasks.get()) is not None:
            task, future = item
            if failed is None:
                try:
                    _write_frame(self.proc.stdin, task)
                    result = _read_frame(self.proc.stdout)
                    if result is EOFError:
                        raise RuntimeError(
                            f"a data worker (pid {self.proc.pid}) exited with code {self.proc.wait()}"
                        )
                    if isinstance(result, RuntimeError):
                        raise result
                    future.set_result(result)
                    continue
                except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                    failed = e
            future.set_exception(failed)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.tasks.put(None)
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.thread.join(timeout=10)


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ChunkRunner:
    """Encodes chunks in order: in this process when `num_proc` is 1 or a source fits in two chunks, else in
    `num_proc` worker processes (`serve`, started on first need and kept for every source; chunk j goes to
    worker j mod num_proc), at most 2 chunks per worker in flight so memory stays bounded. Workers are plain
    `python -c` processes: nothing of the caller's main module or state is imported or inherited."""

    def __init__(
        self, tok: Any, template: str | None, train_on: str, max_length: int, overlong: str, num_proc: int
    ):
        self.tok, self.template, self.num_proc = tok, template, num_proc
        self.cfg = {"train_on": train_on, "max_length": max_length, "overlong": overlong}
        self.workers: list[_Worker] = []
        self.sent = 0

    def _inline(self, spec: SourceSpec, payload: Any) -> ChunkResult:
        return encode_chunk(self.tok, self.template, self.cfg, spec, payload)

    def run(self, spec: SourceSpec, payloads: Iterable[Any]) -> Iterator[ChunkResult]:
        payloads = iter(payloads)
        head = [p for _, p in zip(range(2), payloads)]
        if self.num_proc <= 1 or len(head) < 2:
            for p in head:
                yield self._inline(spec, p)
            for p in payloads:
                yield self._inline(spec, p)
            return
        if not self.workers:
            threads = max(1, default_num_proc() // self.num_proc)
            data = pickle.dumps(
                (self.tok, self.template, self.cfg, threads), protocol=pickle.HIGHEST_PROTOCOL
            )
            setup = len(data).to_bytes(8, "little") + data
            self.workers = [_Worker(setup) for _ in range(self.num_proc)]

        def submit(p: Any) -> Future:
            worker = self.workers[self.sent % len(self.workers)]
            self.sent += 1
            return worker.submit(spec, p)

        in_flight: deque = deque(submit(p) for p in head)
        for p in payloads:
            if len(in_flight) >= 2 * self.num_proc:
                yield in_flight.popleft().result()
            in_flight.append(submit(p))
        while in_flight:
            yield in_flight.popleft().result()

    def close(self) -> None:
        """Stop the workers now (also after an error or Ctrl-C: queued chunks are dropped)."""
        for w in self.workers:
            w.close()
        self.workers = []
