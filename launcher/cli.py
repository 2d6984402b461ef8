"""`sft`: compose the Hydra config and run a subcommand. Overrides are Hydra's (`key=value`, `group=option`).

    sft launch [--nproc N] [overrides]   start torchrun here: every local GPU, or 2 CPU ranks
    sft train [overrides]                run in this process (under torchrun/deepspeed/srun, or alone)
    sft prepare [--shard i/N] [overrides]
                                         build the tokenized + packed data cache (or shard i of N of it) and
                                         print the data report
    sft preview [-n N] [overrides]       print N examples with trained tokens marked, and the data report
    sft check [overrides]                compare packed vs per-document logits of the configured model
    sft config [overrides]               print the composed config
    sft plan [--nodes N --gpus-per-node G --gpu-memory-gb M] [--json] [--check] [overrides]
                                         world size, batch, steps, DeepSpeed JSON and per-GPU memory: fits?

    sft <command> --help                 that command's usage; sft --version

A user's mistake prints one line naming the key/file/row and exits 2 (a bug exits 1); SFT_DEBUG=1 shows the
traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from launcher.data.command import USAGE as PREPARE_USAGE
from launcher.launch import lifecycle

USAGE = __doc__

COMMAND_USAGE = {
    "launch": "sft launch [--nproc N] [overrides]\n\nChecks the config, model, tokenizer, data, DeepSpeed JSON, "
    "resume dir and run dir, prepares the data, then starts torchrun here with N ranks (default: every GPU, or 2 "
    "on CPU) running `sft train`. A rank's error is printed once; its traceback is in <run_dir>/logs/.",
    "train": "sft train [overrides]\n\nTrains in this process: under torchrun, the deepspeed launcher or srun, "
    "or alone (1 rank).",
    "prepare": PREPARE_USAGE,
    "preview": "sft preview [-n N] [overrides]\n\nPrints N documents as the trainer sees them, trained tokens in "
    "colour ([[...]] off a TTY), and the data report.",
    "check": "sft check [overrides]\n\nCompares packed vs per-document logits of the configured model and "
    "backend.",
    "config": "sft config [overrides]\n\nPrints the composed config (every key and its value).",
    "plan": "sft plan [--nodes N --gpus-per-node G --gpu-memory-gb M] [--json] [--check] [overrides]\n\n"
    "Reads the model's config.json (no weights), the data and DeepSpeed config, and prints the world size, "
    "batch, tokens per step, steps per epoch, the resolved DeepSpeed JSON and the per-GPU memory against the "
    "GPU's, with what would fit; --check exits 2 when it does not fit.",
}


def command_help(name: str) -> str:
    from launcher.launch.preflight import _groups

    groups = "\n".join(f"  {g:<11}{', '.join(opts)}" for g, opts in sorted(_groups().items()))
    return (
        f"usage: {COMMAND_USAGE[name]}\n\nOverrides are Hydra's: key=value, group=option, experiment=name.\n"
        f"Config groups and their options:\n{groups}\n"
        "List every key and its current value with `sft config [overrides]` (schema: launcher/config.py)."
    )


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        return pkg_version("sft-launcher")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _compose(overrides: list[str]):
    from launcher.launch.preflight import compose_config

    return compose_config(overrides)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def cmd_train(overrides: list[str]) -> int:
    import torch

    from launcher.launch import lifecycle, preflight

    cfg = _compose(overrides)
    preflight.check(cfg, _world_size(), "cuda" if torch.cuda.is_available() else "cpu")
    from launcher.train import train

    try:
        train(cfg)  # ends with a barrier: every rank has finished writing
    except lifecycle.Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped after the same step: one says it
            print(f"rank 0: {e}", file=sys.stderr, flush=True)
        return lifecycle.EXIT_PREEMPTED
    return 0


def parse_nproc(args: list[str]) -> tuple[int | None, list[str]]:
    """`--nproc N` / `--nproc=N` in front of the overrides."""
    if not args or not args[0].startswith("--nproc"):
        return None, args
    if args[0].startswith("--nproc="):
        value, rest = args[0].split("=", 1)[1], args[1:]
    elif args[0] == "--nproc":
        if len(args) < 2:
            raise ValueError("--nproc needs a value: the number of ranks, e.g. --nproc 2")
        value, rest = args[1], args[2:]
    else:
        raise ValueError(f"unknown option {args[0]!r}: did you mean --nproc?")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--nproc {value}: expected a positive whole number of ranks, e.g. --nproc 2")
    return int(value), rest


def cmd_launch(args: list[str]) -> int:
    check_plan = "--check-plan" in args
    nproc, args = parse_nproc([a for a in args if a != "--check-plan"])
    cfg = _compose(args)  # fail here, before starting processes, on a bad config
    import torch

    from launcher.launch import preflight

    if nproc is None:
        nproc = torch.cuda.device_count() or 2
    preflight.check(cfg, nproc, "cuda" if torch.cuda.is_available() else "cpu")
    if check_plan:
        from launcher.launch.plan import check_for_launch

        check_for_launch(cfg, nproc)  # refuse, before any rank starts, a run that does not fit the GPUs
    run_dir = Path(cfg.run_dir).resolve()
    # One run dir for all ranks, fixed before they start.
    args = [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    _prepare_in_launcher(cfg)  # bad data rows fail here, once; the ranks then read the cache
    return _run_ranks(args, nproc, run_dir)


def _prepare_in_launcher(cfg) -> None:
    from launcher.data.pipeline import cached_prepare
    from launcher.model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    cached_prepare(
        cfg.data, tok, cfg.model.chat_template, cfg.cache_dir, build=True, progress=cfg.logging.progress
    )


def _run_ranks(args: list[str], nproc: int, run_dir: Path) -> int:
    import shutil

    import torch

    from launcher.launch.rankerrors import ERROR_DIR_ENV, first_error, lost_ranks

    errors = run_dir / "logs" / "errors"
    shutil.rmtree(errors, ignore_errors=True)  # a previous attempt's errors are not this one's
    env = {**os.environ, ERROR_DIR_ENV: str(errors)}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [
        sys.executable,
        "-m",
        "launcher.launch.rankerrors",
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
    # A session of its own: Ctrl-C in the terminal reaches only this process, which turns it into an agreed stop.
    with lifecycle.LaunchStop() as stop:
        code = stop.wait(
            subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(me))
        )
    if stop.signame or code == lifecycle.EXIT_PREEMPTED:  # the ranks may have been signalled directly
        return stopped(stop, code, run_dir, args, nproc)
    if not code:  # on success rank 0's `run_dir:` stays the last line
        return 0
    err, lost = first_error(errors), lost_ranks(errors)
    took = f"after {time.time() - t0:.1f}s"
    if lost:  # a rank killed outright says nothing; the others only see a broken or timed-out collective
        then = f"; then rank {err['rank']}: {err['message']}" if err else ""
        print(f"error: {', '.join(lost)} died {took} and the job ended{then}", file=sys.stderr)
        return 1
    if err is None:
        print(f"error: launch failed {took} with exit code {code}", file=sys.stderr)
        return 1
    kind = "error" if err["user"] else "internal error"
    print(f"{kind} (rank {err['rank']}): {err['message']} [traceback: {err['traceback']}]", file=sys.stderr)
    return 2 if err["user"] else 1


def stopped(stop: lifecycle.LaunchStop, code: int, run_dir: Path, args: list[str], nproc: int) -> int:
    """The launcher's one line after a stop: where the run can resume from, and how. Exit code: EXIT_PREEMPTED
    when the ranks agreed on a step and saved it, 128 + the signal when they were ended before."""
    import shlex
    import signal

    from launcher.checkpoint import newest_complete

    if code == 0:  # the run finished before the ranks saw the request
        return 0
    ckpt, _ = newest_complete(run_dir / "checkpoints")
    kept = [a for a in args if not a.lstrip("+").startswith("train.resume=")]
    resume = (
        f"resume with: {shlex.join(['sft', 'launch', '--nproc', str(nproc), *kept, 'train.resume=auto'])}"
    )
    name = stop.signame or "a signal to the ranks"
    if code == lifecycle.EXIT_PREEMPTED and not stop.forced and ckpt is not None:
        lifecycle.tell(f"stopped on {name}: checkpoint {ckpt} saved; {resume}")
        return lifecycle.EXIT_PREEMPTED
    when = (
        "at once, on a second signal" if stop.forced else f"before a checkpoint was saved (exit code {code})"
    )
    then = f"the newest complete checkpoint is {ckpt}; {resume}" if ckpt else f"no checkpoint in {run_dir}"
    lifecycle.tell(f"stopped on {name} {when}: {then}")
    return 128 + signal.Signals[stop.signame].value if stop.signame else code


def cmd_prepare(args: list[str]) -> int:
    from launcher.data.command import parse_shard, prepare
    from launcher.launch.preflight import check_inputs

    shard, overrides = parse_shard(args)
    cfg = _compose(overrides)
    check_inputs(cfg)
    return prepare(cfg, shard)


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
        if len(args) < 2 or not args[1].isdigit():
            raise ValueError("-n needs a whole number of examples, e.g. sft preview -n 3")
        n, args = int(args[1]), args[2:]
    cfg = _compose(args)
    from launcher.launch.preflight import check_inputs

    check_inputs(cfg)
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

    from launcher.data.pipeline import prepare_data
    from launcher.evaluate import check_packing
    from launcher.model import build_model, load_tokenizer, model_config
    from launcher.model.attention import resolve_backend

    cfg = _compose(overrides)
    from launcher.launch.preflight import check_inputs

    check_inputs(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(cfg.model)
    rows = prepare_data(cfg.data, tok, cfg.model.chat_template).train_rows[:64]
    bf16 = device.type == "cuda" and cfg.model.dtype.value != "fp32"
    dtype = torch.bfloat16 if bf16 else torch.float32
    attention = resolve_backend(cfg.model.attention.value, device, model_config(cfg.model, len(tok)), dtype)
    model = build_model(cfg.model, len(tok), attention, dtype).to(device)
    tol = 3e-2 if bf16 else 1e-4
    try:
        result = check_packing(model, rows, attention, device, tol)
    except ValueError as e:  # documents leak into each other: the check's own verdict, not a usage error
        print(f"FAIL: {e}")
        return 1
    print({"attention": attention, **result})
    if "packing_check_rel" not in result:
        print(f"PASS (vacuous): {result['packing_check']}")
    else:
        print(
            f"PASS: packed logits equal per-document logits for attention={attention} "
            f"(relative difference {result['packing_check_rel']:.2g} <= {tol})"
        )
    return 0


def cmd_plan(args: list[str]) -> int:
    from launcher.launch.plan import cli

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


def quiet_third_party() -> None:
    """Known third-party noise, filtered once per process: deprecation notices from the libraries we call and
    transformers' per-shard progress bars. Our own warnings and the libraries' real warnings stay."""
    import warnings

    libs = r"(torch|transformers|deepspeed|datasets|wandb|pydantic|huggingface_hub|accelerate|pkg_resources)"
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=libs)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' shard bars follow this too


def say_help(text: str) -> int:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `sft launch --help | head -1`: the reader has seen enough
        sys.stderr.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank under torchrun: first thing, before slow imports
        die_with_parent()
    quiet_third_party()
    try:
        argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if argv[:1] in (["train"], ["launch"]):
        lifecycle.survive_closed_output()  # `... | tee log` and Ctrl-C: the stop must not die on a closed pipe
    if argv[:1] == ["train"]:
        lifecycle.STOP.install()  # a stop request during start-up is kept (train() acts on it after a step)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"sft-launcher {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            import difflib

            close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            print(
                f"error: unknown command {argv[0]!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr
            )
            return 2
        return say_help(USAGE)
    if any(a in ("-h", "--help") for a in argv[1:]):
        return say_help(command_help(argv[0]))
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from launcher.launch.rankerrors import one_line, record

    rank = os.environ.get("RANK")
    user_errors: tuple[type[BaseException], ...] = (
        ValueError,
        OSError,
        HydraException,
        OmegaConfBaseException,
    )
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers' config validation

        user_errors += (StrictDataclassError,)
    except ImportError:
        pass
    try:
        code = COMMANDS[argv[0]](argv[1:])
    except BrokenPipeError:  # `sft config | head`: the reader has seen enough
        sys.stderr.close()
        code = 0
    except KeyboardInterrupt:  # Ctrl-C outside the ranks' agreed stop (`sft launch` preparing, `sft prepare`)
        where = " before the ranks started: nothing was trained" if argv[0] == "launch" else ""
        lifecycle.tell(f"interrupted (Ctrl-C){where}")
        code = 130
    except user_errors as e:
        # User errors (bad config, bad data, missing files): the message names the key/file/row; no traceback.
        if os.environ.get("SFT_DEBUG"):
            raise
        if not record(e, user=True):
            print(f"error{f' (rank {rank})' if rank else ''}: {one_line(e)}", file=sys.stderr, flush=True)
        code = 2
    except Exception as e:
        if os.environ.get("SFT_DEBUG") or not record(e, user=False):
            raise  # a bug: the traceback is the useful part (exit 1)
        code = 1
    if argv[0] == "train":
        from launcher.engine import exit_now

        exit_now(code)  # a teardown abort must not turn a finished run into exit -6 (see exit_now)
    return code


if __name__ == "__main__":
    sys.exit(main())
