"""Attention backends that keep packed documents apart.

Each backend gets the metadata it needs from the collator (`launcher.data.collate`):

| backend                     | what isolates documents                                      |
|-----------------------------|--------------------------------------------------------------|
| sdpa, eager                 | a float block-diagonal causal mask [B, 1, T, T] (0 / -inf)   |
| flex_attention              | a document-causal BlockMask                                  |
| torch_varlen, flash_attn_2/3| `cu_seq_lens_q/k` + `max_length_q/k` over a flattened batch  |

A boolean 4D mask would be exact on sdpa but is *added* as 0/1 by eager attention, and position ids alone are
ignored once a KV cache exists, so neither is used. Sliding windows are applied by a pre-forward hook on the
decoder (:func:`install_packing_hook`) because only the model's config knows which layers slide.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Any

import torch

from launcher.data.masks import ALL_BACKENDS, VARLEN_BACKENDS, with_window

log = logging.getLogger(__name__)


# Models whose attention adds learned sinks (`s_aux`), which neither varlen kernel applies.
SINK_MODEL_TYPES = ("gpt_oss",)


def attention_needs(model_config: Any) -> dict[str, Any]:
    """What this model's attention asks of a kernel beyond causal softmax attention (falsy: nothing)."""
    dropout = getattr(model_config, "attention_dropout", 0.0) or getattr(model_config, "attn_pdrop", 0.0)
    return {
        "softcap": getattr(model_config, "attn_logit_softcapping", None),
        "sinks": getattr(model_config, "model_type", None) in SINK_MODEL_TYPES,
        "dropout": float(dropout or 0.0),
    }


def _supports_sdpa(model_config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return bool(getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)], "_supports_sdpa", True))
    except KeyError:  # remote code or no config: transformers itself will say if sdpa is missing
        return True


def resolve_backend(
    name: str, device: torch.device, model_config: Any = None, dtype: torch.dtype | None = None
) -> str:
    """The backend `choose_backend` picks (without its reason)."""
    return choose_backend(name, device, model_config, dtype)[0]


def choose_backend(
    name: str, device: torch.device, model_config: Any = None, dtype: torch.dtype | None = None
) -> tuple[str, str]:
    """(backend, why): `auto` turned into a concrete backend, and a named one refused if it cannot run this
    model here.

    `auto`: flash-attn if importable, else PyTorch's varlen kernel on CUDA, else sdpa, always within what the
    model needs: the flash kernels run in bf16/fp16 only; PyTorch's applies no logit softcapping (Gemma2),
    attention sinks (gpt-oss) or attention dropout; flex attention no dropout; some models have no sdpa path.
    """
    needs = attention_needs(model_config)
    varlen_gaps = [k for k, v in needs.items() if v]
    half = dtype in (torch.bfloat16, torch.float16) if dtype is not None else True
    cuda = device.type == "cuda"
    if name != "auto":
        if name not in ALL_BACKENDS:
            raise ValueError(f"model.attention={name!r}: choose one of auto, {', '.join(ALL_BACKENDS)}")
        if name in ("flash_attention_2", "flash_attention_3") and not _flash_attn_importable(name):
            raise ValueError(f"model.attention={name}: the flash-attn package is not importable here")
        if name == "torch_varlen" and not (cuda and varlen_available()):
            raise ValueError(
                "model.attention=torch_varlen needs CUDA and torch.nn.attention.varlen (torch>=2.9)"
            )
        if name == "torch_varlen" and varlen_gaps:
            raise ValueError(
                f"model.attention=torch_varlen cannot apply this model's "
                f"{', '.join(f'{k}={needs[k]}' for k in varlen_gaps)}: use model.attention=auto or eager"
            )
        if name == "flex_attention" and needs["dropout"]:
            raise ValueError(
                f"model.attention=flex_attention has no attention dropout (the model config asks for "
                f"{needs['dropout']}): use sdpa or eager, or set the model's attention dropout to 0"
            )
        if name in VARLEN_BACKENDS and not half:
            raise ValueError(f"model.attention={name} runs in bf16/fp16 only: set model.dtype=bf16")
        return name, "as configured"
    if cuda and half and not needs["sinks"] and _flash_attn_importable("flash_attention_2"):
        chosen, why = "flash_attention_2", "flash-attn is importable"
    elif cuda and half and not varlen_gaps and varlen_available():
        chosen, why = "torch_varlen", "CUDA, flash-attn not installed"
    elif cuda and (needs["softcap"] or needs["sinks"]) and not needs["dropout"]:
        chosen, why = "flex_attention", f"the model needs {', '.join(varlen_gaps)}"
    elif _supports_sdpa(model_config):
        chosen = "sdpa"
        why = "no CUDA" if not cuda else "fp32" if not half else f"the model needs {', '.join(varlen_gaps)}"
    else:
        chosen, why = "eager", "the model has no sdpa path"
    return chosen, f"auto: {why}"


def _flash_attn_importable(name: str) -> bool:
    module = "flash_attn_interface" if name == "flash_attention_3" else "flash_attn"
    return importlib.util.find_spec(module) is not None


def varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


# ---- the varlen backend, registered with transformers ----


def _varlen_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over PyTorch's FlashAttention varlen kernel.

    query/key/value arrive as [1, H, N, D] over the flattened batch; document boundaries come in kwargs.
    """
    from torch.nn.attention.varlen import varlen_attn

    # Options the kernel cannot apply would otherwise be dropped silently (Gemma2 passes softcap=50).
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or dropout:
        raise ValueError(
            "torch_varlen cannot apply attention logit softcapping, attention sinks or attention dropout: "
            "use model.attention=auto or eager for this model"
        )
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(
            "torch_varlen attention needs cu_seq_lens_q/max_length_q: build batches with launcher.data.collate"
        )
    max_len = int(kwargs["max_length_q"])
    b, hq, n, d = query.shape
    assert b == 1, "torch_varlen expects a flattened [1, N] batch"
    # The kernel takes one dtype for q, k and v. Under autocast (an fp32 model, as TRL trains) RoPE leaves q and k
    # in fp32 while v is bf16, and a custom op is not autocast: cast as transformers' flash wrapper does.
    # (fp32 without autocast is refused earlier, by resolve_backend.)
    device_type = query.device.type
    target = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    q = query.transpose(1, 2).reshape(n, hq, d).to(target)
    k = key.transpose(1, 2).reshape(n, key.shape[1], d).to(target)
    v = value.transpose(1, 2).reshape(n, value.shape[1], d).to(target)
    params = _varlen_params(varlen_attn)
    call: dict[str, Any] = {}
    if "scale" in params:
        call["scale"] = scaling
    elif scaling is not None and abs(scaling - d**-0.5) > 1e-12:
        q = q * (scaling * d**0.5)  # older kernels always scale by 1/sqrt(d): pre-scale q to get `scaling`
    if "window_size" in params:
        call["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    else:  # torch 2.9/2.10: causal flag, no windows
        if sliding_window:
            raise ValueError(
                "this torch's varlen_attn has no sliding windows; upgrade torch or use flex_attention"
            )
        call["is_causal"] = True
    if hq != k.shape[1]:
        if "enable_gqa" in params:
            call["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // k.shape[1], dim=1)
            v = v.repeat_interleave(hq // v.shape[1], dim=1)
    out = varlen_attn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len, **call)
    return out.reshape(1, n, hq, d), None


@functools.cache
def _varlen_params(fn: Any) -> frozenset[str]:
    """The keyword arguments this torch's varlen_attn takes (read once: the adapter runs in every layer)."""
    return frozenset(inspect.signature(fn).parameters)


def register_varlen() -> None:
    """Make `attn_implementation="torch_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register("torch_varlen", _varlen_forward)


# ---- sliding windows: only the model config knows which layers slide ----


def _sliding_layout(config: Any) -> tuple[int | None, bool]:
    """(window, per_layer_dict): per_layer_dict when only some layers slide (layer_types)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if layer_types:
        if "sliding_attention" not in layer_types or not window:
            return None, False
        return int(window), True
    return (int(window), False) if window else (None, False)


def install_packing_hook(model: torch.nn.Module) -> None:
    """Adapt collator masks to the model: cast float masks to its dtype and add sliding windows."""
    config = model.config
    window, per_layer = _sliding_layout(config)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        is_float = isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.is_floating_point()
        if is_float:
            mask = mask.to(module.get_input_embeddings().weight.dtype)
        if window is not None and (is_float or type(mask).__name__ == "BlockMask"):
            slid = with_window(mask, window)
            kwargs["attention_mask"] = (
                {"full_attention": mask, "sliding_attention": slid} if per_layer else slid
            )
        elif is_float:
            kwargs["attention_mask"] = mask
        return args, kwargs

    decoder.register_forward_pre_hook(hook, with_kwargs=True)
