"""torchrun worker for test_distributed: one ZeRO-3 optimizer step with plain SGD (lr=1), so the updated weights
are `w - grad` and expose any mis-scaled gradient. Writes loss and gathered weights from rank 0."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from launcher import engine as ds_engine
from launcher.data import pack_examples
from launcher.train import train_step
from tests import helpers


def sgd_reference(model: torch.nn.Module, docs: list[dict], lr: float) -> tuple[torch.Tensor, float]:
    """Weights after one SGD step on the token-mean loss of every document, each run on its own."""
    loss_sum, n_targets = torch.zeros(()), 0
    for d in docs:
        ids, labels = torch.tensor([d["input_ids"]]), torch.tensor(d["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1]
        loss_sum = loss_sum + F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        n_targets += int((labels != -100).sum())
    loss = loss_sum / n_targets
    loss.backward()
    with torch.no_grad():
        new = torch.cat([(p - lr * p.grad).flatten() for p in model.parameters()])
    return new, float(loss)


def main(micro: int, accum: int, out: str) -> None:
    info = ds_engine.init_distributed(timeout_minutes=5)
    world = info.world_size
    ds_config = helpers.ds_config(micro * accum * world, micro, world, grad_clip=0.0)
    cfg = helpers.tiny_config("llama", vocab_size=61, max_position_embeddings=2048)
    # A plain copy for the reference step, built before transformers learns it runs under ZeRO-3.
    ref_model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    ds_engine.zero_init_context(ds_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    eng = ds_engine.initialize(model, torch.optim.SGD(model.parameters(), lr=1.0), None, ds_config)
    with ds_engine.gathered_params(list(eng.module.parameters())), torch.no_grad():
        for mine, full in zip(ref_model.parameters(), eng.module.parameters(), strict=True):
            mine.copy_(full)
    initial = torch.cat([p.detach().flatten().clone() for p in ref_model.parameters()])
    g = torch.Generator().manual_seed(1)
    # Four packed rows with different numbers of target tokens, so per-row averaging would differ.
    docs = [
        {"input_ids": torch.randint(1, 61, (n,), generator=g).tolist()} for n in (5, 9, 3, 12, 7, 4, 10, 6)
    ]
    for i, d in enumerate(docs):
        d["labels"] = [t if (j + i) % (i % 3 + 1) == 0 else -100 for j, t in enumerate(d["input_ids"])]
    rows = pack_examples(docs, max_length=16)
    assert len(rows) == 4, len(rows)
    # The step's expected update computed the plain way: each document on its own (no packing, no DeepSpeed),
    # the loss summed over tokens and divided by the step's target tokens.
    expected, ref_loss = sgd_reference(ref_model, docs, lr=1.0)
    per_rank = micro * accum
    mine = rows[info.rank * per_rank : (info.rank + 1) * per_rank]
    out_step = train_step(eng, mine, micro, "sdpa", info.device, 0, world)
    with ds_engine.gathered_params(list(eng.module.parameters())):
        if info.rank == 0:
            weights = torch.cat([p.detach().flatten().clone() for p in eng.module.parameters()])
            record = {"loss": out_step["loss"], "weights": weights, "tokens": out_step["trained_tokens"]}
            record.update(initial=initial, expected=expected, expected_loss=ref_loss)
            torch.save(record, out)
    dist.barrier()
    ds_engine.exit_now(0)  # every rank is done; see exit_now for the teardown abort it avoids


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
