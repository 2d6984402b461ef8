"""Linear-attention and short-convolution layers that restart at each packed document.

    install_document_reset(model)            # at model build (`launcher.model.load._prepare`): every path gets it
    sequence_parallel_problem(model.config)  # None, or why sequence parallelism cannot split this model's rows

Qwen3.5 and Qwen3-Next interleave Gated DeltaNet layers (a short causal depthwise convolution over q/k/v, then the
gated delta rule recurrence) with full attention; LFM2 interleaves short causal convolutions with attention. Their
state runs along the row, so in a packed row each document would see the end of the one before it. Here each
document's recurrent state and convolution window restart at its first token, the boundaries coming from the
packed batch itself (position ids restart at 0 per document; padding is a document of its own).

Two paths, both exact (a document computes what it computes alone):
- kernels (CUDA, and transformers resolved the function to causal-conv1d / flash-linear-attention): the
  convolution gets `seq_idx` (int32 [B, T], channel-last input), the recurrence `cu_seqlens` over the rows laid
  end to end as one [1, B*T] row (flash-linear-attention takes boundaries for a batch of one row only);
- PyTorch (CPU, or CUDA without the kernels): transformers' own torch convolution over the row with K-1 zeros
  inserted before each document, and transformers' own torch recurrence with each document in a batch row of its
  own, documents with as many 64-token chunks in one call. Timings: bench/linear_attention.py.

How it is wired: a forward pre-hook on each decoder layer that holds such a mixer turns the layer's `position_ids`
into a `Documents` object and adds it to the layer's keyword arguments, which transformers passes on, through the
mixer's forward, to the two module-level functions the mixer calls (`causal_conv1d_fn`,
`torch_chunk_gated_delta_rule`); those names in the family's modeling module are replaced by wrappers that read
it. The layer's kwargs are what activation checkpointing replays, so a recompute sees its own documents. The
mixer's forward still runs once per layer: its projections (and under ZeRO-3 their collective parameter gathers)
never depend on the number of documents; only the parameter-free recurrence runs per group of documents. Without
documents (generation with a cache, no position ids) the wrappers call transformers' functions unchanged. A flex
BlockMask reaches these models as a per-layer-type dict with None for the recurrent layers (transformers would
derive their 2D padding mask from it and fail; packed rows have none to apply).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable
from typing import Any

import torch

from launcher.model.attention import decoder_of

# The sequence mixers made document-aware here (transformers class name -> the functions of its modeling module that
# carry state along the sequence and are wrapped). The families registry references these names.
CONV = "causal_conv1d_fn"
DELTA_RULE = "torch_chunk_gated_delta_rule"
DOCUMENT_AWARE_MIXERS: dict[str, tuple[str, ...]] = {
    "Qwen3_5GatedDeltaNet": (CONV, DELTA_RULE),
    "Qwen3_5MoeGatedDeltaNet": (CONV, DELTA_RULE),
    "Qwen3NextGatedDeltaNet": (CONV, DELTA_RULE),
    "Lfm2ShortConv": (CONV,),
    "Lfm2MoeShortConv": (CONV,),
}
# transformers' `layer_types` entries whose layers carry state along the sequence (Mamba layers are listed as
# "linear_attention" too; Zamba and Falcon-H1 run them inside "hybrid" layers).
RECURRENT_LAYER_TYPES = ("linear_attention", "conv", "hybrid", "mamba")
# transformers' torch recurrence runs in chunks of this many tokens: documents with as many chunks share a call.
CHUNK = 64
_WRAPPED = "__launcher_documents__"  # marks a wrapper, so installing twice wraps once


# ---- what the registry and preflight ask ----


def recurrent_layer_types(config: Any) -> list[str]:
    """The layer types of this model config that carry state along the sequence (empty: none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return sorted({t for t in getattr(text, "layer_types", None) or [] if t in RECURRENT_LAYER_TYPES})


def sequence_parallel_problem(config: Any) -> str | None:
    """Why sequence parallelism cannot split this model's rows (None: it can, as far as these layers go).

    Ulysses hands each rank T/S consecutive tokens; a recurrent state or convolution window at a shard's first token
    depends on the tokens of the previous rank, which would have to be passed between ranks (not done here).
    """
    kinds = recurrent_layer_types(config)
    if not kinds:
        return None
    model_type = getattr(config, "model_type", "this model")
    return (
        f"sequence parallelism cannot split {model_type} rows across ranks: its {'/'.join(kinds)} layers carry a "
        "recurrent state or convolution window along the sequence, which is not passed between ranks; "
        "use train.sequence_parallel_size=1"
    )


def mixers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every document-aware sequence mixer in the model."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in DOCUMENT_AWARE_MIXERS]


def unhandled_mixers(model: torch.nn.Module) -> list[str]:
    """Class names of modules that look like stateful sequence mixers (a causal depthwise Conv1d child, or a
    Mamba / DeltaNet / linear-attention class) but are not made document-aware here."""
    names = set()
    for m in model.modules():
        name = type(m).__name__
        if name in DOCUMENT_AWARE_MIXERS:
            continue
        causal_conv = any(
            isinstance(c, torch.nn.Conv1d)
            and c.groups == c.in_channels
            and c.padding == (c.kernel_size[0] - 1,)
            and c.kernel_size[0] > 1
            for c in m.children()
        )
        if causal_conv or any(k in name for k in ("Mamba", "DeltaNet", "LinearAttention", "Lightning")):
            names.add(name)
    return sorted(names)


# ---- document boundaries of a packed batch ----


class Documents:
    """The documents of a [B, T] batch (rows laid end to end in order), from its position resets.

    A new document starts at each position 0 and at each row's first token. Built once per forward on the host
    (one small device-to-host copy of the position ids); each path builds the index tensors it needs once.
    """

    def __init__(self, position_ids: torch.Tensor):
        pos = position_ids.detach().to("cpu")
        self.shape = tuple(pos.shape)
        self.device = position_ids.device
        starts = pos == 0
        starts[:, 0] = True
        self._first = starts.reshape(-1)
        self.starts: list[int] = self._first.nonzero().flatten().tolist()
        self.lengths = [b - a for a, b in zip(self.starts, [*self.starts[1:], pos.numel()])]
        self.packed = len(self.starts) > self.shape[0]  # some row holds more than one document

    @functools.cached_property
    def seq_idx(self) -> torch.Tensor:
        """[B, T] int32: the document of each token, numbered over the flattened batch (causal-conv1d's seq_idx)."""
        return self._ordinal.to(torch.int32).reshape(self.shape)

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """[D + 1] int64: document boundaries over the flattened batch (flash-linear-attention's cu_seqlens)."""
        return torch.tensor([*self.starts, self._first.numel()], dtype=torch.long).to(self.device)

    @functools.cached_property
    def _ordinal(self) -> torch.Tensor:
        return (self._first.cumsum(0) - 1).to(self.device)

    def spread_index(self, gap: int) -> tuple[torch.Tensor, int]:
        """(where each token goes, width) in one row with `gap` zeros before each document after the first: a causal
        convolution of width gap + 1 over that row (left-padded by gap zeros) sees only each token's document."""
        n = self._first.numel()
        return torch.arange(n, device=self.device) + gap * self._ordinal, n + gap * (len(self.starts) - 1)

    @functools.cached_property
    def groups(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The documents batched by chunk count, and how to put their outputs back in token order.

        Returns ([(index [G, L], keep [n_real])], inverse [N]): `index` gathers each group's documents from the
        flattened tokens (padded with token N, a zero row appended by the caller), `keep` picks the real tokens out
        of the group's flattened [G * L] output, and `inverse` reorders the concatenated kept outputs into token
        order.
        """
        n = self._first.numel()
        by_chunks: dict[int, list[tuple[int, int]]] = {}
        for start, length in zip(self.starts, self.lengths):
            by_chunks.setdefault(math.ceil(length / CHUNK), []).append((start, length))
        out, order = [], []
        for docs in by_chunks.values():
            width = max(length for _, length in docs)
            index = torch.full((len(docs), width), n, dtype=torch.long)
            keep = []
            for g, (start, length) in enumerate(docs):
                index[g, :length] = torch.arange(start, start + length)
                keep.append(torch.arange(g * width, g * width + length))
                order.append(index[g, :length])
            out.append((index.to(self.device), torch.cat(keep).to(self.device)))
        inverse = torch.argsort(torch.cat(order)).to(self.device)
        return out, inverse


class _LastDocuments:
    """The documents of the current forward, shared by a model's layers (one host copy per forward, not per layer).
    Keyed by the position-id tensor itself: every layer of one forward receives the same tensor."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.docs: Documents | None = None

    def of(self, position_ids: torch.Tensor) -> Documents:
        if position_ids is not self.key:
            self.key, self.docs = position_ids, Documents(position_ids)
        assert self.docs is not None
        return self.docs


# ---- the wrapped functions ----


@functools.cache
def _uses_package(fn: Callable) -> bool:
    """Whether transformers resolved this function to its package (causal-conv1d, flash-linear-attention) rather
    than its torch reference. If transformers stops saying, the exact torch path is taken (slower, still exact)."""
    try:
        return bool(inspect.getclosurevars(fn).nonlocals["is_new_implementation"])
    except (KeyError, TypeError, ValueError):
        return False


def _kernel(fn: Callable, x: torch.Tensor) -> bool:
    return x.is_cuda and _uses_package(fn)


def _document_conv(original: Callable) -> Callable:
    @functools.wraps(original)
    def causal_conv1d_fn(x, weight, bias=None, activation=None, packed_documents=None, **kwargs):
        if packed_documents is None:
            return original(x, weight, bias, activation=activation, **kwargs)
        # The batch's own varlen metadata (cu_seq_lens_*) is dropped: the boundaries are the documents'.
        if not packed_documents.packed:
            return original(x, weight, bias, activation=activation)
        if _kernel(original, x):
            # causal-conv1d takes seq_idx in the channel-last layout only ([B, C, T] with stride 1 over C).
            x = x.transpose(1, 2).contiguous().transpose(1, 2) if x.stride(1) != 1 else x
            return original(x, weight, bias, activation=activation, seq_idx=packed_documents.seq_idx)
        return _spread_conv(original, x, weight, bias, activation, packed_documents)

    setattr(causal_conv1d_fn, _WRAPPED, original)
    return causal_conv1d_fn


def _spread_conv(original, x, weight, bias, activation, docs: Documents) -> torch.Tensor:
    """The torch convolution over the flattened batch with K-1 zeros before each document: each output sees only
    its own document's inputs, exactly as when the document runs alone (transformers' conv left-pads K-1 zeros)."""
    b, c, t = x.shape
    # weight is the gathered [C, K] tensor the mixer passes (under ZeRO-3 too): its width is the kernel's.
    dest, width = docs.spread_index(weight.shape[-1] - 1)
    flat = x.transpose(0, 1).reshape(c, b * t)
    spread = flat.new_zeros(c, width).index_copy(1, dest, flat)
    out = original(spread[None], weight, bias, activation=activation)[0]
    return out.index_select(1, dest).reshape(c, b, t).transpose(0, 1)


def _document_delta_rule(original: Callable) -> Callable:
    @functools.wraps(original)
    def torch_chunk_gated_delta_rule(
        query,
        key,
        value,
        g,
        beta,
        *,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        packed_documents=None,
        **kwargs,
    ):
        common = dict(initial_state=initial_state, output_final_state=output_final_state)
        common["use_qk_l2norm_in_kernel"] = use_qk_l2norm_in_kernel
        if packed_documents is None:
            return original(query, key, value, g=g, beta=beta, **common, **kwargs)
        assert initial_state is None and not output_final_state, "packed documents run without a cache"
        # The batch's varlen metadata (cu_seqlens from cu_seq_lens_q) is dropped: the boundaries are the documents'.
        if not packed_documents.packed:
            return original(query, key, value, g=g, beta=beta, **common)
        b, t = query.shape[:2]
        if _kernel(original, query):
            # flash-linear-attention takes cu_seqlens over a batch of one row: lay the rows end to end.
            flat = [x.reshape(1, b * t, *x.shape[2:]) for x in (query, key, value, g, beta)]
            out, _ = original(
                *flat[:3], g=flat[3], beta=flat[4], **common, cu_seqlens=packed_documents.cu_seqlens
            )
            return out.reshape(b, t, *out.shape[2:]), None
        return _grouped_delta_rule(original, (query, key, value, g, beta), common, packed_documents), None

    setattr(torch_chunk_gated_delta_rule, _WRAPPED, original)
    return torch_chunk_gated_delta_rule


def _grouped_delta_rule(original, tensors, common, docs: Documents) -> torch.Tensor:
    """transformers' torch recurrence with each document in a batch row of its own (zero initial state), documents
    of the same chunk count in one call; trailing zero padding cannot reach a causal output."""
    b, t = tensors[0].shape[:2]
    n = b * t
    # One zero row at index N: the padding every group's index points to.
    flat = [torch.cat([x.reshape(n, *x.shape[2:]), x.new_zeros(1, *x.shape[2:])]) for x in tensors]
    groups, inverse = docs.groups
    kept = []
    for index, keep in groups:
        q, k, v, g, beta = (x[index] for x in flat)
        out, _ = original(q, k, v, g=g, beta=beta, **common)
        kept.append(out.reshape(-1, *out.shape[2:])[keep])
    return torch.cat(kept)[inverse].reshape(b, t, *kept[0].shape[1:])


WRAPPERS: dict[str, Callable[[Callable], Callable]] = {CONV: _document_conv, DELTA_RULE: _document_delta_rule}


# ---- installation ----


def _wrap_functions(mixer: torch.nn.Module) -> None:
    """Replace the stateful functions in the mixer's modeling module by their document-aware wrappers (once per
    module: the wrappers call the originals unchanged when a call carries no documents)."""
    module = sys.modules[type(mixer).__module__]
    for name in DOCUMENT_AWARE_MIXERS[type(mixer).__name__]:
        fn = getattr(module, name)
        if not hasattr(fn, _WRAPPED):
            setattr(module, name, WRAPPERS[name](fn))


def install_document_reset(model: torch.nn.Module) -> int:
    """Make every document-aware sequence mixer of `model` restart at each packed document; returns how many.

    Idempotent per layer (a layer hooked once keeps its hook)."""
    found = mixers(model)
    if not found:
        return 0
    last = getattr(model, "_packed_documents_cache", None) or _LastDocuments()
    model._packed_documents_cache = last
    parents = dict(model.named_modules())

    def hook(layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pos = kwargs.get("position_ids")
        # With a cache (generation) the mixer carries its state across calls by design: leave it alone.
        if isinstance(pos, torch.Tensor) and pos.ndim == 2 and kwargs.get("past_key_values") is None:
            kwargs["packed_documents"] = last.of(pos)
        return args, kwargs

    _install_mask_mapping(model)
    for name, mixer in found:
        _wrap_functions(mixer)
        layer = parents[name.rpartition(".")[0]]
        if not getattr(layer, "_packed_documents_hooked", False):
            layer.register_forward_pre_hook(hook, with_kwargs=True)
            layer._packed_documents_hooked = True
    return len(found)


def _install_mask_mapping(model: torch.nn.Module) -> None:
    """Hand a flex BlockMask (or the packing hook's per-layer-type dict) to the decoder as a dict with None for the
    recurrent layer types. transformers derives those layers' 2D padding mask from the attention mask and fails on
    a BlockMask; packed rows have no padding mask to apply (padding is a document of its own), as with the float
    masks, for which transformers itself returns None."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = set(getattr(text, "layer_types", None) or [])
    recurrent = types & set(RECURRENT_LAYER_TYPES)
    if not recurrent or getattr(model, "_packed_mask_mapping_hooked", False):
        return
    decoder = decoder_of(model)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        if type(mask).__name__ == "BlockMask":
            kwargs["attention_mask"] = {t: None if t in recurrent else mask for t in types}
        elif isinstance(mask, dict):
            kwargs["attention_mask"] = {**dict.fromkeys(recurrent), **mask}
        return args, kwargs

    decoder.register_forward_pre_hook(hook, with_kwargs=True)
    model._packed_mask_mapping_hooked = True
