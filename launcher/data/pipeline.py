"""The data stage of a run: sources -> filtered messages -> tokens + masks -> packed rows, cached by content.

    prepared = prepare_data(cfg.data, tokenizer, cache_dir, chat_template)
    prepared.train_rows, prepared.eval_rows, prepared.report

Everything here is deterministic for a seed and free of torch.distributed: the caller decides which rank
builds the cache (see `launcher.train.build_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from launcher.data.packing import pack_examples
from launcher.data.sources import (
    RowError,
    SourceReport,
    apply_system_policy,
    conversation_problem,
    detect_format,
    passes_filters,
    read_rows,
    sample_rows,
    source_name,
    to_messages,
)
from launcher.data.template import (
    IGNORE_INDEX,
    Rendered,
    TemplateError,
    encode_conversation,
    render_conversation,
    tokenize_rendered,
)

CACHE_VERSION = 2


@dataclass
class Prepared:
    train_rows: list[dict[str, list[int]]]
    eval_rows: list[dict[str, list[int]]]
    eval_conversations: list[list[dict[str, str]]]
    report: dict[str, Any]


def _n_trained(labels: list[int]) -> int:
    return sum(1 for x in labels if x != IGNORE_INDEX)


def _fit(tok: Any, msgs: list[dict], enc: dict, data_cfg: Any, template: str | None, report: SourceReport):
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
        shorter = encode_conversation(tok, msgs[:k], train_on=data_cfg.train_on.value, chat_template=template)
        if len(shorter["input_ids"]) <= data_cfg.max_length:
            report.truncated_trained_tokens += _n_trained(enc["labels"]) - _n_trained(shorter["labels"])
            report.truncated += 1
            return shorter
    report.drop("overlong")
    return None


TOKENIZE_CHUNK = 1024  # conversations per batched tokenizer call (the Rust side spreads a batch over cores)


def load_source(src: Any, data_cfg: Any, tok: Any, template: str | None) -> tuple[list[tuple], SourceReport]:
    """Read, filter, normalise and encode one source. Returns [(messages, encoded)] and its report."""
    report = SourceReport(source_name(src))
    on_error = data_cfg.on_error.value
    fmt = None if src.format.value == "auto" else src.format.value
    columns = dict(src.columns)
    pending: list[tuple[str, list[dict]]] = []
    for where, row in read_rows(src, on_error, report):
        report.rows_read += 1
        reason = passes_filters(row, src)
        if reason:
            report.drop(reason)
            continue
        try:
            fmt = fmt or detect_format(row, columns)
            msgs = to_messages(row, fmt, columns, where)
        except RowError as e:
            if on_error == "skip":
                report.drop("malformed_row")
                continue
            raise RowError(f"data source {report.name}: {e}") from None
        msgs = apply_system_policy(msgs, src.system_prompt.value)
        problem = conversation_problem(msgs)
        if problem:
            report.drop(problem)
            continue
        if src.max_turns is not None and sum(m["role"] == "assistant" for m in msgs) > src.max_turns:
            report.drop("max_turns")
            continue
        pending.append((where, msgs))

    out = []
    chunks = [[m for _, m in pending[i : i + TOKENIZE_CHUNK]] for i in range(0, len(pending), TOKENIZE_CHUNK)]
    encoded = _encode_chunks(tok, chunks, data_cfg.train_on.value, template, data_cfg.num_proc)
    for (where, msgs), enc in zip(pending, (e for chunk in encoded for e in chunk)):
        if isinstance(enc, TemplateError):
            if on_error == "skip":
                report.drop("template_mismatch")
                continue
            raise TemplateError(f"{where}: {enc}") from None
        enc = _fit(tok, msgs, enc, data_cfg, template, report)
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


def _encode_chunk(tok: Any, convs: list[list[dict]], train_on: str, template: str | None) -> list:
    """Render + tokenize one chunk; a conversation whose template defeats masking yields its TemplateError."""
    rendered: list[Rendered | TemplateError] = []
    for msgs in convs:
        try:
            rendered.append(render_conversation(tok, msgs, train_on, template))
        except TemplateError as e:
            rendered.append(e)
    encs = iter(tokenize_rendered(tok, [r for r in rendered if isinstance(r, Rendered)]))
    return [r if isinstance(r, TemplateError) else next(encs) for r in rendered]


_WORKER: dict[str, Any] = {}


def _worker_init(tok: Any, train_on: str, template: str | None) -> None:
    _WORKER.update(tok=tok, train_on=train_on, template=template)


def _worker_encode(convs: list[list[dict]]) -> list:
    return _encode_chunk(_WORKER["tok"], convs, _WORKER["train_on"], _WORKER["template"])


def _encode_chunks(tok: Any, chunks: list, train_on: str, template: str | None, num_proc: int) -> list:
    """Encode chunks in order, in `num_proc` spawned worker processes when asked for and there are 2+ chunks."""
    if num_proc <= 1 or len(chunks) < 2:
        return [_encode_chunk(tok, c, train_on, template) for c in chunks]
    import multiprocessing

    # spawn, not fork: the parent may already hold gloo and tokenizer threads, which fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(
        min(num_proc, len(chunks)), initializer=_worker_init, initargs=(tok, train_on, template)
    ) as pool:
        return pool.map(_worker_encode, chunks, chunksize=1)


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
    train_items, reports = [], []
    for src in data_cfg.sources:
        items, report = load_source(src, data_cfg, tok, template)
        reports.append(report)
        train_items.append((src, items, report))

    eval_items: list[tuple] = []
    eval_reports = []
    for src in data_cfg.eval_sources:
        items, report = load_source(src, data_cfg, tok, template)
        report.kept = len(items)
        report.tokens = sum(len(e["input_ids"]) for _, e in items)
        report.trained_tokens = sum(_n_trained(e["labels"]) for _, e in items)
        eval_items += items
        eval_reports.append(report)
    mixed: list[tuple] = []
    for src, items, report in train_items:
        if not data_cfg.eval_sources and (data_cfg.eval_size or data_cfg.eval_fraction):  # split off eval
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
        picked = sample_rows(items, src, data_cfg.seed)
        if len(picked) < len(items):
            report.drop("sampled_out", len(items) - len(picked))
        report.kept = len(picked)
        report.tokens = sum(len(e["input_ids"]) for _, e in picked)
        report.trained_tokens = sum(_n_trained(e["labels"]) for _, e in picked)
        mixed += picked

    if not mixed:
        raise ValueError(
            "no training rows left after filtering: see the data report above for what was dropped"
        )
    train_examples = [e for _, e in mixed]
    eval_examples = [e for _, e in eval_items]
    if data_cfg.pack:
        train_rows = pack_examples(train_examples, data_cfg.max_length)
        eval_rows = pack_examples(eval_examples, data_cfg.max_length) if eval_examples else []
    else:
        train_rows = [_single(e) for e in train_examples]
        eval_rows = [_single(e) for e in eval_examples]
    capacity = len(train_rows) * data_cfg.max_length
    n_tokens = sum(len(r["input_ids"]) for r in train_rows)
    n_trained = sum(_n_trained(r["labels"]) for r in train_rows)
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


def _single(enc: dict[str, list[int]]) -> dict[str, list[int]]:
    return {
        "input_ids": list(enc["input_ids"]),
        "labels": list(enc["labels"]),
        "position_ids": list(range(len(enc["input_ids"]))),
    }


def cached_prepare(data_cfg: Any, tok: Any, template: str | None, cache_dir: str, build: bool) -> Prepared:
    """Load the prepared data for this content hash, building it first when `build` (one rank per node)."""
    path = Path(cache_dir) / f"prepared-{fingerprint(data_cfg, tok, template)}.pkl"
    if path.exists():
        with path.open("rb") as f:
            prepared = pickle.load(f)
        prepared.report["cache"] = {"path": str(path), "hit": True}
        return prepared
    if not build:
        raise FileNotFoundError(f"prepared data {path} is missing: the building rank should have written it")
    prepared = prepare_data(data_cfg, tok, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as f:
        pickle.dump(prepared, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)  # atomic: a waiting rank never reads a half-written file
    prepared.report["cache"] = {"path": str(path), "hit": False}
    return prepared


def format_report(report: dict[str, Any]) -> str:
    """A plain table of rows read / dropped / kept / tokens per source."""
    lines = [f"{'source':<28}{'read':>8}{'kept':>8}{'tokens':>11}{'trained':>10}  dropped"]
    for r in report["sources"] + report["eval_sources"]:
        dropped = ", ".join(f"{k}={v}" for k, v in r["dropped"].items() if v) or "-"
        lines.append(
            f"{r['name'][:27]:<28}{r['rows_read']:>8}{r['kept']:>8}{r['tokens']:>11}{r['trained_tokens']:>10}  {dropped}"
        )
    t = report["train"]
    lines.append(
        f"packed {t['conversations']} conversations into {t['packed_rows']} rows: efficiency "
        f"{t['packing_efficiency']:.4f}, {t['docs_per_pack']:.1f} docs/pack, trained fraction {t['trained_fraction']:.3f}"
    )
    return "\n".join(lines)
