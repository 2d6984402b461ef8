"""Assistant-only masks on real chat templates: exactly the assistant content plus its end-of-turn token."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from launcher.data import encode_conversation
from launcher.data.template import IGNORE_INDEX, TemplateError
from tests.conftest import fixture_path

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Add 2+2"},
    {"role": "assistant", "content": "4"},
]
# (fixture dir, end-of-turn text after each assistant content, whether the template accepts a system turn)
TEMPLATES = [
    ("qwen2.5-0.5b-instruct", "<|im_end|>", True),
    ("qwen3-assembled", "<|im_end|>", True),
    ("tinyllama-1.1b-chat-v1.0", "</s>", True),
    ("mistral-7b-instruct-v0.1", "</s>", False),
]


def trained_spans(tok, enc) -> list[str]:
    spans, cur = [], []
    for i, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == i, "labels are unshifted: a trained label equals its input id"
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tok.decode(s) for s in spans]


@pytest.fixture(params=TEMPLATES, ids=[t[0] for t in TEMPLATES])
def template_case(request):
    name, closer, has_system = request.param
    return AutoTokenizer.from_pretrained(fixture_path("tokenizers", name)), closer, has_system


def test_ids_equal_the_templates_own_tokenization(template_case):
    tok, _, has_system = template_case
    conv = CONV if has_system else CONV[1:]
    enc = encode_conversation(tok, conv)
    ref = tok.apply_chat_template(conv, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert enc["input_ids"] == list(ref)


def test_trained_text_is_assistant_content_plus_end_of_turn(template_case):
    tok, closer, has_system = template_case
    conv = CONV if has_system else CONV[1:]
    spans = trained_spans(tok, encode_conversation(tok, conv))
    expected = [m["content"] + closer for m in conv if m["role"] == "assistant"]
    # SentencePiece decoding may glue a leading space; compare without it.
    assert [s.strip().replace(" ", "") for s in spans] == [e.replace(" ", "") for e in expected]


def test_last_turn_only(template_case):
    tok, closer, has_system = template_case
    conv = CONV if has_system else CONV[1:]
    spans = trained_spans(tok, encode_conversation(tok, conv, train_on="last"))
    assert [s.strip() for s in spans] == ["4" + closer]


def test_injected_text_is_never_trained():
    # Qwen2.5 injects a default system prompt; Qwen3 injects an empty <think> block into the last turn.
    for name in ("qwen2.5-0.5b-instruct", "qwen3-assembled"):
        tok = AutoTokenizer.from_pretrained(fixture_path("tokenizers", name))
        conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
        rendered = tok.apply_chat_template(conv, tokenize=False)
        spans = trained_spans(tok, encode_conversation(tok, conv))
        assert spans == ["Yo<|im_end|>"], (name, rendered)


def test_template_that_rewrites_assistant_content_fails_clearly(demo_tokenizer):
    # A template that upper-cases assistant turns: their content is nowhere verbatim, so no mask is guessed.
    shouting = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}"
    )
    conv = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]
    with pytest.raises(TemplateError, match="rewrites assistant message #1"):
        encode_conversation(demo_tokenizer, conv, chat_template=shouting)


def test_no_assistant_turn_is_an_error(demo_tokenizer):
    with pytest.raises(ValueError, match="no assistant"):
        encode_conversation(demo_tokenizer, [{"role": "user", "content": "hello"}])


def test_demo_tokenizer_masks(demo_tokenizer):
    conv = [{"role": "user", "content": "Convert 7 km to m."}, {"role": "assistant", "content": "7000 m"}]
    assert trained_spans(demo_tokenizer, encode_conversation(demo_tokenizer, conv)) == ["7000 m<|im_end|>"]
