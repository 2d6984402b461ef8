"""Held-out evaluation, the packing self-check, exact-match generation (the training loss is in `loss.py`).

Under ZeRO-3 every forward gathers parameters collectively, so each function here runs the *same number*
of forward passes on every rank (ranks short of work repeat a row and discard its result).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from launcher.data.loader import collate
from launcher.data.packing import doc_lengths
from launcher.loss import model_inputs, target_token_loss


def _shard(items: Sequence[Any], rank: int, world: int, per_batch: int) -> list[list[Any] | None]:
    """This rank's batches, padded with None so that every rank runs the same number of batches."""
    mine = list(items[rank::world])
    n_batches = math.ceil(math.ceil(len(items) / world) / per_batch) if items else 0
    batches: list[list[Any] | None] = [
        mine[i * per_batch : (i + 1) * per_batch] or None for i in range(n_batches)
    ]
    return batches


@torch.no_grad()
def eval_loss(
    model: Any,
    rows: Sequence[dict],
    attention: str,
    micro_batch: int,
    device: torch.device,
    pad_id: int,
    loss_fn: Any = target_token_loss,
    sp: Any = None,
):
    """Token-level mean loss and perplexity over all eval rows, summed over ranks (`loss_fn`: the training
    loss, so a tiled loss keeps evaluation within the memory training needs). With `sp` (a
    `launcher.long_context.sequence_parallel.SequenceParallel`) rows go to data-parallel ranks and each group runs them
    sequence-parallel, as in training: a row that trains only with SP is evaluated within the same memory."""
    rank, world = (sp.dp_rank, sp.dp_world) if sp is not None else (dist.get_rank(), dist.get_world_size())
    split = sp.shard if sp is not None else contextlib.nullcontext
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch_rows in _shard(rows, rank, world, micro_batch):
        real = batch_rows is not None
        with split(collate(batch_rows if real else rows[:1], attention, pad_id, device=device)) as batch:
            loss_sum, n = loss_fn(model, batch)
        if real:
            total += torch.stack([loss_sum.double(), n.double()])
    dist.all_reduce(total)  # over every rank: a group's slices together make its rows' sums
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(total[1].item())}


@torch.no_grad()
def packing_error(
    model: Any, row: dict, lengths: Sequence[int], attention: str, device: torch.device, sp: Any = None
):
    """(max |packed - per-document| logit difference, max |logit|) over the row's first documents.

    Each document's reference runs alone, with positions 0..n-1, whatever the row's own position ids say. With
    `sp` (a `launcher.long_context.sequence_parallel.SequenceParallel` of S > 1) the packed row runs sequence-parallel.
    """
    batch = collate([row], attention, device=device)
    if sp is not None and sp.size > 1:
        packed = sp.logits(model, batch)[0].float()
    else:
        packed = model(**model_inputs(batch)).logits[0].float()
    worst, scale, start = 0.0, 0.0, 0
    for n in lengths[:4]:
        doc = {
            "input_ids": row["input_ids"][start : start + n],
            "labels": row["labels"][start : start + n],
            "position_ids": list(range(n)),
        }
        single = model(**model_inputs(collate([doc], attention, device=device))).logits[0].float()
        worst = max(worst, (packed[start : start + n] - single).abs().max().item())
        scale = max(scale, single.abs().max().item())
        start += n
    return worst, scale


@torch.no_grad()
def check_packing(
    model: Any, rows: Sequence[dict], attention: str, device: torch.device, tol: float, sp: Any = None
) -> dict:
    """Packed vs per-document logits on real packed rows (sequence-parallel with `sp`); ValueError if documents
    leak into each other."""
    t0 = time.time()
    row = max(rows[:64], key=lambda r: len(doc_lengths(r["position_ids"])))
    lengths = doc_lengths(row["position_ids"])
    if len(lengths) < 2:
        return {"packing_check": "skipped (no packed row holds two documents)"}
    model.eval()
    worst, scale = packing_error(model, row, lengths, attention, device, sp)
    model.train()
    rel = worst / max(scale, 1e-6)
    if rel > tol:
        raise ValueError(
            f"packing self-check failed for attention={attention}: packed logits differ from per-document "
            f"logits by {worst:.3g} (relative {rel:.3g} > {tol}); documents are leaking into each other. "
            "Use another model.attention or report this model/backend pair (train.check_packing=false skips)."
        )
    return {
        "packing_check_max_abs_diff": worst,
        "packing_check_rel": rel,
        "packing_check_s": time.time() - t0,
    }


@torch.no_grad()
def exact_match(
    model: Any,
    tok: Any,
    conversations: Sequence[list[dict]],
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 32,
) -> float:
    """Greedy-decode each conversation's final assistant turn; fraction equal to the reference (stripped)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    convs = [c for c in conversations if c and c[-1]["role"] == "assistant"]
    if not convs:
        return float("nan")
    previous = model.config._attn_implementation
    if previous not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")  # generation uses ordinary padded batches, not packed ones
    model.eval()
    stop = [tok.eos_token_id] + [
        tok.convert_tokens_to_ids(t) for t in ("<|im_end|>",) if t in tok.get_vocab()
    ]
    padding_side = tok.padding_side
    tok.padding_side = "left"
    hits = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in _shard(convs, rank, world, batch_size):
        real = batch is not None
        batch = batch if real else convs[:1]
        prompts = [tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in batch]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
            synced_gpus=world > 1,
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        if real:
            hits[0] += sum(t.strip() == c[-1]["content"].strip() for t, c in zip(texts, batch))
            hits[1] += len(batch)
    dist.all_reduce(hits)
    tok.padding_side = padding_side
    if previous not in ("sdpa", "eager"):
        model.set_attn_implementation(previous)
    model.train()
    return (hits[0] / hits[1]).item()
