"""The optimizer and the learning-rate schedule.

    optimizer, scheduler_factory = build_optimizer(model, cfg.train)
    lr_factor(step, cfg.train)          # the schedule: warmup, then cosine / linear / constant

AdamW, with no weight decay on biases, norms and other 1-D parameters (read through `param_shape`: under ZeRO-3
every local partition is 1-D).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from launcher.model import param_shape


def build_optimizer(model: torch.nn.Module, t: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on biases and norms) and a factory for warmup + cosine/linear/constant decay.

    The scheduler is a factory because DeepSpeed wraps the optimizer and rebuilds its param groups: the
    schedule must be attached to DeepSpeed's optimizer, not ours.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # under ZeRO-3 p.ndim is 1 for every parameter: ask for the real shape
            flat = len(param_shape(p)) < 2
            (no_decay if flat or "norm" in name.lower() or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=torch.cuda.is_available()
    )

    return optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t))


def warmup_steps(t: Any) -> int:
    """Warmup length: `train.warmup_steps` when set, else `train.warmup_ratio` of `max_steps`, rounded."""
    return t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * t.max_steps)


def lr_factor(step: int, t: Any) -> float:
    """The lr of optimizer step `step` (0-based) as a fraction of `t.lr`: warmup, then cosine/linear/constant."""
    warmup = warmup_steps(t)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
    if t.schedule.value == "constant":
        return 1.0
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule.value == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape
