"""Render a conversation with the tokenizer's own chat template and label assistant tokens only.

    enc = encode_conversation(tokenizer, [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}])
    enc["input_ids"]  # == the template's own tokenization of the whole conversation
    enc["labels"]     # -100 everywhere but the assistant content and its end-of-turn token(s)

Most real templates have no `{% generation %}` tags, so assistant spans are found on the rendered text:

1. Prefix method: render the conversation up to each assistant turn with the generation prompt (P) and up
   to the end of that turn (Q). When P is a prefix of Q and Q a prefix of the full rendering, the turn is
   the text after P, and its content is located inside it.
2. Templates that rewrite earlier turns once later ones exist (e.g. stripping earlier reasoning) break
   those prefix relations. Then every message's content is located in order in the full rendering; an
   assistant content that the template altered cannot be located and raises instead of guessing.

Trained characters are the assistant content plus the special token(s) that close the turn right after it
(`<|im_end|>`, `</s>`, `<|eot_id|>`, ...), never role headers, separators, or injected text. Characters map
to tokens through the fast tokenizer's offsets; a token that overlaps trained text is trained.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

IGNORE_INDEX = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]

Message = dict[str, Any]


class TemplateError(ValueError):
    """The chat template renders this conversation in a way whose assistant spans cannot be located."""


def _render(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool, template: str | None
) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


@lru_cache(maxsize=64)
def _special_token_regex(closers: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first so that a closer wins over a shorter closer that is its prefix.
    alternation = "|".join(re.escape(s) for s in sorted(closers, key=len, reverse=True))
    return re.compile(rf"(?:\s*(?:{alternation}))+")


_CLOSER_NAME = re.compile(r"end|eot|eos|^</s>$", re.IGNORECASE)


def _closing_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Special tokens that close a turn: eos, or ones named like an end (<|im_end|>, <end_of_turn>, <|eot_id|>).

    Headers of the next turn (<|user|>, <|start_header_id|>) are special too but must never be trained.
    """
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    closers = {s for s in specials if s and _CLOSER_NAME.search(s)}
    if tokenizer.eos_token:
        closers.add(tokenizer.eos_token)
    return tuple(sorted(closers))


_CLOSERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _closers_cached(tokenizer: Any) -> re.Pattern[str]:
    # Keyed by tokenizer and its special-token count: adding ChatML tokens later changes the set.
    key = len(tokenizer.all_special_tokens)
    hit = _CLOSERS.get(tokenizer)
    if hit is None or hit[0] != key:
        hit = (key, _special_token_regex(_closing_tokens(tokenizer)))
        _CLOSERS[tokenizer] = hit
    return hit[1]


def _closing_end(text: str, content_end: int, specials_re: re.Pattern[str]) -> int:
    """End of the special token(s) that close the turn directly after its content (content_end if none)."""
    m = specials_re.match(text, content_end)
    return m.end() if m else content_end


def _assistant_spans_prefix(
    tokenizer: Any, messages: Sequence[Message], full: str, template: str | None
) -> list[tuple[int, int]] | None:
    """Character spans of assistant content by the prefix method; None when the template is not prefix-stable."""
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, template) if i else ""
        # The conversation up to its last message is the full rendering: no need to render it again.
        turn = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False, template)
        if not (turn.startswith(prompt) and full.startswith(turn)):
            return None
        start = turn.find(msg["content"], len(prompt))
        if start < 0:
            return None
        spans.append((start, start + len(msg["content"])))
    return spans


def _assistant_spans_search(messages: Sequence[Message], full: str) -> list[tuple[int, int]]:
    """Locate every message's content in order; assistant content the template altered is an error."""
    spans, pos = [], 0
    for i, msg in enumerate(messages):
        content = msg["content"]
        start = full.find(content, pos)
        if start < 0:
            if msg["role"] == "assistant":
                raise TemplateError(
                    f"the chat template rewrites assistant message #{i} (its content does not appear verbatim in "
                    "the rendered conversation), so its trained tokens cannot be located exactly; use a template "
                    "that keeps assistant content, or train on the last turn only (data.train_on=last)"
                )
            continue  # a system/user text the template rewrote (e.g. folded): nothing to train there
        if msg["role"] == "assistant":
            spans.append((start, start + len(content)))
        pos = start + len(content)
    return spans


@dataclass
class Rendered:
    """A conversation rendered by its template, with the character spans that carry labels."""

    text: str
    trained: list[tuple[int, int]]


def render_conversation(
    tokenizer: Any, messages: Sequence[Message], train_on: str = "all", chat_template: str | None = None
) -> Rendered:
    """Render with the chat template and find the trained character spans (content + closing token)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; offsets are needed to map masks"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant message: nothing to train on")
    full = _render(tokenizer, messages, False, chat_template)
    spans = _assistant_spans_prefix(tokenizer, messages, full, chat_template)
    if spans is None:
        spans = _assistant_spans_search(messages, full)
    if train_on == "last":
        spans = spans[-1:]
    closers = _closers_cached(tokenizer)
    return Rendered(full, [(s, _closing_end(full, e, closers)) for s, e in spans])


def tokenize_rendered(tokenizer: Any, rendered: Sequence[Rendered]) -> list[dict[str, list[int]]]:
    """Tokenize many rendered conversations in one batched call; a token overlapping a trained span is trained."""
    if not rendered:
        return []
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        ids_np = np.asarray(ids, dtype=np.int64)
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        labels = np.full(len(ids_np), IGNORE_INDEX, dtype=np.int64)
        if r.trained and len(ids_np):
            starts = np.asarray([s for s, _ in r.trained])
            ends = np.asarray([e for _, e in r.trained])
            a, b = off[:, 0], off[:, 1]
            k = np.searchsorted(ends, a, side="right")  # first span ending after the token starts
            valid = k < len(ends)
            s_k = starts[np.minimum(k, len(ends) - 1)]
            hit = valid & ((s_k < b) | ((a == b) & (s_k <= a)))
            labels[hit] = ids_np[hit]
        out.append({"input_ids": ids_np.tolist(), "labels": labels.tolist()})
    return out


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Message],
    train_on: str = "all",
    chat_template: str | None = None,
) -> dict[str, list[int]]:
    """Tokenize a conversation with its chat template; label only assistant tokens.

    Args:
        tokenizer: a transformers *fast* tokenizer with a chat template (or `chat_template` given).
        messages: OpenAI-style `{"role", "content"}` dicts with at least one assistant message.
        train_on: "all" assistant turns or only the "last".
        chat_template: a Jinja template to use instead of the tokenizer's own.

    Returns:
        `{"input_ids": [...], "labels": [...]}`, labels unshifted with -100 for untrained positions.
    """
    return tokenize_rendered(tokenizer, [render_conversation(tokenizer, messages, train_on, chat_template)])[
        0
    ]


def ensure_chat_template(tokenizer: Any, override: str | None = None) -> bool:
    """Give the tokenizer a chat template; returns True when ChatML special tokens had to be added.

    A base model's tokenizer has no template: we fall back to ChatML and add its markers as special tokens,
    so the caller must resize the embeddings.
    """
    if override:
        tokenizer.chat_template = override
        return False
    if tokenizer.chat_template:
        return False
    warnings.warn(
        "tokenizer has no chat template: using ChatML and adding <|im_start|>/<|im_end|> as special tokens "
        "(embeddings are resized; their rows start untrained)",
        stacklevel=2,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    added = tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL_TOKENS})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or "<|im_end|>"
    return added > 0
