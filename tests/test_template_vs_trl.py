"""Our masks against TRL's `{% generation %}` training templates on real SFT data (TRL as a test-only dependency).

TRL's Qwen2.5 training template wraps `'\\n' + content + '<|im_end|>\\n'` in generation tags, so it also trains the
newline after the role header and the one after `<|im_end|>`. Ours trains exactly content + `<|im_end|>` (the issue's
definition). The test asserts the same token ids, our mask inside TRL's, and a difference of whitespace tokens only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from launcher.data import encode_conversation
from launcher.data.sources import to_messages
from launcher.data.template import IGNORE_INDEX
from tests.helpers import fixture_path

trl_templates = pytest.importorskip("trl.chat_template_utils")


def conversations(n: int) -> list[list[dict]]:
    out = []
    vicuna = json.loads(Path(fixture_path("data", "sharegpt_vicuna_dummy_conversation.json")).read_text())
    out += [to_messages(r, "sharegpt", {}, f"vicuna[{i}]") for i, r in enumerate(vicuna[:n])]
    alpaca = json.loads(Path(fixture_path("data", "alpaca_gpt4_en_demo.json")).read_text())
    out += [to_messages(r, "alpaca", {}, f"alpaca[{i}]") for i, r in enumerate(alpaca[:n])]
    return out


def test_qwen25_masks_match_trl_training_template_up_to_whitespace():
    tok = AutoTokenizer.from_pretrained(fixture_path("tokenizers", "qwen2.5-0.5b-instruct"))
    training = trl_templates.qwen2_5_training_chat_template
    checked = 0
    for conv in conversations(150):
        ours = encode_conversation(tok, conv)
        trl = tok.apply_chat_template(
            conv, chat_template=training, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ours["input_ids"] == list(trl["input_ids"]), "the training template renders other tokens"
        our_mask = [lab != IGNORE_INDEX for lab in ours["labels"]]
        trl_mask = [bool(m) for m in trl["assistant_masks"]]
        assert not any(o and not t for o, t in zip(our_mask, trl_mask)), "we train a token TRL does not"
        extra = [i for i, (o, t) in enumerate(zip(our_mask, trl_mask)) if t and not o]
        assert all(tok.decode([ours["input_ids"][i]]).strip() == "" for i in extra), conv
        n_spans = sum(1 for i, m in enumerate(our_mask) if m and (i == 0 or not our_mask[i - 1]))
        assert n_spans == sum(m["role"] == "assistant" for m in conv)
        checked += 1
    assert checked == 300
