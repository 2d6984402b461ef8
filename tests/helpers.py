"""What tests share: paths and fixtures, running `sft` and torchrun, small runs and their run dirs, tiny models, the
ZeRO-3 dict, reference computations. Test modules import from here, never from each other; pytest fixtures that
several modules use are in conftest.py.

    proc = run_cli(["config", "train.max_steps=3"], expect_code=0)
    out = sft_launch([*SMALL_RUN, "train.max_steps=4"], run_dir, cache)
    model = AutoModelForCausalLM.from_config(tiny_config("mistral_sliding"), attn_implementation="sdpa")
    config = family_config("gpt_oss")    # a family of `sft models` (FAMILY_CONFIGS), keeping its hard layers
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from launcher.data.template import IGNORE_INDEX
from launcher.model.moe import MOE_FAMILIES

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
ASSETS = ROOT / "launcher" / "assets"
WORKERS = ROOT / "tests" / "workers"


def fixture_path(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/fixtures is provided in CI)")
    return path


# ---- running `sft`, torchrun and workers: always the checkout under test ----


def sft_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the tests start: this checkout first on the import path (a worker or `sft`
    must not import a `launcher` installed elsewhere), CPU DeepSpeed, the hub offline."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def sft_cmd(*args: str) -> list[str]:
    """`sft <args>` as a command line (`python -m launcher.cli`, this interpreter)."""
    return [sys.executable, "-m", "launcher.cli", *args]


def run_cli(
    args: list[str], env: dict[str, str] | None = None, expect_code: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `sft <args>` from the repository root, output captured; with `expect_code`, assert the exit code
    (showing the output's tail when it differs)."""
    proc = subprocess.run(
        sft_cmd(*args), cwd=ROOT, env=sft_env(env), capture_output=True, text=True, timeout=timeout
    )
    if expect_code is not None:
        assert proc.returncode == expect_code, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def sft_launch(
    overrides: list[str], run_dir: Path, cache_dir: Path, timeout: int = 900, nproc: int = 2
) -> str:
    """`sft launch --nproc 2` (or `nproc`) with overrides into run_dir; asserts success and returns its stdout."""
    args = ["launch", "--nproc", str(nproc), *overrides, f"run_dir={run_dir}", f"cache_dir={cache_dir}"]
    return run_cli(args, expect_code=0, timeout=timeout).stdout


def torchrun(args: list[str], nproc: int, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    """`python -m torch.distributed.run` on CPU ranks (a worker script under tests/workers/, or `-m ...`);
    returns the CompletedProcess (output captured)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    full_env = sft_env({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def worker(name: str) -> str:
    """The path of a torchrun worker script in tests/workers/."""
    return str(WORKERS / name)


# ---- a small run of the demo model, and what its run dir says ----

# A constant schedule after warmup keeps the lr independent of max_steps (the only thing that differs between
# the runs in the resume tests); a scheduler that was not restored would restart warmup and show in the lr.
SMALL_RUN = [
    "model.init.num_hidden_layers=2",
    "model.init.hidden_size=64",
    "model.init.intermediate_size=128",
    "data.max_length=256",
    "train.warmup_steps=5",
    "train.schedule=constant",
    "train.lr=3e-3",
    "train.log_every=1",
    "train.exact_match_eval=false",
    "train.export=false",
    "train.check_packing=false",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
]
# Training collectives time out after 30 s in the fault tests; data preparation keeps its own long timeout.
SHORT_TIMEOUT = "deepspeed.timeout_minutes=0.5"


def launch(run_dir: Path, cache: Path, *extra: str) -> str:
    """`sft launch --nproc 2` of the small run with `extra` overrides; its stdout."""
    return sft_launch([*SMALL_RUN, *extra], run_dir, cache, timeout=600)


def train_rows(run_dir: Path) -> dict[int, dict]:
    """Training rows of metrics.jsonl by step; a step logged again (after a resume) keeps its latest row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def logged_steps(run_dir: Path) -> int:
    """The last step in metrics.jsonl so far (0 before the file exists; a line being written is skipped)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


def assert_same_steps(got: dict[int, dict], want: dict[int, dict], steps: int = 8) -> None:
    """Two runs' steps 1..`steps` agree in loss, lr, gradient norm and trained tokens."""
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    for step in range(1, steps + 1):
        for key in ("loss", "lr", "grad_norm", "trained_tokens"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)


def ranks_running(run_dir: Path) -> list[int]:
    """Pids of processes whose command line names this run dir (launcher, agent or rank)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"run_dir={run_dir}".encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # exited while we looked
            pass
    return pids


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the training process of `rank` in this run (its environment says RANK=<rank> under
    torchrun, SLURM_PROCID=<rank> under srun)."""
    for pid in ranks_running(run_dir):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        mine = {f"RANK={rank}".encode(), f"SLURM_PROCID={rank}".encode()} & set(env)
        if mine and b"train" in args and b"launch" not in args:
            return pid
    return None


def kill_rank_after_checkpoint(run_dir: Path, rank: int, running, sig: int = signal.SIGKILL) -> float:
    """Signal `rank` (SIGKILL: dies; SIGSTOP: hangs) once step 4 (after the step-3 checkpoint) is logged;
    returns the time of the signal. `running()` tells whether the job still runs."""
    deadline = time.time() + 300
    while logged_steps(run_dir) < 4 and running() and time.time() < deadline:
        time.sleep(0.05)
    pid = rank_pid(run_dir, rank)
    assert pid is not None and running(), "the job was not training"
    os.kill(pid, sig)
    return time.time()


# ---- tiny models and the ZeRO-3 config ----

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# Windows shorter than the longest test document (LENGTHS), so a missing window would show.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama"),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2_sliding": dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "mistral_sliding": dict(model_type="mistral", sliding_window=5),
    "gemma2": dict(model_type="gemma2", sliding_window=4, head_dim=8),
    "gemma3": dict(model_type="gemma3_text", sliding_window=4, head_dim=8),
}
LENGTHS = [9, 13, 6, 11]  # documents of the packing tests: 39 tokens


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A tiny transformers config of `arch` (see ARCHS), built by transformers' own config class."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**{**TINY, **ARCHS[arch], **overrides})


ZERO3 = {
    "stage": 3,
    "offload_optimizer": False,
    "offload_params": False,
    "config_file": None,
    "overlap_comm": False,
}


def ds_config(global_batch: int, micro: int, world: int, grad_clip: float = 1.0, sp: int = 1) -> dict:
    """The DeepSpeed dict `launcher.engine` builds for ZeRO-3 with these batch sizes (fp32)."""
    from omegaconf import OmegaConf

    from launcher.engine import build_ds_config

    train = {"global_batch_size": global_batch, "micro_batch_size": micro, "grad_clip": grad_clip}
    train["sequence_parallel_size"] = sp
    return build_ds_config(OmegaConf.create(ZERO3), OmegaConf.create(train), world, bf16=False)


# ---- references ----


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loss from whole [B, T, V] logits: (sum of next-token cross-entropies, target count); labels are
    unshifted (HF style). The production loss (`launcher.loss.target_token_loss`) must equal it."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


def trained_spans(tok: Any, enc: dict) -> list[str]:
    """The decoded runs of trained tokens of one encoded conversation (labels unshifted)."""
    spans, cur = [], []
    for i, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == i, "labels are unshifted: a trained label equals its input id"
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tok.decode(s) for s in spans]


# ---- tiny configs per family, built from transformers' own config classes ----

# Small enough for a CPU forward in milliseconds; each family keeps what makes it hard to pack (sliding/full and
# chunked layer types, linear-attention and convolution layers, dense and MoE layers, sinks, soft-caps, MLA
# ranks, per-layer head dims). Windows and chunks are shorter than the test documents so a missing one shows.
BASE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
)
SLIDE = ["sliding_attention", "full_attention"]
MOE4 = dict(num_local_experts=4, num_experts_per_tok=2)
LINEAR = dict(
    num_hidden_layers=4,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama3": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "llama4_text": dict(
        model_type="llama4_text",
        num_hidden_layers=4,
        layer_types=["chunked_attention", "chunked_attention", "chunked_attention", "full_attention"],
        attention_chunk_size=4,
        no_rope_layers=[1, 1, 1, 0],
        intermediate_size_mlp=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # dense and MoE layers
        floor_scale=512,  # above the rows of the tests: temperature tuning (row positions >= 511) stays off
    ),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "qwen3": dict(model_type="qwen3"),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "qwen3_5": dict(model_type="qwen3_5_text", **LINEAR),
    "qwen3_5_moe": dict(
        model_type="qwen3_5_moe_text",
        **LINEAR,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "qwen3_next": dict(
        model_type="qwen3_next",
        **LINEAR,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "mistral": dict(model_type="mistral", sliding_window=5),
    "mixtral": dict(model_type="mixtral", sliding_window=5, **MOE4),
    # Soft-caps small enough to bind on a tiny model's scores and logits, so a kernel that drops one shows.
    "gemma2": dict(
        model_type="gemma2",
        sliding_window=4,
        layer_types=SLIDE,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=0.5,
    ),
    "gemma3": dict(model_type="gemma3_text", sliding_window=4, layer_types=SLIDE),
    "gemma4": dict(
        model_type="gemma4_text",
        num_hidden_layers=4,
        sliding_window=4,
        layer_types=SLIDE * 2,
        global_head_dim=16,  # full-attention layers have a head_dim of their own
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,  # the last layers reuse earlier layers' keys and values
    ),
    "gpt_oss": dict(
        model_type="gpt_oss",
        sliding_window=4,
        layer_types=SLIDE,
        **MOE4,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=4.0,
            original_max_position_embeddings=64,
            beta_fast=32.0,
            beta_slow=1.0,
        ),
    ),  # attention sinks
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        num_key_value_heads=4,
        head_dim=4,  # = qk_rope_head_dim, as in DeepSeek-V3's own config
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,  # a dense layer, then MoE
    ),
    "glm4": dict(model_type="glm4"),
    "glm4_moe": dict(
        model_type="glm4_moe",
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        use_qk_norm=True,
    ),
    "phi3": dict(model_type="phi3", sliding_window=5, partial_rotary_factor=0.5),
    # Released Phi-MoE's window is its context (131072): it never binds. (transformers applies it on mask backends
    # only, so a window that binds would make flash/varlen and sdpa disagree, packed or not.)
    "phimoe": dict(model_type="phimoe", **MOE4),
    "olmo2": dict(model_type="olmo2"),
    "olmo3": dict(model_type="olmo3", sliding_window=4, layer_types=SLIDE),
    "olmoe": dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=8.0),
    "granite": dict(
        model_type="granite",
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
    ),
    "smollm3": dict(model_type="smollm3", num_hidden_layers=4, no_rope_layer_interval=2),  # NoPE layers
    "lfm2": dict(model_type="lfm2", layer_types=["conv", "full_attention"], conv_L_cache=3),
    "minimax_m2": dict(model_type="minimax_m2", partial_rotary_factor=0.5, **MOE4),
    "ernie4_5_moe": dict(
        model_type="ernie4_5_moe",
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=16,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    ),
}


def family_config(family: str, vocab_size: int = 97, **overrides):
    """The family's tiny config, built by its transformers config class (`AutoConfig.for_model`)."""
    from transformers import AutoConfig

    kwargs = {**BASE, **FAMILY_CONFIGS[family], "vocab_size": vocab_size, **overrides}
    if kwargs["model_type"] == "gemma4_text":
        kwargs.setdefault("vocab_size_per_layer_input", vocab_size)
    return AutoConfig.for_model(**kwargs)


def family_documents(seed: int = 0) -> list[dict]:
    """The packing tests' documents (LENGTHS: longer than every tiny window and chunk), random tokens."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, 97, (n,), generator=g).tolist(),
            "labels": torch.randint(3, 97, (n,), generator=g).tolist(),
        }
        for n in LENGTHS
    ]


def _packed_rows() -> list[dict]:
    from launcher.data.packing import pack_examples

    return pack_examples(family_documents(), max_length=24)


PACKED_ROWS = _packed_rows()  # 2 rows, several documents each, one padded


@functools.cache
def family_reference(key: str) -> tuple[dict, torch.Tensor]:
    """(the eager model's weights, each document's logits alone through transformers' eager path, in row order):
    what packed rows must reproduce. Input ids only, so the model applies its own causal, window and chunk masks."""
    from transformers import AutoModelForCausalLM

    from launcher.data.packing import doc_lengths

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(key), attn_implementation="eager").eval()
    outs = []
    with torch.no_grad():
        for r in PACKED_ROWS:
            start = 0
            for n in doc_lengths(r["position_ids"]):
                outs.append(model(input_ids=torch.tensor([r["input_ids"][start : start + n]])).logits[0])
                start += n
    return model.state_dict(), torch.cat(outs)


# ---- the MoE families among them, by model type (tests/test_moe.py) ----

MOE_VOCAB = 128
# model type -> FAMILY_CONFIGS key, for the rows whose family has a router (launcher/model/families.py).
MOE_KEYS = {
    FAMILY_CONFIGS[key]["model_type"]: key
    for key in FAMILY_CONFIGS
    if FAMILY_CONFIGS[key]["model_type"] in MOE_FAMILIES
}
TINY_MOE = list(MOE_KEYS)
MOE_BASE = {**BASE, "vocab_size": MOE_VOCAB}


def tiny_moe_kwargs(model_type: str, **overrides) -> dict:
    """The keyword arguments of an MoE family's tiny config (its FAMILY_CONFIGS row, vocabulary MOE_VOCAB)."""
    return {**MOE_BASE, **FAMILY_CONFIGS[MOE_KEYS[model_type]], **overrides}


def tiny_moe_config(model_type: str, **overrides):
    """A tiny random-init config of an MoE family, from transformers' own config class (`family_config`)."""
    return family_config(MOE_KEYS[model_type], vocab_size=MOE_VOCAB, **overrides)


# ---- the GPU tests' models (tests/test_gpu.py, tests/workers/sequence_parallel.py) ----

GPU_SMALL = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
GPU_ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2_sliding": dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1
    ),
    "mistral_sliding": dict(model_type="mistral", sliding_window=64),
}
GPU_LENGTHS = (300, 41, 700, 129, 17, 500)  # two rows of 1,024, windows of 64
