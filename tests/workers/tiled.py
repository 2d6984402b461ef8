"""torchrun worker for test_long_context_dist: a few real ZeRO-3 AdamW steps, untiled, then with the tiled LM-head
loss, then with the tiled MLP, from the same initial weights on the same rows. Rank 0 writes each variant's per-step losses and grad norms."""

from __future__ import annotations

import sys
from functools import partial

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

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


def run(
    tied: bool, loss_fn, ds_config: dict, world: int, steps: int, mlp_tiles: int = 0
) -> dict[str, list[float]]:
    cfg = helpers.tiny_config(
        "llama", vocab_size=VOCAB, tie_word_embeddings=tied, max_position_embeddings=2048
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    if mlp_tiles:
        install_tiled_mlp(model, n_tiles=mlp_tiles)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng = ds_engine.initialize(model, opt, None, ds_config)
    assert eng.zero_optimization_partition_weights()
    head = eng.module.get_output_embeddings().weight
    assert head.numel() == 0 or head.numel() < head.ds_numel, "the head must be partitioned"
    out: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    for step in range(steps):
        got = train_step(
            eng, rows_for(dist.get_rank(), step), 1, "sdpa", torch.device("cpu"), 0, world, loss_fn
        )
        out["loss"].append(got["loss"])
        out["grad_norm"].append(float(eng.get_global_grad_norm()))
    return out


def main(tied: bool, n_tiles: int, out: str) -> None:
    info = ds_engine.init_distributed(timeout_minutes=5)
    world = info.world_size
    ds_config = helpers.ds_config(2 * world, 1, world)
    # Partition every parameter, however small (DeepSpeed keeps small ones whole on every rank by default).
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_engine.zero_init_context(ds_config)
    results = {
        "untiled": run(tied, target_token_loss, ds_config, world, 3),
        "tiled": run(tied, partial(tiled_target_token_loss, n_tiles=n_tiles), ds_config, world, 3),
        "tiled_mlp": run(tied, target_token_loss, ds_config, world, 3, mlp_tiles=n_tiles),
    }
    if info.rank == 0:
        torch.save(results, out)
    dist.barrier()
    ds_engine.exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1] == "tied", int(sys.argv[2]), sys.argv[3])
