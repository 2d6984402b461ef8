"""Everything a run needs before its first step, built in one place: `build_run(cfg) -> Run`.

    run = build_run(cfg)            # collective: every rank calls it
    run.engine, run.data, run.sampler, run.loss_fn, run.state, run.logger, ...

`sft train` (through `launcher.train.train`), `sft check`, the benchmarks and the tests build runs here, so
what they measure is what users run: the same precision, attention backend, model preparation (sequence
parallelism, tiled MLP, activation checkpointing and its offload), tiled loss decision and DeepSpeed config.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from launcher import checkpoint
from launcher import engine as ds_engine
from launcher.checkpoint import TrainState
from launcher.config import batch_layout, validate
from launcher.data.loader import StepSampler
from launcher.data.pipeline import Prepared, cached_prepare, format_report, load_prepared
from launcher.evaluate import eval_loss
from launcher.long_context.offload import CheckpointOffload, enable_checkpointing
from launcher.long_context.sequence_parallel import SequenceParallel
from launcher.long_context.tiled_loss import tiled_target_token_loss, use_tiled_loss
from launcher.long_context.tiled_mlp import install_tiled_mlp, tiled_mlp_supported
from launcher.loss import target_token_loss
from launcher.metrics import NullLogger, PeakMemory, build_logger
from launcher.model import build_model, embedding_rows, load_tokenizer, model_config, param_shape
from launcher.model.attention import choose_backend
from launcher.model.families import registered_family
from launcher.model.moe import RouterAux, router_aux_decision, separately_called_expert_blocks
from launcher.optim import build_optimizer, warmup_steps
from launcher.precision import Precision, resolve_precision
from launcher.stop import STOP, StopRequest


@dataclass
class Run:
    """A run ready to train: its config, ranks, data, model and engine, loss, logger and state."""

    cfg: DictConfig
    info: ds_engine.DistInfo
    run_dir: Path
    sp: SequenceParallel  # data parallelism is sp.dp_world ranks; S = sp.size ranks share each row
    accum: int  # micro-batches per optimizer step on each rank
    tok: Any
    data: Prepared
    sampler: StepSampler
    sampler_info: dict[str, Any]  # what checkpoint manifests record of the data (shape and content digest)
    precision: Precision
    attention: str
    model: torch.nn.Module
    n_params: int
    engine: Any
    loss_fn: Any  # (engine, batch) -> (summed loss, target count): target_token_loss or its tiled variant
    train_loss_fn: Any  # what training steps call: loss_fn, plus an MoE router's auxiliary term when it is on
    offload: CheckpointOffload | None
    state: TrainState
    logger: NullLogger
    stop: StopRequest
    started: float  # when build_run began (results.json's wall_s counts from here)
    memory: PeakMemory  # peaks per interval: start-up (from build_run), the self-check, each step, each eval

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world(self) -> int:
        return self.info.world_size

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    def say(self, msg: str) -> None:
        """A line on rank 0's console."""
        if self.rank == 0:
            print(msg, flush=True)

    def evaluate(self) -> dict[str, float]:
        """Eval loss over the held-out rows, as training computes its loss (collective)."""
        t = self.cfg.train
        return eval_loss(
            self.engine,
            self.data.eval_rows,
            self.attention,
            t.micro_batch_size,
            self.device,
            self.pad_id,
            self.loss_fn,
            self.sp,
        )

    def save(self) -> Path:
        """A checkpoint of the current step (collective)."""
        return checkpoint.save(
            self.engine, self.run_dir / "checkpoints", self.state, self.cfg, self.sampler_info, self.say
        )


def build_run(cfg: DictConfig) -> Run:
    """Set up a run as configured, saying on rank 0 what it chose (collective: every rank calls it)."""
    started = time.time()
    stop = STOP.install()  # SIGUSR1/SIGTERM: stop at a step boundary, with a checkpoint
    info = ds_engine.init_distributed(cfg.deepspeed.timeout_minutes)
    rank, world, device = info.rank, info.world_size, info.device
    memory = PeakMemory(device)
    memory.take()  # start-up's interval begins here (train() may run more than once in a process)
    validate(cfg, world)
    t = cfg.train
    sp = SequenceParallel(t.sequence_parallel_size, rank, world)
    dp, accum = batch_layout(t, world)
    torch.manual_seed(t.seed)
    run_dir = build_run_dir(cfg, rank)
    say = partial(_say, rank)
    say(
        f"world size {world} on {device.type}: global batch {t.global_batch_size} rows = "
        f"{t.micro_batch_size} micro x {accum} accumulation x {dp} ranks"
        + (f" (x {sp.size} sequence-parallel ranks per row)" if sp.size > 1 else "")
        + f"; run_dir {run_dir}",
    )

    # ---- data ----
    tok = load_tokenizer(cfg.model)
    if tok.chatml_fallback:
        say("tokenizer: no chat template, using ChatML (<|im_start|>/<|im_end|> added as special tokens)")
    data = build_data(cfg, tok, info)
    if rank == 0:
        (run_dir / "data_report.json").write_text(json.dumps(data.report, indent=2))
        say(format_report(data.report))
    sampler = StepSampler(data.train_rows, dp, sp.dp_rank, t.micro_batch_size * accum, cfg.data.seed)
    sampler_info = {
        "rows": len(data.train_rows),
        "steps_per_epoch": sampler.steps_per_epoch,
        "data": data.train_rows.digest(),
        "eval_data": data.eval_rows.digest(),
    }

    # ---- model + engine ----
    trainable = build_trainable(cfg, info, len(tok), sp, say)
    engine = trainable.engine
    state = checkpoint.resume(engine, cfg, run_dir, sampler_info, say)
    config_dict = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    logger = build_logger(rank, run_dir, cfg.logging, config_dict, t.max_steps)
    return Run(
        cfg=cfg,
        info=info,
        run_dir=run_dir,
        sp=sp,
        accum=accum,
        tok=tok,
        data=data,
        sampler=sampler,
        sampler_info=sampler_info,
        precision=trainable.choice.precision,
        attention=trainable.choice.attention,
        model=trainable.model,
        n_params=trainable.n_params,
        engine=engine,
        loss_fn=trainable.loss_fn,
        train_loss_fn=trainable.train_loss_fn,
        offload=trainable.offload,
        state=state,
        logger=logger,
        stop=stop,
        started=started,
        memory=memory,
    )


@dataclass(frozen=True)
class Choice:
    """What a run decides about its model before building it; `sft check` and the preflight decide the same."""

    precision: Precision
    attention: str
    attention_why: str
    tiled_loss: bool
    router_aux: bool = False  # an MoE router's auxiliary loss is added (launcher.model.moe)
    router_aux_why: str | None = None  # what was decided about it and why (None for a dense model)


def decide(cfg: DictConfig, device: torch.device, config: Any, training: bool = True) -> Choice:
    """Precision, attention backend, tiled loss and an MoE router's auxiliary loss for this model on this device
    (ValueError, one line, when a setting cannot run here), within what the model's family row proves
    (`launcher.model.families`): packed rows, the tiled loss and the tiled MLP it refuses are refused here.
    `training=False`: `sft check`'s forward only."""
    precision = resolve_precision(cfg.model.dtype.value, device)
    attention, why = choose_backend(cfg.model.attention.value, device, config, precision.dtype, training)
    check_family(cfg, config)
    aux, aux_why = router_aux_decision(cfg.train.router_aux_loss, config)
    return Choice(precision, attention, why, use_tiled_loss(cfg.train.tiled_loss, config), aux, aux_why)


def check_family(cfg: DictConfig, config: Any) -> None:
    """ValueError (one line) when the model's family row refuses what the run asks: packed rows (`data.pack`,
    `data.max_length`) or the tiled MLP (`train.tiled_mlp`; the tiled loss is `use_tiled_loss`'s)."""
    family = registered_family(config, cfg.model.trust_remote_code)
    if family is not None and cfg.data.pack and (why := family.packing_refusal(config, cfg.data.max_length)):
        raise ValueError(
            f"data.pack=true: {family.name} cannot be packed exactly: {why}; set data.pack=false"
        )
    if cfg.train.tiled_mlp and (why := tiled_mlp_supported(config)):
        raise ValueError(f"train.tiled_mlp=true: {why}; set train.tiled_mlp=false")


@dataclass
class Trainable:
    """The model as training runs it, inside its DeepSpeed engine, and the loss it trains with."""

    choice: Choice
    model: torch.nn.Module
    offload: CheckpointOffload | None
    engine: Any
    n_params: int
    loss_fn: Any
    train_loss_fn: Any


def build_trainable(
    cfg: DictConfig, info: ds_engine.DistInfo, vocab_size: int, sp: SequenceParallel, say: Any = print
) -> Trainable:
    """Decide, build the model, and wrap it in its DeepSpeed engine with the optimizer and schedule (collective).
    `build_run` and the training-step benchmark build it here."""
    t, device = cfg.train, info.device
    choice = decide(cfg, device, model_config(cfg.model, vocab_size))
    ds_config = ds_engine.build_ds_config(cfg.deepspeed, t, info.world_size, choice.precision.bf16)
    init = ds_engine.zero_init_context(ds_config)
    model, offload = build_training_model(cfg, choice, vocab_size, sp, device, init, say)
    n_params = sum(int(np.prod(param_shape(p))) for p in model.parameters())
    say(
        f"model: {n_params / 1e6:.2f}M params, vocabulary {embedding_rows(model)} rows (tokenizer {vocab_size}), "
        f"{choice.precision.name}, attention={choice.attention} ({choice.attention_why}), "
        f"ZeRO stage {ds_config['zero_optimization']['stage']}",
    )
    say(f"loss: {'tiled' if choice.tiled_loss else 'untiled'} LM head (train.tiled_loss={t.tiled_loss})")
    if choice.router_aux_why:
        say(f"router auxiliary loss: {choice.router_aux_why}")
    warmup = warmup_steps(t)
    how = "train.warmup_steps" if t.warmup_steps is not None else f"train.warmup_ratio={t.warmup_ratio}"
    say(
        f"optimizer: AdamW lr {t.lr}, {t.schedule.value} schedule over {t.max_steps} steps, warmup {warmup} ({how})"
    )
    optimizer, scheduler_factory = build_optimizer(model, t)
    engine = ds_engine.initialize(model, optimizer, scheduler_factory, ds_config, cfg.deepspeed.config_file)
    loss_fn = tiled_target_token_loss if choice.tiled_loss else target_token_loss
    train_loss_fn = RouterAux(model, sp.group).wrap(loss_fn) if choice.router_aux else loss_fn
    return Trainable(choice, model, offload, engine, n_params, loss_fn, train_loss_fn)


def build_training_model(
    cfg: DictConfig,
    choice: Choice,
    vocab_size: int,
    sp: SequenceParallel,
    device: torch.device,
    init_context: Any = None,
    say: Any = print,
) -> tuple[torch.nn.Module, CheckpointOffload | None]:
    """The model as training runs it: built (ZeRO-3 partitioned under `init_context`) with the chosen backend
    and dtype, sequence-parallel attention, the tiled MLP, activation checkpointing and its offload."""
    t = cfg.train
    model = build_model(cfg.model, vocab_size, choice.attention, choice.precision.dtype, init_context)
    sp.install(model, choice.attention)
    ds_engine.gather_whole(model, separately_called_expert_blocks(model))  # ZeRO-3: MoE never hangs
    if t.tiled_mlp:
        say(f"tiled MLP in {install_tiled_mlp(model)} layers")
    for note in getattr(model, "load_notes", []):
        say(f"model: {note}")
    offload = None  # with model.checkpoint_offload: the checkpointed layers' inputs wait in host memory
    if cfg.model.gradient_checkpointing:
        offload = enable_checkpointing(model, cfg.model.checkpoint_offload)
    if offload is not None:
        say(offload.describe(device))
    return model, offload


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def build_run_dir(cfg: DictConfig, rank: int) -> Path:
    """Rank 0's run dir for everyone (`${now:...}` could differ by a second between ranks).

    `config.yaml` is the run's first launch; every launch (resumes too) also lands in `launches/<k>.yaml`.
    """
    holder = [str(Path(cfg.run_dir).resolve())] if rank == 0 else [None]
    dist.broadcast_object_list(holder, src=0)
    run_dir = Path(holder[0])
    if rank == 0:
        launches = run_dir / "launches"
        launches.mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(cfg, resolve=True)
        (launches / f"{len(list(launches.glob('*.yaml'))) + 1}.yaml").write_text(text)
        if not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(text)
    return run_dir


def build_data(cfg: DictConfig, tok: Any, info: ds_engine.DistInfo) -> Prepared:
    """Tokenize + mask + pack once per content hash: local rank 0 of each node builds, the others wait."""
    # Preparing a large recipe can take far longer than a collective timeout: wait on a separate group.
    slow = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))
    prepared = None
    if info.local_rank == 0:
        prepared = cached_prepare(
            cfg.data, tok, cfg.model.chat_template, cfg.cache_dir, build=True, progress=cfg.logging.progress
        )
    # Every node's builder is done (a node-local cache_dir is built on each node) before any rank loads.
    dist.barrier(group=slow)
    # The content hash reads every source file: rank 0 says where the data is instead of each rank hashing again
    # (same cache_dir and content on every node, so the same path).
    where = [prepared.report["cache"]["path"] if prepared is not None else None]
    dist.broadcast_object_list(where, src=0, group=slow)
    if prepared is None:
        prepared = load_prepared(Path(where[0]))
    return prepared
