"""Hugging Face export of the trained weights (safetensors + tokenizer + chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from launcher import engine as ds_engine


def export_hf(engine: Any, tok: Any, out_dir: Path) -> Path | None:
    """Gather ZeRO-3 shards and write a model loadable by `AutoModelForCausalLM.from_pretrained`.

    Collective: every rank must call it; rank 0 writes.
    """
    state = ds_engine.consolidated_state_dict(engine)
    if dist.get_rank() != 0:
        return None
    model = engine.module
    out_dir.mkdir(parents=True, exist_ok=True)
    attn = model.config._attn_implementation
    # The export is for inference: cache on, and a stock attention (torch_varlen is registered only by us).
    model.config.use_cache = True
    if attn not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"):
        model.config._attn_implementation = "sdpa"
    try:
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    finally:
        model.config.use_cache = False
        model.config._attn_implementation = attn
    tok.save_pretrained(out_dir)
    return out_dir
