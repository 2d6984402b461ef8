"""`sft plan`: the model-state estimate against DeepSpeed's own, the verdict, and the data statistics."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import run_cli

# Meta-Llama-3-8B's published hyperparameters (its config.json), no hub access.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def sft_plan(*args: str) -> subprocess.CompletedProcess:
    return run_cli(["plan", *args])


@pytest.fixture(scope="module")
def llama3_8b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3-8b")
    (path / "config.json").write_text(json.dumps(LLAMA3_8B))
    return path


def closed_form_params(c: dict) -> tuple[int, int]:
    """(total, largest module) of a Llama from its hyperparameters: the inputs DeepSpeed's estimator needs."""
    h, v, i, n = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    return 2 * v * h + n * layer + h, v * h  # untied embedding and head, final norm; the embedding is largest


@pytest.mark.parametrize(
    "ds_overrides, offload",
    [
        pytest.param([], (False, False), marks=pytest.mark.slow),
        pytest.param(["deepspeed.offload_optimizer=true"], (True, False), marks=pytest.mark.slow),
        pytest.param(["deepspeed=zero3_offload"], (True, True), marks=pytest.mark.slow),
    ],
    ids=["gpu", "offload_optimizer", "offload_params"],
)
def test_plan_model_states_agree_with_deepspeed_on_llama3_8b(llama3_8b, ds_overrides, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    proc = sft_plan(
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gb",
        "80",
        "--json",
        "model=hf",
        f"model.name_or_path={llama3_8b}",
        "train.global_batch_size=64",
        "train.micro_batch_size=1",
        "data.max_length=8192",
        *ds_overrides,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    total, largest = closed_form_params(LLAMA3_8B)
    assert plan["world_size"] == 16 and plan["model"]["params"] == total == 8_030_261_248
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        total,
        largest,
        num_gpus_per_node=8,
        num_nodes=2,
        cpu_offload=offload[0],
        cpu_offload_params=offload[1],
    )
    ours = plan["per_gpu_gb"]["model_states"]
    print(
        f"model states per GPU, Llama-3-8B on 2 x 8 GPUs {offload}: plan {ours!r} GB, "
        f"DeepSpeed {ds_gpu / 2**30!r} GB"
    )
    # The same formula as DeepSpeed's estimator (README: "agree"): equal up to float rounding.
    assert ours == pytest.approx(ds_gpu / 2**30, rel=1e-9)
    per_gpu = plan["per_gpu_gb"]
    assert per_gpu["total"] > per_gpu["model_states"] + per_gpu["activations"] > per_gpu["model_states"]


@pytest.mark.badinput
@pytest.mark.slow  # several `sft plan` processes
def test_plan_says_what_does_not_fit_and_what_would(llama3_8b):
    args = [
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "model=hf",
        f"model.name_or_path={llama3_8b}",
        "model.gradient_checkpointing=false",
        "train.global_batch_size=32",
        "train.micro_batch_size=4",
        "data.max_length=8192",
    ]
    small = json.loads(sft_plan("--gpu-memory-gb", "40", "--json", *args).stdout)
    assert not small["fits"] and small["per_gpu_gb"]["total"] > 40
    assert any("gradient_checkpointing=true" in s for s in small["would_fit"]), small["would_fit"]
    # The activations without checkpointing dwarf those with it at 4 x 8192 tokens.
    assert (
        small["per_gpu_gb"]["activations_no_checkpointing"]
        > 4 * small["per_gpu_gb"]["activations_checkpointing"]
    )
    check = sft_plan("--gpu-memory-gb", "40", "--check", *args)
    assert check.returncode == 2 and "error: the plan does not fit" in check.stderr, check.stderr
    assert "DOES NOT FIT" in check.stdout and "would fit:" in check.stdout
    big = sft_plan("--gpu-memory-gb", "1000", "--check", *args)
    assert big.returncode == 0 and "fits" in big.stdout.splitlines()[-1], big.stdout[-1000:]


@pytest.mark.slow  # several `sft plan` processes
def test_plan_reads_the_prepared_data(tmp_path):
    """Once the data is prepared, the plan counts steps per epoch and tokens from the real packed rows."""
    cache = f"cache_dir={tmp_path / 'cache'}"
    before = json.loads(sft_plan("--json", "--gpus-per-node", "2", cache).stdout)
    assert before["steps_per_epoch"] is None and before["data"]["source"].startswith("not prepared")
    prep = run_cli(["prepare", cache], timeout=600)
    assert prep.returncode == 0, prep.stderr[-2000:]
    rows = json.loads(prep.stdout.splitlines()[-1])  # the cache line; the report is in the table above
    after = json.loads(sft_plan("--json", "--gpus-per-node", "2", cache).stdout)
    report = json.loads((next((tmp_path / "cache").glob("prepared-*")) / "meta.json").read_text())["report"]
    assert after["data"]["source"] == f"prepared cache {rows['path']}"
    assert after["steps_per_epoch"] == report["train"]["packed_rows"] // after["global_batch_size"] > 0
    assert after["tokens_per_step"] < before["tokens_per_step"]  # packed rows are not all full


@pytest.mark.slow  # several `sft plan` processes
def test_plan_accounts_for_sequence_parallelism_and_tiling(llama3_8b):
    """S=2 halves every per-token term and the data-parallel ranks; the tiled loss keeps one tile of logits;
    the tiled MLP keeps one tile of MLP intermediates in flight."""
    base = ["--nodes", "2", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--json", "model=hf"]
    base += [f"model.name_or_path={llama3_8b}", "model.attention=flash_attention_2", "data.max_length=32768"]
    base += ["train.global_batch_size=16", "train.micro_batch_size=1"]

    def plan(*extra):
        return json.loads(sft_plan(*base, *extra).stdout)

    full = plan("train.tiled_loss=false")
    sp2 = plan("train.tiled_loss=false", "train.sequence_parallel_size=2")
    assert full["gradient_accumulation"] == 1 and sp2["gradient_accumulation"] == 2  # 16 rows over 8 DP ranks
    g1, g2 = full["per_gpu_gb"], sp2["per_gpu_gb"]
    assert g2["activations_checkpointing"] == pytest.approx(g1["activations_checkpointing"] / 2, rel=1e-6)
    assert g2["logits"] == pytest.approx(g1["logits"] / 2, rel=1e-6)
    assert g2["model_states"] == pytest.approx(g1["model_states"])  # ZeRO-3 still partitions over all 16
    tiled = plan("train.tiled_loss=auto")  # auto: on for Llama-3's 128k vocabulary
    # 32 tiles of 1024 targets (a tile's logits as large as its hidden states): bf16 + fp32 copy + fp32 grad.
    assert tiled["tiled_loss"] and tiled["per_gpu_gb"]["logits"] * 2**30 == pytest.approx(1024 * 128256 * 10)
    mlp = plan("train.tiled_loss=false", "train.tiled_mlp=true", "model.gradient_checkpointing=false")
    no_mlp = plan("train.tiled_loss=false", "model.gradient_checkpointing=false")
    saved = no_mlp["per_gpu_gb"]["activations"] - mlp["per_gpu_gb"]["activations"]
    # 32 layers x 4 intermediates x 14336 x 32768 tokens x 2 bytes, less one 4096-token tile in flight.
    assert saved * 2**30 == pytest.approx(32 * 4 * 14336 * 32768 * 2 - 4 * 14336 * 4096 * 2, rel=1e-6)


@pytest.mark.slow  # several `sft plan` processes
def test_plan_checkpoint_offload_moves_the_layer_inputs_to_host_memory(llama3_8b):
    """With the layer inputs in host memory the GPU keeps one of them (plus one layer recomputed); the plan says
    how much the host holds, and suggests the offload when only it makes the run fit."""
    base = ["--nodes", "2", "--gpus-per-node", "8", "--json", "model=hf", f"model.name_or_path={llama3_8b}"]
    base += [
        "model.attention=flash_attention_2",
        "data.max_length=32768",
        "model.gradient_checkpointing=true",
    ]
    base += ["train.global_batch_size=16", "train.micro_batch_size=1"]

    def plan(*extra):
        proc = sft_plan(*base, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    ckpt, off = plan("--gpu-memory-gb", "80"), plan("--gpu-memory-gb", "80", "model.checkpoint_offload=true")
    assert off["checkpoint_offload"] and not ckpt["checkpoint_offload"]
    g, o = ckpt["per_gpu_gb"], off["per_gpu_gb"]
    inputs = 32 * 32768 * 4096 * 2  # layers x tokens x hidden x bf16 bytes
    assert (g["activations"] - o["activations"]) * 2**30 == pytest.approx(inputs * 31 / 32, rel=1e-6)
    assert o["checkpoint_offload_host"] * 2**30 == pytest.approx(inputs, rel=1e-6)
    assert g["checkpoint_offload_host"] == 0 and o["model_states"] == g["model_states"]
    assert o["total"] < g["total"]
    between = f"{(g['total'] + o['total']) / 2:.2f}"
    tight = plan("--gpu-memory-gb", between)
    assert not tight["fits"], tight["per_gpu_gb"]
    assert "model.gradient_checkpointing=true model.checkpoint_offload=true" in tight["would_fit"]
    assert plan("--gpu-memory-gb", between, "model.checkpoint_offload=true")["fits"]
    text = sft_plan(*[a for a in base if a != "--json"], "model.checkpoint_offload=true").stdout
    assert "with the layer inputs in host memory" in text and "checkpoint offload on: 8.00 of layer" in text


@pytest.mark.slow  # several `sft plan` processes
def test_plan_picks_the_nearest_batch_that_divides_over_the_cluster():
    """The demo's 8 rows in micro-batches of 4 do not divide over 8 GPUs: the planner keeps the global batch and
    lowers the micro batch (and says so); a global batch that does not divide over the ranks at all becomes the
    nearest multiple of micro x ranks."""
    plan = json.loads(sft_plan("--nodes", "1", "--gpus-per-node", "8", "--json").stdout)
    assert (
        plan["global_batch_size"] == 8
        and plan["micro_batch_size"] == 1
        and plan["gradient_accumulation"] == 1
    )
    assert plan["batch_adjusted"].startswith("train.micro_batch_size=1")
    odd = json.loads(
        sft_plan("--nodes", "1", "--gpus-per-node", "3", "--json", "train.micro_batch_size=2").stdout
    )
    assert odd["global_batch_size"] == 6 and odd["batch_adjusted"].startswith("train.global_batch_size=6")
    fits = json.loads(sft_plan("--nodes", "1", "--gpus-per-node", "2", "--json").stdout)
    assert fits["batch_adjusted"] is None and fits["micro_batch_size"] == 4
    text = sft_plan("--nodes", "1", "--gpus-per-node", "8").stdout
    assert "planned with train.micro_batch_size=1" in text
