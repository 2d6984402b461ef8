"""torchrun worker for test_checkpoint: one real ZeRO-3 save on every rank, with what reaches the disk recorded.

Each rank writes `<out>/rank<r>.json`: its file-system events in order, `[what, path, monotonic ns]` (one clock
for both ranks of this machine) with `what` one of `fsync` (a file or a directory), `hash` (a file this rank
hashed for the manifest) and `replace` (an atomic rename's target, once renamed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from launcher import checkpoint
from launcher import engine as ds_engine
from launcher.config import compose


def main(out: str) -> None:
    info = ds_engine.init_distributed(timeout_minutes=5)
    cfg = compose(["train.global_batch_size=2", "train.micro_batch_size=1"])
    ds_config = ds_engine.build_ds_config(cfg.deepspeed, cfg.train, info.world_size, bf16=False)
    ds_engine.zero_init_context(ds_config)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=97, **small))
    eng = ds_engine.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ds_config)

    events: list[list] = []
    real_fsync, real_replace, real_record = os.fsync, os.replace, checkpoint.file_record

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(["fsync", os.readlink(f"/proc/self/fd/{fd}"), time.monotonic_ns()])

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(["replace", str(Path(dst).resolve()), time.monotonic_ns()])

    def record(path: Path) -> dict:
        events.append(["hash", str(path.resolve()), time.monotonic_ns()])
        return real_record(path)

    os.fsync, os.replace, checkpoint.file_record = fsync, replace, record
    root = Path(out) / "checkpoints"
    checkpoint.save(eng, root, checkpoint.TrainState(step=1), cfg, {"rows": 1}, print)
    os.fsync, os.replace, checkpoint.file_record = real_fsync, real_replace, real_record
    (Path(out) / f"rank{info.rank}.json").write_text(json.dumps(events))
    dist.barrier()
    ds_engine.exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1])
