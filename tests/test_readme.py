"""The README's commands are real: its command table is the CLI's own, and every `sft ...` example composes."""

from __future__ import annotations

import re
import shlex

import pytest

from launcher.config import validate
from launcher.config_errors import compose_config
from launcher.launch.cli import BY_NAME, command_table, parser
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()


def shell_lines(text: str) -> list[str]:
    """The commands of the README's bash blocks, continuation lines joined, comments dropped."""
    lines, fence, pending = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence != "bash" or line.lstrip().startswith("#"):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    return [line for line in lines if line]


def sft_invocations(line: str) -> list[tuple[str, list[str]]]:
    """(command, its arguments) of every `sft <command>` in a line: `sft`, `-m launcher.cli`, `--module
    launcher.cli`, the image's entrypoint (`sft-launcher <command>`), and `slurm/sft.sbatch` (which runs `sft
    train`)."""
    words = shlex.split(line, comments=True)
    found = []
    for i, word in enumerate(words):
        if word in ("sft", "launcher.cli", "sft-launcher") and i + 1 < len(words) and words[i + 1] in BY_NAME:
            found.append((words[i + 1], words[i + 2 :]))
        elif word.endswith("slurm/sft.sbatch"):
            found.append(("train", words[i + 1 :]))
    return found


EXAMPLES = [(cmd, args) for line in shell_lines(README) for cmd, args in sft_invocations(line)]


def test_the_readme_has_examples_of_every_kind():
    assert {"launch", "train", "plan", "preview"} <= {cmd for cmd, _ in EXAMPLES}, EXAMPLES
    assert len(EXAMPLES) >= 10, EXAMPLES


@pytest.mark.parametrize("command,args", EXAMPLES, ids=[" ".join([c, *a])[:80] for c, a in EXAMPLES])
def test_every_readme_example_parses_and_composes(command, args):
    """The command's own parser takes its options, Hydra composes the overrides against the schema and the
    values pass the config's own checks (a renamed key or option fails here)."""
    parsed = parser(BY_NAME[command]).parse_intermixed_args(args)
    cfg = compose_config(parsed.overrides)
    world = parsed.nodes * parsed.gpus_per_node if command == "plan" else 8
    validate(cfg, world)  # every field in its domain: what `sft launch` checks before any rank


def test_the_readme_command_table_is_the_cli_table():
    table = re.search(r"^\| command \| what it does \|\n(?:\|.*\n)+", README, re.M)
    assert table is not None, "the README has no command table"
    assert table.group(0).strip() == command_table(), "regenerate it: launcher.launch.cli.command_table()"
