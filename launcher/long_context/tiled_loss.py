"""The tiled loss: LM head + cross-entropy over tiles of target tokens, so [tokens, vocab] logits never exist whole.

loss_fn = tiled_target_token_loss if use_tiled_loss(cfg.train.tiled_loss, model.config) else target_token_loss
loss_sum, n = loss_fn(engine, batch)          # the same contract as launcher.loss.target_token_loss
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from launcher.data.template import IGNORE_INDEX
from launcher.loss import model_inputs, next_token_targets

# Post-processing some heads apply to the logits after the projection (Gemma 2's soft-capping, Cohere's scale,
# Granite's divisor): the tiled loss calls the projection alone, so it refuses these models.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
TILED_LOSS_MIN_VOCAB = 32_000


def tiled_loss_supported(model_cfg: Any) -> str | None:
    """None when the LM head is a plain projection the tiled loss can run tile by tile; else why not."""
    for key in LOGIT_POSTPROCESSING:
        value = getattr(model_cfg, key, None)
        if value not in (None, 0, 1, 1.0):
            return (
                f"{getattr(model_cfg, 'model_type', 'the model')} post-processes its logits ({key}={value})"
            )
    return None


def use_tiled_loss(setting: str, model_cfg: Any) -> bool:
    """`train.tiled_loss` resolved: `auto` turns it on for vocabularies of 32k entries or more, where the
    [tokens, vocab] logits outgrow the hidden states by far, and where the head is a plain projection."""
    setting = str(setting).lower()
    why_not = tiled_loss_supported(model_cfg)
    if setting == "auto":
        return why_not is None and model_cfg.vocab_size >= TILED_LOSS_MIN_VOCAB
    if setting == "true" and why_not:
        raise ValueError(f"train.tiled_loss=true: {why_not}; set train.tiled_loss=false")
    return setting == "true"


class _TiledHeadLoss(torch.autograd.Function):
    """sum of cross-entropy(head(hidden[i]), targets[i]) over tiles of rows, never holding more than one tile's
    logits. Forward runs without a graph; backward recomputes each tile's logits and back-propagates it at once,
    so the peak is one tile's logits and their gradient (DeepSpeed's TiledMLP pattern; its TiledFusedLogitsLoss
    back-propagates inside forward and so scales the head's gradient wrongly unless the loss is exactly 1x).

    The head is called as a module, so under ZeRO-3 its own hooks gather the partitioned weight for each call.
    Its gradient accumulates over the tiles; `ds_grad_is_ready` (read by every ZeRO stage's reduce hook) holds
    the reduction back until the last tile, or, when the weight is tied to the input embedding, until the
    embedding's own backward adds its part, so ZeRO reduces the weight's gradient once, as untiled."""

    @staticmethod
    def forward(ctx, hidden, targets, head, n_tiles, tied):
        ctx.head, ctx.n_tiles, ctx.tied = head, n_tiles, tied
        ctx.save_for_backward(hidden, targets)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for h, t in zip(hidden.tensor_split(n_tiles), targets.tensor_split(n_tiles), strict=True):
            total += F.cross_entropy(head(h).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, targets = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(True)
        params = [p for p in ctx.head.parameters() if p.requires_grad]
        with torch.enable_grad():  # backward runs without grad mode: the tile views must track hidden
            tiles = zip(hidden.tensor_split(ctx.n_tiles), targets.tensor_split(ctx.n_tiles), strict=True)
            for i, (h, t) in enumerate(tiles):
                for p in params:
                    p.ds_grad_is_ready = i == ctx.n_tiles - 1 and not ctx.tied
                loss = F.cross_entropy(ctx.head(h).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
                # The head's weight gradient accumulates tile by tile (under ZeRO-3, into its partition).
                torch.autograd.backward(loss, grad_out)
        for p in params:
            p.ds_grad_is_ready = True  # the tied embedding's backward, and the next step, reduce as usual
        if hidden.grad is None:  # no target on this rank
            return torch.zeros_like(hidden), None, None, None, None
        return hidden.grad, None, None, None, None


# Logits per tile at least: 2^27 fp32 entries (512 MiB). Smaller tiles would save little and under ZeRO-3 each
# tile gathers the head weight again.
MIN_TILE_LOGITS = 2**27


def count_tiles(n_rows: int, hidden_size: int, vocab_size: int, device: torch.device) -> int:
    """Tiles for `n_rows` target rows: a tile's logits are no larger than the hidden states ([rows / tiles,
    vocab] ~ [rows, hidden]) or MIN_TILE_LOGITS, whichever is larger. Every rank takes the largest count: under
    ZeRO-3 each head call gathers the weight collectively, so all ranks must make the same number of calls (a
    rank with fewer targets runs smaller, possibly empty, tiles)."""
    n = torch.tensor(
        [math.ceil(n_rows * vocab_size / max(n_rows * hidden_size, MIN_TILE_LOGITS))], device=device
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return max(1, int(n.item()))


def tiled_target_token_loss(
    model: Any, batch: dict[str, Any], n_tiles: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `target_token_loss`, with the LM head and cross-entropy run over tiles of target tokens: neither the
    [targets, vocab] logits nor their gradient ever exist whole. `n_tiles` overrides the number of tiles.

    The model runs its body only (its head sees no position: `logits_to_keep` is empty); the final hidden states
    are taken from the decoder's output.
    """
    targets = next_token_targets(batch)
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    captured: list[torch.Tensor] = []
    hook = inner.get_decoder().register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    try:
        nothing = torch.zeros(0, dtype=torch.long, device=targets.device)
        model(**model_inputs(batch), logits_to_keep=nothing)
    finally:
        hook.remove()
    hidden = captured[-1]  # [B, T, H] after the final norm
    where = targets != IGNORE_INDEX
    rows, kept = hidden[where], targets[where]  # only positions that predict a target
    head = inner.get_output_embeddings()
    n_tiles = n_tiles or count_tiles(rows.shape[0], rows.shape[-1], inner.config.vocab_size, rows.device)
    tied = head.weight is inner.get_input_embeddings().weight
    loss_sum = _TiledHeadLoss.apply(rows, kept, head, n_tiles, tied)
    return loss_sum, where.sum()
