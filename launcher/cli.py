"""`sft`: compose the Hydra config and run a subcommand. Overrides are Hydra's (`key=value`, `group=option`).

    sft launch [--nproc N] [overrides]   start torchrun here: every local GPU, or 2 CPU ranks
    sft train [overrides]                run in this process (under torchrun/deepspeed/srun, or alone)
    sft prepare [overrides]              build the tokenized + packed data cache and print the data report
    sft config [overrides]               print the composed config

User errors print one message naming the key/file/row and exit 2; SFT_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

USAGE = __doc__


def _compose(overrides: list[str]):
    from launcher.config import compose

    return compose(overrides)


def cmd_train(overrides: list[str]) -> int:
    from launcher.train import train

    train(_compose(overrides))
    return 0


def cmd_launch(args: list[str]) -> int:
    import torch

    nproc = None
    if args[:1] == ["--nproc"]:
        nproc, args = int(args[1]), args[2:]
    cfg = _compose(args)  # fail here, before starting processes, on a bad config
    if nproc is None:
        nproc = torch.cuda.device_count() or 2
    if not any(a.startswith("run_dir=") for a in args):
        # One run dir for all ranks, fixed before they start.
        args = [*args, f"run_dir={Path(cfg.run_dir).resolve()}"]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "launcher.cli",
        "train",
        *args,
    ]
    print("launching:", " ".join(cmd), flush=True)
    t0 = time.time()
    code = subprocess.call(cmd, env=env)
    print(f"launch finished in {time.time() - t0:.1f}s with exit code {code}", flush=True)
    return code


def cmd_prepare(overrides: list[str]) -> int:
    import json

    from launcher.data.pipeline import cached_prepare, format_report
    from launcher.model import load_tokenizer

    cfg = _compose(overrides)
    tok = load_tokenizer(cfg.model)
    prepared = cached_prepare(cfg.data, tok, cfg.model.chat_template, cfg.cache_dir, build=True)
    print(format_report(prepared.report))
    print(json.dumps(prepared.report["cache"]))
    return 0


def cmd_config(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_compose(overrides)))
    return 0


COMMANDS = {"train": cmd_train, "launch": cmd_launch, "prepare": cmd_prepare, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException) as e:
        if os.environ.get("SFT_DEBUG"):
            raise
        # User errors (bad config, bad data): the message names the key/file/row; no traceback.
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
