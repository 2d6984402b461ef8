"""What `sft prepare [--shard i/N | --shard auto]` does (its row and parser are in `launcher.launch.cli`).

sft prepare data=smoltalk                         # prepare (or merge the shards) and print the data report
sft prepare --shard 3/8 data=smoltalk             # encode shard 3 of 8 into the shared cache
srun --ntasks 8 sft prepare --shard auto ...      # shard i/N of an srun step's tasks (SLURM_PROCID), or of a
                                                  # job array's (SLURM_ARRAY_TASK_ID / _COUNT)
(slurm/prepare.sbatch runs either, then the merge)
"""

from __future__ import annotations

import json
import os
from typing import Any


def parse_shard(value: str) -> tuple[int, int]:
    """`i/N` (0 <= i < N), or `auto`: this task's shard from Slurm's variables."""
    if value == "auto":
        env = os.environ
        if env.get("SLURM_STEP_NUM_TASKS", "1") != "1":  # a task of an srun step: its rank among the step's
            return parse_shard(f"{env.get('SLURM_PROCID')}/{env['SLURM_STEP_NUM_TASKS']}")
        if env.get("SLURM_ARRAY_TASK_ID", "").isdigit() and env.get("SLURM_ARRAY_TASK_COUNT", "").isdigit():
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return parse_shard(f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{env['SLURM_ARRAY_TASK_COUNT']}")
        raise ValueError(
            "--shard auto: not a task of a multi-task srun step or of a Slurm job array here; give i/N"
        )
    i, _, n = value.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ValueError(f"--shard {value}: expected i/N with 0 <= i < N, e.g. --shard 0/4 (or --shard auto)")
    return int(i), int(n)


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
