"""Shared fixtures: real tokenizers, tiny real HF models, and a torchrun runner for distributed tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
ASSETS = ROOT / "launcher" / "assets"


def fixture_path(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/fixtures is provided in CI)")
    return path


@pytest.fixture(scope="session")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def checkout_env(env: dict | None = None) -> dict:
    """The environment for a subprocess that must import this checkout's `launcher`: a worker run as a script
    (`torchrun tests/x.py`) has its own folder first on sys.path, not the checkout, and would otherwise import
    whichever `launcher` is installed (another clone's editable install) or already on PYTHONPATH."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full.get("PYTHONPATH", "")) if p)
    return full


def sft_launch(
    overrides: list[str], run_dir: Path, cache_dir: Path, timeout: int = 900, nproc: int = 2
) -> str:
    """`sft launch --nproc 2` (or `nproc`) with overrides into run_dir; asserts success and returns its stdout."""
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "launch",
        "--nproc",
        str(nproc),
        *overrides,
        f"run_dir={run_dir}",
        f"cache_dir={cache_dir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def torchrun(args: list[str], nproc: int, cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run `python -m torch.distributed.run` on CPU ranks, importing this checkout; returns the CompletedProcess
    (output captured)."""
    full_env = checkout_env({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
