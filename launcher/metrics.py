"""What a run measures and where it goes: FLOPs and MFU, peak memory, and logging on rank 0
(`<run_dir>/metrics.jsonl`, wandb — the only wandb import — and a progress bar).

Other ranks get a logger whose methods do nothing, so the training loop never branches on rank to log.
wandb mode `auto` is offline unless WANDB_API_KEY is set; offline runs land in `<run_dir>/wandb/`. The wandb run id
is kept in `<run_dir>/wandb_id`, so a resumed job logs to the same wandb run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from launcher.data.packing import doc_lengths
from launcher.loss import count_targets

log = logging.getLogger(__name__)


# ---- FLOPs, MFU, memory ----


def step_flops(model_cfg: Any, n_params: int, rows: list[dict]) -> float:
    """Model FLOPs of one step's rows, the numerator of MFU (activation-checkpoint recompute is not counted).

    6 x matmul parameters x tokens, plus causal attention on the real document lengths. The input embedding is a
    lookup, not a matmul, so it is left out; the LM head is counted only at positions that have a target,
    the only positions where it runs (`target_token_loss`).
    """
    tokens = sum(len(r["input_ids"]) for r in rows)
    targets = count_targets(rows)
    head = model_cfg.vocab_size * model_cfg.hidden_size
    body = n_params - head * (1 if getattr(model_cfg, "tie_word_embeddings", False) else 2)
    sq = sum(n * n for r in rows for n in doc_lengths(r["position_ids"]))
    head_dim = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
    width = model_cfg.num_attention_heads * head_dim
    # QK^T and AV: 2 matmuls x 2 FLOPs x (n^2 / 2 causal) x width per layer; x3 for forward + backward.
    attn = 3 * 2 * 2 * (sq / 2) * width * model_cfg.num_hidden_layers
    return 6 * body * tokens + 6 * head * targets + attn


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), most specific name first: an H100 PCIe is not an SXM.
PEAK_TFLOPS = (
    (r"H100.*PCIe", 756),
    (r"H100 NVL|H200 NVL", 835),
    (r"H100|H200|GH200", 989),
    (r"A100", 312),
    (r"L40S", 362),
    (r"L40\b", 181),
    (r"\bA10\b", 125),
)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak for MFU; SFT_PEAK_TFLOPS overrides, and is needed for devices not listed."""
    if os.environ.get("SFT_PEAK_TFLOPS"):
        return float(os.environ["SFT_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops(name)
    if tflops is None:
        log.warning("no bf16 peak known for %r: MFU is not logged (set SFT_PEAK_TFLOPS)", name)
        return None
    return tflops * 1e12


def peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated on CUDA; on CPU, this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- logging ----


class NullLogger:
    """What non-zero ranks get: every call is a no-op."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger(NullLogger):
    def __init__(self, run_dir: Path, log_cfg: Any, config: dict[str, Any], total_steps: int):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a", encoding="utf-8")
        self.wandb_run = None
        mode = log_cfg.wandb_mode.value
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "disabled":
            import wandb

            # One wandb run per run dir: a resumed or requeued job continues the run whose id is kept there.
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self.wandb_run = wandb.init(
                id=run_id,
                resume="allow",
                project=log_cfg.project,
                entity=log_cfg.entity,
                name=log_cfg.run_name or run_dir.name,
                dir=str(run_dir),
                mode=mode,
                config=config,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        self.bar = None
        if log_cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)
        self.t0 = time.time()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self._wandb(lambda run: run.log(metrics, step=step))

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)

    def summary(self, values: dict[str, Any]) -> None:
        self._wandb(lambda run: run.summary.update(values))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        self._wandb(lambda run: run.finish())

    def _wandb(self, call: Any) -> None:
        """A wandb call that cannot end the run: Slurm's stop signal (preemption) reaches wandb's service process
        too, and a rank whose next log call then fails would never reach the step boundary and its checkpoint.
        metrics.jsonl keeps every record; wandb stops here, saying so once."""
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as e:  # the service is gone: its socket or process
            print(
                f"wandb: stopped logging ({type(e).__name__}: {e}); metrics.jsonl has every step", flush=True
            )
            self.wandb_run = None


def build_logger(
    rank: int, run_dir: Path, log_cfg: Any, config: dict[str, Any], total_steps: int
) -> NullLogger:
    return RunLogger(run_dir, log_cfg, config, total_steps) if rank == 0 else NullLogger()
