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
import torch.nn.functional as F

from launcher.data.masks import ALL_BACKENDS, VARLEN_BACKENDS, with_chunks, with_window
from launcher.model.families import AUTO_ORDER, device_refusal, family_of, model_type

log = logging.getLogger(__name__)


def attention_needs(model_config: Any) -> dict[str, Any]:
    """What this model's config asks of a kernel beyond causal softmax attention (falsy: nothing). Family-level
    needs (sinks, chunked layers) are in the families registry; these are read from the config itself, so they hold
    for any checkpoint, in the table or not."""
    dropout = getattr(model_config, "attention_dropout", 0.0) or getattr(model_config, "attn_pdrop", 0.0)
    return {
        "softcap": getattr(model_config, "attn_logit_softcapping", None),
        "dropout": float(dropout or 0.0),
    }


def _causal_lm_class(model_config: Any) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:  # remote code or no config: transformers itself will say what is missing
        return None


def _supports_sdpa(model_config: Any) -> bool:
    return bool(getattr(_causal_lm_class(model_config), "_supports_sdpa", True))


def _supports_flex(model_config: Any) -> bool:
    return bool(getattr(_causal_lm_class(model_config), "_supports_flex_attn", True))


def backend_problem(
    backend: str,
    device: torch.device,
    model_config: Any = None,
    dtype: torch.dtype | None = None,
    training: bool = True,
) -> str | None:
    """Why `backend` cannot run this model here with packed documents kept exact; None: it can.

    In order: what the device offers (varlen kernels need CUDA, flex attention has no backward on CPU), what the
    model's family row refuses (the registry, `launcher.model.families`), then what the config and the installed
    packages allow."""
    family = family_of(model_config)
    half = dtype in (torch.bfloat16, torch.float16) if dtype is not None else True
    if why := device_refusal(backend, device.type, training):
        return why
    if family is not None and (why := family.refusal(backend, device.type)):
        return f"{family.name} ({model_type(model_config)}): {why}"
    needs = attention_needs(model_config)
    if backend in VARLEN_BACKENDS and not half:
        return "the varlen kernels run in bf16/fp16 only: set model.dtype=bf16"
    if backend in ("flash_attention_2", "flash_attention_3") and not _flash_attn_importable(backend):
        return "the flash-attn package is not importable here"
    if backend == "torch_varlen":
        if not varlen_available():
            return "torch_varlen needs torch.nn.attention.varlen (torch>=2.9)"
        if gaps := [f"{k}={v}" for k, v in needs.items() if v]:
            return f"PyTorch's varlen kernel cannot apply this model's {', '.join(gaps)}"
    if backend == "flex_attention" and needs["dropout"]:
        return (
            f"flex attention has no attention dropout (the model config asks for {needs['dropout']}): "
            "set the model's attention dropout to 0"
        )
    if backend == "sdpa" and not _supports_sdpa(model_config):
        return "transformers has no sdpa path for this model"
    if backend == "flex_attention" and not _supports_flex(model_config):
        return "transformers has no flex_attention path for this model"
    return None


def resolve_backend(
    name: str,
    device: torch.device,
    model_config: Any = None,
    dtype: torch.dtype | None = None,
    training: bool = True,
) -> str:
    """The backend `choose_backend` picks (without its reason)."""
    return choose_backend(name, device, model_config, dtype, training)[0]


def choose_backend(
    name: str,
    device: torch.device,
    model_config: Any = None,
    dtype: torch.dtype | None = None,
    training: bool = True,
) -> tuple[str, str]:
    """(backend, why): `auto` turned into a concrete backend, and a named one refused (ValueError, one line) if it
    cannot keep this model's packed documents exact here (`backend_problem`).

    `auto` takes the first backend of `AUTO_ORDER[device]` with no problem: on CUDA flash-attn, then PyTorch's
    varlen kernel, sdpa, flex attention, eager; on CPU sdpa, then eager. sft check (`training=False`), sft launch's
    preflight and every rank call this one function, so they decide alike."""
    if name != "auto":
        if name not in ALL_BACKENDS:
            raise ValueError(f"model.attention={name!r}: choose one of auto, {', '.join(ALL_BACKENDS)}")
        if why := backend_problem(name, device, model_config, dtype, training):
            try:
                hint = f"; model.attention=auto picks {resolve_backend('auto', device, model_config, dtype, training)}"
            except ValueError:
                hint = ""
            raise ValueError(f"model.attention={name} is refused: {why}{hint}")
        return name, "as configured"
    skipped = []
    for candidate in AUTO_ORDER[device.type if device.type == "cuda" else "cpu"]:
        why = backend_problem(candidate, device, model_config, dtype, training)
        if why is None:
            if not skipped:
                return candidate, "auto: no CUDA" if device.type != "cuda" else f"auto: {candidate} runs here"
            return candidate, "auto: " + "; ".join(skipped)
        skipped.append(f"not {candidate}: {why}")
    raise ValueError(f"model.attention=auto: no backend runs this model here ({'; '.join(skipped)})")


def plain_backend(model_config: Any) -> str:
    """The backend for ordinary, unpacked forwards (the export check, generation): sdpa, or eager where the model
    has no sdpa path (Gemma 2, gpt-oss)."""
    return resolve_backend("auto", torch.device("cpu"), model_config, torch.float32, training=False)


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
    d_v = value.shape[-1]
    if d_v < d:  # MLA (DeepSeek-V3): values narrower than queries/keys; the kernel takes one head size
        value = F.pad(value, (0, d - d_v))
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
    return out[..., :d_v].reshape(1, n, hq, d_v), None


@functools.cache
def _varlen_params(fn: Any) -> frozenset[str]:
    """The keyword arguments this torch's varlen_attn takes (read once: the adapter runs in every layer)."""
    return frozenset(inspect.signature(fn).parameters)


def register_varlen() -> None:
    """Make `attn_implementation="torch_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register("torch_varlen", _varlen_forward)


# ---- flex attention: fall back from the compiled kernel when it does not build ----

_FLEX_UNCOMPILED = False  # set once TorchInductor failed to build the CPU kernel in this process


def _flex_forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' flex attention; on CPU, run uncompiled when TorchInductor cannot build the kernel.

    torch 2.13's CPU inductor emits C++ that does not compile for a sliding-window document BlockMask once a
    second shape turns on dynamic shapes. Flex attention uncompiled computes the same (it materialises the scores:
    fine for `sft check`, the only use of flex on CPU, which has no backward there). On CUDA a failure is raised:
    a silent fallback to materialised scores would run out of memory at long sequence lengths."""
    global _FLEX_UNCOMPILED
    from transformers.integrations.flex_attention import flex_attention_forward

    on_cpu = args[0].device.type == "cpu"
    if not (on_cpu and _FLEX_UNCOMPILED):
        try:
            return flex_attention_forward(module, *args, **kwargs)
        except Exception as e:  # torch's compile errors live in private modules: matched by name
            if not on_cpu or type(e).__name__ not in (
                "InductorError",
                "BackendCompilerFailed",
                "CppCompileError",
            ):
                raise
            log.warning(
                "flex attention: TorchInductor's CPU kernel does not build here; running it uncompiled"
            )
            _FLEX_UNCOMPILED = True
    with torch.compiler.set_stance("force_eager"):
        return flex_attention_forward(module, *args, **kwargs)


def register_flex() -> None:
    """Route `attn_implementation="flex_attention"` through `_flex_forward` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register("flex_attention", _flex_forward)


# ---- layer masks: only the model config knows which layers slide or attend in chunks ----


def layer_masks(config: Any) -> tuple[dict[str, Any], bool]:
    """({layer type: restriction of the document mask}, per_layer): the sliding window and the chunks of the
    layers that have them, as functions (mask, position_ids) -> mask. `per_layer` when layers differ (their
    `layer_types`), so the model gets a mask per layer type; otherwise the one restriction applies to every layer."""
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None) or []
    out: dict[str, Any] = {}
    if window and ("sliding_attention" in layer_types or not layer_types):
        out["sliding_attention"] = lambda mask, pos: with_window(mask, int(window))
    if chunk and "chunked_attention" in layer_types:
        out["chunked_attention"] = lambda mask, pos: with_chunks(mask, int(chunk), pos)
    return out, bool(layer_types)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (the module whose output is the final hidden states). transformers'
    `get_decoder` answers with the model itself when the attribute is not named after `base_model_prefix`
    (Llama 4's `model` vs `language_model`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    if decoder is model:
        decoder = getattr(model, "model", None) or model.base_model
    assert decoder is not model, f"{type(model).__name__}: no decoder stack found"
    return decoder


def install_packing_hook(model: torch.nn.Module) -> None:
    """Adapt collator masks to the model: cast float masks to its dtype, add sliding windows and chunks."""
    variants, per_layer = layer_masks(model.config)
    decoder = decoder_of(model)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        is_float = isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.is_floating_point()
        if is_float:
            mask = mask.to(module.get_input_embeddings().weight.dtype)
        if variants and (is_float or type(mask).__name__ == "BlockMask"):
            pos = kwargs.get("position_ids")
            made = {kind: restrict(mask, pos) for kind, restrict in variants.items()}
            kwargs["attention_mask"] = (
                {"full_attention": mask, **made} if per_layer else made["sliding_attention"]
            )
        elif is_float:
            kwargs["attention_mask"] = mask
        return args, kwargs

    decoder.register_forward_pre_hook(hook, with_kwargs=True)
