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
from launcher.loss import final_hidden_states, model_inputs, target_token_loss
from launcher.model.attention import plain_backend


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


SAMPLED_POSITIONS = 8  # per document, where the self-check also compares logits (the LM head's own output)


def sampled_positions(n: int, device: torch.device) -> torch.Tensor:
    """At most SAMPLED_POSITIONS of 0..n-1, evenly spaced, first and last included."""
    return torch.linspace(0, n - 1, min(n, SAMPLED_POSITIONS), device=device).round().long().unique()


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |b|) in fp32."""
    return (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()


@torch.no_grad()
def packing_error(
    model: Any, row: dict, lengths: Sequence[int], attention: str, device: torch.device, sp: Any = None
) -> dict[str, float]:
    """How far the packed row's outputs are from each of its first documents run alone, relative to the
    largest value: `hidden` over the final hidden states at every position, `logits` over the LM head's output
    at SAMPLED_POSITIONS positions per document. Memory: [T, hidden] and [32, vocab], never [T, vocab].

    Each document's reference runs alone, with positions 0..n-1, whatever the row's own position ids say. With
    `sp` (a `launcher.long_context.sequence_parallel.SequenceParallel` of S > 1) the packed row runs
    sequence-parallel. Every rank runs the same forwards and head calls (ZeRO-3 gathers are collective).
    """
    batch = collate([row], attention, device=device)
    if sp is not None and sp.size > 1:
        packed = sp.hidden_states(model, batch)[0]
    else:
        packed = final_hidden_states(model, batch)[0]
    head = getattr(model, "module", model).get_output_embeddings()
    out = {"hidden": [0.0, 0.0], "logits": [0.0, 0.0]}  # [max abs diff, max abs reference]
    start = 0
    for n in lengths[:4]:
        doc = {
            "input_ids": row["input_ids"][start : start + n],
            "labels": row["labels"][start : start + n],
            "position_ids": list(range(n)),
        }
        single = final_hidden_states(model, collate([doc], attention, device=device))[0]
        at = sampled_positions(n, device)
        pairs = {
            "hidden": (packed[start : start + n], single),
            "logits": (head(packed[start + at]), head(single[at])),
        }
        for key, (got, want) in pairs.items():
            diff, scale = _rel(got, want)
            out[key] = [max(out[key][0], diff), max(out[key][1], scale)]
        start += n
    return {
        f"{key}_{what}": value
        for key, (diff, scale) in out.items()
        for what, value in (("max_abs_diff", diff), ("rel", diff / max(scale, 1e-6)))
    }


@torch.no_grad()
def leaking_module(
    model: Any, row: dict, lengths: Sequence[int], attention: str, device: torch.device, tol: float
) -> str | None:
    """The layer that lets documents leak into each other, as `Class (path)`, or None: on the row's second
    document, the first module (in the order modules finish, so the innermost) whose packed output differs from
    its output for the document alone. When its input differs too, the leak is in the code of the module around it
    (Gated DeltaNet's recurrence runs between its projections), so that one is named. One process, on the row's
    first two documents only, the LM head run at no position (never [T, vocab] logits; it is not hooked)."""
    seen: dict[str, list] = {}  # name -> [(input, output)] per forward
    order: list[str] = []

    def first_tensor(x: Any) -> torch.Tensor | None:
        x = x[0] if isinstance(x, tuple) and x else x
        return x.detach() if isinstance(x, torch.Tensor) and x.ndim >= 2 else None

    def keep(name: str):
        def hook(_module, args, out):
            if name not in seen:
                order.append(name)
            seen.setdefault(name, []).append((first_tensor(args), first_tensor(out)))

        return hook

    head = model.get_output_embeddings()
    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n and m is not head]
    n0, n1 = lengths[0], lengths[1]
    row = {k: row[k][: n0 + n1] for k in ("input_ids", "labels", "position_ids")}  # the first two documents
    second = {k: row[k][n0 : n0 + n1] for k in ("input_ids", "labels")}
    nothing = torch.zeros(0, dtype=torch.long, device=device)
    try:
        model(**model_inputs(collate([row], attention, device=device)), logits_to_keep=nothing)
        packed = {n: v[0] for n, v in seen.items()}
        seen.clear()
        alone = collate([{**second, "position_ids": list(range(n1))}], attention, device=device)
        model(**model_inputs(alone), logits_to_keep=nothing)
        alone = {n: v[0] for n, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()

    def differs(a: torch.Tensor | None, b: torch.Tensor | None) -> bool | None:
        if a is None or b is None or a.shape[1] != len(row["input_ids"]) or b.shape[1] != n1:
            return None  # not a [B, T, ...] tensor (e.g. channels first)
        a, b = a[0, n0 : n0 + n1].float(), b[0].float()
        return (a - b).abs().max().item() > tol * max(b.abs().max().item(), 1e-6)

    for name in order:
        if name in packed and name in alone and differs(packed[name][1], alone[name][1]):
            if differs(packed[name][0], alone[name][0]) and "." in name:
                name = name.rsplit(".", 1)[0]
            return f"{type(model.get_submodule(name)).__name__} ({name})"
    return None


@torch.no_grad()
def check_packing(
    model: Any,
    rows: Sequence[dict],
    attention: str,
    device: torch.device,
    tol: float,
    sp: Any = None,
    skippable: bool = True,
) -> dict:
    """Packed vs per-document final hidden states (and logits at sampled positions) on a real packed row,
    sequence-parallel with `sp`; ValueError if documents leak into each other. `skippable=False`: the run cannot
    turn the check off (a model no families row vouches for), so the error does not offer it."""
    t0 = time.time()
    row = max(rows[:64], key=lambda r: len(doc_lengths(r["position_ids"])))
    lengths = doc_lengths(row["position_ids"])
    if len(lengths) < 2:
        return {"packing_check": "skipped (no packed row holds two documents)"}
    model.eval()
    err = packing_error(model, row, lengths, attention, device, sp)
    model.train()
    rel = max(err["hidden_rel"], err["logits_rel"])
    if rel > tol:
        worst = "hidden" if err["hidden_rel"] >= err["logits_rel"] else "logits"
        what = "final hidden states" if worst == "hidden" else "logits"
        where = leaking_module(model, row, lengths, attention, device, tol)
        raise ValueError(
            f"packing self-check failed for attention={attention}: packed {what} differ from per-document "
            f"{what} by {err[worst + '_max_abs_diff']:.3g} (relative {rel:.3g} > {tol}); documents are leaking "
            "into each other"
            + (f" in {where}, which cannot be packed: set data.pack=false" if where else "")
            + ". Use another model.attention or report this model/backend pair"
            + (" (train.check_packing=false skips)." if skippable else ".")
        )
    return {
        "packing_check_max_abs_diff": err["hidden_max_abs_diff"],
        "packing_check_rel": rel,
        "packing_check_logits_max_abs_diff": err["logits_max_abs_diff"],
        "packing_check_tokens": len(row["input_ids"]),
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
        model.set_attn_implementation(plain_backend(model.config))  # generation: padded batches, not packed
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
