"""The DeepSpeed dict is built from the typed config in one place; a user's JSON is merged on top."""

from __future__ import annotations

import json

import pytest

from launcher.config import compose
from launcher.engine import build_ds_config
from tests.helpers import launch, train_rows


def test_generated_dict_from_the_typed_config():
    cfg = compose(["train.global_batch_size=16", "train.micro_batch_size=2", "train.grad_clip=0.5"])
    ds = build_ds_config(cfg.deepspeed, cfg.train, world_size=4, bf16=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(ds), "HF-style 'auto' values are resolved, never handed to DeepSpeed"


def test_offload_preset():
    cfg = compose(["deepspeed=zero3_offload"])
    ds = build_ds_config(cfg.deepspeed, cfg.train, world_size=1, bf16=False)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_user_json_overrides_generated_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}, "wall_clock_breakdown": True})
    )
    cfg = compose([f"deepspeed.config_file={path}"])
    ds = build_ds_config(cfg.deepspeed, cfg.train, world_size=1, bf16=False)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 12345
    assert ds["zero_optimization"]["stage"] == 3, "keys the user did not set are kept"
    assert ds["wall_clock_breakdown"] is True


@pytest.mark.badinput
def test_malformed_user_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {\n    "stage": 3,\n  }\n}')
    cfg = compose([f"deepspeed.config_file={path}"])
    with pytest.raises(ValueError, match=r"ds.json:4: malformed JSON"):
        build_ds_config(cfg.deepspeed, cfg.train, world_size=1, bf16=False)


@pytest.mark.slow
def test_offload_preset_trains_like_the_default(tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded to the CPU takes the same steps as without offload."""

    cache = tmp_path / "cache"
    launch(tmp_path / "plain", cache, "train.max_steps=3", "train.warmup_steps=1")
    launch(
        tmp_path / "offload", cache, "train.max_steps=3", "train.warmup_steps=1", "deepspeed=zero3_offload"
    )
    plain, offload = train_rows(tmp_path / "plain"), train_rows(tmp_path / "offload")
    assert sorted(offload) == [1, 2, 3]
    for step in (1, 2, 3):
        assert offload[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-4), step


def test_srun_tasks_find_each_other_from_slurm_variables():
    from launcher.engine import first_host, slurm_env

    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node3,node4") == "node3" and first_host("a-b[1]") == "a-b1"
    assert first_host("rack[1-2]-node[01-04],x") == "rack1-node01"
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_ID": "0",
    }
    assert slurm_env(env) == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(15000 + 123456 * 31 % 20000),
        "LOCAL_WORLD_SIZE": "4",
    }
    assert slurm_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29500"})["MASTER_ADDR"] == "head"
    assert slurm_env({**env, "SLURM_STEP_ID": "1"})["MASTER_PORT"] != slurm_env(env)["MASTER_PORT"]
