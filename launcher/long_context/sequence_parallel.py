"""Ulysses sequence parallelism that keeps packed documents apart.

    sp = SequenceParallel(cfg.train.sequence_parallel_size, rank, world)   # groups of S consecutive ranks
    sp.install(model, attention)                                         # before the engine wraps it
    with sp.shard(collate(rows, attention, pad_id)) as local:            # this rank's T/S tokens
        loss_sum, n = target_token_loss(engine, local)

S consecutive ranks share every packed row: each holds T/S of its tokens (and their pre-shifted labels, since
the token after a shard's last one lives on the next rank). Each attention layer's core function is wrapped:
q/k/v are exchanged all-to-all from [B, H, T/S, D] (all heads, a slice of the sequence) to [B, H/S, T, D] (a
slice of the heads, the whole sequence), the backend's own attention runs over the whole row, and the output
goes back the same way. Document isolation is rebuilt there for the whole row: a float block-diagonal causal
mask for sdpa/eager and a document BlockMask for flex attention (from the position ids gathered over the group,
with the layer's sliding window), and the whole row's `cu_seq_lens` for the varlen kernels (torch_varlen,
flash-attn), which apply the window themselves. DeepSpeed's `UlyssesSPAttentionHF` instead discards 4D masks and attends
causally over the gathered sequence, which lets every packed document see the ones before it.

Data parallelism is `world / S`: the sampler deals rows to `dp_world` data-parallel ranks, and every rank of
an SP group gets the same rows. Outside `shard` (the packing self-check's per-document references, exact-match
generation, the export check) the wrapped attention runs the backend unchanged on whole rows.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from launcher.data.masks import VARLEN_BACKENDS, block_causal_float_mask, document_block_mask, with_window
from launcher.data.template import IGNORE_INDEX
from launcher.model.linear_attention import sequence_parallel_problem

PREFIX = "sft_sp_"  # the wrapped backend's name in transformers' attention registry: sft_sp_sdpa, ...


class _State:
    """What the wrapped attention needs in the current micro-batch (None outside `shard`)."""

    sp: SequenceParallel | None = None
    positions: torch.Tensor | None = None  # [B, T]: the whole rows' position ids
    masks: dict[Any, Any] = {}  # (window, dtype) -> mask, built once per micro-batch
    varlen: dict[
        str, Any
    ] = {}  # the whole flattened row's cu_seq_lens_q/k and max_length_q/k (varlen kernels)


_STATE = _State()


def check_heads(size: int, model_config: Any) -> None:
    """Each rank of a group attends for heads / S query heads and kv_heads / S key/value heads."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    from launcher.model import per_layer

    heads = text.num_attention_heads  # a composite (vision-language) config keeps them in its text config
    kv_per_layer = {kv or heads for kv in per_layer(text, "num_key_value_heads")}  # Gemma 4's vary by layer
    kv = max(kv_per_layer, key=lambda k: (k % size != 0, k))
    if heads % size or kv % size:
        raise ValueError(
            f"train.sequence_parallel_size={size} must divide the model's attention heads ({heads}) "
            f"and key/value heads ({kv})"
        )


def check_sequence_parallel(size: int, model_config: Any) -> None:
    """ValueError (one line) when sequence parallelism of `size` ranks cannot run this model exactly: its family's
    row refuses it (`launcher.model.families`), it has recurrent layers (linear attention, short convolutions:
    any model, in the table or not), or its heads do not split over the group."""
    from launcher.model.families import family_of

    family = family_of(model_config)
    if family is not None and family.sequence_parallel:  # what `sft models` shows
        raise ValueError(
            f"train.sequence_parallel_size={size}: {family.name}: {family.sequence_parallel}; "
            "set train.sequence_parallel_size=1"
        )
    if problem := sequence_parallel_problem(model_config):  # a model no row knows: named by its layers
        raise ValueError(f"train.sequence_parallel_size={size}: {problem}")
    check_heads(size, model_config)


class SequenceParallel:
    """Groups of `size` consecutive ranks sharing each packed row, and the data-parallel layout around them."""

    def __init__(self, size: int, rank: int, world: int):
        if size < 1 or world % size:
            raise ValueError(
                f"train.sequence_parallel_size={size} must be >= 1 and divide the world size ({world})"
            )
        self.size, self.world = size, world
        self.sp_rank, self.dp_rank, self.dp_world = rank % size, rank // size, world // size
        self.group = None
        if size > 1:
            for first in range(0, world, size):  # every rank creates every group (a collective)
                group = dist.new_group(list(range(first, first + size)))
                if first <= rank < first + size:
                    self.group = group

    def install(self, model: torch.nn.Module, attention: str) -> None:
        """Route the model's core attention through the sequence-parallel wrapper (a no-op for S=1)."""
        if self.size == 1:
            return
        check_sequence_parallel(self.size, model.config)
        from transformers import AttentionInterface

        AttentionInterface.register(PREFIX + attention, _sp_attention)
        model.config._attn_implementation = PREFIX + attention

    @contextlib.contextmanager
    def shard(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """This rank's slice of a collated batch of whole rows (its mask is dropped), with the wrapped attention
        armed (forward and backward, so activation-checkpoint recompute sees it too, must run inside)."""
        if self.size == 1:
            yield batch
            return
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        real = batch.get("token_mask")
        # The collator's [B, 1, T, T] mask is not used (it is rebuilt after the all-to-all): drop it from the
        # batch rather than hold a second T x T mask through the step (the batch is consumed).
        batch.pop("attention_mask", None)
        pad = -ids.shape[1] % self.size
        if pad:  # the padding is a document of its own, with no target
            ids = F.pad(ids, (0, pad), value=0)
            labels = F.pad(labels, (0, pad), value=IGNORE_INDEX)
            extra = torch.arange(pad, device=pos.device).expand(pos.shape[0], pad)
            pos = torch.cat([pos, extra], dim=1)
            real = None if real is None else F.pad(real, (0, pad), value=False)
        # Shift before slicing: the target of a shard's last token is the next shard's first token.
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        n = ids.shape[1] // self.size
        mine = slice(self.sp_rank * n, (self.sp_rank + 1) * n)
        local_pos = pos[:, mine].contiguous()
        try:
            _STATE.sp, _STATE.positions, _STATE.masks = self, self.gather_positions(local_pos), {}
            _STATE.varlen = whole_row_boundaries(batch, pad)
            local = {
                "input_ids": ids[:, mine],
                "position_ids": local_pos,
                "shift_labels": targets[:, mine],
                "use_cache": False,
            }
            if real is not None:
                local["token_mask"] = real[:, mine]
            yield local
        finally:
            _STATE.sp, _STATE.positions, _STATE.masks, _STATE.varlen = None, None, {}, {}

    def hidden_states(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """[B, T, H] final hidden states of whole rows computed sequence-parallel (every rank of the group gets
        them all; no logits are computed)."""
        from launcher.loss import final_hidden_states

        t = batch["input_ids"].shape[1]
        with self.shard(batch) as local:
            mine = final_hidden_states(model, local).contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.cat(parts, dim=1)[:, :t]

    def gather_positions(self, local: torch.Tensor) -> torch.Tensor:
        """The whole rows' position ids, from every rank's slice, in rank order."""
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=1)


def whole_row_boundaries(batch: dict[str, Any], pad: int) -> dict[str, Any]:
    """A varlen batch's document boundaries over its whole flattened row, padding included as one more
    document (empty for other backends, whose batches carry no `cu_seq_lens_q`)."""
    if "cu_seq_lens_q" not in batch:
        return {}
    cu, longest = batch["cu_seq_lens_q"], int(batch["max_length_q"])
    if pad:
        cu, longest = torch.cat([cu, cu[-1:] + pad]), max(longest, pad)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _all_to_all(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """x: [size, ...] where x[j] goes to group rank j; returns [size, ...] where out[j] came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """[B, H, T/S, D] (all heads, this rank's tokens) -> [B, H/S, T, D] (this rank's heads, all tokens)."""
    b, h, t, d = x.shape
    parts = x.reshape(b, size, h // size, t, d).transpose(0, 1)  # [S, B, H/S, T/S, D]: heads for rank j
    got = _all_to_all(parts, group, size)  # got[j]: my heads, rank j's tokens
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * t, d)


def heads_to_seq(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """The inverse: [B, H/S, T, D] -> [B, H, T/S, D]."""
    b, hs, t, d = x.shape
    parts = x.reshape(b, hs, size, t // size, d).permute(
        2, 0, 1, 3, 4
    )  # [S, B, H/S, T/S, D]: tokens of rank j
    got = _all_to_all(parts, group, size)  # got[j]: rank j's heads, my tokens
    return got.transpose(0, 1).reshape(b, size * hs, t // size, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return seq_to_heads(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad, ctx.group, ctx.size), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return heads_to_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad, ctx.group, ctx.size), None, None


class _WithSinks:
    """A module seen through with other sinks: this rank's heads' (gpt-oss's eager attention reads `module.sinks`)."""

    def __init__(self, module: torch.nn.Module, sinks: torch.Tensor):
        self._module, self.sinks = module, sinks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _base_attention(module: torch.nn.Module, backend: str) -> Any:
    if backend == "eager":  # the model's own eager function (some add softcapping or sinks)
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[backend]


def document_mask(backend: str, window: int | None, dtype: torch.dtype) -> Any:
    """The whole rows' document mask for `backend`, with the layer's sliding window (cached per micro-batch)."""
    key = (backend, window, dtype)
    if key not in _STATE.masks:
        pos = _STATE.positions
        mask = (
            document_block_mask(pos) if backend == "flex_attention" else block_causal_float_mask(pos, dtype)
        )
        _STATE.masks[key] = with_window(mask, window) if window else mask
    return _STATE.masks[key]


def _sp_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: the configured backend over whole rows, with q/k/v exchanged
    all-to-all inside `SequenceParallel.shard`, and unchanged outside it."""
    config = module.config
    wrapped = config._attn_implementation
    backend = wrapped.removeprefix(PREFIX)
    base = _base_attention(module, backend)
    sp = _STATE.sp
    # transformers' flash integration picks its kernel by the config's name: the backend sees its own name for
    # the call (forward and recompute run one layer at a time, so the shared config is restored before the next).
    config._attn_implementation = backend
    try:
        if sp is None:
            return base(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs)
        q, k, v = (_SeqToHeads.apply(x, sp.group, sp.size) for x in (query, key, value))
        if kwargs.get("s_aux") is not None:  # one sink per head (gpt-oss): this rank's heads' sinks
            per_rank = kwargs["s_aux"].shape[0] // sp.size
            kwargs["s_aux"] = kwargs["s_aux"][sp.sp_rank * per_rank : (sp.sp_rank + 1) * per_rank]
            if backend == "eager":  # the model's eager function reads `module.sinks` itself
                module = _WithSinks(module, kwargs["s_aux"])
        if backend in VARLEN_BACKENDS:
            # The model handed this rank's own position ids (and, for flash-attn, boundaries it may have derived
            # from them): the kernel gets the whole row's boundaries instead, and applies the window itself.
            kwargs.update(_STATE.varlen, position_ids=_STATE.positions)
            out, _ = base(module, q, k, v, None, sliding_window=sliding_window, **kwargs)
        else:
            mask = document_mask(backend, sliding_window, q.dtype)
            out, _ = base(module, q, k, v, mask, **kwargs)  # [B, T, H/S, D]
    finally:
        config._attn_implementation = wrapped
    out = _HeadsToSeq.apply(out.transpose(1, 2), sp.group, sp.size)  # [B, H, T/S, D]
    return out.transpose(1, 2).contiguous(), None
