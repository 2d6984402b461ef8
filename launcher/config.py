"""Typed configuration: one dataclass per Hydra group, registered in ConfigStore.

Compose a config the way the CLI does::

    from launcher.config import compose
    cfg = compose(["train.max_steps=10", "model=tiny"])

Every YAML under ``launcher/conf/`` (shipped inside the package, so a wheel composes too) is merged onto these
dataclasses, so an unknown key or a value of the wrong type fails at compose time with Hydra's own message (key
and expected type). Checks that span several fields live in :func:`validate`, which reports every problem at
once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(os.environ.get("SFT_CONF_DIR", Path(__file__).resolve().parent / "conf"))


class DataFormat(str, Enum):
    auto = "auto"
    messages = "messages"
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    prompt_completion = "prompt_completion"
    oasst = "oasst"  # OpenAssistant message trees


class TreePaths(str, Enum):
    best = "best"  # the top-ranked reply at every turn: one conversation per tree
    all = "all"  # every root-to-leaf path: several conversations per tree


class SystemPolicy(str, Enum):
    keep = "keep"
    drop = "drop"
    fold = "fold"  # prepend the system text to the first user turn


class TrainOn(str, Enum):
    all = "all"  # every assistant turn
    last = "last"  # only the final assistant turn


class Overlong(str, Enum):
    drop = "drop"
    truncate = "truncate"  # cut at a turn boundary, never inside an assistant turn


class OnError(str, Enum):
    raise_ = "raise"
    skip = "skip"


class Attention(str, Enum):
    auto = "auto"
    flash_attention_2 = "flash_attention_2"
    flash_attention_3 = "flash_attention_3"
    torch_varlen = "torch_varlen"
    sdpa = "sdpa"
    eager = "eager"
    flex_attention = "flex_attention"


class Dtype(str, Enum):
    auto = "auto"  # bf16 where the accelerator supports it, else fp32
    bf16 = "bf16"
    fp32 = "fp32"


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class WandbMode(str, Enum):
    auto = "auto"  # online with WANDB_API_KEY set, offline otherwise
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Local Hugging Face directory or hub id; None builds a random model from `init`."""
    init: dict[str, Any] = field(default_factory=dict)
    """Kwargs for `AutoConfig.for_model` (must include `model_type`) when `name_or_path` is None."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; defaults to `name_or_path`."""
    attention: Attention = Attention.auto
    """Attention backend; every choice isolates packed documents."""
    dtype: Dtype = Dtype.auto
    """Training precision."""
    trust_remote_code: bool = False
    """Run model/tokenizer code from the checkpoint; off unless you trust it."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    checkpoint_offload: bool = False
    """Keep each checkpointed layer's input in host memory between forward and backward (needs
    gradient_checkpointing): layers x tokens x hidden x bytes less on the GPU, copied over PCIe twice per step."""
    chat_template: str | None = None
    """Jinja chat template to use instead of the tokenizer's own (ChatML is used when it has none)."""


@dataclass
class SourceConfig:
    path: str = MISSING
    """Local file (json, jsonl, parquet, csv), local dataset dir, or hub id."""
    name: str | None = None
    """Label in reports; defaults to the file name."""
    format: DataFormat = DataFormat.auto
    """Row format; `auto` detects it from the columns."""
    subset: str | None = None
    """Hugging Face dataset config name."""
    split: str = "train"
    """Hugging Face split."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map canonical column names (messages, conversations, instruction, input, output, prompt, completion,
    system) to this source's own names."""
    include: dict[str, list[Any]] = field(default_factory=dict)
    """Keep only rows whose column value is in the list."""
    exclude: dict[str, list[Any]] = field(default_factory=dict)
    """Drop rows whose column value is in the list."""
    max_turns: int | None = None
    """Drop conversations with more assistant turns than this."""
    max_tokens: int | None = None
    """Drop conversations longer than this after templating."""
    system_prompt: SystemPolicy = SystemPolicy.keep
    """What to do with system messages."""
    sample: int | None = None
    """Keep N rows (seeded) after filtering."""
    sample_fraction: float | None = None
    """Keep this fraction of rows (seeded) after filtering."""
    weight: float = 1.0
    """Mixture weight: rows are repeated (integer part) and sampled (fractional part) by this factor."""
    tree_paths: TreePaths = TreePaths.best
    """OASST trees: follow the best-ranked reply (`best`) or train on every root-to-leaf path (`all`)."""
    eval: bool = False
    """Held-out source: its rows are evaluated on, never trained on (replacing the whole `data.sources` list
    drops it too, so a preset's eval set never leaks into a run on other data)."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Training sources, mixed by their weights."""
    eval_sources: list[SourceConfig] = field(default_factory=list)
    """Held-out sources (like a source with `eval: true`); with none, `eval_fraction` / `eval_size` of the
    training rows are held out."""
    eval_fraction: float = 0.0
    """Fraction of training rows held out for eval; an error when eval sources are given (it would be ignored)."""
    eval_size: int | None = None
    """Number of training rows held out for eval (instead of eval_fraction); an error with eval sources."""
    max_length: int = 2048
    """Tokens per packed row."""
    pack: bool = True
    """Pack several conversations per row (best-fit decreasing); False pads one per row."""
    train_on: TrainOn = TrainOn.all
    """Which assistant turns carry labels."""
    overlong: Overlong = Overlong.drop
    """What to do with conversations longer than max_length."""
    on_error: OnError = OnError.raise_
    """Malformed rows: raise with file/row/field, or skip and count."""
    seed: int = 0
    """Seed for sampling, splits and pack order."""
    dedup: bool = False
    """Drop exact duplicate conversations (per source, after normalising); by default they are kept and counted."""
    num_proc: int | None = None
    """Processes that read, render and tokenize sources when preparing data (blocks of ~1 MiB of JSON Lines or
    1024 rows, order kept; the result does not depend on it); null: every core this process may use."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps."""
    global_batch_size: int = 8
    """Packed rows per optimizer step, over all ranks and micro-batches."""
    micro_batch_size: int = 1
    """Packed rows per rank per forward."""
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak (cosine/linear)."""
    warmup_steps: int | None = None
    """Linear warmup steps; unset: `warmup_ratio` decides."""
    warmup_ratio: float = 0.0
    """Linear warmup as a fraction of max_steps (rounded to whole steps), when `warmup_steps` is unset."""
    schedule: Schedule = Schedule.cosine
    """Decay after warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    save_every: int = 0
    """Save a sharded DeepSpeed checkpoint every N steps (0: only at the end)."""
    log_every: int = 1
    """Log metrics every N steps."""
    seed: int = 0
    """Model init and data order seed."""
    export: bool = True
    """Export a Hugging Face model to <run_dir>/export at the end."""
    save_final_checkpoint: bool = True
    """Save a sharded checkpoint after the last step."""
    keep_last: int = 0
    """Keep only the N newest complete checkpoints (0: keep all); the newest complete one is never deleted."""
    resume: str | None = None
    """Resume from a checkpoint (`auto`: the newest complete one under <run_dir>/checkpoints, if any; or a
    checkpoints dir, or one step<N> dir); weights, optimizer, schedule, data position and every rank's RNG state
    are restored, so the run continues exactly. `auto` needs an explicit run_dir."""
    allow_config_change: bool = False
    """Resume even though the config differs from the checkpoint's in keys that decide the run (data, model,
    batch, optimizer, schedule); without it such a resume is refused, naming the keys."""
    verify_export: bool = True
    """After exporting, reload the export on rank 0's CPU and compare it with the engine on a held-out row
    (final hidden states, logits at a few positions; needs the model's size in CPU memory); fails if they differ."""
    check_packing: bool = True
    """Before training, compare a real packed row with each of its documents alone (final hidden states, and
    logits at a few positions per document)."""
    exact_match_eval: bool = False
    """Greedy-decode the final assistant turn of held-out rows and report exact-match accuracy
    before and after training."""
    exact_match_max_examples: int = 200
    """Held-out rows used for exact-match accuracy."""
    max_new_tokens: int = 32
    """Generation length for exact-match accuracy."""
    sequence_parallel_size: int = 1
    """Ulysses sequence parallelism: S consecutive ranks share each packed row (T/S tokens each); data
    parallelism is world / S, and global_batch_size counts rows over the world / S data-parallel ranks."""
    tiled_mlp: bool = False
    """Run each decoder layer's MLP over sequence tiles, recomputed per tile in backward: long rows need far less
    activation memory, for one extra MLP forward per step."""
    tiled_loss: str = "auto"
    """LM head + cross-entropy over tiles of target tokens, so the [tokens, vocab] logits never exist whole
    (`auto`: on for vocabularies of 32k or more; true/false)."""
    router_aux_loss: str = "auto"
    """MoE models: add the router's auxiliary (load-balancing) loss over the real tokens, times the model's own
    coefficient (`auto`: when the model's config sets output_router_logits, as transformers does; true/false);
    logged apart as `aux_loss`. Families without one (DeepSeek-V3, GLM-4-MoE, Llama 4) add nothing."""


@dataclass
class DeepSpeedConfig:
    stage: int = 3
    """ZeRO stage."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory."""
    offload_params: bool = False
    """Keep parameters in CPU memory (stage 3 only)."""
    config_file: str | None = None
    """Your own DeepSpeed JSON; its keys override the generated ones."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    timeout_minutes: float = 10.0
    """Timeout of training collectives: a rank that stops answering (hung, or lost without its connections
    closing) fails the job after this long. Data preparation waits on a group of its own, with hours."""


@dataclass
class LoggingConfig:
    wandb_mode: WandbMode = WandbMode.auto
    """wandb mode; `auto` is offline unless WANDB_API_KEY is set."""
    project: str = "sft-launcher"
    """wandb project."""
    entity: str | None = None
    """wandb entity."""
    run_name: str | None = None
    """wandb run name; defaults to the run dir's name."""
    progress: bool = True
    """Progress bar on rank 0."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    """Where metrics, checkpoints, export and wandb files go."""
    cache_dir: str = "${oc.env:SFT_CACHE_DIR,.cache/sft}"
    """Where tokenized+packed datasets are cached."""


ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def register_configs() -> None:
    """Register the schema so every YAML in conf/ is validated against it, and `${asset:...}` for bundled files."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda rel: str(ASSETS_DIR / rel))


register_configs()


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides, as `sft` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def batch_layout(t: Any, world_size: int) -> tuple[int, int]:
    """(data-parallel ranks, gradient accumulation steps) of a valid train config on `world_size` ranks: S
    consecutive ranks share each row under sequence parallelism, so rows are dealt to world / S ranks."""
    dp = world_size // t.sequence_parallel_size
    return dp, t.global_batch_size // (t.micro_batch_size * dp)


def validate(cfg: DictConfig, world_size: int) -> None:
    """Check every numeric field's domain and the fields that depend on each other; raise one ValueError (one
    line) listing every problem."""
    problems: list[str] = []
    t, d, m = cfg.train, cfg.data, cfg.model

    def need(ok: bool, key: str, value: Any, domain: str) -> None:
        if not ok:
            problems.append(f"{key}={value} must be {domain}")

    sp = t.sequence_parallel_size
    need(
        sp >= 1 and world_size % sp == 0,
        "train.sequence_parallel_size",
        sp,
        f"a divisor of the world size ({world_size})",
    )
    dp = world_size // sp if sp >= 1 and world_size % sp == 0 else world_size  # data-parallel ranks
    per_step = t.micro_batch_size * dp
    need(t.micro_batch_size > 0, "train.micro_batch_size", t.micro_batch_size, "positive")
    need(t.global_batch_size > 0, "train.global_batch_size", t.global_batch_size, "positive")
    if t.micro_batch_size > 0 and t.global_batch_size > 0 and t.global_batch_size % per_step != 0:
        ranks = (
            f"data-parallel ranks ({world_size} / sequence_parallel_size {sp})" if sp > 1 else "world size"
        )
        problems.append(
            f"train.global_batch_size={t.global_batch_size} must be divisible by micro_batch_size "
            f"({t.micro_batch_size}) x {ranks} ({dp}) = {per_step}"
        )
    need(t.max_steps > 0, "train.max_steps", t.max_steps, "positive")
    need(
        t.warmup_steps is None or 0 <= t.warmup_steps < max(t.max_steps, 1),
        "train.warmup_steps",
        t.warmup_steps,
        f"in [0, max_steps={t.max_steps}) (or unset it and give train.warmup_ratio, a fraction of max_steps)",
    )
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "in [0, 1)")
    need(t.lr > 0, "train.lr", t.lr, "positive")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "in [0, 1]")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", t.adam_beta1, "in [0, 1)")
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", t.adam_beta2, "in [0, 1)")
    need(t.adam_eps > 0, "train.adam_eps", t.adam_eps, "positive")
    need(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0 (0 disables clipping)")
    need(t.eval_every >= 0, "train.eval_every", t.eval_every, ">= 0 (0: only at the end)")
    need(t.save_every >= 0, "train.save_every", t.save_every, ">= 0 (0: only at the end)")
    need(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    need(t.seed >= 0, "train.seed", t.seed, ">= 0")
    need(
        t.exact_match_max_examples >= 0, "train.exact_match_max_examples", t.exact_match_max_examples, ">= 0"
    )
    need(t.max_new_tokens > 0, "train.max_new_tokens", t.max_new_tokens, "positive")
    need(d.max_length > 0, "data.max_length", d.max_length, "positive")
    need(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "in [0, 1)")
    need(d.eval_size is None or d.eval_size >= 0, "data.eval_size", d.eval_size, ">= 0")
    need(d.num_proc is None or d.num_proc >= 1, "data.num_proc", d.num_proc, ">= 1 (or null: every core)")
    need(d.seed >= 0, "data.seed", d.seed, ">= 0")
    if not [s for s in d.sources if not s.eval]:
        problems.append("data.sources has no training source (all are empty or eval: true): e.g. data=demo")
    has_eval_sources = bool(d.eval_sources) or any(s.eval for s in d.sources)
    if has_eval_sources and (d.eval_fraction or d.eval_size):
        setting = f"data.eval_size={d.eval_size}" if d.eval_size else f"data.eval_fraction={d.eval_fraction}"
        problems.append(
            f"{setting} would be ignored: eval sources are given (data.eval_sources, or a source with eval: "
            "true); drop one of them"
        )
    if not (has_eval_sources or d.eval_fraction or d.eval_size):
        if t.eval_every:
            problems.append(
                f"train.eval_every={t.eval_every} but there is no eval data: set data.eval_fraction or "
                "data.eval_size, add eval sources, or set train.eval_every=0"
            )
        if t.exact_match_eval:
            problems.append(
                "train.exact_match_eval=true but there is no eval data: set data.eval_fraction or "
                "data.eval_size, add eval sources, or set train.exact_match_eval=false"
            )
    need(
        str(t.tiled_loss).lower() in ("auto", "true", "false"),
        "train.tiled_loss",
        t.tiled_loss,
        "auto, true or false",
    )
    need(
        str(t.router_aux_loss).lower() in ("auto", "true", "false"),
        "train.router_aux_loss",
        t.router_aux_loss,
        "auto, true or false",
    )
    if t.keep_last < 0:
        problems.append(f"train.keep_last={t.keep_last} must be >= 0 (0 keeps every checkpoint)")
    if t.resume == "auto" and "${now:" in str(cfg._get_node("run_dir")._value()):
        problems.append(
            "train.resume=auto needs the run's own run_dir (the default is a new timestamped dir, with nothing "
            "to resume): add run_dir=<the run dir to continue>"
        )
    for kind in ("sources", "eval_sources"):
        for i, s in enumerate(d[kind]):
            key = f"data.{kind}[{i}]"
            need(s.weight > 0, f"{key}.weight", s.weight, "positive")
            need(s.max_turns is None or s.max_turns > 0, f"{key}.max_turns", s.max_turns, "positive")
            need(s.max_tokens is None or s.max_tokens > 0, f"{key}.max_tokens", s.max_tokens, "positive")
            need(s.sample is None or s.sample > 0, f"{key}.sample", s.sample, "positive")
            if s.sample is not None and s.sample_fraction is not None:
                problems.append(f"{key} ({s.path}): set sample or sample_fraction, not both")
            need(
                s.sample_fraction is None or 0 < s.sample_fraction <= 1,
                f"{key}.sample_fraction",
                s.sample_fraction,
                "in (0, 1]",
            )
    if m.name_or_path is None and "model_type" not in m.init:
        problems.append(
            "model.name_or_path is unset and model.init has no model_type: nothing to load or build"
        )
    if m.checkpoint_offload and not m.gradient_checkpointing:
        problems.append(
            "model.checkpoint_offload=true needs model.gradient_checkpointing=true (it offloads the inputs the "
            "checkpointed layers keep for backward)"
        )
    if m.name_or_path is None and m.tokenizer is None:
        problems.append("model.tokenizer must be set when model.name_or_path is unset (random init)")
    need(cfg.deepspeed.stage in (0, 1, 2, 3), "deepspeed.stage", cfg.deepspeed.stage, "0, 1, 2 or 3")
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
        problems.append("deepspeed.offload_params needs deepspeed.stage=3")
    need(
        cfg.deepspeed.timeout_minutes > 0,
        "deepspeed.timeout_minutes",
        cfg.deepspeed.timeout_minutes,
        "positive",
    )
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
