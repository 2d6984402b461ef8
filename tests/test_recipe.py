"""The SmolTalk preset on small local stand-ins with the real columns: every filter counts what it drops."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher.config import compose
from launcher.data.pipeline import prepare_data
from launcher.data.sources import RowError
from launcher.model import load_tokenizer
from tests.helpers import fixture_path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def conv(turns: int, words: int = 3, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for t in range(turns):
        msgs += [
            {"role": "user", "content": f"question {t} " + "word " * words},
            {"role": "assistant", "content": f"answer {t}"},
        ]
    return msgs


@pytest.fixture
def standins(tmp_path):
    everyday = [{"messages": conv(1 + i % 3), "full_topic": "x"} for i in range(12)]
    magpie = (
        [{"messages": conv(1), "category": "math"} for _ in range(5)]
        + [{"messages": conv(1), "category": "coding"} for _ in range(4)]
        + [{"messages": conv(3), "category": "advice-seeking"} for _ in range(3)]  # > 2 turns
        + [{"messages": conv(1, words=700), "category": "editing"} for _ in range(2)]  # >= 512 tokens
        + [{"messages": conv(2), "category": "editing"} for _ in range(6)]  # kept
    )
    smol = [{"messages": conv(1, system="Rewrite politely."), "source": "s"} for _ in range(30)]
    return {
        "everyday": write_jsonl(tmp_path / "everyday.jsonl", everyday),
        "magpie": write_jsonl(tmp_path / "magpie.jsonl", magpie),
        "smol": write_jsonl(tmp_path / "smol.jsonl", smol),
    }


def test_smoltalk_preset_on_local_standins(standins):
    cfg = compose(
        [
            "data=smoltalk",
            "data.eval_fraction=0",
            f"data.sources.0.path={standins['everyday']}",
            f"data.sources.1.path={standins['magpie']}",
            f"data.sources.2.path={standins['smol']}",
            f"data.sources.3.path={standins['smol']}",
            f"data.sources.4.path={standins['smol']}",
            "data.sources.2.sample=10",
            "data.sources.3.sample=10",
            "data.sources.4.sample=10",
        ]
    )
    tok = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg.data, tok)
    report = {r["name"]: r for r in prepared.report["sources"]}
    assert report["everyday-conversations"]["kept"] == 12 and not report["everyday-conversations"]["dropped"]
    magpie = report["magpie-ultra"]
    assert magpie["rows_read"] == 20
    assert magpie["dropped"] == {"exclude:category": 9, "max_turns": 3, "max_tokens": 2}
    assert magpie["kept"] == 6
    for name in ("smol-rewrite", "smol-constraints", "smol-summarize"):
        assert report[name]["kept"] == 10 and report[name]["dropped"] == {"sampled_out": 20}
    assert prepared.report["train"]["conversations"] == 12 + 6 + 30
    # Folded system prompts: no system turn is left, its text leads the user turn.
    text = tok.decode(
        prepared.train_rows[0]["input_ids"] + sum((r["input_ids"] for r in prepared.train_rows[1:]), [])
    )
    assert "<|im_start|>system" not in text and "Rewrite politely.\n\nquestion 0" in text


@pytest.mark.badinput
def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": conv(1)}) + "\n{not json\n")
    cfg = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]"])
    with pytest.raises(RowError, match=r"bad.jsonl:2: malformed JSON"):
        prepare_data(cfg.data, load_tokenizer(cfg.model))
    cfg = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]", "data.on_error=skip"])
    prepared = prepare_data(cfg.data, load_tokenizer(cfg.model))
    assert prepared.report["sources"][0]["dropped"] == {"malformed_json": 1}


@pytest.mark.badinput
@pytest.mark.parametrize(
    "row,match",
    [
        ({"messages": [{"role": "wizard", "content": "x"}]}, r"bad.jsonl:1: messages\[0\].role='wizard'"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content' must be a string"),
        ({"conversations": [{"from": "human"}]}, r"conversations\[0\] needs 'from' and 'value'"),
        ({"instruction": "x", "output": None}, r"field 'output' must be a string"),
        ({"text": "x"}, r"cannot detect the format from columns \['text'\]"),
    ],
)
def test_bad_rows_name_source_row_and_field(tmp_path, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    cfg = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]"])
    with pytest.raises(RowError, match=match):
        prepare_data(cfg.data, load_tokenizer(cfg.model))


@pytest.mark.badinput
def test_conversations_without_assistant_turns_are_counted_drops(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": conv(1)},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
    ]
    cfg = compose(
        [f"data.sources=[{{path: {write_jsonl(tmp_path / 'd.jsonl', rows)}}}]", "data.eval_sources=[]"]
    )
    prepared = prepare_data(cfg.data, load_tokenizer(cfg.model))
    assert prepared.report["sources"][0]["dropped"] == {"no_assistant": 1, "empty_assistant": 1}
    assert prepared.report["sources"][0]["kept"] == 1


def test_real_fixture_formats_load(tmp_path):
    from tests.helpers import fixture_path

    # Auto-detected formats, and a Dolly subset whose response lives in `text` (mapped with `columns`).
    for name, extra in [
        ("alpaca_gpt4_en_demo.json", ""),
        ("sharegpt_vicuna_dummy_conversation.json", ""),
        ("sharegpt_glaive_toolcall_en_demo.json", ""),
        ("dolly15k_partial_instruction_response.jsonl", ", format: alpaca, columns: {output: text}"),
    ]:
        path = fixture_path("data", name)
        cfg = compose(
            [f"data.sources=[{{path: {path}{extra}}}]", "data.eval_sources=[]", "data.max_length=4096"]
        )
        prepared = prepare_data(cfg.data, load_tokenizer(cfg.model))
        src = prepared.report["sources"][0]
        assert src["kept"] > 0 and src["kept"] + sum(src["dropped"].values()) == src["rows_read"], (name, src)


def test_prepared_data_is_cached_by_content(tmp_path, monkeypatch):
    import launcher.data.pipeline as pipeline

    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv(1 + i % 2)} for i in range(20)])
    cfg = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]"])
    tok = load_tokenizer(cfg.model)
    first = pipeline.cached_prepare(cfg.data, tok, None, str(tmp_path / "cache"), build=True)
    assert first.report["cache"]["hit"] is False
    # On disk: plain .npy arrays (tokens of all rows end to end, row offsets), readable with NumPy alone.
    import numpy as np

    import launcher.data.encode as encode

    train = Path(first.report["cache"]["path"]) / "train"
    ids, offsets = np.load(train / "input_ids.npy", mmap_mode="r"), np.load(train / "offsets.npy")
    assert len(offsets) - 1 == len(first.train_rows)
    assert ids[offsets[0] : offsets[1]].tolist() == first.train_rows[0]["input_ids"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a warm cache must not re-tokenize")

    monkeypatch.setattr(encode, "encode_many", no_tokenizing)
    again = pipeline.cached_prepare(cfg.data, tok, None, str(tmp_path / "cache"), build=False)
    assert again.report["cache"]["hit"] is True and again.train_rows == first.train_rows
    # The number of preparing processes is not part of the content: same hash, cache hit.
    more_procs = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]", "data.num_proc=2"])
    assert pipeline.cached_prepare(
        more_procs.data, tok, None, str(tmp_path / "cache"), build=False
    ).train_rows
    # The key is the files' bytes: a copy written later (another node's disk, a new mtime) hits; a byte changed
    # (same size) misses.
    os.utime(path, ns=(1, 1))
    assert pipeline.cached_prepare(cfg.data, tok, None, str(tmp_path / "cache"), build=False).train_rows
    data = bytearray(Path(path).read_bytes())
    data[data.index(b"a")] = ord("b")
    Path(path).write_bytes(bytes(data))
    with pytest.raises(FileNotFoundError):
        pipeline.cached_prepare(cfg.data, tok, None, str(tmp_path / "cache"), build=False)
    # Any change to the recipe is a different content hash: the cache misses (and here would re-tokenize).
    changed = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]", "data.max_length=300"])
    with pytest.raises(FileNotFoundError):
        pipeline.cached_prepare(changed.data, tok, None, str(tmp_path / "cache"), build=False)


@pytest.mark.badinput
def test_missing_local_file_is_not_mistaken_for_a_hub_id(tmp_path):
    cfg = compose([f"data.sources=[{{path: {tmp_path}/data/missing.jsonl}}]", "data.eval_sources=[]"])
    with pytest.raises(ValueError, match="missing.jsonl: no such file"):
        prepare_data(cfg.data, load_tokenizer(cfg.model))


def test_worker_processes_give_identical_data(tmp_path):
    rows = [{"messages": conv(1 + i % 3, words=i % 7)} for i in range(2500)]  # 3 chunks of work
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    base = [f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]"]
    tok = load_tokenizer(compose(base).model)
    one = prepare_data(compose(base).data, tok)
    two = prepare_data(compose([*base, "data.num_proc=2"]).data, tok)
    assert one.train_rows == two.train_rows and one.report["sources"] == two.report["sources"]


@pytest.mark.badinput
@pytest.mark.parametrize("num_proc", [1, 2])
def test_template_that_defeats_masking_raises_with_location_or_is_counted(tmp_path, num_proc):
    from launcher.data.template import TemplateError

    shouting = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}"
    )
    # Upper-casing leaves digits-only answers verbatim: those rows still train, the others cannot be masked.
    rows = [{"messages": conv(1)}] * 1500 + [
        {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}
    ] * 600
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    base = [f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]", f"data.num_proc={num_proc}"]
    tok = load_tokenizer(compose(base).model)
    with pytest.raises(TemplateError, match=r"d.jsonl:1: the chat template rewrites assistant message #1"):
        prepare_data(compose(base).data, tok, template=shouting)
    prepared = prepare_data(compose([*base, "data.on_error=skip"]).data, tok, template=shouting)
    assert prepared.report["sources"][0]["dropped"] == {"template_mismatch": 1500}
    assert prepared.report["sources"][0]["kept"] == 600


def node(role: str, text: str, replies=(), **kw) -> dict:
    return {"role": role, "text": text, "replies": list(replies), **kw}


def test_oasst_trees_best_path_and_all_paths(tmp_path):
    from launcher.data.sources import to_conversations

    tree = node(
        "prompter",
        "Q1",
        [
            node("assistant", "A-rank1", rank=1),
            node(
                "assistant",
                "A-rank0",
                [node("prompter", "Q2a", [node("assistant", "A2")]), node("prompter", "Q2b-leaf")],
                rank=0,
            ),
            node("assistant", "A-deleted", rank=None, deleted=True),
            node("assistant", "A-failed-review", review_result=False),
            node("assistant", "A-unranked"),
        ],
    )
    row = {"message_tree_id": "t", "prompt": tree}
    (best,) = to_conversations(row, "oasst", {}, "t[0]", "best")
    assert [m["content"] for m in best] == ["Q1", "A-rank0", "Q2a", "A2"]
    assert [m["role"] for m in best] == ["user", "assistant"] * 2
    every = to_conversations(row, "oasst", {}, "t[0]", "all")
    # Leaves: A-rank1, A2, Q2b-leaf (cut back to A-rank0), A-unranked; deleted / failed review are skipped.
    assert sorted(tuple(m["content"] for m in c) for c in every) == sorted(
        [("Q1", "A-rank1"), ("Q1", "A-rank0", "Q2a", "A2"), ("Q1", "A-rank0"), ("Q1", "A-unranked")]
    )
    # The message export (the root node as the row) reads the same.
    assert to_conversations({"message_id": "m", **tree}, "oasst", {}, "t[0]", "all") == every

    path = write_jsonl(tmp_path / "trees.jsonl", [row, row])
    base = [f"data.sources=[{{path: {path}, tree_paths: all}}]", "data.eval_sources=[]"]
    cfg = compose(base)
    src = prepare_data(cfg.data, load_tokenizer(cfg.model)).report["sources"][0]
    assert src["rows_read"] == 2 and src["extra_from_trees"] == 6 and src["kept"] == 8
    assert src["kept"] + sum(src["dropped"].values()) == src["rows_read"] + src["extra_from_trees"]


@pytest.mark.badinput
def test_oasst_bad_role_names_row_and_field(tmp_path):
    tree = node("prompter", "Q", [node("robot", "beep")])
    path = write_jsonl(tmp_path / "trees.jsonl", [{"prompt": tree}])
    cfg = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]"])
    with pytest.raises(RowError, match=r"trees.jsonl:1: prompt.replies\[0\].role='robot'"):
        prepare_data(cfg.data, load_tokenizer(cfg.model))


@pytest.mark.parametrize("name", ["oasst_en_100_trees.jsonl", "oasst_en_100_messages.jsonl"])
def test_real_oasst_export_flattens(name):
    """The real OpenAssistant tree export (both shapes): best path = one conversation per tree, rank 0 each turn."""
    from launcher.data.sources import to_conversations

    path = fixture_path("data", name)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        (best,) = to_conversations(row, "oasst", {}, f"{name}:{i + 1}", "best")
        assert best and best[0]["role"] == "user" and best[-1]["role"] == "assistant"
        assert all(a["role"] != b["role"] for a, b in zip(best, best[1:])), "turns alternate"
        root = row.get("prompt", row)
        first = [
            r for r in root["replies"] if not r.get("deleted") and r.get("review_result", True) is not False
        ]
        ranked = [r for r in first if r.get("rank") is not None]
        if ranked:
            assert best[1]["content"] == min(ranked, key=lambda r: r["rank"])["text"]
    cfg = compose(
        [f"data.sources=[{{path: {path}, tree_paths: all}}]", "data.eval_sources=[]", "data.max_length=4096"]
    )
    src = prepare_data(cfg.data, load_tokenizer(cfg.model)).report["sources"][0]
    assert src["rows_read"] == 100 and src["extra_from_trees"] > 100
    assert src["kept"] + sum(src["dropped"].values()) == src["rows_read"] + src["extra_from_trees"]


@pytest.mark.badinput
def test_template_that_refuses_a_conversation_names_the_row_or_counts_it(tmp_path):
    from launcher.data.template import TemplateError

    no_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    rows = [{"messages": conv(1)}] * 3 + [{"messages": conv(1, system="Be brief.")}] + [{"messages": conv(2)}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    base = [f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]"]
    tok = load_tokenizer(compose(base).model)
    with pytest.raises(
        TemplateError, match=r"d.jsonl:4: the chat template refused .*System role not supported"
    ):
        prepare_data(compose(base).data, tok, template=no_system)
    prepared = prepare_data(compose([*base, "data.on_error=skip"]).data, tok, template=no_system)
    assert prepared.report["sources"][0]["dropped"] == {"template_mismatch": 1}
    assert prepared.report["sources"][0]["kept"] == 4


def test_flat_oasst_message_table_is_assembled_into_the_same_trees(tmp_path):
    """oasst1's released shape (one message per row, parent_id links, parquet) reads like its trees."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = fixture_path("data", "oasst_en_100_trees.jsonl")
    trees = [json.loads(line) for line in path.read_text().splitlines()]
    flat = []

    def walk(node, parent, tree_id):  # post-order: every reply comes before its parent, siblings in order
        for reply in node.get("replies", []):
            walk(reply, node["message_id"], tree_id)
        flat.append(
            {
                "message_id": node["message_id"],
                "parent_id": parent,
                "message_tree_id": tree_id,
                "role": node["role"],
                "text": node["text"],
                "lang": node.get("lang"),
                "rank": node.get("rank"),
                "deleted": node.get("deleted", False),
                "review_result": node.get("review_result", True),
            }
        )

    for tree in reversed(trees):
        walk(tree["prompt"], None, tree["message_tree_id"])
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "oasst1.parquet")

    def conversations(src_path, paths):
        cfg = compose(
            [
                f"data.sources=[{{path: {src_path}, tree_paths: {paths}}}]",
                "data.eval_sources=[]",
                "data.max_length=4096",
            ]
        )
        prepared = prepare_data(cfg.data, load_tokenizer(cfg.model))
        rows = prepared.train_rows
        starts = [i for i, x in enumerate(rows.position_ids.tolist()) if x == 0] + [len(rows.position_ids)]
        docs = sorted(tuple(rows.input_ids[x:y].tolist()) for x, y in zip(starts, starts[1:]))
        return prepared.report["sources"][0], docs

    for paths in ("best", "all"):
        src_tree, docs_tree = conversations(path, paths)
        src_flat, docs_flat = conversations(tmp_path / "oasst1.parquet", paths)
        assert src_flat["rows_read"] == len(trees) == 100
        assert docs_flat == docs_tree
        for key in ("kept", "tokens", "trained_tokens", "dropped", "extra_from_trees"):
            assert src_flat[key] == src_tree[key], (paths, key)

    # The `data=oasst` preset on this stand-in: filters read the root message's fields (one tree made German).
    roots = [r for r in flat if r["parent_id"] is None]
    roots[0]["lang"] = "de"
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "oasst1-mixed.parquet")
    cfg = compose(
        ["data=oasst", f"data.sources.0.path={tmp_path / 'oasst1-mixed.parquet'}", "data.max_length=4096"]
    )
    src = prepare_data(cfg.data, load_tokenizer(cfg.model)).report["sources"][0]
    assert src["dropped"]["include:lang"] == 1 and src["dropped"]["held_out_for_eval"] > 0
    assert src["kept"] + sum(src["dropped"].values()) == 100


@pytest.mark.badinput
def test_flat_oasst_with_a_missing_parent_names_the_row(tmp_path):
    rows = [
        {"message_id": "a", "parent_id": None, "role": "prompter", "text": "Q"},
        {"message_id": "b", "parent_id": "zzz", "role": "assistant", "text": "A"},
    ]
    path = write_jsonl(tmp_path / "flat.jsonl", rows)
    cfg = compose([f"data.sources=[{{path: {path}}}]", "data.eval_sources=[]"])
    with pytest.raises(RowError, match=r"flat.jsonl:2: parent_id 'zzz' is not a message in this source"):
        prepare_data(cfg.data, load_tokenizer(cfg.model))
    rows[1] = {"message_id": "a", "parent_id": None, "role": "prompter", "text": "again"}
    path = write_jsonl(tmp_path / "flat.jsonl", rows)
    with pytest.raises(RowError, match=r"flat.jsonl:2: message_id 'a' repeats .*flat.jsonl:1"):
        prepare_data(cfg.data, load_tokenizer(cfg.model))
    rows[1:] = [
        {"message_id": "b", "parent_id": "c", "role": "assistant", "text": "A"},
        {"message_id": "c", "parent_id": "b", "role": "prompter", "text": "Q"},
    ]
    path = write_jsonl(tmp_path / "flat.jsonl", rows)
    with pytest.raises(RowError, match="2 OASST messages are not under any root"):
        prepare_data(cfg.data, load_tokenizer(cfg.model))
