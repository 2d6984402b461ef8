"""Data preparation at scale, on generated data: a million documents packed and written with every token once,
the same bytes whatever the processes and chunking, shards that merge to one preparation, errors that name the
line from any worker or shard. Speed and memory are measured in bench/data_scale.py, not here."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.config import compose
from launcher.data import sources
from launcher.data.encode import ChunkResult
from launcher.data.packing import best_fit_counts, lower_bound_rows, pack_plan, position_checksum
from launcher.data.pipeline import cached_prepare, format_report, prepare_data
from launcher.data.store import (
    GATHER_DOCS,
    GATHER_TOKENS,
    EncodedPart,
    PartWriter,
    _blocks,
    load_rows,
    write_rows,
)
from launcher.data.template import IGNORE_INDEX, encode_conversation
from launcher.model import load_tokenizer
from tests.helpers import ROOT, sft_cmd, sft_env


def aranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1])) + np.repeat(starts - (ends - lengths), lengths)


def synthetic_part(path: Path, lengths: np.ndarray, seed: int) -> tuple[EncodedPart, np.ndarray, np.ndarray]:
    """An encoded part of documents with random tokens and trained flags, written by the real PartWriter."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 150_000, int(lengths.sum()), dtype=np.int32)
    mask = (rng.random(len(ids)) < 0.6).astype(np.uint8)
    writer = PartWriter(path, keep_messages=False)
    c = len(lengths)
    writer.add(
        ChunkResult(
            hashes=np.arange(c, dtype=np.uint64),
            status=np.zeros(c, np.uint8),
            lengths=lengths.astype(np.int32),
            trained=np.zeros(c, np.int32),
            truncated=np.zeros(c, np.uint8),
            lost=np.zeros(c, np.int32),
            id_sums=np.zeros(c, np.int64),
            ids=ids,
            mask=mask,
            messages=None,
        )
    )
    writer.finish({"rows_read": c, "dropped": {}, "extra_from_trees": 0})
    return EncodedPart(path), ids, mask


@pytest.mark.slow  # a million documents
def test_a_million_documents_are_packed_whole_with_every_token_once(tmp_path):
    # Real-mix-like lengths (lognormal, a long tail), two encoded parts (two sources or shards).
    rng = np.random.default_rng(0)
    lengths = [np.minimum(rng.lognormal(3.2, 0.8, n).astype(np.int64) + 2, 1024) for n in (600_000, 400_000)]
    parts, ids, masks = zip(*(synthetic_part(tmp_path / f"p{k}", L, k) for k, L in enumerate(lengths)))
    doc_part = np.concatenate([np.full(len(L), k, np.int32) for k, L in enumerate(lengths)])
    doc_len = np.concatenate(lengths)
    doc_src = np.concatenate([np.cumsum(L) - L for L in lengths])
    capacity = 2048

    order, starts = pack_plan(doc_len, capacity)
    assert np.array_equal(np.bincount(order, minlength=len(doc_len)), np.ones(len(doc_len))), "each doc once"
    loads = np.add.reduceat(doc_len[order], starts[:-1])
    assert loads.max() <= capacity
    rows = len(starts) - 1
    assert rows <= len(best_fit_counts(doc_len, capacity)[1]) - 1, "never worse than best-fit decreasing"
    assert doc_len.sum() / (rows * capacity) >= 0.999 and rows <= lower_bound_rows(doc_len, capacity) + 2
    again = pack_plan(doc_len, capacity)
    assert np.array_equal(again[0], order) and np.array_equal(again[1], starts), "deterministic"

    index = write_rows(
        tmp_path / "train", list(parts), doc_part[order], doc_src[order], doc_len[order], starts
    )
    out = load_rows(tmp_path / "train")
    assert len(out) == rows == index["rows"] and isinstance(out.input_ids, np.memmap)
    # Every document whole, in place: its tokens in the row are its tokens in its part.
    lens = doc_len[order]
    out_start = np.cumsum(lens) - lens
    got = np.asarray(out.input_ids)
    for k in range(2):
        sel = doc_part[order] == k
        assert np.array_equal(
            got[aranges(out_start[sel], lens[sel])], ids[k][aranges(doc_src[order][sel], lens[sel])]
        )
        labels = np.where(masks[k].astype(bool), ids[k], IGNORE_INDEX)[
            aranges(doc_src[order][sel], lens[sel])
        ]
        labels[np.cumsum(lens[sel]) - lens[sel]] = IGNORE_INDEX  # a document's first token is never a target
        assert np.array_equal(np.asarray(out.labels)[aranges(out_start[sel], lens[sel])], labels)
    # Positions restart at every document; rows start at documents and never cross one.
    pos = np.asarray(out.position_ids)
    assert np.array_equal(np.flatnonzero(pos == 0), out_start)
    assert np.array_equal(pos, np.arange(len(pos)) - np.repeat(out_start, lens))
    assert np.isin(out.offsets[:-1], out_start).all() and np.diff(out.offsets).max() <= capacity
    # Tokens in = tokens out (count and position checksum), and the digest is the rows' own.
    assert out.num_tokens == int(doc_len.sum())
    want = sum(
        position_checksum(
            ids[k][aranges(np.cumsum(L) - L, L)], np.arange(int(L.sum())) - np.repeat(np.cumsum(L) - L, L)
        )
        for k, L in enumerate(lengths)
    )
    assert position_checksum(got, pos) == want == index["ids_sum"]
    assert out.digest() == type(out)(got, np.asarray(out.labels), pos, out.offsets).digest()


def test_rows_are_gathered_in_blocks_bounded_by_documents_and_tokens():
    # Each document read through a memory map faults in 64 KiB around it: the resident mapped pages between two
    # releases grow with the documents per block, so a block is bounded in both (bench/data_scale.py: 10M
    # conversations peaked at 7 GB RSS, 5.2 GB of it mapped file pages, when blocks were bounded by tokens only).
    rng = np.random.default_rng(1)
    lengths = np.concatenate(
        [rng.integers(1, 40, 50_000), [GATHER_TOKENS + 5], rng.integers(500, 4000, 3000)]
    )
    ends = np.cumsum(lengths)
    blocks = list(_blocks(ends))
    assert [d for d, _ in blocks] == [0] + [e for _, e in blocks[:-1]] and blocks[-1][1] == len(lengths)
    for d, e in blocks:
        assert e - d <= GATHER_DOCS
        assert e - d == 1 or lengths[d:e].sum() <= GATHER_TOKENS, "only a lone document may exceed the tokens"
    assert max(e - d for d, e in blocks) == GATHER_DOCS  # short documents: the document bound is the one met


def gen_rows(n: int, seed: int = 0) -> list[str]:
    """n messages rows (short, so the demo tokenizer encodes them fast): every 97th repeats one 5,000 rows back
    (a duplicate in another chunk), every 331st is too long for data.max_length=64, one in 500 has a second turn
    that makes it too long (cut back to the first)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 97 == 96 and i > 5000:
            rows.append(rows[i - 5000])
            continue
        words = " ".join(
            rng.choice(["add", "seven", "to", "nine", "the", "sum", "of", "one"]) for _ in range(3)
        )
        answer = "answer " * (60 if i % 331 == 0 else 1 + i % 3)
        msgs = [
            {"role": "user", "content": f"q{i} {words}"},
            {"role": "assistant", "content": f"{answer}#{i}"},
        ]
        if i % 500 == 0:
            msgs += [
                {"role": "user", "content": "and again?"},
                {"role": "assistant", "content": "again " * 40},
            ]
        rows.append(json.dumps({"messages": msgs}) + "\n")
    return rows


N_ROWS = 30_000


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "mix.jsonl"
    path.write_text("".join(gen_rows(N_ROWS)))
    return path


def recipe(path: Path, *extra: str) -> list[str]:
    return [
        f"data.sources=[{{path: {path}, sample_fraction: 0.9, weight: 1.5}}]",
        "data.eval_sources=[]",
        "data.eval_size=300",
        "data.max_length=64",
        "data.overlong=truncate",
        "data.dedup=true",
        *extra,
    ]


@pytest.fixture(scope="module")
def in_workers(big_jsonl):
    """The recipe prepared by two worker processes, in ~50 chunks of 32 KiB."""
    saved, sources.BLOCK_BYTES = sources.BLOCK_BYTES, 1 << 15
    try:
        cfg = compose(recipe(big_jsonl, "data.num_proc=2"))
        prepared = prepare_data(cfg.data, load_tokenizer(cfg.model))
    finally:
        sources.BLOCK_BYTES = saved
    return prepared


@pytest.mark.slow  # 30k rows prepared in two worker processes
def test_processes_and_chunking_do_not_change_the_prepared_bytes(big_jsonl, in_workers):
    cfg = compose(recipe(big_jsonl, "data.num_proc=1"))
    assert sources.BLOCK_BYTES == 1 << 20
    one, two = prepare_data(cfg.data, load_tokenizer(cfg.model)), in_workers  # 3 chunks, in this process
    for a, b in ((one.train_rows, two.train_rows), (one.eval_rows, two.eval_rows)):
        for k in ("input_ids", "labels", "position_ids", "offsets"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), k
        assert a.digest() == b.digest()
    assert one.report["sources"] == two.report["sources"] and one.report["train"] == two.report["train"]
    assert list(one.eval_conversations) == list(two.eval_conversations)
    src = one.report["sources"][0]
    # Duplicates across chunks are found (dedup), overlong ones are cut at a turn, everything is counted.
    assert (
        src["dropped"]["duplicate"]
        == src["duplicates"]
        == sum(i % 97 == 96 and i > 5000 for i in range(N_ROWS))
    )
    assert src["truncated"] > 0 and src["rows_read"] == N_ROWS
    assert src["dropped"]["held_out_for_eval"] == 300 and one.report["eval"]["conversations"] == 300
    stages = one.report["stages"]
    assert all(stages[k] > 0 for k in ("read", "render", "tokenize", "pack", "write", "encode_wall")), stages
    assert 0 < one.report["peak_rss_gb"] < 3 and 0 < max(two.report["encode_peak_rss_gb"].values()) < 3
    line = format_report(two.report).splitlines()[-1]  # the data report's time and memory line
    for stage in (
        "encode",
        "read",
        "render",
        "tokenize",
        "pack",
        "write",
        "peak RSS",
        "2 encoding processes",
    ):
        assert stage in line, (stage, line)


def test_a_token_written_out_of_place_stops_the_preparation(tmp_path, monkeypatch):
    """The tokens-in = tokens-out check weighs each token by its position: two tokens of a document swapped while
    the rows are written (same count, same plain sum) stop the preparation with one line, and nothing is cached."""
    from launcher.data import store

    real, calls = store._aranges, []

    def src_swapped(starts, lengths):  # write_rows asks for source, then destination indices
        out = real(starts, lengths)
        calls.append(1)
        if len(calls) % 2 == 1 and len(out) > 1:
            out = out.copy()
            out[[0, 1]] = out[[1, 0]]
        return out

    monkeypatch.setattr(store, "_aranges", src_swapped)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(gen_rows(200)))
    cfg = compose(recipe(path, "data.num_proc=1", "data.eval_size=0"))
    with pytest.raises(RuntimeError, match="packed train rows differ from the encoded conversations"):
        cached_prepare(cfg.data, load_tokenizer(cfg.model), None, str(tmp_path / "cache"), build=True)
    assert not list((tmp_path / "cache").glob("prepared-*/meta.json")), "a wrong preparation was cached"


@pytest.mark.slow  # 30k rows prepared in two worker processes
def test_masks_at_scale_are_the_single_conversation_encoding(big_jsonl, in_workers):
    tok = load_tokenizer(compose([]).model)
    rows = in_workers.train_rows
    by_marker = {}
    for line in big_jsonl.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        by_marker[msgs[1]["content"].rsplit("#", 1)[1]] = msgs
    docs = rows.doc_lengths()
    starts = np.cumsum(docs) - docs
    for d in np.random.default_rng(1).choice(len(docs), 300, replace=False).tolist():
        a, b = int(starts[d]), int(starts[d] + docs[d])
        ids = rows.input_ids[a:b].tolist()
        marker = tok.decode(ids).split("#", 1)[1].split("<", 1)[0].split()[0]
        msgs = by_marker[marker]
        enc = encode_conversation(tok, msgs)
        if len(enc["input_ids"]) > 64:  # truncated at a turn boundary: the first turn pair alone
            enc = encode_conversation(tok, msgs[:2])
        assert ids == enc["input_ids"]
        assert rows.labels[a:b].tolist() == [IGNORE_INDEX] + enc["labels"][1:]


def sft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        sft_cmd(*args), cwd=ROOT, env=sft_env(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # three `sft prepare` processes
def test_shards_merge_into_the_one_preparation_and_a_second_job_only_loads(big_jsonl, in_workers, tmp_path):
    overrides = [*recipe(big_jsonl), "data.num_proc=1", "logging.progress=false", f"cache_dir={tmp_path}"]
    for shard in ("0/3", "2/3"):  # shard 1/3 is missing: the merge prepares it itself, and says so
        out = sft("prepare", "--shard", shard, *overrides)
        assert out.returncode == 0 and f"shard {shard} encoded" in out.stdout, out.stderr[-3000:]
    merged = sft("prepare", *overrides)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "data: shard 1/3 was not prepared (sft prepare --shard 1/3): preparing it here" in merged.stderr
    path = Path(json.loads(merged.stdout.strip().splitlines()[-1])["path"])
    cfg = compose(overrides)
    loaded = cached_prepare(cfg.data, load_tokenizer(cfg.model), None, str(tmp_path), build=False)
    assert loaded.report["sources"] == in_workers.report["sources"]  # every row read once, the same drops
    assert loaded.train_rows == in_workers.train_rows and loaded.eval_rows == in_workers.eval_rows
    assert loaded.train_rows.digest() == in_workers.train_rows.digest()
    assert list(loaded.eval_conversations) == list(in_workers.eval_conversations)
    assert isinstance(loaded.train_rows.input_ids, np.memmap), "ranks memory-map the rows"
    assert not path.with_name(path.name + ".shards").exists(), "merged shards are removed"
    # The next job with the same data and tokenizer prepares nothing: one line says so.
    again = sft("prepare", *overrides)
    assert (
        again.stdout.splitlines()[0]
        == f"data cache hit: {path} (nothing prepared; delete it to prepare again)"
    )
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"path": str(path), "hit": True}


@pytest.mark.badinput
@pytest.mark.slow  # a 100k-row file, read by worker processes
@pytest.mark.parametrize("how", ["workers", "shard"])
def test_a_bad_line_deep_in_a_big_file_is_named_with_its_line(tmp_path, how):
    rows = gen_rows(8_000)
    rows[6_002] = '{"messages": [}\n'  # line 6003, in the second half
    path = tmp_path / "d.jsonl"
    path.write_text("".join(rows))
    overrides = [f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]", f"cache_dir={tmp_path / 'c'}"]
    if how == "workers":  # many chunks in two workers: the error comes back from one, in file order
        code = (
            "import sys; from launcher.data import sources; sources.BLOCK_BYTES = 1 << 15; "
            "from launcher.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        cmd = [sys.executable, "-c", code, "prepare", "data.num_proc=2", *overrides]
        out = subprocess.run(cmd, cwd=ROOT, env=sft_env(), capture_output=True, text=True, timeout=300)
    else:  # a shard that starts mid-file counts the lines before it
        out = sft("prepare", "--shard", "1/2", *overrides)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr
    offset = sum(len(r.encode()) for r in rows[:6_002]) + len('{"messages": [')
    assert f"{path}:6003: malformed JSON at column 15 (byte offset {offset})" in lines[0]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_says_rows_and_tokens_per_second(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(gen_rows(2000)))
    stderr = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    cfg = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]"])
    cached_prepare(cfg.data, load_tokenizer(cfg.model), None, str(tmp_path / "c"), build=True, progress=True)
    lines = [x.rsplit("\r", 1)[-1] for x in stderr.getvalue().split("\n") if x]
    encode = next(x for x in lines if x.startswith("data: encode d.jsonl 100%"))
    assert "2,000 rows" in encode and " rows/s" in encode and " tokens/s" in encode
    assert any(x.startswith("data: write train 100%") for x in lines)


def test_a_data_worker_starts_without_torch(tmp_path):
    # What a worker process runs before its first chunk: the `serve` import and the pickled tokenizer. torch is
    # ~2.4 s of start-up per process here and preparing data never needs it.
    import pickle

    tok = load_tokenizer(compose([]).model)
    (tmp_path / "setup.pkl").write_bytes(pickle.dumps((tok, None, {}, 1)))
    code = (
        "import pickle, sys; from launcher.data.encode import serve; "
        f"pickle.loads(open({str(tmp_path / 'setup.pkl')!r}, 'rb').read()); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=sft_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout[-500:]
