"""Every config group and experiment composes; typos and wrong types fail at compose time."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from launcher.config import CONF_DIR, compose, validate
from tests.helpers import run_cli

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
    out = run_cli(["config", "train.max_stepz=3"], expect_code=2)
    assert "max_stepz" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.badinput
def test_launch_validates_before_starting_ranks():
    out = run_cli(["launch", "--nproc", "2", "train.global_batch_size=7"], expect_code=2)
    assert "global_batch_size=7" in out.stderr and "launching" not in out.stdout


def test_your_own_sources_replace_the_demos_eval_set(tmp_path):
    """`data.sources=[...]` replaces the demo's held-out source too (it is one of the sources, eval: true), so
    the README's `data.sources=[...] data.eval_fraction=0.02` evaluates on 2% of the user's own rows."""
    import json

    from launcher.data.pipeline import prepare_data
    from launcher.model import load_tokenizer

    path = tmp_path / "mine.jsonl"
    rows = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(200)
    ]
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    cfg = compose([f"data.sources=[{{path: {path}}}]", "data.eval_fraction=0.05"])
    validate(cfg, world_size=2)
    assert [s.eval for s in cfg.data.sources] == [False] and not cfg.data.eval_sources
    prepared = prepare_data(cfg.data, load_tokenizer(cfg.model))
    assert prepared.report["eval_sources"] == []
    assert prepared.report["sources"][0]["dropped"] == {"held_out_for_eval": 10}
    assert {c[0]["content"] for c in prepared.eval_conversations} <= {f"q{i}" for i in range(200)}
    assert len(prepared.eval_conversations) == 10


@pytest.mark.badinput
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.eval_fraction=0.02"], "data.eval_fraction=0.02 would be ignored: eval sources are given"),
        (["data.eval_size=50"], "data.eval_size=50 would be ignored"),
        (
            ["data.sources=[{path: x.jsonl}]", "train.exact_match_eval=false"],
            "train.eval_every=100 but there is no eval data",
        ),
        (
            ["data.sources=[{path: x.jsonl}]", "train.eval_every=0"],
            "train.exact_match_eval=true but there is no eval data",
        ),
        (["data.sources=[{path: x.jsonl, eval: true}]"], "data.sources has no training source"),
        (["train.keep_last=-1"], "train.keep_last=-1 must be >= 0"),
    ],
)
def test_eval_settings_that_would_be_ignored_are_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(compose(overrides), world_size=2)


@pytest.mark.badinput
def test_sequence_parallel_batch_arithmetic_counts_data_parallel_ranks():
    # 4 ranks, S=2: 2 data-parallel ranks, so a global batch of 2 rows is 1 micro-batch each.
    validate(
        compose(["train.global_batch_size=2", "train.micro_batch_size=1", "train.sequence_parallel_size=2"]),
        world_size=4,
    )
    with pytest.raises(
        ValueError, match=r"micro_batch_size \(1\) x data-parallel ranks \(4 / sequence_paral"
    ):
        validate(
            compose(
                ["train.global_batch_size=3", "train.micro_batch_size=1", "train.sequence_parallel_size=2"]
            ),
            world_size=4,
        )
    with pytest.raises(
        ValueError, match=r"train.sequence_parallel_size=3 must be a divisor of the world size"
    ):
        validate(compose(["train.sequence_parallel_size=3"]), world_size=4)
    with pytest.raises(ValueError, match=r"train.tiled_loss=maybe must be auto, true or false"):
        validate(compose(["train.tiled_loss=maybe"]), world_size=2)


def test_pretrained_weights_bring_the_pretrained_training_defaults():
    """`model=hf` composes train=default (the demo's lr 2e-3 would wreck pretrained weights); an explicit train
    group or key on the command line still wins."""
    demo, hf = compose([]), compose(["model=hf", "model.name_or_path=some/model"])
    default = compose(["train=default"])
    assert demo.train.lr == 2e-3 and hf.train == default.train and hf.train.lr == 1e-5
    assert compose(["model=hf", "model.name_or_path=x", "train=demo"]).train.lr == 2e-3
    assert compose(["model=hf", "model.name_or_path=x", "train.lr=3e-5"]).train.lr == 3e-5


def test_warmup_ratio_is_a_fraction_of_max_steps_and_warmup_steps_wins():
    from launcher.optim import lr_factor, warmup_steps

    assert warmup_steps(compose([]).train) == 20  # the demo: 0.067 of 300 steps
    trial = compose(["train.max_steps=10"]).train  # a short trial of the demo no longer trips over warmup
    validate(compose(["train.max_steps=10"]), world_size=2)
    assert warmup_steps(trial) == 1 and lr_factor(0, trial) == 0.5 and lr_factor(1, trial) == 1.0
    assert warmup_steps(compose(["train=default", "train.max_steps=2000"]).train) == 60
    assert warmup_steps(compose(["train.warmup_steps=7"]).train) == 7  # steps, when given, win over the ratio
    with pytest.raises(ValueError, match=r"train.warmup_ratio=1.5 must be in \[0, 1\)"):
        validate(compose(["train.warmup_ratio=1.5"]), world_size=2)
