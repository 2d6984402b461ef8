"""Models: loading a Hugging Face causal LM ready for packed rows, attention backends, model families.

Stable API::

    from launcher.model import load_model
    model = load_model("path/to/hf_dir", attention="sdpa")
"""

from launcher.model.load import (
    build_model,
    embedding_rows,
    load_model,
    load_tokenizer,
    model_config,
    param_shape,
)

__all__ = ["build_model", "embedding_rows", "load_model", "load_tokenizer", "model_config", "param_shape"]
