"""`sft preview` and `sft check` on the embedded default, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_cli


def sft(*args: str) -> subprocess.CompletedProcess:
    return run_cli(list(args))


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
    assert out.stdout.strip().splitlines()[-1].startswith("PASS: packed logits equal per-document logits")


def test_check_ends_with_a_fail_line_when_documents_leak(monkeypatch, capsys):
    """The verdict line when the packed batch leaks across documents: other tools' padding-free collators hand
    the model an all-ones [B, T] mask, which transformers turns into one causal mask over the whole row."""
    import torch

    import launcher.evaluate as evaluate
    from launcher.cli import main
    from launcher.data import collate

    def all_ones(rows, attention, pad_id=0, device=None):
        batch = collate(rows, attention, pad_id, device)
        return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}

    monkeypatch.setattr(evaluate, "collate", all_ones)
    assert main(["check", "model.attention=sdpa"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("FAIL: packing self-check failed for attention=sdpa"), lines[-3:]


def test_help_into_a_closed_pipe_is_quiet():
    """`sft launch --help | head -1` (and `sft config | head`): the reader stops early; no traceback."""
    for args in (["--help"], ["launch", "--help"], ["plan", "--help"], ["config"]):
        cmd = f"{sys.executable} -m launcher.cli {' '.join(args)} | head -c 1"
        out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.stdout and out.stderr == "", (args, out.stderr[-2000:])


def test_only_our_own_checks_errors_are_the_users():
    """A ValueError our code raises (a check naming the key) is the user's: exit 2. The same exception type
    raised inside a third party (transformers refusing something the user never chose) is an internal error:
    exit 1, with its traceback."""
    from transformers import AutoConfig

    from launcher.config import compose, validate
    from launcher.errors import EXIT_BUG, EXIT_USER, UserError, exit_code

    with pytest.raises(ValueError) as ours:
        validate(compose(["train.log_every=0"]), world_size=2)
    with pytest.raises(ValueError) as theirs:
        AutoConfig.for_model("no-such-model-type")
    assert exit_code(ours.value) == EXIT_USER and exit_code(theirs.value) == EXIT_BUG
    assert exit_code(UserError("wrapped detail")) == EXIT_USER
    assert exit_code(AssertionError("an invariant")) == EXIT_BUG


def test_a_rising_eval_loss_is_said_once_with_the_likely_cause(capsys):
    from types import SimpleNamespace

    from launcher.config import compose
    from launcher.train import warn_if_eval_rises

    run = SimpleNamespace(cfg=compose([]), say=print)
    results = {"eval_loss_before": 1.88}
    warn_if_eval_rises(run, results, 1.95, 10)  # within 10%: training noise
    assert capsys.readouterr().out == ""
    warn_if_eval_rises(run, results, 2.48, 20)
    warn_if_eval_rises(run, results, 2.60, 30)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "eval loss rose from 1.8800 at step 0 to 2.4800 at step 20" in out[0]
    assert "train.lr=0.002" in out[0]
