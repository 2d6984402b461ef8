"""`sft preview` and `sft check` on the embedded default, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def sft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_preview_brackets_exactly_the_assistant_turns():
    out = sft("preview", "-n", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    examples = out.stdout.split("---- example ")[1:]
    assert len(examples) == 2
    for ex in examples:
        # Every bracketed span is an assistant answer closed by <|im_end|>, and every assistant turn has one.
        assert ex.count("[[") == ex.count("<|im_start|>assistant\n") > 0
        assert ex.count("<|im_end|>]]") == ex.count("[[")
    assert "packed " in out.stdout and "efficiency" in out.stdout  # the stats table


def test_check_passes_on_the_default_model():
    out = sft("check")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'attention': 'sdpa'" in out.stdout and "packing_check_rel" in out.stdout
