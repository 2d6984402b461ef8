"""The MLP of every decoder layer over tiles of the sequence, recomputed tile by tile in backward.

    install_tiled_mlp(model)     # before the engine wraps it; train.tiled_mlp=true

At long sequence lengths the MLP's intermediate activations ([tokens, intermediate_size], several of them)
are the largest activations of a layer. Tiled, forward keeps only the layer's input and output; backward
recomputes one tile at a time, so the intermediate activations of one tile exist at once. The result is the
same (each token's MLP is independent of the others); the cost is one more MLP forward per step. This is
DeepSpeed's `TiledMLP` (ALST), written here so that only `launcher/engine.py` imports DeepSpeed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


class _TiledMLP(torch.autograd.Function):
    """forward(x) = cat(fn(tile) for tile in x split along the sequence), without a graph; backward recomputes
    each tile and back-propagates it at once. The MLP's weights accumulate their gradient over the tiles, and
    `ds_grad_is_ready` holds ZeRO's reduction back until the last tile, so each weight is reduced once."""

    @staticmethod
    def forward(ctx, fn, params, x, n_tiles):
        ctx.fn, ctx.params, ctx.n_tiles = fn, params, n_tiles
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(t) for t in x.tensor_split(n_tiles, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            tiles = zip(
                x.tensor_split(ctx.n_tiles, dim=-2), grad.tensor_split(ctx.n_tiles, dim=-2), strict=True
            )
            for i, (t, g) in enumerate(tiles):
                for p in ctx.params:
                    p.ds_grad_is_ready = i == ctx.n_tiles - 1
                torch.autograd.backward(ctx.fn(t), g)
        for p in ctx.params:
            p.ds_grad_is_ready = True
        return None, None, x.grad if x.grad is not None else torch.zeros_like(x), None


def count_mlp_tiles(seq_len: int, hidden_size: int, device: torch.device) -> int:
    """DeepSpeed's choice, ceil(tokens / hidden_size) tiles, so a tile's [tile, intermediate] activations are
    about the size of a [hidden, intermediate] weight. The largest count over ranks: under ZeRO-3 each tile
    gathers the MLP's weights collectively, so every rank must run the same number of tiles."""
    n = torch.tensor([max(1, math.ceil(seq_len / hidden_size))], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())


def install_tiled_mlp(model: torch.nn.Module, n_tiles: int | None = None) -> int:
    """Tile the `mlp` of every decoder layer (`n_tiles` fixed, or chosen per batch); returns how many MLPs."""
    hidden = model.config.hidden_size
    count = 0
    for name, module in model.named_modules():
        if not name.endswith(".mlp") or not any(True for _ in module.parameters()):
            continue
        plain = module.forward
        params = [p for p in module.parameters() if p.requires_grad]

        def forward(x: torch.Tensor, *args: Any, _plain=plain, _params=params, **kwargs: Any) -> torch.Tensor:
            if args or kwargs:  # an MLP with extra inputs (e.g. routing): not a per-token function of x alone
                return _plain(x, *args, **kwargs)
            tiles = n_tiles or count_mlp_tiles(x.shape[-2], hidden, x.device)
            return _TiledMLP.apply(_plain, _params, x, tiles)

        module.forward = forward
        count += 1
    if not count:
        raise ValueError("train.tiled_mlp=true: this model has no `.mlp` modules to tile")
    return count
