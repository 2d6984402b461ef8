"""Data options each checked by what a wrong implementation would get wrong (no ranks, the demo tokenizer)."""

from __future__ import annotations

import json

import pytest

from launcher.config import compose
from launcher.data.packing import doc_lengths
from launcher.data.pipeline import format_report, prepare_data
from launcher.data.sources import RowError
from launcher.data.template import IGNORE_INDEX
from launcher.model import load_tokenizer
from tests.helpers import run_cli


def conv(i: int, turns: int = 1, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for t in range(turns):
        msgs += [
            {"role": "user", "content": f"question {i}.{t}"},
            {"role": "assistant", "content": f"answer {i}.{t}"},
        ]
    return msgs


def write_jsonl(path, rows) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(path: str, *overrides: str, source: str = ""):
    cfg = compose([f"data.sources=[{{path: {path}{source}}}]", "data.eval_sources=[]", *overrides])
    tok = load_tokenizer(cfg.model)
    return prepare_data(cfg.data, tok), tok


def trained_text(tok, row) -> str:
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX])


@pytest.mark.badinput
def test_on_error_skip_reads_every_line(tmp_path):
    rows = [{"messages": conv(i)} for i in range(39)]
    rows.insert(17, '{"messages": [}\n')
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    src = prepare(path, "data.on_error=skip")[0].report["sources"][0]
    assert (src["rows_read"], src["dropped"], src["kept"]) == (40, {"malformed_json": 1}, 39)


@pytest.mark.badinput
def test_role_order_problems_are_errors_or_counted_drops(tmp_path):
    starts_with_assistant = [{"role": "assistant", "content": "a"}, *conv(1)]
    two_users = [{"role": "user", "content": "a"}, *conv(2)]
    system_then_assistant = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    rows = [{"messages": m} for m in (conv(0), starts_with_assistant, two_users, system_then_assistant)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(RowError, match=r"d.jsonl:2: messages\[0\] is the assistant's"):
        prepare(path)
    src = prepare(path, "data.on_error=skip")[0].report["sources"][0]
    assert src["dropped"] == {"starts_with_assistant": 2, "consecutive_user_turns": 1} and src["kept"] == 1


@pytest.mark.badinput
def test_duplicates_are_counted_and_dedup_drops_them(tmp_path):
    rows = [{"messages": conv(0)}, {"messages": conv(1)}, {"messages": conv(0)}, {"messages": conv(0)}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared, _ = prepare(path)
    src = prepared.report["sources"][0]
    assert src["duplicates"] == 2 and src["kept"] == 4 and src["dropped"] == {}
    assert "2 exact duplicates kept" in format_report(prepared.report)
    src = prepare(path, "data.dedup=true")[0].report["sources"][0]
    assert src["duplicates"] == 2 and src["kept"] == 2 and src["dropped"] == {"duplicate": 2}


def test_rows_removed_by_sampling_and_weight_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv(i)} for i in range(10)])
    src = prepare(path, source=", sample: 4, weight: 2")[0].report["sources"][0]
    assert src["dropped"] == {"sampled_out": 6} and src["kept"] == 8  # 4 sampled, each twice
    src = prepare(path, source=", weight: 0.5")[0].report["sources"][0]
    assert src["dropped"] == {"weighted_out": 5} and src["kept"] == 5
    src = prepare(path, source=", sample_fraction: 0.3, weight: 1.5")[0].report["sources"][0]
    assert (
        src["dropped"] == {"sampled_out": 7} and src["kept"] == 3 + 2
    )  # 3 kept once, then half of them again


def test_overlong_truncate_cuts_at_an_assistant_turn_and_counts(tmp_path):
    long = conv(0, turns=6)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": long}])
    full, tok = prepare(path, "data.max_length=512", "data.pack=false")
    n_full = len(full.train_rows[0]["input_ids"])
    limit = n_full - 5  # the last turn cannot fit
    with pytest.raises(ValueError, match=r"no training rows left .*overlong=1"):
        prepare(path, f"data.max_length={limit}")
    cut, _ = prepare(path, f"data.max_length={limit}", "data.overlong=truncate", "data.pack=false")
    src, row = cut.report["sources"][0], cut.train_rows[0]
    assert src["truncated"] == 1 and src["kept"] == 1
    assert len(row["input_ids"]) <= limit
    text = tok.decode(row["input_ids"])
    assert "answer 0.4" in text and "question 0.5" not in text, text  # whole turns, the last one left out
    assert trained_text(tok, row).rstrip().endswith("answer 0.4<|im_end|>"), trained_text(tok, row)
    assert src["truncated_trained_tokens"] > 0


def test_pack_false_gives_one_conversation_per_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv(i)} for i in range(12)])
    packed = prepare(path)[0]
    unpacked = prepare(path, "data.pack=false")[0]
    assert len(packed.train_rows) < 12 == len(unpacked.train_rows)
    assert all(len(doc_lengths(r["position_ids"])) == 1 for r in unpacked.train_rows)
    assert unpacked.report["train"]["tokens"] == packed.report["train"]["tokens"]


def test_csv_prompt_completion_trains_only_the_completion(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"What is 2+2?",four\n"Name, a colour",blue\n')
    prepared, tok = prepare(str(path), "data.pack=false")
    src = prepared.report["sources"][0]
    assert src["rows_read"] == 2 and src["kept"] == 2
    trained = sorted(trained_text(tok, r) for r in prepared.train_rows)
    assert [t.replace("<|im_end|>", "").strip() for t in trained] == ["blue", "four"], trained
    assert any(
        "Name, a colour" in tok.decode(r["input_ids"]) for r in prepared.train_rows
    )  # quoted comma kept


def test_prompt_completion_with_message_lists(tmp_path):
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "capital of France?"},
            ],
            "completion": [{"role": "assistant", "content": "Paris"}],
        }
    ]
    prepared, tok = prepare(write_jsonl(tmp_path / "d.jsonl", rows), "data.pack=false")
    row = prepared.train_rows[0]
    assert trained_text(tok, row).replace("<|im_end|>", "").strip() == "Paris"
    assert "be brief" in tok.decode(row["input_ids"]) and "capital of France?" in tok.decode(row["input_ids"])


def test_local_dataset_dir_source(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"messages": conv(i)} for i in range(5)]).save_to_disk(str(tmp_path / "ds"))
    prepared, tok = prepare(str(tmp_path / "ds"), "data.pack=false")
    src = prepared.report["sources"][0]
    assert src["rows_read"] == 5 and src["kept"] == 5
    trained = sorted(trained_text(tok, r).replace("<|im_end|>", "").strip() for r in prepared.train_rows)
    assert trained == [f"answer {i}.0" for i in range(5)]


def test_system_prompt_keep_drop_fold(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv(0, system="SYSTEM-RULES")}])
    texts = {}
    for policy in ("keep", "drop", "fold"):
        prepared, tok = prepare(path, "data.pack=false", source=f", system_prompt: {policy}")
        texts[policy] = tok.decode(prepared.train_rows[0]["input_ids"])
    assert "<|im_start|>system\nSYSTEM-RULES" in texts["keep"]
    assert "SYSTEM-RULES" not in texts["drop"] and "<|im_start|>system" not in texts["drop"]
    assert "<|im_start|>user\nSYSTEM-RULES\n\nquestion 0.0" in texts["fold"]


def test_eval_size_holds_out_exactly_that_many(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv(i)} for i in range(20)])
    prepared, _ = prepare(path, "data.eval_size=3")
    assert prepared.report["eval"]["conversations"] == 3 == len(prepared.eval_conversations)
    assert prepared.report["train"]["conversations"] == 17
    held = {m[-1]["content"] for m in prepared.eval_conversations}
    assert prepared.report["sources"][0]["dropped"] == {"held_out_for_eval": 3} and len(held) == 3


@pytest.mark.slow  # two `sft prepare` processes
def test_sft_prepare_builds_then_hits_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv(i)} for i in range(6)])
    args = [
        "prepare",
        f"data.sources=[{{path: {path}}}]",
        "data.eval_sources=[]",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    outs = [run_cli(args, expect_code=0, timeout=120) for _ in range(2)]
    for out in outs:
        assert "d.jsonl" in out.stdout and "packed 6 conversations" in out.stdout
    first, second = (json.loads(o.stdout.strip().splitlines()[-1]) for o in outs)
    assert first["hit"] is False and second["hit"] is True and first["path"] == second["path"]
    assert (tmp_path / "cache").joinpath(first["path"].rsplit("/", 1)[-1], "meta.json").exists()
