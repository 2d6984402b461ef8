"""The data stage of a run: sources -> filtered messages -> tokens + masks -> packed rows, cached by content.

    prepared = prepare_data(cfg.data, tokenizer, cache_dir, chat_template)
    prepared.train_rows, prepared.eval_rows, prepared.report

Everything here is deterministic for a seed and free of torch.distributed: the caller decides which rank
builds the cache (see `launcher.run.build_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from launcher.data.packing import PackedRows, pack_arrays
from launcher.data.sources import (
    RowError,
    SourceReport,
    apply_system_policy,
    conversation_problem,
    detect_format,
    passes_filters,
    read_rows,
    read_tools,
    role_order_problem,
    sample_rows,
    source_name,
    to_conversations,
)
from launcher.data.template import (
    IGNORE_INDEX,
    TemplateError,
    ToolsNotRendered,
    encode_conversation,
    encode_many,
)

CACHE_VERSION = 4  # 4: one closing token trained (not a trailing eos); tool schemas and calls

Encoded = dict[str, np.ndarray]  # {"input_ids", "labels"}: int32 arrays of one conversation


@dataclass
class Prepared:
    train_rows: PackedRows
    eval_rows: PackedRows
    eval_conversations: list[list[dict[str, str]]]
    report: dict[str, Any]


def _n_trained(labels: Any) -> int:
    return int(np.count_nonzero(np.asarray(labels) != IGNORE_INDEX))


def _fit(
    tok: Any,
    msgs: list[dict],
    tools: Any,
    enc: dict,
    data_cfg: Any,
    template: str | None,
    report: SourceReport,
):
    """Handle a conversation longer than max_length; returns None (counted) when it is dropped."""
    if len(enc["input_ids"]) <= data_cfg.max_length:
        return enc
    if data_cfg.overlong.value == "drop":
        report.drop("overlong")
        return None
    # Truncate at a turn boundary: keep the longest prefix that ends on an assistant turn and fits.
    for k in range(len(msgs) - 1, 0, -1):
        if msgs[k - 1]["role"] != "assistant":
            continue
        shorter = encode_conversation(tok, msgs[:k], data_cfg.train_on.value, template, tools)
        shorter = {k: np.asarray(v, dtype=np.int32) for k, v in shorter.items()}
        if len(shorter["input_ids"]) <= data_cfg.max_length:
            report.truncated_trained_tokens += _n_trained(enc["labels"]) - _n_trained(shorter["labels"])
            report.truncated += 1
            return shorter
    report.drop("overlong")
    return None


TOKENIZE_CHUNK = 1024  # conversations per datasets.map batch (data.num_proc > 1)


def load_source(src: Any, data_cfg: Any, tok: Any, template: str | None) -> tuple[list[tuple], SourceReport]:
    """Read, filter, normalise and encode one source. Returns [(messages, encoded)] and its report."""
    report = SourceReport(source_name(src))
    on_error = data_cfg.on_error.value
    fmt = None if src.format.value == "auto" else src.format.value
    columns = dict(src.columns)
    pending: list[tuple[str, list[dict], list[dict] | None]] = []
    seen: set[str] = set()
    for where, row in read_rows(src, on_error, report):
        report.rows_read += 1
        reason = passes_filters(row, src)
        if reason:
            report.drop(reason)
            continue
        try:
            fmt = fmt or detect_format(row, columns)
            convs = to_conversations(row, fmt, columns, where, src.tree_paths.value)
            tools = read_tools(row, columns, where)
        except RowError as e:
            if on_error == "skip":
                report.drop("malformed_row")
                continue
            raise RowError(f"data source {report.name}: {e}") from None
        report.extra_from_trees += len(convs) - 1
        for msgs in convs:
            msgs = apply_system_policy(msgs, src.system_prompt.value)
            problem = conversation_problem(msgs)
            if problem:
                report.drop(problem)
                continue
            order = role_order_problem(msgs)
            if order:
                if on_error == "skip":
                    report.drop(order[0])
                    continue
                raise RowError(
                    f"data source {report.name}: {where}: {order[1]} (data.on_error=skip drops and counts these)"
                )
            if src.max_turns is not None and sum(m["role"] == "assistant" for m in msgs) > src.max_turns:
                report.drop("max_turns")
                continue
            key = hashlib.sha256(json.dumps([msgs, tools], sort_keys=True).encode()).hexdigest()
            if key in seen:
                report.duplicates += 1
                if data_cfg.dedup:
                    report.drop("duplicate")
                    continue
            seen.add(key)
            pending.append((where, msgs, tools))

    out = []
    encoded = encode_conversations(
        tok,
        [m for _, m, _ in pending],
        data_cfg.train_on.value,
        template,
        data_cfg.num_proc,
        [t for *_, t in pending],
    )
    for (where, msgs, tools), enc in zip(pending, encoded):
        if isinstance(enc, ToolsNotRendered):  # would teach calls to functions the model was never shown
            report.drop("tools_not_rendered")
            continue
        if isinstance(enc, TemplateError):
            if on_error == "skip":
                report.drop("template_mismatch")
                continue
            raise TemplateError(f"{where}: {enc}") from None
        enc = _fit(tok, msgs, tools, enc, data_cfg, template, report)
        if enc is None:
            continue
        if src.max_tokens is not None and len(enc["input_ids"]) >= src.max_tokens:
            report.drop("max_tokens")
            continue
        if _n_trained(enc["labels"]) == 0:
            report.drop("no_trained_tokens")
            continue
        out.append((msgs, enc))
    return out, report


def _map_encode(batch: dict[str, list], tok: Any, train_on: str, template: str | None) -> dict[str, list]:
    """`datasets.map` body: JSON messages (and tools) -> input_ids, labels (empty) and error ('' when fine)."""
    empty = np.zeros(0, dtype=np.int32)
    out: dict[str, list] = {"input_ids": [], "labels": [], "error": []}
    tools = [json.loads(t) for t in batch["tools"]]
    for enc in encode_many(tok, [json.loads(m) for m in batch["messages"]], train_on, template, tools):
        ids, labels = (empty, empty) if isinstance(enc, TemplateError) else enc
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        # The error's kind travels with its text: a template that drops tools is counted, not raised.
        kind = "tools:" if isinstance(enc, ToolsNotRendered) else "template:"
        out["error"].append(kind + str(enc) if isinstance(enc, TemplateError) else "")
    return out


def _list_column(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow list column as (values, offsets) NumPy arrays, copied into memory (the file may go away)."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    values = np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)
    offsets = np.array(arr.offsets.to_numpy(), dtype=np.int64)
    return values, offsets - offsets[0]


def encode_conversations(
    tok: Any,
    conversations: list[list[dict]],
    train_on: str,
    template: str | None,
    num_proc: int,
    tools: list[list[dict] | None] | None = None,
) -> list[Encoded | TemplateError]:
    """Template + mask + tokenize, in order; a conversation whose template defeats masking yields its error.

    One process: `encode_many` directly (rendering overlaps the multi-threaded Rust tokenizer). More:
    `datasets.Dataset.map(batched=True, num_proc=...)` over Arrow shards in a scratch directory.
    """
    if num_proc <= 1 or len(conversations) < 2 * TOKENIZE_CHUNK:
        return [
            e if isinstance(e, TemplateError) else {"input_ids": e[0], "labels": e[1]}
            for e in encode_many(tok, conversations, train_on, template, tools)
        ]
    import datasets

    with tempfile.TemporaryDirectory(prefix="sft-encode-") as scratch:
        scratch_id = hashlib.sha256(scratch.encode()).hexdigest()[:16]
        tools = tools or [None] * len(conversations)
        ds = datasets.Dataset.from_dict(
            {"messages": [json.dumps(m) for m in conversations], "tools": [json.dumps(t) for t in tools]}
        )
        with _quiet_datasets(datasets):
            mapped = ds.map(
                _map_encode,
                fn_kwargs={"tok": tok, "train_on": train_on, "template": template},
                batched=True,
                batch_size=TOKENIZE_CHUNK,
                num_proc=num_proc,
                remove_columns=["messages", "tools"],
                cache_file_name=str(Path(scratch) / "encoded.arrow"),
                new_fingerprint=scratch_id,  # spares datasets hashing the tokenizer
                desc="encode",
            )
        (ids, cuts), (labels, label_cuts) = (
            _list_column(mapped.data.column(c)) for c in ("input_ids", "labels")
        )
        assert np.array_equal(cuts, label_cuts), "input_ids and labels rows differ in length"
        errors = mapped.data.column("error").to_pylist()
        del mapped, ds
    ids, labels = np.split(ids, cuts[1:-1]), np.split(labels, cuts[1:-1])
    errs = {"tools": ToolsNotRendered, "template": TemplateError}
    return [
        errs[err.split(":", 1)[0]](err.split(":", 1)[1]) if err else {"input_ids": i, "labels": lab}
        for i, lab, err in zip(ids, labels, errors)
    ]


class _quiet_datasets:
    """Progress bars off while we map (the pipeline prints its own report)."""

    def __init__(self, datasets: Any):
        self.datasets = datasets

    def __enter__(self) -> None:
        self.was = self.datasets.is_progress_bar_enabled()
        self.datasets.disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        if self.was:
            self.datasets.enable_progress_bars()


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
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare_data(data_cfg: Any, tok: Any, template: str | None = None) -> Prepared:
    """Build train/eval packed rows and the data report from the recipe."""
    eval_srcs = [s for s in data_cfg.sources if s.eval] + list(data_cfg.eval_sources)
    train_items, reports = [], []
    for src in (s for s in data_cfg.sources if not s.eval):
        items, report = load_source(src, data_cfg, tok, template)
        reports.append(report)
        train_items.append((src, items, report))

    eval_items: list[tuple] = []
    eval_reports = []
    for src in eval_srcs:
        items, report = load_source(src, data_cfg, tok, template)
        report.kept = len(items)
        report.tokens = sum(len(e["input_ids"]) for _, e in items)
        report.trained_tokens = sum(_n_trained(e["labels"]) for _, e in items)
        eval_items += items
        eval_reports.append(report)
    mixed: list[tuple] = []
    for src, items, report in train_items:
        if not eval_srcs and (data_cfg.eval_size or data_cfg.eval_fraction):  # split off eval
            # Hold out from each source before weighting, so no eval row is repeated into training.
            rng = random.Random(f"{data_cfg.seed}:eval:{report.name}")
            items = items[:]
            rng.shuffle(items)
            total = sum(len(i) for _, i, _ in train_items) or 1
            n_eval = (
                round(data_cfg.eval_size * len(items) / total)
                if data_cfg.eval_size
                else round(len(items) * data_cfg.eval_fraction)
            )
            eval_items += items[:n_eval]
            report.drop("held_out_for_eval", n_eval)
            items = items[n_eval:]
        picked = sample_rows(items, src, data_cfg.seed, report)
        report.kept = len(picked)
        report.tokens = sum(len(e["input_ids"]) for _, e in picked)
        report.trained_tokens = sum(_n_trained(e["labels"]) for _, e in picked)
        mixed += picked

    if not mixed:
        # Said here in full: the report table is printed only after a successful preparation.
        why = "; ".join(
            f"{r.name}: read {r.rows_read}, dropped "
            + (", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items()) if v) or "none")
            for r in reports
        )
        raise ValueError(f"no training rows left (data.max_length={data_cfg.max_length}): {why}")
    train_examples = [e for _, e in mixed]
    eval_examples = [e for _, e in eval_items]
    train_rows = _rows(train_examples, data_cfg)
    eval_rows = _rows(eval_examples, data_cfg)
    capacity = len(train_rows) * data_cfg.max_length
    n_tokens, n_trained = train_rows.num_tokens, train_rows.num_trained
    report = {
        "sources": [r.as_dict() for r in reports],
        "eval_sources": [r.as_dict() for r in eval_reports],
        "train": {
            "conversations": len(train_examples),
            "packed_rows": len(train_rows),
            "tokens": n_tokens,
            "trained_tokens": n_trained,
            "trained_fraction": n_trained / max(n_tokens, 1),
            "packing_efficiency": n_tokens / max(capacity, 1),
            "docs_per_pack": len(train_examples) / max(len(train_rows), 1),
        },
        "eval": {"conversations": len(eval_examples), "packed_rows": len(eval_rows)},
    }
    return Prepared(train_rows, eval_rows, [m for m, _ in eval_items], report)


def _rows(examples: list[Encoded], data_cfg: Any) -> PackedRows:
    """Packed rows (best-fit decreasing), or one conversation per row when packing is off."""
    ids = [e["input_ids"] for e in examples]
    labels = [e["labels"] for e in examples]
    if data_cfg.pack:
        return pack_arrays(ids, labels, data_cfg.max_length)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = [np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32) for xs in (ids, labels)]
    positions = (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    return PackedRows(flat[0], flat[1], positions, offsets)


def _save_rows(rows: PackedRows, path: Path) -> None:
    """Packed rows as a `datasets` Arrow dataset (one row per pack; list columns share the row offsets)."""
    import datasets
    import pyarrow as pa

    if not len(rows):  # nothing to store (no eval set): an absent dir loads as no rows
        return
    offsets = pa.array(rows.offsets, type=pa.int64())
    table = pa.table(
        {
            name: pa.LargeListArray.from_arrays(offsets, pa.array(getattr(rows, name), type=pa.int32()))
            for name in ("input_ids", "labels", "position_ids")
        }
    )
    with _quiet_datasets(datasets):
        datasets.Dataset(table).save_to_disk(str(path))


def _load_rows(path: Path) -> PackedRows:
    """Packed rows from their Arrow dataset, memory-mapped: a big cache is not read into RAM up front."""
    import datasets

    if not path.exists():
        return PackedRows(*(np.zeros(0, np.int32) for _ in range(3)), np.zeros(1, np.int64))
    table = datasets.load_from_disk(str(path)).data.table
    cols = {}
    for name in ("input_ids", "labels", "position_ids"):
        arr = table.column(name).combine_chunks()  # one chunk per shard file; a no-copy view for one
        cols[name] = arr.values.to_numpy(zero_copy_only=True) if arr.offset == 0 else arr.flatten().to_numpy()
        offsets = arr.offsets.to_numpy()
    return PackedRows(cols["input_ids"], cols["labels"], cols["position_ids"], offsets - offsets[0])


def cached_prepare(data_cfg: Any, tok: Any, template: str | None, cache_dir: str, build: bool) -> Prepared:
    """Load the prepared data for this content hash, building it first when `build` (one rank per node).

    On disk: `<cache_dir>/prepared-<hash>/{train,eval}` (`datasets` Arrow) and `meta.json` (report, eval
    conversations for generation metrics).
    """
    path = Path(cache_dir) / f"prepared-{fingerprint(data_cfg, tok, template)}"
    if (path / "meta.json").exists():
        meta = json.loads((path / "meta.json").read_text())
        prepared = Prepared(
            _load_rows(path / "train"), _load_rows(path / "eval"), meta["eval_conversations"], meta["report"]
        )
        prepared.report["cache"] = {"path": str(path), "hit": True}
        return prepared
    if not build:
        raise FileNotFoundError(f"prepared data {path} is missing: the building rank should have written it")
    prepared = prepare_data(data_cfg, tok, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per builder: on a shared file system each node's local rank 0 builds at once, and pids can repeat.
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_rows(prepared.train_rows, tmp / "train")
    _save_rows(prepared.eval_rows, tmp / "eval")
    meta = {"report": prepared.report, "eval_conversations": prepared.eval_conversations}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(path)  # atomic: a waiting rank never sees a half-written cache
    except OSError:  # another node's builder (shared file system) got there first: same content
        shutil.rmtree(tmp, ignore_errors=True)
    prepared.report["cache"] = {"path": str(path), "hit": False}
    return prepared


def format_report(report: dict[str, Any]) -> str:
    """A plain table of rows read / dropped / kept / tokens per source."""
    lines = [f"{'source':<28}{'read':>8}{'kept':>8}{'tokens':>11}{'trained':>10}  dropped"]
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
    return "\n".join(lines)
