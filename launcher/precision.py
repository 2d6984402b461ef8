"""The training precision, decided once for every command: `train`, `check`, preflight and `plan` agree.

    p = resolve_precision(cfg.model.dtype.value, device)        # Precision(dtype=torch.bfloat16, ...)
    p.dtype, p.name, p.tol                                      # tol: for packed-vs-per-document logit checks

`auto` is bf16 where the accelerator supports it (CUDA with bf16: Ampere and newer), else fp32 (CPU, V100, T4).
An explicit `bf16` where it is not supported is the user's mistake, said in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative tolerance of logit comparisons that must agree up to rounding (the packing self-check, the export
# check): bf16 keeps 8 bits of mantissa, so kernels that sum in another order differ by ~1e-2.
TOLERANCE = {"bf16": 3e-2, "fp32": 1e-4}


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" or "fp32"
    why: str  # how it was chosen, for the start-up line

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def tol(self) -> float:
        return TOLERANCE[self.name]


def bf16_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(setting: str, device: torch.device | str, bf16_ok: bool | None = None) -> Precision:
    """`model.dtype` for `device`; `bf16_ok` overrides what the device reports (`sft plan` plans for GPUs it
    does not run on, and assumes bf16). Raises ValueError for bf16 where it is not supported."""
    device = torch.device(device)
    ok = bf16_supported(device) if bf16_ok is None else bf16_ok
    if setting == "fp32":
        return Precision("fp32", "as configured")
    if setting == "bf16":
        if not ok:
            where = "on CPU" if device.type == "cpu" else "on this GPU (no bf16 support)"
            raise ValueError(f"model.dtype=bf16 {where} is not supported here: use model.dtype=auto or fp32")
        return Precision("bf16", "as configured")
    assert setting == "auto", setting
    if ok:
        return Precision("bf16", "auto: the accelerator supports bf16")
    return Precision("fp32", "auto: no CUDA" if device.type == "cpu" else "auto: this GPU has no bf16")
