"""Every config group and experiment composes; typos and wrong types fail at compose time."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from launcher.config import CONF_DIR, compose, validate

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF_DIR.iterdir() if p.is_dir()}


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g, opts in GROUPS.items() for o in opts if g != "experiment"]
)
def test_every_group_option_composes(override):
    extra = ["model.name_or_path=some/model"] if override == "model=hf" else []
    cfg = compose([override, *extra])
    validate(cfg, world_size=2)  # every preset is also consistent across fields (e.g. batch sizes on 2 ranks)


@pytest.mark.parametrize("name", GROUPS["experiment"])
def test_every_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    validate(cfg, world_size=2)


def test_unknown_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["train.max_stepz=3"])
    assert "max_stepz" in str(e.value)


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["train.max_steps=many"])
    cause = e.value.__cause__
    assert isinstance(cause, ValidationError) and "max_steps" in str(cause)


def test_bad_enum_value_names_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["model.attention=flash9"])
    assert "sdpa" in str(e.value.__cause__)


def test_unknown_key_inside_a_source_fails():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose(["data.sources=[{path: a.jsonl, wieght: 2}]"])


def test_validate_reports_every_problem_at_once():
    cfg = compose(["train.global_batch_size=7", "train.warmup_steps=500", "data.max_length=0"])
    with pytest.raises(ValueError) as e:
        validate(cfg, world_size=2)
    msg = str(e.value)
    assert "global_batch_size=7" in msg and "warmup_steps=500" in msg and "max_length=0" in msg


@pytest.mark.badinput
def test_cli_bad_config_is_one_clear_line():
    out = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "config", "train.max_stepz=3"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "max_stepz" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.badinput
def test_launch_validates_before_starting_ranks():
    out = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "launch", "--nproc", "2", "train.global_batch_size=7"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "global_batch_size=7" in out.stderr and "launching" not in out.stdout
