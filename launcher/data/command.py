"""`sft prepare [--shard i/N | --shard auto] [overrides]`: what the prepare command does, given its arguments.

sft prepare data=smoltalk                         # prepare (or merge the shards) and print the data report
sft prepare --shard 3/8 data=smoltalk             # encode shard 3 of 8 into the shared cache
srun --ntasks 8 sft prepare --shard auto ...      # shard i/N from SLURM_PROCID / SLURM_NTASKS
                                                  # (or SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)
"""

from __future__ import annotations

import json
import os
from typing import Any

USAGE = (
    "sft prepare [--shard i/N | --shard auto] [overrides]\n\n"
    "Tokenizes, masks and packs the data once (cached by content hash) and prints the data report. With "
    "--shard i/N it only encodes shard i of N (JSON Lines split by byte range, other sources dealt whole) into "
    "the shared cache, e.g. one per node or Slurm array task (`auto`: the srun step's task rank and count, or the "
    "array task's; see slurm/prepare.sbatch); a plain `sft prepare` then merges the shards (preparing any missing one itself)."
)


def _shard_value(value: str) -> tuple[int, int]:
    if value == "auto":
        env = os.environ
        if env.get("SLURM_STEP_NUM_TASKS", "1") != "1":  # a task of an srun step: its rank among the step's
            return _shard_value(f"{env.get('SLURM_PROCID')}/{env['SLURM_STEP_NUM_TASKS']}")
        if env.get("SLURM_ARRAY_TASK_ID", "").isdigit() and env.get("SLURM_ARRAY_TASK_COUNT", "").isdigit():
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return _shard_value(f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{env['SLURM_ARRAY_TASK_COUNT']}")
        raise ValueError(
            "--shard auto: not a task of a multi-task srun step or of a Slurm job array here; give --shard i/N"
        )
    i, _, n = value.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ValueError(f"--shard {value}: expected i/N with 0 <= i < N, e.g. --shard 0/4 (or --shard auto)")
    return int(i), int(n)


def parse_shard(args: list[str]) -> tuple[tuple[int, int] | None, list[str]]:
    """`--shard i/N` / `--shard=i/N` / `--shard auto` in front of the overrides."""
    if not args or not args[0].startswith("--shard"):
        return None, args
    if args[0].startswith("--shard="):
        return _shard_value(args[0].split("=", 1)[1]), args[1:]
    if args[0] != "--shard":
        raise ValueError(f"unknown option {args[0]!r}: did you mean --shard i/N?")
    if len(args) < 2:
        raise ValueError("--shard needs a value: i/N (shard i of N, from 0), e.g. --shard 0/4, or auto")
    return _shard_value(args[1]), args[2:]


def prepare(cfg: Any, shard: tuple[int, int] | None) -> int:
    """Prepare the data of `cfg` (or encode one shard of it), printing the report (or a line)."""
    from launcher.data.pipeline import cached_prepare, format_report, prepare_shard
    from launcher.model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    progress = bool(cfg.logging.progress)
    if shard is not None:
        print(prepare_shard(cfg.data, tok, cfg.model.chat_template, cfg.cache_dir, *shard, progress=progress))
        return 0
    prepared = cached_prepare(
        cfg.data, tok, cfg.model.chat_template, cfg.cache_dir, build=True, progress=progress
    )
    print(format_report(prepared.report))
    print(json.dumps(prepared.report["cache"]))
    return 0
