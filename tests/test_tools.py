"""Tool-calling data: function schemas reach the chat template, the assistant's calls are trained as the model's
own template writes them, tool results never are, and a template that cannot show tools is counted, not trained."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from launcher.config import compose
from launcher.data import encode_conversation
from launcher.data.pipeline import load_source
from launcher.model import load_tokenizer
from tests.helpers import fixture_path, trained_spans

GLAIVE = "sharegpt_glaive_toolcall_en_demo.json"


def glaive_source(tokenizer_dir: str | None, **extra):
    path = fixture_path("data", GLAIVE)
    model = [f"model.tokenizer={tokenizer_dir}"] if tokenizer_dir else []
    cfg = compose([*model, f"data.sources=[{{path: {path}}}]", "data.max_length=8192"])
    for k, v in extra.items():
        cfg.data[k] = v
    return cfg


def qwen():
    return AutoTokenizer.from_pretrained(fixture_path("tokenizers", "qwen2.5-0.5b-instruct"))


def test_glaive_tool_calls_train_the_call_never_the_result():
    tok = qwen()
    cfg = glaive_source(str(fixture_path("tokenizers", "qwen2.5-0.5b-instruct")))
    items, report = load_source(cfg.data.sources[0], cfg.data, tok, None)
    rows = json.loads(fixture_path("data", GLAIVE).read_text())
    assert report.rows_read == len(rows) and "tools_not_rendered" not in report.dropped
    assert len(items) == len(rows) - sum(report.dropped.values()) > 250
    # A conversation with a call: the call is trained as Qwen's <tool_call> block, closed by <|im_end|>.
    msgs, enc = next((m, e) for m, e in items if any(x.get("tool_calls") for x in m))
    call = next(x for x in msgs if x.get("tool_calls"))["tool_calls"][0]["function"]
    text = tok.decode(enc["input_ids"])
    spans = trained_spans(tok, {k: v.tolist() for k, v in enc.items()})
    call_spans = [s for s in spans if "<tool_call>" in s]
    assert len(call_spans) == 1 and f'"name": "{call["name"]}"' in call_spans[0]
    assert call_spans[0].strip().endswith("</tool_call><|im_end|>")
    # The schemas are shown (in the system turn) and the results are read, never trained.
    assert "<tools>" in text and '"description"' in text and "<tool_response>" in text
    assert not any("<tool_response>" in s or "<tools>" in s or "<|im_start|>" in s for s in spans)
    results = [x["content"] for x in msgs if x["role"] == "tool"]
    assert results and not any(r[:40] in s for r in results for s in spans)


def test_openai_style_messages_rows_equal_the_sharegpt_spelling(tmp_path):
    tok = qwen()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "Time in a city",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    msgs = [
        {"role": "user", "content": "Time in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "content": '{"time": "12:00"}'},
        {"role": "assistant", "content": "It is noon."},
    ]
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Time in Oslo?"},
            {"from": "function_call", "value": '{"name": "get_time", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"time": "12:00"}'},
            {"from": "gpt", "value": "It is noon."},
        ],
        "tools": json.dumps([tools[0]["function"]]),
    }
    encoded = []
    for row in ({"messages": msgs, "tools": tools}, sharegpt):
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps(row) + "\n")
        cfg = compose([f"data.sources=[{{path: {path}}}]"])
        ((_, enc),) = load_source(cfg.data.sources[0], cfg.data, tok, None)[0]
        encoded.append({k: v.tolist() for k, v in enc.items()})
    assert encoded[0] == encoded[1]
    spans = trained_spans(tok, encoded[0])
    assert [s.strip() for s in spans][-1] == "It is noon.<|im_end|>"
    assert '{"name": "get_time", "arguments": {"city": "Oslo"}}' in spans[0]
    # encode_conversation (the public API) takes the tools too and gives the same tokens.
    assert encode_conversation(tok, load_msgs(msgs), tools=tools) == encoded[0]


def load_msgs(msgs):
    from launcher.data.sources import to_messages

    return to_messages({"messages": msgs}, "messages", {}, "x")


@pytest.mark.badinput
def test_a_template_that_cannot_show_tools_is_counted_not_trained():
    """The demo's ChatML template has no tools: every row with schemas or calls is a counted drop."""
    cfg = glaive_source(None)
    tok = load_tokenizer(cfg.model)
    items, report = load_source(cfg.data.sources[0], cfg.data, tok, None)
    rows = json.loads(fixture_path("data", GLAIVE).read_text())
    with_tools = sum(bool(json.loads(r["tools"] or "[]")) for r in rows)
    assert with_tools > 100 and report.dropped["tools_not_rendered"] == with_tools
    assert len(items) == len(rows) - sum(report.dropped.values())


@pytest.mark.badinput
def test_a_function_call_that_is_not_json_names_the_row(tmp_path):
    path = tmp_path / "d.jsonl"
    row = {
        "conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "get_time("}]
    }
    path.write_text(json.dumps(row) + "\n")
    cfg = compose([f"data.sources=[{{path: {path}}}]"])
    with pytest.raises(
        ValueError, match=r"d.jsonl:1: conversations\[1\].value of a function_call turn is not JSON"
    ):
        load_source(cfg.data.sources[0], cfg.data, qwen(), None)
