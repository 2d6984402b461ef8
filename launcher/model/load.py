"""Models and tokenizers, prepared for packed rows.

    model = load_model("path/to/hf_dir", attention="sdpa")
    logits = model(**collate(rows, attention="sdpa")).logits

`load_model` registers the varlen backend when asked for it, turns the KV cache off (a cache makes
transformers ignore packed position ids), and installs the hook that adds sliding windows to the
collator's document masks. DeepSpeed's `zero.Init` is passed in as a context by the engine, so this module
never imports deepspeed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from launcher.data.template import ensure_chat_template
from launcher.model.attention import install_packing_hook, register_varlen

log = logging.getLogger(__name__)


def _prepare(model: torch.nn.Module, attention: str) -> torch.nn.Module:
    model.config.use_cache = False
    install_packing_hook(model)
    model.packing_attention = attention  # what the collator must build for this model
    return model


def load_model(
    path: str,
    attention: str = "sdpa",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    init_context: Callable[[], Any] | None = None,
) -> torch.nn.Module:
    """Load a Hugging Face causal LM (local dir or hub id) ready for packed rows from `collate`.

    Args:
        path: local directory or hub id.
        attention: backend name, as for `collate`.
        dtype: parameter dtype (default fp32).
        trust_remote_code: allow code shipped with the checkpoint.
        init_context: context manager factory wrapping construction (DeepSpeed zero.Init for ZeRO-3).
    """
    from transformers import AutoModelForCausalLM

    if attention == "torch_varlen":
        register_varlen()
    with (init_context or contextlib.nullcontext)():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            attn_implementation=attention,
            dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code,
        )
    return _prepare(model, attention)


def param_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's real shape: under ZeRO-3 the local tensor is an empty partition (shape (0,)) and the real
    shape is `ds_shape`."""
    return tuple(getattr(p, "ds_shape", p.shape))


def embedding_rows(model: torch.nn.Module) -> int:
    """Rows of the input embedding (the model's real vocabulary size, whatever the tokenizer says)."""
    return param_shape(model.get_input_embeddings().weight)[0]


def model_config(model_cfg: Any, vocab_size: int | None = None) -> Any:
    """The transformers config of the configured model, without its weights (to choose an attention backend, to
    plan). A random-init model (`model.init`) takes the tokenizer's `vocab_size` when given."""
    from transformers import AutoConfig

    if model_cfg.name_or_path:
        return AutoConfig.from_pretrained(
            model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code
        )
    init = dict(model_cfg.init)
    return AutoConfig.for_model(**(init if vocab_size is None else {**init, "vocab_size": vocab_size}))


def build_model(
    model_cfg: Any,
    vocab_size: int,
    attention: str,
    dtype: torch.dtype,
    init_context: Callable[[], Any] | None = None,
) -> torch.nn.Module:
    """The configured model: loaded from `name_or_path`, or randomly initialised from `init`."""
    from transformers import AutoModelForCausalLM

    if model_cfg.name_or_path:
        model = load_model(
            model_cfg.name_or_path, attention, dtype, model_cfg.trust_remote_code, init_context
        )
        rows = embedding_rows(model)
        model.load_notes = []
        if rows < vocab_size:
            # Special tokens were added (ChatML fallback): grow the embeddings to cover them. A model with more
            # rows than the tokenizer has entries (padded vocabularies, Qwen2.5's 151936) keeps every row.
            model.resize_token_embeddings(vocab_size)
            model.load_notes.append(
                f"embeddings resized from {rows} to {embedding_rows(model)} rows to cover the tokenizer's "
                f"{vocab_size} entries (the new rows start untrained)"
            )
        return model
    if attention == "torch_varlen":
        register_varlen()
    config = model_config(model_cfg, vocab_size)
    with (init_context or contextlib.nullcontext)():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)
    return _prepare(model, attention)


def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer with a chat template and a pad token (ChatML added for base models without one)."""
    from transformers import AutoTokenizer

    source = model_cfg.tokenizer or model_cfg.name_or_path
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    if not tok.is_fast:
        raise ValueError(
            f"tokenizer {source!r} is not a fast tokenizer: assistant masks need offset mappings"
        )
    tok.chatml_fallback = ensure_chat_template(tok, model_cfg.chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
