"""Hugging Face export of the trained weights (safetensors + tokenizer + chat template), checked on the way out.

export_hf(engine, tok, run_dir / "export")                      # collective; rank 0 writes
verify_export(engine, run_dir / "export", row, attention, tol)  # collective; raises if the export differs
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher import engine as ds_engine
from launcher.data.loader import collate
from launcher.evaluate import sampled_positions
from launcher.loss import model_inputs
from launcher.model import param_shape
from launcher.model.attention import decoder_of, plain_backend
from launcher.model.moe import router_logits_restored

VERIFY_TOKENS = 64  # the export check's row is cut to this many tokens: cheap even for a large model on CPU


def export_hf(engine: Any, tok: Any, out_dir: Path) -> Path | None:
    """Gather ZeRO-3 shards and write a model loadable by `AutoModelForCausalLM.from_pretrained`.

    Collective: every rank must call it; rank 0 writes.
    """
    state = ds_engine.consolidated_state_dict(engine)
    if dist.get_rank() != 0:
        return None
    model = engine.module
    out_dir.mkdir(parents=True, exist_ok=True)
    attn = model.config._attn_implementation
    # The export is for inference: cache on, and a stock attention (torch_varlen is registered only by us).
    model.config.use_cache = True
    if attn not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"):
        model.config._attn_implementation = plain_backend(model.config)
    try:
        with router_logits_restored(model):  # the config as loaded: output_router_logits is ours to turn off
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    finally:
        model.config.use_cache = False
        model.config._attn_implementation = attn
    tok.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def verify_export(
    engine: Any, out_dir: Path, row: dict, attention: str, tol: float, trust_remote_code: bool = False
) -> dict[str, float]:
    """Reload the export on rank 0's CPU and compare it with the engine on one held-out row: the final hidden
    states at every position and the logits at SAMPLED_POSITIONS of them (the LM head's own output, with any
    post-processing), never [T, vocab] logits.

    Catches an export that is not the trained model (shapes cut down, weights missing or untied wrongly, a
    config that disagrees with the tensors). Collective (the engine's forward gathers ZeRO-3 partitions);
    raises RuntimeError on every rank when the two differ by more than `tol` relative to the largest value.
    """

    n = min(len(row["input_ids"]), VERIFY_TOKENS)
    doc = {k: list(row[k][:n]) for k in ("input_ids", "labels")}
    doc["position_ids"] = list(range(n))  # one document from position 0, like a plain forward
    device = next(engine.module.parameters()).device
    model = engine.module
    was_training = model.training
    model.eval()
    at = sampled_positions(n, device)
    ours = outputs(model, collate([doc], attention, device=device), at)
    model.train(was_training)
    # [max relative difference, max abs, shapes differ, failed to reload]: rank 0's verdict, which every rank waits
    # for, so an export rank 0 cannot even reload is everyone's error (not rank 1 waiting forever).
    verdict = torch.zeros(4, dtype=torch.float64, device=device)
    failure = ""
    if dist.get_rank() == 0:
        try:
            verdict = _compare_reloaded(model, out_dir, doc, ours, at, trust_remote_code).to(device)
        except Exception as e:
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            verdict = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    dist.broadcast(verdict, src=0)
    rel, diff, shapes_differ, failed = verdict.tolist()
    if failed:
        raise RuntimeError(
            f"export check failed: {out_dir} does not reload with from_pretrained ({failure or 'rank 0'})"
        )
    if shapes_differ or rel > tol:
        raise RuntimeError(
            f"export check failed: {out_dir} reloaded with from_pretrained gives outputs that differ from the "
            f"trained engine's by {diff:.3g} (relative {rel:.3g} > {tol})"
            + (" and parameter shapes differ" if shapes_differ else "")
            + "; the export is not the trained model"
        )
    return {"export_check_max_abs_diff": diff, "export_check_rel": rel}


def outputs(model: Any, batch: dict[str, Any], at: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"hidden": [T, H] final hidden states, "logits": [len(at), V] logits at positions `at`} in fp32, from one
    forward that runs the LM head at those positions only (`logits_to_keep` as an index tensor)."""
    captured: list[torch.Tensor] = []
    hook = decoder_of(model).register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    try:
        logits = model(**model_inputs(batch), logits_to_keep=at).logits[0]
    finally:
        hook.remove()
    return {"hidden": captured[-1][0].float(), "logits": logits.float()}


def _compare_reloaded(
    model: Any,
    out_dir: Path,
    doc: dict,
    ours: dict[str, torch.Tensor],
    at: torch.Tensor,
    trust_remote_code: bool,
) -> torch.Tensor:
    """[max relative difference, max abs difference, shapes differ, 0] for the export reloaded on this process's
    CPU against `ours` (`outputs` of the engine)."""
    from transformers import AutoModelForCausalLM

    dtype = next(p.dtype for p in model.parameters())
    with ds_engine.local_construction():
        reloaded = AutoModelForCausalLM.from_pretrained(
            out_dir,
            dtype=dtype,
            attn_implementation=plain_backend(model.config),
            trust_remote_code=trust_remote_code,  # code shipped with the checkpoint is saved with the export
        )
    reloaded.eval()
    shapes = {k: param_shape(p) for k, p in model.named_parameters()}
    wrong = [k for k, p in reloaded.named_parameters() if k in shapes and tuple(p.shape) != shapes[k]]
    theirs = outputs(reloaded, {"input_ids": torch.tensor([doc["input_ids"]])}, at.cpu())
    rel, diff = 0.0, 0.0
    same = all(theirs[k].shape == ours[k].shape for k in ours)
    for k in ours if same else ():
        d = (theirs[k] - ours[k].cpu()).abs().max().item()
        rel, diff = max(rel, d / max(ours[k].abs().max().item(), 1e-6)), max(diff, d)
    bad = bool(wrong) or not same
    return torch.tensor([float("inf") if bad else rel, diff, float(bad), 0.0], dtype=torch.float64)
