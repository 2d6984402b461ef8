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
from launcher.loss import model_inputs
from launcher.model import param_shape
from launcher.model.attention import plain_backend

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
    """Reload the export on rank 0's CPU and compare its logits with the engine's on one held-out row.

    Catches an export that is not the trained model (shapes cut down, weights missing or untied wrongly, a
    config that disagrees with the tensors). Collective (the engine's forward gathers ZeRO-3 partitions);
    raises RuntimeError on every rank when the two differ by more than `tol` relative to the largest logit.
    """

    n = min(len(row["input_ids"]), VERIFY_TOKENS)
    doc = {k: list(row[k][:n]) for k in ("input_ids", "labels")}
    doc["position_ids"] = list(range(n))  # one document from position 0, like a plain forward
    device = next(engine.module.parameters()).device
    model = engine.module
    was_training = model.training
    model.eval()
    ours = model(**model_inputs(collate([doc], attention, device=device))).logits[0].float().cpu()
    model.train(was_training)
    # [max abs diff, max |logit|, shapes differ, failed to reload]: rank 0's verdict, which every rank waits for,
    # so an export rank 0 cannot even reload is everyone's error (not rank 1 waiting forever).
    verdict = torch.zeros(4, dtype=torch.float64, device=device)
    failure = ""
    if dist.get_rank() == 0:
        try:
            verdict = _compare_reloaded(model, out_dir, doc, ours, trust_remote_code).to(device)
        except Exception as e:
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            verdict = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    dist.broadcast(verdict, src=0)
    diff, scale, shapes_differ, failed = verdict.tolist()
    if failed:
        raise RuntimeError(
            f"export check failed: {out_dir} does not reload with from_pretrained ({failure or 'rank 0'})"
        )
    rel = diff / max(scale, 1e-6)
    if shapes_differ or rel > tol:
        raise RuntimeError(
            f"export check failed: {out_dir} reloaded with from_pretrained gives logits that differ from the "
            f"trained engine's by {diff:.3g} (relative {rel:.3g} > {tol})"
            + (" and parameter shapes differ" if shapes_differ else "")
            + "; the export is not the trained model"
        )
    return {"export_check_max_abs_diff": diff, "export_check_rel": rel}


def _compare_reloaded(
    model: Any, out_dir: Path, doc: dict, ours: torch.Tensor, trust_remote_code: bool
) -> torch.Tensor:
    """[max |reloaded - ours|, max |ours|, shapes differ, 0] for the export reloaded on this process's CPU."""
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
    theirs = reloaded(input_ids=torch.tensor([doc["input_ids"]])).logits[0].float()
    same_width = theirs.shape == ours.shape
    diff = (theirs - ours).abs().max().item() if same_width else float("inf")
    return torch.tensor(
        [diff, ours.abs().max().item(), float(bool(wrong) or not same_width), 0.0], dtype=torch.float64
    )
