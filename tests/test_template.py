"""Assistant-only masks on real chat templates: exactly the assistant content plus its end-of-turn token."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from launcher.data import encode_conversation
from launcher.data.template import IGNORE_INDEX, TemplateError
from tests.helpers import fixture_path, trained_spans

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


def real_conversations(n: int) -> list[list[dict]]:
    """Real ShareGPT multi-turn + Alpaca rows (skips where ../shared is absent)."""
    import json

    from launcher.data.sources import to_messages

    vicuna = json.loads(fixture_path("data", "sharegpt_vicuna_dummy_conversation.json").read_text())
    alpaca = json.loads(fixture_path("data", "alpaca_gpt4_en_demo.json").read_text())
    out = [to_messages(r, "sharegpt", {}, f"vicuna[{i}]") for i, r in enumerate(vicuna[:n])]
    return out + [to_messages(r, "alpaca", {}, f"alpaca[{i}]") for i, r in enumerate(alpaca[:n])]


def reference_encode(tok, conv: list[dict]) -> tuple[list[int], list[int]]:
    """The slow, obvious way: the prefix method for spans and the tokenizer's own offsets for the mask."""
    import re

    from launcher.data import template as t

    full = tok.apply_chat_template(conv, tokenize=False)
    spans = t._assistant_spans_prefix(tok, conv, full, None) or t._assistant_spans_search(conv, full)
    closers = "|".join(re.escape(c) for c in sorted(t._closing_tokens(tok), key=len, reverse=True))
    spans = [(s, re.compile(rf"(?:\s*(?:{closers}))*").match(full, e).end()) for s, e in spans]
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        i if any(a < e and s < b or (a == b and s <= a < e) for s, e in spans) else IGNORE_INDEX
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return enc["input_ids"], labels


@pytest.mark.parametrize("name", [t[0] for t in TEMPLATES])
def test_fast_batch_path_equals_the_slow_reference(name):
    """The cached role layouts, byte-length offsets and whole-batch masking change nothing."""
    from launcher.data.template import _plan, encode_many

    tok = AutoTokenizer.from_pretrained(fixture_path("tokenizers", name))
    convs = real_conversations(150)
    if name.startswith("mistral"):  # its template rejects system turns and non-alternating roles
        convs = [c for c in convs if [m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2)]
    # Byte-level BPE (Qwen) takes the byte-length path; SentencePiece ones use offsets.
    assert (_plan(tok).byte_len is not None) == name.startswith("qwen")
    fast = encode_many(tok, convs)
    assert len(fast) == len(convs) >= 150
    for conv, (ids, labels) in zip(convs, fast):
        ref_ids, ref_labels = reference_encode(tok, conv)
        assert ids.tolist() == ref_ids
        assert labels.tolist() == ref_labels


def test_tokenizer_json_truncation_does_not_cut_conversations():
    """TinyLlama's tokenizer.json truncates at 512; transformers' own calls ignore that, and so must we."""
    tok = AutoTokenizer.from_pretrained(fixture_path("tokenizers", "tinyllama-1.1b-chat-v1.0"))
    conv = [{"role": "user", "content": "go " * 400}, {"role": "assistant", "content": "on " * 400}]
    enc = encode_conversation(tok, conv)
    assert len(enc["input_ids"]) > 800
    assert enc["input_ids"] == list(
        tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    )


def test_content_dependent_template_falls_back_to_exact_spans(demo_tokenizer):
    """A template that treats some contents differently defeats the cached layout only for those rows."""
    strip_think = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if '</think>' in m['content'] %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    plain = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    think = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "hmm</think>4"}]
    assert trained_spans(
        demo_tokenizer, encode_conversation(demo_tokenizer, plain, chat_template=strip_think)
    ) == ["4<|im_end|>"]
    with pytest.raises(TemplateError, match="rewrites assistant message #1"):
        encode_conversation(demo_tokenizer, think, chat_template=strip_think)


def test_a_trailing_eos_after_the_last_end_of_turn_is_not_trained(demo_tokenizer):
    """The mask contract: assistant content plus the end-of-turn token that closes it, nothing after. A Phi-3
    style template closes every turn with <|end|> and appends eos once at the very end."""
    import copy

    tok = copy.deepcopy(demo_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|user|>", "<|assistant|>"]})
    tok.eos_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else "</s>"
    if tok.eos_token not in tok.get_vocab():
        tok.add_special_tokens({"eos_token": "</s>"})
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
    )
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    enc = encode_conversation(tok, conv, chat_template=template)
    assert enc["input_ids"][-1] == tok.convert_tokens_to_ids(tok.eos_token)
    assert enc["labels"][-1] == IGNORE_INDEX, "the trailing eos is trained"
    spans = trained_spans(tok, enc)
    assert [s.replace(" ", "") for s in spans] == ["Hello<|end|>", "4<|end|>"], spans
