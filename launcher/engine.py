"""DeepSpeed, in one place: distributed init, the DeepSpeed dict, ZeRO-3 construction, checkpoints.

No other module imports deepspeed. The typed config becomes the DeepSpeed dict in `build_ds_config`; a
user's own JSON (`deepspeed.config_file`) is merged on top of it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.config import batch_layout
from launcher.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def accelerator_name() -> str:
    """`cpu` without CUDA (then DeepSpeed must be told before it is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return "cpu"
    return "cuda"


def init_distributed(timeout_minutes: float) -> DistInfo:
    """Join the process group set up by torchrun / the deepspeed launcher / srun (or run single-process)."""
    accel = accelerator_name()
    import deepspeed

    # Only a task that srun started (a job step) is one of several ranks: a process run straight in an
    # allocation's batch script also sees SLURM_PROCID and SLURM_NTASKS, and would wait for ranks that never come.
    if "SLURM_STEP_NUM_TASKS" in os.environ and "RANK" not in os.environ:
        os.environ.update(slurm_env(os.environ))
    if "RANK" not in os.environ:
        # Single process: a one-rank group so the same code path (and DeepSpeed) works unchanged.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel == "cuda":
        # srun --gpus-per-task shows each task only its own GPU: local rank 3 then owns device 0.
        visible = torch.cuda.device_count()
        if visible > 1 and local_rank >= visible:
            raise ValueError(
                f"local rank {local_rank} but only {visible} GPUs visible: start one rank per GPU"
            )
        index = 0 if visible == 1 else local_rank
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(
        dist_backend="nccl" if accel == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1)),
        device=device,
    )


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables for a task started by `srun`, from the SLURM_* ones.

    The rendezvous host is the step's first node and the port is derived from the job id, so every task of the
    step agrees on both without talking first (as Lightning does). Values already set are kept.
    """
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    step_id = env.get("SLURM_STEP_ID", "0")
    step_id = step_id if step_id.isdigit() else "0"
    out = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "MASTER_ADDR": first_host(nodes),
        # Steps of one job can run at once: the port depends on the step too.
        "MASTER_PORT": str(15000 + (int(env.get("SLURM_JOB_ID", "0")) * 31 + int(step_id)) % 20000),
    }
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if tasks_per_node:  # "4(x2),2": the first group's count is this node's when counts are equal
        out["LOCAL_WORLD_SIZE"] = tasks_per_node.split("(")[0].split(",")[0]
    return {k: env.get(k) or v for k, v in out.items()}


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: "gpu[07-09,12],cpu1" -> "gpu07", "r[1-2]-n[01-04]" -> "r1-n01"."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first item ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


def exit_now(code: int) -> None:
    """End a distributed process without interpreter teardown, once its work is written and flushed.

    Workaround, seen here about once in 15-20 two-rank CPU runs (torch 2.13, DeepSpeed 0.19.8): after the run has
    finished and every file is closed, a native thread is destroyed while still joinable during teardown and the
    process aborts ("terminate called without an active exception", exit -6), even after destroy_process_group.
    The work is complete by then, so skipping teardown loses nothing and keeps the exit code truthful.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_ds_config(ds_cfg: Any, train_cfg: Any, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed dict for this run (ZeRO stage, precision, clipping, batch sizes).

    With sequence parallelism (S ranks per row) the accumulation counts data-parallel ranks, while
    DeepSpeed, which sees every rank as data-parallel, checks train_batch_size = micro x accum x world."""
    _, accum = batch_layout(train_cfg, world_size)
    zero: dict[str, Any] = {
        "stage": ds_cfg.stage,
        "overlap_comm": ds_cfg.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ds_cfg.stage == 3:
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
            }
        )
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": train_cfg.global_batch_size * train_cfg.sequence_parallel_size,
        "gradient_clipping": train_cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        # We hand DeepSpeed a torch optimizer (AdamW here; SGD in the invariance test).
        "zero_allow_untested_optimizer": True,
        # With the optimizer offloaded, DeepSpeed refuses any optimizer but its own CPU Adam, a C++ extension
        # compiled at first use. torch's AdamW steps the CPU-resident fp32 partitions instead: no compiler needed.
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
    }
    if ds_cfg.config_file:
        path = Path(ds_cfg.config_file)
        if not path.is_file():
            raise ValueError(f"deepspeed.config_file={path}: no such file")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"deepspeed.config_file={path}:{e.lineno}: malformed JSON ({e.msg})") from None
        config = _merge(config, user)
    return _resolve_auto(config)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_auto(config: dict) -> dict:
    # "auto" is an HF-Trainer convention DeepSpeed itself does not parse: drop it and take DeepSpeed's default.
    return {k: _resolve_auto(v) if isinstance(v, dict) else v for k, v in config.items() if v != "auto"}


_HF_DS_CONFIG: Any = None


def zero_init_context(ds_config: dict) -> Callable[[], Any]:
    """Construct the model already partitioned (ZeRO-3), so no rank ever holds the full weights.

    transformers must *know* it runs under ZeRO-3 (HfDeepSpeedConfig, kept alive for the whole run): it then
    wraps construction in zero.Init itself and gathers partitions to initialise and load weights. A bare
    zero.Init around from_pretrained would leave partitioned weights unloaded and uninitialised.
    """
    global _HF_DS_CONFIG
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    return contextlib.nullcontext


@contextlib.contextmanager
def local_construction():
    """Build a model whole in this process (e.g. to reload the export on rank 0), not partitioned by ZeRO-3:
    transformers would otherwise wrap its construction in zero.Init, a collective the other ranks never join."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if _HF_DS_CONFIG is not None:
            set_hf_deepspeed_config(_HF_DS_CONFIG)


def initialize(
    model: torch.nn.Module, optimizer: Any, scheduler: Any, ds_config: dict, user_file: str | None = None
) -> Any:
    """The DeepSpeed engine. DeepSpeed validates the merged config here: when the user gave their own JSON
    (`user_file`), its refusal is theirs to fix, said in one line naming the file."""
    import deepspeed

    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
    except ValueError as e:  # pydantic's ValidationError is one
        if user_file is None:
            raise
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(f"deepspeed.config_file={user_file}: DeepSpeed refused the config: {detail}") from e
    return engine


def backward(engine: Any, loss: torch.Tensor) -> None:
    """Backward without DeepSpeed's 1/accumulation scaling: the loss is already normalised by the step's
    global token count (see launcher.train.train_step)."""
    engine.backward(loss, scale_wrt_gas=False)


def save_checkpoint(engine: Any, ckpt_dir: Path, tag: str) -> None:
    """Every rank's shards under `ckpt_dir/tag` (collective). DeepSpeed's own `latest` is not written here: it
    writes it on rank 0 before its closing barrier, so a job killed in that window would point at half-written
    shards (`launcher.checkpoint` writes it after its manifest)."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str) -> None:
    """Restore weights, optimizer and LR schedule from `ckpt_dir/tag`."""
    path, _ = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ValueError(f"could not load a DeepSpeed checkpoint from {ckpt_dir / tag}")


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full weights gathered from all ranks (collective: every rank must call it); rank 0 gets the dict."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def gathered_params(params: list[torch.nn.Parameter]) -> Any:
    """Context in which ZeRO-3-partitioned parameters are whole on every rank (read-only)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
