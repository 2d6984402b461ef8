"""Render a conversation with the tokenizer's own chat template and label assistant tokens only.

    enc = encode_conversation(tokenizer, [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}])
    enc["input_ids"]  # == the template's own tokenization of the whole conversation
    enc["labels"]     # -100 everywhere but the assistant content and its end-of-turn token(s)

Most real templates have no `{% generation %}` tags, so assistant spans are found on the rendered text:

0. Layout method (the fast path, one render per conversation): the template is rendered once per sequence of
   roles with numbered placeholder contents, which gives the fixed text around each content. When the real
   rendering equals that layout filled with the real contents, every content sits exactly there.
1. Prefix method: render the conversation up to each assistant turn with the generation prompt (P) and up
   to the end of that turn (Q). When P is a prefix of Q and Q a prefix of the full rendering, the turn is
   the text after P, and its content is located inside it.
2. Templates that rewrite earlier turns once later ones exist (e.g. stripping earlier reasoning) break
   those prefix relations. Then every message's content is located in order in the full rendering; an
   assistant content that the template altered cannot be located and raises instead of guessing.

Trained characters are the assistant content plus the one special token that closes the turn right after it
(`<|im_end|>`, `</s>`, `<|eot_id|>`, ...), never role headers, separators, injected text, or an end-of-sequence
token the template appends after the last turn's end-of-turn token. Characters map
to tokens through the fast tokenizer's offsets (or, for byte-level BPE, the byte length of each token id); a
token that overlaps trained text is trained.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import unicodedata
import weakref
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
    tokenizer: Any,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    template: str | None,
    tools: list[dict] | None = None,
) -> str:
    return tokenizer.apply_chat_template(
        list(messages),
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=template,
    )


@lru_cache(maxsize=64)
def _special_token_regex(closers: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first so that a closer wins over a shorter closer that is its prefix.
    alternation = "|".join(re.escape(s) for s in sorted(closers, key=len, reverse=True))
    # One closer: the end-of-turn token. An end-of-sequence token a template appends after the last turn's
    # end-of-turn token (`...<|end|></s>`) closes the sequence, not the answer, and is never trained.
    return re.compile(rf"\s*(?:{alternation})")


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


def _closing_end(text: str, content_end: int, specials_re: re.Pattern[str]) -> int:
    """End of the special token that closes the turn directly after its content (content_end if none)."""
    m = specials_re.match(text, content_end)
    return m.end() if m else content_end


def _assistant_spans_prefix(
    tokenizer: Any,
    messages: Sequence[Message],
    full: str,
    template: str | None,
    tools: list[dict] | None = None,
    closers: re.Pattern[str] | None = None,
) -> list[tuple[int, int]] | None:
    """Character spans of assistant content by the prefix method; None when the template is not prefix-stable.

    A turn that calls tools is trained on everything the template writes after the generation prompt up to its
    closing token (the calls as this model spells them, e.g. Qwen's `<tool_call>{...}</tool_call>`).
    """
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, template, tools) if i else ""
        # The conversation up to its last message is the full rendering: no need to render it again.
        last = i == len(messages) - 1
        turn = full if last else _render(tokenizer, messages[: i + 1], False, template, tools)
        if not (turn.startswith(prompt) and full.startswith(turn)):
            return None
        if msg.get("tool_calls"):
            assert closers is not None
            end = len(turn.rstrip())
            while (m := _trailing_closer(turn[:end], closers)) is not None:
                end = m
            spans.append((len(prompt), end))
            continue
        start = turn.find(msg["content"], len(prompt))
        if start < 0:
            return None
        spans.append((start, start + len(msg["content"])))
    return spans


def _trailing_closer(text: str, closers: re.Pattern[str]) -> int | None:
    """Start of a closing special token (and the white space before it) that ends `text`, or None."""
    for m in closers.finditer(text):
        if m.end() == len(text) and m.start() < len(text):
            return m.start()
    return None


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
    tokenizer: Any,
    messages: Sequence[Message],
    train_on: str = "all",
    chat_template: str | None = None,
    tools: list[dict] | None = None,
) -> Rendered:
    """Render with the chat template and find the trained character spans (content + closing token)."""
    out = render_many(tokenizer, [messages], train_on, chat_template, [tools])[0]
    if isinstance(out, TemplateError):
        raise out
    return out


_SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use code points: never in a real template


def _layout(
    tokenizer: Any, plan: _TokenPlan, roles: tuple[str, ...], template: str | None
) -> list[str] | None:
    """The template's text around each message's content for this sequence of roles, or None.

    Rendered once per role sequence with numbered placeholder contents: when every placeholder shows up
    exactly once and in order, the template writes each content verbatim between fixed strings (for
    placeholder content; `_spans_from_layout` checks it still holds for the real content).
    """
    key = (template or str(tokenizer.chat_template), roles)
    if key in plan.layouts:
        return plan.layouts[key]
    msgs = [{"role": r, "content": f"\ue000{i}\ue001"} for i, r in enumerate(roles)]
    try:
        parts = _SENTINEL.split(_render(tokenizer, msgs, False, template))
    except Exception:  # the template refuses this role sequence; the real render will say why
        parts = None
    literals = None
    if parts is not None and [int(x) for x in parts[1::2]] == list(range(len(roles))):
        literals = parts[0::2]
    if len(plan.layouts) < 4096:
        plan.layouts[key] = literals
    return literals


def _spans_from_layout(
    messages: Sequence[Message], full: str, literals: list[str]
) -> list[tuple[int, int]] | None:
    """Assistant content spans when the real rendering is exactly the layout filled with the real contents."""
    pieces, spans, pos = [literals[0]], [], len(literals[0])
    for msg, lit in zip(messages, literals[1:]):
        content = msg["content"]
        if msg["role"] == "assistant":
            spans.append((pos, pos + len(content)))
        pieces += (content, lit)
        pos += len(content) + len(lit)
    # Equal strings: each content sits exactly where the template put it, so the spans are exact.
    return spans if "".join(pieces) == full else None


class ToolsNotRendered(TemplateError):
    """The chat template drops the conversation's tool schemas or calls: training on it would teach calls to
    functions the model was never shown (counted as `tools_not_rendered`, never trained)."""


def _uses_tools(messages: Sequence[Message], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") for m in messages)


def _tools_dropped(
    tokenizer: Any, messages: Sequence[Message], full: str, template: str | None, tools: list[dict] | None
) -> str | None:
    """What of the tools the template leaves out ("tools" schemas, "tool_calls"), by rendering without them."""
    if tools and _render_or_error(tokenizer, messages, template, None) == full:
        return "tools"
    if any(m.get("tool_calls") for m in messages):
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if _render_or_error(tokenizer, bare, template, tools) == full:
            return "tool_calls"
    return None


def render_many(
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    train_on: str = "all",
    chat_template: str | None = None,
    tools: Sequence[list[dict] | None] | None = None,
) -> list[Rendered | TemplateError]:
    """Render many conversations and find their trained spans; a conversation that can't be masked
    exactly yields its TemplateError instead.

    Spans come from, in order: the cached layout of the conversation's role sequence (one render per
    conversation), the prefix method, the in-order content search (see the module docstring). Conversations
    with tool schemas (`tools[i]`, passed to the template) or tool calls take the prefix method.
    """
    tools = list(tools) if tools is not None else [None] * len(conversations)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; offsets are needed to map masks"
        )
    for messages in conversations:
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("conversation has no assistant message: nothing to train on")
    if not conversations:
        return []
    with_tools = [_uses_tools(m, t) for m, t in zip(conversations, tools)]
    try:  # one call for the whole batch; a template error in one conversation re-renders them one by one
        if any(with_tools):
            raise ValueError("tool schemas differ per conversation")
        fulls: list[str | TemplateError] = tokenizer.apply_chat_template(
            [list(m) for m in conversations], tokenize=False, chat_template=chat_template
        )
    except Exception:
        fulls = [_render_or_error(tokenizer, m, chat_template, t) for m, t in zip(conversations, tools)]
    plan = _plan(tokenizer)
    out: list[Rendered | TemplateError] = []
    for messages, full, conv_tools, tooled in zip(conversations, fulls, tools, with_tools):
        if isinstance(full, TemplateError):
            out.append(full)
            continue
        if tooled:
            dropped = _tools_dropped(tokenizer, messages, full, chat_template, conv_tools)
            if dropped:
                out.append(ToolsNotRendered(f"the chat template ignores the conversation's {dropped}"))
                continue
            spans = _assistant_spans_prefix(
                tokenizer, messages, full, chat_template, conv_tools, plan.closers
            )
            if spans is None:
                out.append(
                    TemplateError(
                        "the chat template is not prefix-stable with tools: tool calls can't be located"
                    )
                )
                continue
        else:
            literals = _layout(tokenizer, plan, tuple(m["role"] for m in messages), chat_template)
            spans = _spans_from_layout(messages, full, literals) if literals is not None else None
        if spans is None:
            spans = _assistant_spans_prefix(tokenizer, messages, full, chat_template)
        if spans is None:
            try:
                spans = _assistant_spans_search(messages, full)
            except TemplateError as e:
                out.append(e)
                continue
        if train_on == "last":
            spans = spans[-1:]
        out.append(Rendered(full, [(s, _closing_end(full, e, plan.closers)) for s, e in spans]))
    return out


def _render_or_error(
    tokenizer: Any, messages: Sequence[Message], template: str | None, tools: list[dict] | None = None
) -> str | TemplateError:
    """The rendering, or why the template refused it (e.g. a system turn, roles that don't alternate)."""
    try:
        return _render(tokenizer, messages, False, template, tools)
    except Exception as e:  # Jinja's raise_exception() and template bugs: a data/template mismatch
        roles = [m["role"] for m in messages]
        return TemplateError(f"the chat template refused this conversation (roles {roles}): {e}")


class _TokenPlan:
    """How to map a tokenizer's tokens back to characters, fastest exact way first.

    Byte-level BPE tokenizers (Qwen, Llama 3, GPT-style) spell every token as a fixed byte string, so a
    token's extent is a running sum of per-id byte lengths: no offsets need to be computed or converted.
    That holds only when the text reaches the model unchanged (no normalizer, or NFC on NFC text) and is
    re-checked on every batch (each conversation's byte lengths must sum to its text's, else the batch is
    encoded again with offsets); other tokenizers use offsets.
    """

    def __init__(self, tokenizer: Any):
        backend = tokenizer.backend_tokenizer
        if backend.truncation or backend.padding:
            # tokenizer.json may carry truncation/padding (TinyLlama's truncates at 512), which transformers
            # only switches off inside its own calls: use a private copy without them.
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        self.byte_len: np.ndarray | None = None
        normalizer = repr(backend.normalizer) if backend.normalizer is not None else None
        if (
            type(backend.model).__name__ == "BPE"
            and "ByteLevel" in repr(backend.pre_tokenizer)
            and type(backend.decoder).__name__ == "ByteLevel"
            and normalizer in (None, "NFC()")
        ):
            vocab = backend.get_vocab(with_added_tokens=False)
            table = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
            # One ByteLevel character per byte.
            table[np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))] = np.fromiter(
                map(len, vocab), dtype=np.int64, count=len(vocab)
            )
            for i, added in backend.get_added_tokens_decoder().items():
                table[i] = len(added.content.encode("utf-8"))
            self.byte_len = table
        self.nfc = normalizer == "NFC()"
        # Without offsets to compute, the Rust side is ~20% faster.
        fast = getattr(backend, "encode_batch_fast", None)
        self.encode = fast if self.byte_len is not None and fast is not None else backend.encode_batch
        self.closers = _special_token_regex(_closing_tokens(tokenizer))
        self.layouts: dict[tuple, list[str] | None] = {}


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(tokenizer: Any) -> _TokenPlan:
    key = (len(tokenizer), len(tokenizer.all_special_tokens))  # added (special) tokens change the plan
    hit = _PLANS.get(tokenizer)
    if hit is None or hit[0] != key:
        hit = (key, _TokenPlan(tokenizer))
        _PLANS[tokenizer] = hit
    return hit[1]


def _byte_pos(text: str, chars: list[int]) -> list[int]:
    """Byte offsets of character positions in `text` (identity for ASCII text)."""
    if text.isascii():
        return chars
    return [len(text[:c].encode("utf-8")) for c in chars]


def tokenize_to_arrays(tokenizer: Any, rendered: Sequence[Rendered]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize rendered conversations in one batched call; returns (input_ids, labels) int32 arrays each.

    A token overlapping a trained span is trained. The mask of the whole batch is computed at once on one
    coordinate line: conversation c's positions are shifted by the total length of the ones before it.
    """
    if not rendered:
        return []
    plan = _plan(tokenizer)
    texts = [r.text for r in rendered]
    encs = plan.encode(texts, add_special_tokens=False)
    counts = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    ids = np.fromiter(
        itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=int(counts.sum())
    )
    starts_sp: list[int] = []
    ends_sp: list[int] = []
    tok_ends = None
    if plan.byte_len is not None:
        text_bytes = [len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts]
        tok_ends = np.cumsum(plan.byte_len[ids])
        conv_ends = np.cumsum(counts)
        expect = np.cumsum(np.asarray(text_bytes, dtype=np.int64))
        got = np.where(counts > 0, tok_ends[np.maximum(conv_ends - 1, 0)], 0)
        nfc_ok = not plan.nfc or all(unicodedata.is_normalized("NFC", t) for t in texts)
        # Empty conversations have no tokens; a conversation is exact when all before it and it add up.
        if not nfc_ok or counts.min() == 0 or not np.array_equal(got, expect):
            tok_ends = None
    if tok_ends is not None:
        tok_starts = tok_ends - plan.byte_len[ids]
        base = 0
        for r, n_bytes in zip(rendered, text_bytes):
            flat = [x for span in r.trained for x in span]
            for i, x in enumerate(_byte_pos(r.text, flat)):
                (starts_sp if i % 2 == 0 else ends_sp).append(base + x)
            base += n_bytes
    else:
        # Offsets in characters, shifted per conversation onto one line. A byte-level batch that did not add
        # up was encoded without offsets: encode it again with them.
        if plan.encode != plan.backend.encode_batch:
            encs = plan.backend.encode_batch(texts, add_special_tokens=False)
        off = np.asarray([o for e in encs for o in e.offsets], dtype=np.int64).reshape(-1, 2)
        char_base = np.cumsum([0] + [len(t) for t in texts[:-1]])
        off += np.repeat(char_base, counts)[:, None]
        tok_starts, tok_ends = off[:, 0], off[:, 1]
        for r, b in zip(rendered, char_base.tolist()):
            for s, e in r.trained:
                starts_sp.append(b + s)
                ends_sp.append(b + e)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    if starts_sp and len(ids):
        starts = np.asarray(starts_sp, dtype=np.int64)
        ends = np.asarray(ends_sp, dtype=np.int64)
        k = np.searchsorted(ends, tok_starts, side="right")  # first span ending after the token starts
        valid = k < len(ends)
        s_k = starts[np.minimum(k, len(ends) - 1)]
        hit = valid & ((s_k < tok_ends) | ((tok_starts == tok_ends) & (s_k <= tok_starts)))
        labels[hit] = ids[hit]
    cuts = np.cumsum(counts)[:-1]
    return list(zip(np.split(ids, cuts), np.split(labels, cuts)))


def tokenize_rendered(tokenizer: Any, rendered: Sequence[Rendered]) -> list[dict[str, list[int]]]:
    """`tokenize_to_arrays` as plain lists: `{"input_ids": [...], "labels": [...]}` per conversation."""
    return [
        {"input_ids": ids.tolist(), "labels": labels.tolist()}
        for ids, labels in tokenize_to_arrays(tokenizer, rendered)
    ]


RENDER_CHUNK = 256  # conversations per tokenizer call; rendered while earlier chunks are tokenized
# Tokenizing threads (each single-threaded in Rust); at least 2 so that one always runs beside rendering.
TOKENIZE_THREADS = max(
    2, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2)
)


def encode_many(
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    train_on: str = "all",
    chat_template: str | None = None,
    tools: Sequence[list[dict] | None] | None = None,
    timings: dict[str, float] | None = None,
) -> list[tuple[np.ndarray, np.ndarray] | TemplateError]:
    """Encode many conversations: (input_ids, labels) arrays, or the TemplateError of one that can't be masked.
    `tools[i]` are conversation i's function schemas (passed to the chat template). `timings`, if given, gains
    the seconds spent rendering ("render") and in the tokenizer threads ("tokenize", overlapping rendering).

    Rendering (Python, holds the GIL) of one chunk overlaps with the Rust tokenizer (releases it) working on
    the chunks before, so every core stays busy in one process.
    """
    out: list[tuple[np.ndarray, np.ndarray] | TemplateError] = []

    spent = {"render": 0.0, "tokenize": 0.0}

    def tokenize(rendered: list[Rendered | TemplateError]) -> list:
        t0 = time.perf_counter()
        encs = iter(tokenize_to_arrays(tokenizer, [r for r in rendered if isinstance(r, Rendered)]))
        out = [r if isinstance(r, TemplateError) else next(encs) for r in rendered]
        spent["tokenize"] += time.perf_counter() - t0  # one += per chunk, under the GIL
        return out

    # The Rust tokenizer's own thread pool spin-waits between batches, which starves the rendering thread
    # on a small machine. Instead each of our threads tokenizes a whole chunk single-threaded (the GIL is
    # released inside), while this thread renders the next: measured 25-30% faster on 2 cores.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ThreadPoolExecutor(TOKENIZE_THREADS) as pool:
            pending: deque = deque()
            for i in range(0, len(conversations), RENDER_CHUNK):
                chunk_tools = tools[i : i + RENDER_CHUNK] if tools is not None else None
                t0 = time.perf_counter()
                rendered = render_many(
                    tokenizer, conversations[i : i + RENDER_CHUNK], train_on, chat_template, chunk_tools
                )
                spent["render"] += time.perf_counter() - t0
                if len(pending) >= TOKENIZE_THREADS:
                    out += pending.popleft().result()
                pending.append(pool.submit(tokenize, rendered))
            while pending:
                out += pending.popleft().result()
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    if timings is not None:
        for k, v in spent.items():
            timings[k] = timings.get(k, 0.0) + v
    return out


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Message],
    train_on: str = "all",
    chat_template: str | None = None,
    tools: list[dict] | None = None,
) -> dict[str, list[int]]:
    """Tokenize a conversation with its chat template; label only assistant tokens.

    Args:
        tokenizer: a transformers *fast* tokenizer with a chat template (or `chat_template` given).
        messages: OpenAI-style `{"role", "content"}` dicts with at least one assistant message; an assistant
            message may carry `tool_calls` (trained as the template writes them), `tool` results never are.
        train_on: "all" assistant turns or only the "last".
        chat_template: a Jinja template to use instead of the tokenizer's own.
        tools: function schemas shown to the model (the template's `tools`).

    Returns:
        `{"input_ids": [...], "labels": [...]}`, labels unshifted with -100 for untrained positions.
    """
    rendered = render_conversation(tokenizer, messages, train_on, chat_template, tools)
    return tokenize_rendered(tokenizer, [rendered])[0]


def ensure_chat_template(tokenizer: Any, override: str | None = None) -> bool:
    """Give the tokenizer a chat template; returns True when it had none and ChatML was put in its place.

    A base model's tokenizer has no template: we fall back to ChatML and add its markers as special tokens
    (the model's embeddings then grow to cover them, if it has fewer rows; see `launcher.model.build_model`).
    """
    if override:
        tokenizer.chat_template = override
        return False
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL_TOKENS})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or "<|im_end|>"
    return True
