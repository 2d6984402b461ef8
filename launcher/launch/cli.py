"""`sft`: one table of commands, a parser for each, and dispatch. Overrides are Hydra's (`key=value`,
`group=option`, `experiment=name`).

    sft <command> [options] [overrides]      sft <command> --help; sft --help; sft --version

Each command's name, one-line summary (also the README's command table, checked by a test), usage and options
are in `COMMANDS`; its body is in `launcher.launch.commands`. Exit codes are `launcher.errors`': a user's
mistake prints one line naming the key, file or row and exits 2, a bug exits 1 with its traceback (`SFT_DEBUG=1`
shows the traceback of any error).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from launcher.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER, UserError, exit_code


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return int(value)


def whole_number(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(value)


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value!r}")
    return number


def shard(value: str) -> tuple[int, int]:
    from launcher.data.command import parse_shard

    try:
        return parse_shard(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Command:
    name: str
    summary: str  # one line: `sft --help` and the README's command table
    usage: str
    description: str
    body: str  # the function's name in launcher.launch.commands (imported when the command runs)
    options: tuple[Option, ...] = field(default_factory=tuple)


COMMANDS: tuple[Command, ...] = (
    Command(
        "launch",
        "checks everything, prepares the data, then starts `torchrun` here with one rank per GPU (2 on CPU) "
        "running `sft train`",
        "sft launch [--nproc N] [--check-plan] [overrides]",
        "Checks the config, model, tokenizer, data, DeepSpeed JSON, resume dir and run dir, prepares the data, "
        "then starts torchrun here with N ranks (default: every GPU, or 2 on CPU) running `sft train`. A rank's "
        "error is printed once; its traceback is in <run_dir>/logs/.",
        "launch",
        (
            Option(
                ("--nproc",),
                {
                    "type": positive_int,
                    "metavar": "N",
                    "help": "ranks to start (default: every GPU, or 2 on CPU)",
                },
            ),
            Option(
                ("--check-plan",),
                {
                    "action": "store_true",
                    "help": "refuse, before any rank starts, a run `sft plan` says does not fit the GPUs",
                },
            ),
        ),
    ),
    Command(
        "train",
        "runs in this process: under `torchrun`, the `deepspeed` launcher or `srun`, or alone (1 rank)",
        "sft train [overrides]",
        "Trains in this process: under torchrun, the deepspeed launcher or srun, or alone (1 rank).",
        "train",
    ),
    Command(
        "prepare",
        "tokenizes, masks and packs the data once (cached by content hash) and prints the data report; "
        "`--shard i/N` encodes one shard of it (one per node or array task), a plain run then merges them",
        "sft prepare [--shard i/N] [overrides]",
        "Tokenizes, masks and packs the data once (cached by content hash) and prints the data report. With "
        "--shard i/N it only encodes shard i of N (JSON Lines split by byte range, other sources dealt whole) into "
        "the shared cache, e.g. one per node or Slurm array task (`--shard auto`: the srun step's task rank and "
        "count, or the array task's; see slurm/prepare.sbatch); a plain `sft prepare` then merges the shards "
        "(preparing any missing one itself).",
        "prepare",
        (
            Option(
                ("--shard",),
                {
                    "type": shard,
                    "metavar": "i/N",
                    "help": "encode shard i of N (from 0) into the shared cache; `auto`: from Slurm's task ids",
                },
            ),
        ),
    ),
    Command(
        "preview",
        "prints N documents as the trainer sees them, trained tokens in colour (`[[...]]` off a TTY), and the report",
        "sft preview [-n N] [overrides]",
        "Prints N documents as the trainer sees them, trained tokens in colour ([[...]] off a TTY), and the data "
        "report.",
        "preview",
        (
            Option(
                ("-n",),
                {"type": whole_number, "default": 3, "metavar": "N", "help": "documents to show (default 3)"},
            ),
        ),
    ),
    Command(
        "check",
        "compares packed vs per-document outputs of the configured model and backend, built as training builds it",
        "sft check [overrides]",
        "Builds the configured model as training does (precision, attention backend, tiled MLP, checkpointing) "
        "and compares a real packed row with each of its documents alone (final hidden states, logits at 8 "
        "positions per document): PASS or FAIL.",
        "check",
    ),
    Command(
        "config",
        "prints the composed config",
        "sft config [overrides]",
        "Prints the composed config (every key and its value).",
        "config",
    ),
    Command(
        "models",
        "the model families table: which attention backends keep packed documents exact, what `auto` picks, "
        "sequence parallelism, tiled loss and MLP, MoE",
        "sft models",
        "Prints the model families table (launcher/model/families.py), as Markdown: for each family, which "
        "attention backends keep packed documents exact on CPU and GPU, what model.attention=auto picks, whether "
        "sequence parallelism, the tiled loss and the tiled MLP apply, its MoE router's auxiliary loss, and why "
        "anything is refused.",
        "models",
    ),
    Command(
        "plan",
        "world size, batch, tokens and steps per epoch, the DeepSpeed JSON and per-GPU memory against the GPU, "
        "before any GPU hour",
        "sft plan [--nodes N --gpus-per-node G --gpu-memory-gb M] [--json] [--check] [overrides]",
        "Reads the model's config.json (no weights), the data and DeepSpeed config, and prints the world size, "
        "batch (the nearest valid one when the configured batch does not divide over the cluster), tokens per "
        "step, steps per epoch, the resolved DeepSpeed JSON and the per-GPU memory against the GPU's, with what "
        "would fit; --check exits 2 when it does not fit.",
        "plan",
        (
            Option(
                ("--nodes",),
                {"type": positive_int, "default": 1, "metavar": "N", "help": "nodes (default 1)"},
            ),
            Option(
                ("--gpus-per-node",),
                {
                    "type": positive_int,
                    "metavar": "G",
                    "help": "GPUs per node (default: this machine's, or 1)",
                },
            ),
            Option(
                ("--gpu-memory-gb",),
                {
                    "type": positive_float,
                    "metavar": "M",
                    "help": "memory per GPU in GB (default: this machine's, or 80)",
                },
            ),
            Option(("--json",), {"action": "store_true", "help": "print one JSON object"}),
            Option(("--check",), {"action": "store_true", "help": "exit 2 when the run does not fit"}),
        ),
    ),
)
BY_NAME = {c.name: c for c in COMMANDS}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2 (argparse prints the usage and exits itself)
        raise UserError(f"{self.prog}: {message} (usage: {self.usage})")


def parser(command: Command) -> argparse.ArgumentParser:
    from launcher.config_errors import config_groups

    groups = "\n".join(f"  {g:<11}{', '.join(opts)}" for g, opts in sorted(config_groups().items()))
    p = _Parser(
        prog=f"sft {command.name}",
        usage=command.usage,
        description=command.description,
        epilog="overrides are Hydra's: key=value, group=option, experiment=name.\nconfig groups and their "
        f"options:\n{groups}\nList every key and its current value with `sft config [overrides]` (schema: "
        "launcher/config.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option in command.options:
        p.add_argument(*option.flags, **option.kwargs)
    p.add_argument("overrides", nargs="*", help="Hydra overrides: key=value, group=option")
    return p


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [f"  sft {c.name:<{width}}  {c.summary}" for c in COMMANDS]
    return (
        "usage: sft <command> [options] [overrides]\n\ncommands:\n" + "\n".join(lines) + "\n\n"
        "`sft <command> --help` for its options; `sft --version`. Overrides are Hydra's: key=value, group=option, "
        "experiment=name.\nA user's mistake prints one line and exits 2; a bug exits 1 (SFT_DEBUG=1 shows "
        "tracebacks)."
    )


def command_table() -> str:
    """The README's command table, from `COMMANDS`."""
    rows = [f"| `{c.usage}` | {c.summary} |" for c in COMMANDS]
    return "\n".join(["| command | what it does |", "|---|---|", *rows])


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        return pkg_version("sft-launcher")
    except PackageNotFoundError:
        return "unknown (not installed)"


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the deepspeed launcher puts before our arguments (LOCAL_RANK says it too)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.split("=", 1)[0] in ("--local_rank", "--local-rank"):
            if "=" not in arg and i + 1 == len(argv):
                raise UserError(f"{arg} needs a value")
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


def _say(text: str, stream: Any = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    from launcher.launch import lifecycle

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank under torchrun: first thing, before slow imports
        from launcher.launch.supervise import die_with_parent

        die_with_parent()
    quiet_third_party()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["train"], ["launch"]):
        lifecycle.survive_closed_output()  # `... | tee log` and Ctrl-C: the stop must not die on a closed pipe
    if argv[:1] == ["train"]:
        from launcher.stop import STOP

        STOP.install()  # a stop request during start-up is kept (train() acts on it after a step)
    try:
        code = _dispatch(argv)
    except BrokenPipeError:  # `sft config | head`, `sft launch --help | head -1`: the reader has seen enough
        sys.stderr.close()
        code = EXIT_OK
    if argv[:1] == ["train"]:
        from launcher.engine import exit_now

        exit_now(code)  # a teardown abort must not turn a finished run into exit -6 (see exit_now)
    return code


def _dispatch(argv: list[str]) -> int:
    from launcher.launch import lifecycle
    from launcher.launch.rankerrors import one_line, record

    name = argv[0] if argv else None
    try:
        argv = strip_launcher_args(argv)
        name = argv[0] if argv else None
        if name in ("--version", "-V"):
            _say(f"sft-launcher {version()}")
            return EXIT_OK
        if name is None or name in ("-h", "--help"):
            _say(usage())
            return EXIT_OK
        if name not in BY_NAME:
            close = difflib.get_close_matches(name, list(BY_NAME), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown command {name!r}{hint}; commands: {', '.join(BY_NAME)}")
        command = BY_NAME[name]
        try:
            args = parser(command).parse_intermixed_args(argv[1:])
        except SystemExit as e:  # --help printed
            return int(e.code or 0)
        from launcher.launch import commands

        body: Callable[[argparse.Namespace], int] = getattr(commands, command.body)
        return body(args)
    except BrokenPipeError:
        raise  # the reader of our output is gone: `main` ends quietly
    except KeyboardInterrupt:  # Ctrl-C outside the ranks' agreed stop (`sft launch` preparing, `sft prepare`)
        where = " before the ranks started: nothing was trained" if name == "launch" else ""
        lifecycle.tell(f"interrupted (Ctrl-C){where}")
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("SFT_DEBUG"):
            raise
        code = exit_code(e) if not _config_library_error(e) else EXIT_USER
        rank = os.environ.get("RANK")
        if code == EXIT_USER:  # the message names the key/file/row: no traceback
            if not record(e, user=True):
                _say(f"error{f' (rank {rank})' if rank else ''}: {one_line(e)}", sys.stderr)
            return code
        if not record(e, user=False):
            raise  # a bug: the traceback is the useful part (exit 1)
        return code


def _config_library_error(e: BaseException) -> bool:
    """Hydra's and OmegaConf's errors are about the user's config (a missing `???` value read late, say)."""
    return type(e).__module__.split(".")[0] in ("hydra", "omegaconf")
