"""`sft`: compose the Hydra config and run a subcommand. Overrides are Hydra's (`key=value`, `group=option`).

    sft launch [--nproc N] [overrides]   start torchrun here: every local GPU, or 2 CPU ranks
    sft train [overrides]                run in this process (under torchrun/deepspeed/srun, or alone)
    sft prepare [overrides]              build the tokenized + packed data cache and print the data report
    sft preview [-n N] [overrides]       print N examples with trained tokens marked, and the data report
    sft check [overrides]                compare packed vs per-document logits of the configured model
    sft config [overrides]               print the composed config
    sft plan [--nodes N --gpus-per-node G --gpu-memory-gb M] [--json] [--check] [overrides]
                                         world size, batch, steps, DeepSpeed JSON and per-GPU memory: fits?

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
    from launcher import lifecycle
    from launcher.train import train

    try:
        train(_compose(overrides))  # ends with a barrier: every rank has finished writing
    except lifecycle.Preempted as e:
        print(f"rank {os.environ.get('RANK', '0')}: {e}", file=sys.stderr, flush=True)
        return lifecycle.EXIT_PREEMPTED
    return 0


def cmd_launch(args: list[str]) -> int:
    import torch

    nproc, check_plan = None, "--check-plan" in args
    args = [a for a in args if a != "--check-plan"]
    if args[:1] == ["--nproc"]:
        nproc, args = int(args[1]), args[2:]
    from launcher.config import validate

    cfg = _compose(args)  # fail here, before starting processes, on a bad config
    if nproc is None:
        nproc = torch.cuda.device_count() or 2
    validate(cfg, nproc)
    if check_plan:
        from launcher.plan import check_for_launch

        check_for_launch(cfg, nproc)  # refuse, before any rank starts, a run that does not fit the GPUs
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
    me = os.getpid()
    code = subprocess.call(cmd, env=env, preexec_fn=lambda: die_with_parent(me))
    if code:  # on success rank 0's `run_dir:` stays the last line
        print(
            f"launch failed after {time.time() - t0:.1f}s with exit code {code}", file=sys.stderr, flush=True
        )
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


def render_trained(tok, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded example with trained spans in colour (TTY) or [[double brackets]]."""
    open_, close = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    out, span, trained = [], [], False
    for tid, lab in zip(input_ids, labels):
        if (lab != -100) != trained:
            out.append(tok.decode(span))
            out.append(open_ if not trained else close)
            span, trained = [], not trained
        span.append(tid)
    out.append(tok.decode(span) + (close if trained else ""))
    return "".join(out)


def cmd_preview(args: list[str]) -> int:
    from launcher.data.packing import doc_lengths
    from launcher.data.pipeline import format_report, prepare_data
    from launcher.model import load_tokenizer

    n = 3
    if args[:1] == ["-n"]:
        n, args = int(args[1]), args[2:]
    cfg = _compose(args)
    tok = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg.data, tok, cfg.model.chat_template)
    # Documents exactly as the trainer sees them inside packed rows (first token of each never trained).
    shown = 0
    for row in prepared.train_rows:
        start = 0
        for length in doc_lengths(row["position_ids"]):
            if shown == n:
                break
            ids, labels = row["input_ids"][start : start + length], row["labels"][start : start + length]
            print(f"---- example {shown} ({length} tokens, {sum(x != -100 for x in labels)} trained)")
            print(render_trained(tok, ids, labels, sys.stdout.isatty()))
            start += length
            shown += 1
    print(format_report(prepared.report))
    return 0


def cmd_check(overrides: list[str]) -> int:
    import torch

    from launcher.attention import resolve_backend
    from launcher.data.pipeline import prepare_data
    from launcher.evaluate import check_packing
    from launcher.model import build_model, load_tokenizer, model_config

    cfg = _compose(overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(cfg.model)
    rows = prepare_data(cfg.data, tok, cfg.model.chat_template).train_rows[:64]
    bf16 = device.type == "cuda" and cfg.model.dtype.value != "fp32"
    dtype = torch.bfloat16 if bf16 else torch.float32
    attention = resolve_backend(cfg.model.attention.value, device, model_config(cfg.model, len(tok)), dtype)
    model = build_model(cfg.model, len(tok), attention, dtype).to(device)
    print({"attention": attention, **check_packing(model, rows, attention, device, 3e-2 if bf16 else 1e-4)})
    return 0


def cmd_plan(args: list[str]) -> int:
    from launcher.plan import cli

    return cli(args, _compose)


def cmd_config(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_compose(overrides)))
    return 0


COMMANDS = {
    "train": cmd_train,
    "launch": cmd_launch,
    "prepare": cmd_prepare,
    "preview": cmd_preview,
    "check": cmd_check,
    "config": cmd_config,
    "plan": cmd_plan,
}


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies, however the parent dies (Linux).

    `sft launch` -> torchrun agent -> ranks: torchrun starts each rank in a session of its own, so a SIGKILL to
    the launcher or the agent (a preemption, an OOM kill, `kill -9`) would leave the agent and the ranks running
    as orphans that hold the GPUs and go on writing checkpoints. Cheap enough to run between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    _PRCTL(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


def _load_prctl():
    import ctypes

    # Looked up once, in the parent: the forked child of `sft launch` only calls it.
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


_PRCTL = _load_prctl()


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the deepspeed launcher puts before our arguments (LOCAL_RANK says it too)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.split("=", 1)[0] in ("--local_rank", "--local-rank"):
            if "=" not in arg and i + 1 == len(argv):
                raise ValueError(f"{arg} needs a value")
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank under torchrun: first thing, before slow imports
        die_with_parent()
    try:
        argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        code = COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException) as e:
        if os.environ.get("SFT_DEBUG"):
            raise
        # User errors (bad config, bad data): the message names the key/file/row; no traceback.
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr, flush=True)
        code = 2
    if argv[0] == "train":
        from launcher.engine import exit_now

        exit_now(code)  # a teardown abort must not turn a finished run into exit -6 (see exit_now)
    return code


if __name__ == "__main__":
    sys.exit(main())
