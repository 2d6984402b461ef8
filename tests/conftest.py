"""pytest fixtures shared by several test modules (plain helpers are in tests/helpers.py)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import ASSETS, launch, train_rows

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """An uninterrupted 8-step small run (tests.helpers.SMALL_RUN): (its per-step metrics, the data cache dir,
    its run dir). The resume tests compare their split runs with it."""
    tmp = tmp_path_factory.mktemp("straight")
    launch(tmp / "run", tmp / "cache", "train.max_steps=8")
    return train_rows(tmp / "run"), tmp / "cache", tmp / "run"


@pytest.fixture(scope="session")
def straight(straight_run):
    return straight_run[:2]
