"""Full-parameter SFT under DeepSpeed: `train(cfg)` is the whole run, top to bottom.

    sft launch                                 # torchrun on every local GPU (or 2 CPU ranks)
    torchrun --nproc_per_node 8 -m launcher.cli train model=... data=...
    python -c "from launcher.config import compose; from launcher.train import train; train(compose())"

Loss normalisation: every micro-batch's loss is the *sum* of its token losses divided by the number of
target tokens in the whole optimizer step, all-reduced over ranks, so each token weighs the same whatever the
packing, micro-batch size, accumulation or world size.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from launcher import checkpoint
from launcher import engine as ds_engine
from launcher.config import validate
from launcher.data.loader import StepSampler, collate
from launcher.data.packing import doc_lengths
from launcher.data.pipeline import Prepared, cached_prepare, format_report
from launcher.evaluate import check_packing, eval_loss, exact_match
from launcher.export import export_hf, verify_export
from launcher.launch import lifecycle
from launcher.long_context.offload import enable_checkpointing
from launcher.long_context.sequence_parallel import SequenceParallel
from launcher.long_context.tiled_loss import tiled_target_token_loss, use_tiled_loss
from launcher.long_context.tiled_mlp import install_tiled_mlp
from launcher.loss import count_targets, target_token_loss
from launcher.metrics import build_logger
from launcher.model import build_model, embedding_rows, load_tokenizer, model_config, param_shape
from launcher.model.attention import choose_backend

log = logging.getLogger("launcher")


def say(rank: int, msg: str) -> None:
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
    dist.barrier(group=slow)
    if prepared is None:
        prepared = cached_prepare(cfg.data, tok, cfg.model.chat_template, cfg.cache_dir, build=False)
    return prepared


def build_optimizer(model: torch.nn.Module, t: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on biases and norms) and a factory for warmup + cosine/linear/constant decay.

    The scheduler is a factory because DeepSpeed wraps the optimizer and rebuilds its param groups: the
    schedule must be attached to DeepSpeed's optimizer, not ours.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # under ZeRO-3 p.ndim is 1 for every parameter: ask for the real shape
            flat = len(param_shape(p)) < 2
            (no_decay if flat or "norm" in name.lower() or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=torch.cuda.is_available()
    )

    return optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t))


def lr_factor(step: int, t: Any) -> float:
    """The lr of optimizer step `step` (0-based) as a fraction of `t.lr`: warmup, then cosine/linear/constant."""
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    if t.schedule.value == "constant":
        return 1.0
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule.value == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape


def step_flops(model_cfg: Any, n_params: int, rows: list[dict]) -> float:
    """Model FLOPs of one step's rows, the numerator of MFU (activation-checkpoint recompute is not counted).

    6 x matmul parameters x tokens, plus causal attention on the real document lengths. The input embedding is a
    lookup, not a matmul, so it is left out; the LM head is counted only at positions that have a target,
    the only positions where it runs (`target_token_loss`).
    """
    tokens = sum(len(r["input_ids"]) for r in rows)
    targets = count_targets(rows)
    head = model_cfg.vocab_size * model_cfg.hidden_size
    body = n_params - head * (1 if getattr(model_cfg, "tie_word_embeddings", False) else 2)
    sq = sum(n * n for r in rows for n in doc_lengths(r["position_ids"]))
    head_dim = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
    width = model_cfg.num_attention_heads * head_dim
    # QK^T and AV: 2 matmuls x 2 FLOPs x (n^2 / 2 causal) x width per layer; x3 for forward + backward.
    attn = 3 * 2 * 2 * (sq / 2) * width * model_cfg.num_hidden_layers
    return 6 * body * tokens + 6 * head * targets + attn


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated on CUDA; on CPU, this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), most specific name first: an H100 PCIe is not an SXM.
PEAK_TFLOPS = (
    (r"H100.*PCIe", 756),
    (r"H100 NVL|H200 NVL", 835),
    (r"H100|H200|GH200", 989),
    (r"A100", 312),
    (r"L40S", 362),
    (r"L40\b", 181),
    (r"\bA10\b", 125),
)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak for MFU; SFT_PEAK_TFLOPS overrides, and is needed for devices not listed."""
    if os.environ.get("SFT_PEAK_TFLOPS"):
        return float(os.environ["SFT_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops(name)
    if tflops is None:
        log.warning("no bf16 peak known for %r: MFU is not logged (set SFT_PEAK_TFLOPS)", name)
        return None
    return tflops * 1e12


def peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def train_step(
    eng: Any,
    my_rows: list[dict],
    micro: int,
    attention: str,
    device: torch.device,
    pad_id: int,
    world: int,
    loss_fn: Any = target_token_loss,
    sp: SequenceParallel | None = None,
) -> dict[str, float]:
    """One optimizer step over this rank's rows, in micro-batches; loss normalised by global target tokens.
    `loss_fn(engine, batch)` returns (summed loss, target count): `target_token_loss` or its tiled variant.
    With sequence parallelism the S ranks of a group hold the same rows and each computes its slice of them."""
    sp = sp or SequenceParallel(1, 0, world)
    n_local = count_targets(my_rows)
    counts = torch.tensor(
        [n_local, sum(len(r["input_ids"]) for r in my_rows)], dtype=torch.float64, device=device
    )
    dist.all_reduce(counts)
    counts /= sp.size  # each row was counted by every rank of its group
    n_global = counts[:1]
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    counted = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(my_rows), micro):
        with sp.shard(collate(my_rows[i : i + micro], attention, pad_id, device=device)) as b:
            loss_sum, n_targets = loss_fn(eng, b)
            counted += n_targets
            # DeepSpeed averages gradients over ranks; x world turns that average into the global token sum
            # (with SP too: every rank's gradient is its own tokens' part of the sum).
            ds_engine.backward(eng, loss_sum * world / n_global.clamp(min=1).float())
        eng.step()
        loss_total += loss_sum.detach().double()
    if sp.size > 1:
        dist.all_reduce(counted, group=sp.group)  # the group's slices together hold the rows' targets
    # The normaliser counted what the loss summed. Padding-free batches lay rows end to end, so this also holds
    # the packer to its invariant: every row's first label is -100 (no row is a target of the row before it).
    assert int(counted) == n_local, (int(counted), n_local)
    dist.all_reduce(loss_total)
    return {
        "loss": (loss_total / n_global.clamp(min=1)).item(),
        "trained_tokens": int(counts[0].item()),
        "tokens": int(counts[1].item()),
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run SFT as configured; returns the final metrics (rank 0 also prints them)."""
    stop = lifecycle.STOP.install()  # SIGUSR1/SIGTERM: stop at a step boundary, with a checkpoint
    info = ds_engine.init_distributed(cfg.deepspeed.timeout_minutes)
    rank, world, device = info.rank, info.world_size, info.device
    validate(cfg, world)
    t, start = cfg.train, time.time()
    sp = SequenceParallel(t.sequence_parallel_size, rank, world)  # data parallelism: sp.dp_world ranks
    torch.manual_seed(cfg.train.seed)
    run_dir = build_run_dir(cfg, rank)
    accum = t.global_batch_size // (t.micro_batch_size * sp.dp_world)
    say(
        rank,
        f"world size {world} on {device.type}: global batch {t.global_batch_size} rows = "
        f"{t.micro_batch_size} micro x {accum} accumulation x {sp.dp_world} ranks"
        + (f" (x {sp.size} sequence-parallel ranks per row)" if sp.size > 1 else "")
        + f"; run_dir {run_dir}",
    )

    # ---- data ----
    tok = load_tokenizer(cfg.model)
    if tok.chatml_fallback:
        say(
            rank,
            "tokenizer: no chat template, using ChatML (<|im_start|>/<|im_end|> added as special tokens)",
        )
    data = build_data(cfg, tok, info)
    if rank == 0:
        (run_dir / "data_report.json").write_text(json.dumps(data.report, indent=2))
        say(rank, format_report(data.report))
    sampler = StepSampler(data.train_rows, sp.dp_world, sp.dp_rank, t.micro_batch_size * accum, cfg.data.seed)
    # What the manifest records of the data: its shape and its content (a resume from moved files compares it).
    sampler_info = {
        "rows": len(data.train_rows),
        "steps_per_epoch": sampler.steps_per_epoch,
        "data": data.train_rows.digest(),
        "eval_data": data.eval_rows.digest(),
    }

    # ---- model + engine ----
    bf16 = cfg.model.dtype.value == "bf16" or (cfg.model.dtype.value == "auto" and ds_engine.bf16_supported())
    if bf16 and device.type == "cpu":
        raise ValueError("model.dtype=bf16 on CPU is not supported here: use model.dtype=auto or fp32")
    dtype = torch.bfloat16 if bf16 else torch.float32
    attention, why = choose_backend(
        cfg.model.attention.value, device, model_config(cfg.model, len(tok)), dtype
    )
    ds_config = ds_engine.build_ds_config(cfg.deepspeed, t, world, bf16, sp.size)
    model = build_model(cfg.model, len(tok), attention, dtype, ds_engine.zero_init_context(ds_config))
    sp.install(model, attention)
    if t.tiled_mlp:
        say(rank, f"tiled MLP in {install_tiled_mlp(model)} layers")
    for note in getattr(model, "load_notes", []):
        say(rank, f"model: {note}")
    offload = None  # with model.checkpoint_offload: the checkpointed layers' inputs wait in host memory
    if cfg.model.gradient_checkpointing:
        offload = enable_checkpointing(model, cfg.model.checkpoint_offload)
    if offload is not None:
        say(rank, offload.describe(device))
    n_params = sum(int(np.prod(param_shape(p))) for p in model.parameters())
    say(
        rank,
        f"model: {n_params / 1e6:.2f}M params, vocabulary {embedding_rows(model)} rows (tokenizer {len(tok)}), "
        f"{'bf16' if bf16 else 'fp32'}, attention={attention} ({why}), "
        f"ZeRO stage {ds_config['zero_optimization']['stage']}",
    )
    tiled = use_tiled_loss(t.tiled_loss, model.config)
    loss_fn = tiled_target_token_loss if tiled else target_token_loss
    say(rank, f"loss: {'tiled' if tiled else 'untiled'} LM head (train.tiled_loss={t.tiled_loss})")
    optimizer, scheduler_factory = build_optimizer(model, t)
    eng = ds_engine.initialize(model, optimizer, scheduler_factory, ds_config)
    scheduler = eng.lr_scheduler
    state = checkpoint.resume(eng, cfg, run_dir, sampler_info, partial(say, rank))
    logger = build_logger(
        rank, run_dir, cfg.logging, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), t.max_steps
    )
    pad_id = tok.pad_token_id
    results: dict[str, Any] = {"run_dir": str(run_dir)}
    evaluate = partial(
        eval_loss, eng, data.eval_rows, attention, t.micro_batch_size, device, pad_id, loss_fn, sp
    )

    if state.step:
        say(rank, f"resumed at step {state.step} ({state.tokens_seen} tokens seen)")
        logger.log({"resumed_at": state.step}, state.step)
    else:
        say(rank, "starting at step 0")
    if t.check_packing:
        check = check_packing(eng.module, data.train_rows, attention, device, 1e-4 if not bf16 else 3e-2, sp)
        results.update(check)
        say(rank, f"packing self-check: {check}")
    if data.eval_rows and not state.step:
        results.update({f"{k}_before": v for k, v in evaluate().items()})
        logger.log({"eval_loss": results["eval_loss_before"], "eval_ppl": results["eval_ppl_before"]}, 0)
        say(rank, f"step 0: eval_loss {results['eval_loss_before']:.4f}")
    if t.exact_match_eval and not state.step:
        results["accuracy_before"] = exact_match(
            eng.module, tok, data.eval_conversations[: t.exact_match_max_examples], t.max_new_tokens, device
        )
        say(rank, f"held-out exact match before training: {results['accuracy_before']:.3f}")

    # ---- the loop ----
    peak = peak_flops(device)
    steps = sampler.steps_from(state.step)
    start_step, metrics = state.step, {}
    note = partial(say, rank)
    save = partial(
        checkpoint.save, eng, run_dir / "checkpoints", cfg=cfg, sampler_info=sampler_info, say=note
    )
    while state.step < t.max_steps:
        my_rows = [data.train_rows[i] for i in next(steps)]
        t_step = time.time()
        out = train_step(eng, my_rows, t.micro_batch_size, attention, device, pad_id, world, loss_fn, sp)
        state.advance(out)
        step, dt = state.step, time.time() - t_step

        if step % t.log_every == 0 or step == t.max_steps:
            flops = torch.tensor(
                [step_flops(model.config, n_params, my_rows)], device=device, dtype=torch.float64
            )
            dist.all_reduce(flops)
            flops /= sp.size  # the ranks of a sequence-parallel group hold the same rows
            metrics = {
                "loss": out["loss"],
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(eng.get_global_grad_norm() or 0.0),
                "tokens_per_s": out["tokens"] / dt,
                "trained_tokens": out["trained_tokens"],
                "tokens_seen": state.tokens_seen,
                "epoch": step // sampler.steps_per_epoch,
                "peak_mem_gb": peak_memory_gb(device),
            }
            if offload is not None:  # host memory the layer inputs took at most, since the last log
                metrics.update(offload.metrics())
            if peak:
                metrics["mfu"] = flops.item() / dt / (peak * world)
            logger.log(metrics, step)
            logger.progress(step, {"loss": f"{out['loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"})
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps and data.eval_rows:
            ev = evaluate()
            logger.log(ev, step)
            say(rank, f"step {step}: eval_loss {ev['eval_loss']:.4f} (train loss {out['loss']:.4f})")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            save(state)
        if state.step < t.max_steps and (signame := stop.agreed(device)):  # one all-reduce; every rank agrees
            say(rank, f"{signame}: every rank stops after step {step} with a checkpoint")
            if not (t.save_every and step % t.save_every == 0):  # unless saved just above
                save(state)
            logger.close()
            raise lifecycle.Preempted(step, signame)

    # ---- finish: eval, checkpoint, export ----
    if start_step >= t.max_steps:
        say(rank, f"the run had already finished (step {start_step} of {t.max_steps}): nothing to train")
    results.update(first_loss=state.first_loss, final_loss=state.last_loss, steps=state.step)
    results.update(tokens_seen=state.tokens_seen, balance=sampler.balance)
    if data.eval_rows:
        results.update(evaluate())
        logger.log({k: results[k] for k in ("eval_loss", "eval_ppl")}, state.step)
    if t.save_final_checkpoint and state.step > start_step:
        save(state)
    if t.export:
        export_hf(eng, tok, run_dir / "export")
        if t.verify_export:
            row = (data.eval_rows or data.train_rows)[0]
            results.update(verify_export(eng, run_dir / "export", row, attention, 3e-2 if bf16 else 1e-4))
            say(rank, f"export check: {run_dir / 'export'} reloads with the engine's logits")
    if t.exact_match_eval:
        results["accuracy_after"] = exact_match(
            eng.module, tok, data.eval_conversations[: t.exact_match_max_examples], t.max_new_tokens, device
        )
    results["wall_s"] = time.time() - start
    logger.summary({k: v for k, v in results.items() if isinstance(v, (int, float))})
    logger.close()
    if rank == 0:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        say(rank, summary_line(results))
        if t.exact_match_eval:
            say(
                rank,
                # before is not measured when resuming
                f"accuracy: before={results.get('accuracy_before', float('nan')):.3f} "
                f"after={results['accuracy_after']:.3f}",
            )
        say(rank, f"run_dir: {run_dir}")
    dist.barrier()
    return results


def summary_line(results: dict[str, Any]) -> str:
    """`final: loss A -> B, eval_loss C -> D` with what was measured (a resumed run keeps its first loss)."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    line = f"final: loss {fmt(results['first_loss'])} -> {fmt(results['final_loss'])}"
    if "eval_loss" in results:
        before = f"{fmt(results['eval_loss_before'])} -> " if "eval_loss_before" in results else ""
        line += f", eval_loss {before}{fmt(results['eval_loss'])}"
    return line
