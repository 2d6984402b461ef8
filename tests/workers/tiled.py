"""torchrun worker for test_long_context_dist: a few real ZeRO-3 AdamW steps, untiled, then with the tiled LM-head
loss, then with the tiled MLP, from the same initial weights on the same rows. Rank 0 writes each variant's
per-step losses and grad norms.

`n_tiles` fixed (a number), or `auto`: the tiles are counted per micro-batch as in training (no n_tiles), on rows
whose length and targets differ by rank, with MIN_TILE_LOGITS lowered so that a few dozen targets make several
tiles. Each count is then recorded as (this rank's own count, the count every rank ran) and gathered."""

from __future__ import annotations

import sys
from functools import partial

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import launcher.long_context.tiled_loss as tiled_loss
import launcher.long_context.tiled_mlp as tiled_mlp
from launcher import engine as ds_engine
from launcher.data import pack_examples
from launcher.long_context.tiled_loss import tiled_target_token_loss
from launcher.long_context.tiled_mlp import install_tiled_mlp
from launcher.loss import target_token_loss
from launcher.train import train_step
from tests import helpers

VOCAB = 503


def rows_for(rank: int, step: int) -> list[dict]:
    """Two packed rows per rank and step; rank 1's rows carry fewer targets, so the ranks' tiles differ."""
    g = torch.Generator().manual_seed(100 * step + rank)
    docs = []
    for i, n in enumerate((7, 12, 5, 9, 11, 6)):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        masked = n - 2 if rank else i % 3 + 1
        docs.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    return pack_examples(docs, max_length=24)[:2]


def uneven_rows_for(rank: int, step: int) -> list[dict]:
    """Two rows per rank and step: rank 0's long (about 64 tokens, nearly all trained), rank 1's short with a
    few targets, so the ranks' own tile counts differ (loss: targets; MLP: tokens over hidden_size=32)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    lengths = (21, 20, 22, 19, 23, 18) if rank == 0 else (9, 7, 8, 6)
    docs = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        masked = 1 if rank == 0 else n - 2
        docs.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    rows = pack_examples(docs, max_length=64 if rank == 0 else 16)[:2]
    assert len(rows) == 2
    return rows


COUNTS: dict[str, list[tuple[int, int]]] = {"loss": [], "mlp": []}  # (own count, the count run), per call


def record_counts() -> None:
    """Record every automatic tile count as (this rank's own, the one every rank ran)."""
    count_tiles, count_mlp_tiles = tiled_loss.count_tiles, tiled_mlp.count_mlp_tiles

    def loss_tiles(n_rows, hidden, vocab, device):
        agreed = count_tiles(n_rows, hidden, vocab, device)
        COUNTS["loss"].append((tiled_loss.own_tile_count(n_rows, hidden, vocab), agreed))
        return agreed

    def mlp_tiles(seq_len, hidden, device):
        agreed = count_mlp_tiles(seq_len, hidden, device)
        COUNTS["mlp"].append((tiled_mlp.own_mlp_tile_count(seq_len, hidden), agreed))
        return agreed

    tiled_loss.count_tiles, tiled_mlp.count_mlp_tiles = loss_tiles, mlp_tiles


def run(
    tied: bool, loss_fn, ds_config: dict, world: int, steps: int, mlp_tiles: int | None = 0, rows=rows_for
) -> dict[str, list[float]]:
    cfg = helpers.tiny_config(
        "llama", vocab_size=VOCAB, tie_word_embeddings=tied, max_position_embeddings=2048
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    if mlp_tiles is None or mlp_tiles:
        install_tiled_mlp(model, n_tiles=mlp_tiles)  # None: counted per batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng = ds_engine.initialize(model, opt, None, ds_config)
    assert eng.zero_optimization_partition_weights()
    head = eng.module.get_output_embeddings().weight
    assert head.numel() == 0 or head.numel() < head.ds_numel, "the head must be partitioned"
    out: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    for step in range(steps):
        got = train_step(eng, rows(dist.get_rank(), step), 1, "sdpa", torch.device("cpu"), 0, world, loss_fn)
        out["loss"].append(got["loss"])
        out["grad_norm"].append(float(eng.get_global_grad_norm()))
    return out


def main(tied: bool, n_tiles: int | None, out: str) -> None:
    # A rank whose tile count differed would wait in a gather the others never join: fail in a minute.
    info = ds_engine.init_distributed(timeout_minutes=1)
    world = info.world_size
    ds_config = helpers.ds_config(2 * world, 1, world)
    # Partition every parameter, however small (DeepSpeed keeps small ones whole on every rank by default).
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_engine.zero_init_context(ds_config)
    rows = rows_for
    if n_tiles is None:
        tiled_loss.MIN_TILE_LOGITS = 2**12  # a tile of 4,096 logits: ~8 targets of this 503-entry vocabulary
        record_counts()
        rows = uneven_rows_for
    results = {
        "untiled": run(tied, target_token_loss, ds_config, world, 3, rows=rows),
        "tiled": run(tied, partial(tiled_target_token_loss, n_tiles=n_tiles), ds_config, world, 3, rows=rows),
        "tiled_mlp": run(tied, target_token_loss, ds_config, world, 3, mlp_tiles=n_tiles, rows=rows),
    }
    counts: list = [None] * world
    dist.all_gather_object(counts, COUNTS)
    results["counts"] = counts
    if info.rank == 0:
        torch.save(results, out)
    dist.barrier()
    ds_engine.exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1] == "tied", None if sys.argv[2] == "auto" else int(sys.argv[2]), sys.argv[3])
