"""`sft plan`: what a run will do and whether it fits in GPU memory, before any GPU hour is spent.

Reads only the model's `config.json` (the model is built on the meta device: no weights, no memory), the data
config (the real packed-row statistics when the data is already prepared in `cache_dir`, else `max_length`) and
the DeepSpeed config, and estimates per-GPU memory of a ZeRO-3 run:

- model states, partitioned over all GPUs (bytes per parameter, divided by the world size): bf16 parameters (2),
  fp32 gradient partitions (4) and fp32 master weights + Adam moments (12) -- DeepSpeed's own 18 bytes -- plus
  the largest module gathered whole with its gradient (4 bytes per parameter), as
  `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs` counts them. Optimizer offload keeps
  only the bf16 parameters on the GPU; parameter offload keeps only the gathered module. (fp32 runs: 4 + 4 + 8.)
- activations of one micro-batch of `max_length` tokens per row: what each decoder layer keeps for backward
  (norm inputs and outputs, q/k/v before and after rotary, the attention output, the MLP's gate, up, activation
  and product), or with gradient checkpointing the layer inputs plus one layer recomputed. Fused attention
  kernels (flash, varlen, sdpa's memory-efficient path) keep no seq x seq buffer; `eager` keeps its scores and
  probabilities, and `sdpa`/`eager` get a float block-diagonal mask. With `model.checkpoint_offload` the
  layer inputs wait in host memory: the GPU keeps one of them (the layer running or being recomputed) plus one
  layer recomputed; the host holds all of them (`checkpoint_offload_host`, per GPU).
- logits and loss buffers: the LM head runs only at positions with a target (bf16 logits, their fp32 copy for
  the cross-entropy, and its fp32 gradient); with `train.tiled_loss`, one tile of them at a time.
- sequence parallelism (`train.sequence_parallel_size=S`): every per-token term is divided by S, the float
  document mask of sdpa/eager is not (each rank masks the whole gathered row); `train.tiled_mlp` keeps one tile
  (about `hidden` tokens) of MLP intermediates in flight instead of the whole row's.
- a fixed reserve for the CUDA context, NCCL buffers and allocator fragmentation.

It is an estimate: measure with `torch.cuda.max_memory_allocated` (logged as `peak_mem_gb`) on a short run.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from launcher.errors import EXIT_OK, EXIT_USER

GB = 2**30
RESERVE_GB = 2.0  # CUDA context (~0.5 GB), NCCL buffers, allocator fragmentation
FUSED_ATTENTION = ("auto", "torch_varlen", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory_gb: float = 80.0

    @classmethod
    def local(cls) -> Hardware:
        """This machine's GPUs (where there is none: 1 GPU of 80 GB)."""
        import torch

        if not torch.cuda.is_available():
            return cls()
        return cls(1, torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GB)


def model_shape(cfg: Any) -> dict[str, Any]:
    """Parameter counts and dimensions from the model's config alone (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.model import model_config

    vocab = None
    if not cfg.model.name_or_path:  # the demo model's vocabulary is its tokenizer's
        from launcher.model import load_tokenizer

        vocab = len(load_tokenizer(cfg.model))
    config = model_config(cfg.model, vocab)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    unique = {id(p): p.numel() for p in model.parameters()}  # tied weights once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    from launcher.long_context.tiled_loss import use_tiled_loss

    return {
        "tiled_loss": use_tiled_loss(cfg.train.tiled_loss, text),
        "params": sum(unique.values()),
        "largest_layer_params": largest,
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "heads": heads,
        "kv_dim": (getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        "intermediate": getattr(text, "intermediate_size", 4 * text.hidden_size),
        "vocab": text.vocab_size,
    }


def data_stats(cfg: Any) -> dict[str, Any]:
    """Packed-row statistics from the prepared cache, if this data config was prepared already."""
    from pathlib import Path

    try:
        from launcher.data.pipeline import fingerprint
        from launcher.model import load_tokenizer

        tok = load_tokenizer(cfg.model)
        path = Path(cfg.cache_dir) / f"prepared-{fingerprint(cfg.data, tok, cfg.model.chat_template)}"
        report = json.loads((path / "meta.json").read_text())["report"]["train"]
    except (OSError, ValueError, KeyError):  # not prepared here (or the tokenizer is not local)
        return {"source": f"not prepared: rows of data.max_length={cfg.data.max_length} tokens assumed"}
    return {
        "source": f"prepared cache {path}",
        "packed_rows": report["packed_rows"],
        "tokens_per_row": report["tokens"] / max(report["packed_rows"], 1),
        "trained_fraction": report["trained_fraction"],
    }


def model_states_gb(
    shape: dict, world: int, bf16: bool, offload_optimizer: bool, offload_params: bool
) -> dict:
    """ZeRO-3 model states per GPU (see the module docstring)."""
    p = shape["params"] / world
    param_b, grad_b, optim_b = (2, 4, 12) if bf16 else (4, 4, 8)
    params = 0.0 if offload_params else param_b * p
    grads = 0.0 if offload_optimizer or offload_params else grad_b * p
    optim = 0.0 if offload_optimizer or offload_params else optim_b * p
    gathered = 4 * shape["largest_layer_params"]  # the largest module whole, with its gradient
    cpu = (param_b * p if offload_params else 0) + ((grad_b + optim_b) * p if offload_optimizer else 0)
    out = {"params": params, "grads": grads, "optimizer": optim, "gathered_layer": gathered}
    out = {k: v / GB for k, v in out.items()}
    out["model_states"] = sum(out.values())
    out["cpu_offloaded_per_gpu"] = cpu / GB
    return out


def activations_gb(
    shape: dict,
    tokens: int,
    bytes_: int,
    attention: str,
    heads_rows: tuple[int, int],
    sp: int = 1,
    tiled_mlp: bool = False,
) -> dict:
    """Activation memory of one micro-batch of `tokens` tokens, without and with gradient checkpointing, on one
    rank of a sequence-parallel group of `sp` ranks (each holds tokens / sp of every row)."""
    h, kv, inter, layers = shape["hidden"], shape["kv_dim"], shape["intermediate"], shape["layers"]
    local = tokens / sp
    # attention block: input, normed, q, k, v, rotated q and k, output; MLP: input, normed, gate, up, act, product
    mlp = 4 * inter * local * bytes_
    in_flight = 0.0
    if tiled_mlp:  # the MLP's intermediates live for one tile (about `hidden` tokens) at a time, recomputed
        mlp, in_flight = 0.0, 4 * inter * min(local, h) * bytes_
    per_layer = local * (7 * h + 3 * kv) * bytes_ + mlp
    rows, row_len = heads_rows
    quadratic = 0
    if attention == "eager":  # scores and probabilities of this rank's heads over the whole row, per layer
        quadratic = 2 * rows * (shape["heads"] / sp) * row_len * row_len * bytes_
    # The float document mask covers the whole (gathered) row on every rank, whatever sp is.
    mask = rows * row_len * row_len * bytes_ if attention in ("sdpa", "eager") else 0
    full = layers * (per_layer + quadratic) + mask + in_flight
    inputs = layers * local * h * bytes_  # what each checkpointed layer keeps for backward: its input
    ckpt = inputs + per_layer + quadratic + mask + in_flight
    offload = local * h * bytes_ + per_layer + quadratic + mask + in_flight  # one input back on the GPU
    return {
        "no_checkpointing": full / GB,
        "checkpointing": ckpt / GB,
        "checkpoint_offload": offload / GB,
        "checkpoint_offload_host": inputs / GB,
    }


def logits_gb(shape: dict, targets: float, tiled: bool = False) -> float:
    """LM-head outputs at target positions: bf16 logits, fp32 copy, fp32 gradient; with the tiled loss, one
    tile's worth (`launcher.long_context.tiled_loss.count_tiles`: a tile's logits are about the size of its hidden states)."""
    from launcher.long_context.tiled_loss import MIN_TILE_LOGITS

    if tiled and targets:
        tiles = max(1, math.ceil(targets * shape["vocab"] / max(targets * shape["hidden"], MIN_TILE_LOGITS)))
        targets = math.ceil(targets / tiles)
    return targets * shape["vocab"] * (2 + 4 + 4) / GB


def fit_batch(t: Any, world: int) -> tuple[int, int, str | None]:
    """(global batch, micro batch, what was changed) that divide over `world` ranks: the configured ones when
    they do; else the largest micro batch up to the configured one that divides the global batch over the
    data-parallel ranks; else the nearest global batch that is a multiple of micro x data-parallel ranks."""
    sp = t.sequence_parallel_size
    if sp < 1 or world % sp:
        return t.global_batch_size, t.micro_batch_size, None  # validate() names the problem
    dp, g, m = world // sp, t.global_batch_size, t.micro_batch_size
    if g <= 0 or m <= 0 or g % (m * dp) == 0:
        return g, m, None
    if g % dp == 0:
        micro = max(k for k in range(1, m + 1) if (g // dp) % k == 0)
        return (
            g,
            micro,
            (
                f"train.micro_batch_size={micro}: global batch {g} over {dp} data-parallel ranks leaves {g // dp} rows "
                f"per rank, which micro batch {m} does not divide"
            ),
        )
    step = m * dp
    nearest = max(step, round(g / step) * step)
    return (
        nearest,
        m,
        (
            f"train.global_batch_size={nearest}: global batch {g} does not divide over {dp} data-parallel ranks; "
            f"{nearest} is the nearest multiple of micro batch {m} x {dp}"
        ),
    )


def make_plan(cfg: Any, hw: Hardware) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from launcher.config import batch_layout, validate
    from launcher.engine import build_ds_config
    from launcher.precision import resolve_precision

    world = hw.nodes * hw.gpus_per_node
    global_batch, micro, adjusted = fit_batch(cfg.train, world)
    if adjusted:  # plan what it would take on this cluster, and say so
        cfg = OmegaConf.merge(cfg, {"train": {"global_batch_size": global_batch, "micro_batch_size": micro}})
    validate(cfg, world)
    t, d = cfg.train, cfg.data
    sp = t.sequence_parallel_size
    _, accum = batch_layout(t, world)
    # Planned for GPUs that may not be this machine's: `auto` is bf16 there (fp32 only when asked for).
    bf16 = resolve_precision(cfg.model.dtype.value, "cuda", bf16_ok=True).bf16
    ds_config = build_ds_config(cfg.deepspeed, t, world, bf16)
    shape = model_shape(cfg)
    data = data_stats(cfg)
    row_len = d.max_length
    trained = data.get("trained_fraction", 1.0)
    attention = cfg.model.attention.value

    def per_gpu(
        micro: int, ckpt: bool, off_opt: bool, off_par: bool, gpus: int, off_ckpt: bool = False
    ) -> dict[str, float]:
        states = model_states_gb(shape, gpus, bf16, off_opt, off_par)
        act = activations_gb(
            shape, micro * row_len, 2 if bf16 else 4, attention, (micro, row_len), sp, t.tiled_mlp
        )
        out = {k: states[k] for k in ("params", "grads", "optimizer", "gathered_layer", "model_states")}
        off_ckpt = ckpt and off_ckpt
        out["activations"] = act[
            "checkpoint_offload" if off_ckpt else "checkpointing" if ckpt else "no_checkpointing"
        ]
        out["activations_no_checkpointing"] = act["no_checkpointing"]
        out["activations_checkpointing"] = act["checkpointing"]
        out["activations_checkpoint_offload"] = act["checkpoint_offload"]
        out["checkpoint_offload_host"] = act["checkpoint_offload_host"] if off_ckpt else 0.0
        out["logits"] = logits_gb(shape, micro * row_len / sp * trained, shape["tiled_loss"])
        out["reserve"] = RESERVE_GB
        out["total"] = out["model_states"] + out["activations"] + out["logits"] + out["reserve"]
        out["cpu_offloaded"] = states["cpu_offloaded_per_gpu"]
        return out

    ds = cfg.deepspeed
    ckpt, off_ckpt = bool(cfg.model.gradient_checkpointing), bool(cfg.model.checkpoint_offload)
    mem = per_gpu(t.micro_batch_size, ckpt, ds.offload_optimizer, ds.offload_params, world, off_ckpt)
    fits = mem["total"] <= hw.gpu_memory_gb
    suggestions = [] if fits else _what_fits(per_gpu, t, cfg, hw, world)
    steps_per_epoch = data["packed_rows"] // t.global_batch_size if "packed_rows" in data else None
    return {
        "world_size": world,
        "nodes": hw.nodes,
        "gpus_per_node": hw.gpus_per_node,
        "gpu_memory_gb": hw.gpu_memory_gb,
        "micro_batch_size": t.micro_batch_size,
        "sequence_parallel_size": sp,
        "tiled_loss": shape["tiled_loss"],
        "tiled_mlp": bool(t.tiled_mlp),
        "gradient_accumulation": accum,
        "global_batch_size": t.global_batch_size,
        "max_length": row_len,
        "tokens_per_step": t.global_batch_size * (data.get("tokens_per_row") or row_len),
        "steps_per_epoch": steps_per_epoch,
        "data": data,
        "model": shape,
        "precision": "bf16" if bf16 else "fp32",
        "attention": attention,
        "gradient_checkpointing": ckpt,
        "checkpoint_offload": off_ckpt,
        "deepspeed": ds_config,
        "per_gpu_gb": mem,
        "fits": fits,
        "would_fit": suggestions,
        "batch_adjusted": adjusted,
    }


def _what_fits(per_gpu: Any, t: Any, cfg: Any, hw: Hardware, world: int) -> list[str]:
    """Settings that would fit, cheapest first: checkpointing, a smaller micro-batch, offload, more GPUs."""
    ds, out = cfg.deepspeed, []
    ckpt, off_ckpt = bool(cfg.model.gradient_checkpointing), bool(cfg.model.checkpoint_offload)
    off_opt, off_par = ds.offload_optimizer, ds.offload_params

    def fits(**kw: Any) -> bool:
        args = {
            "micro": t.micro_batch_size,
            "ckpt": ckpt,
            "off_opt": off_opt,
            "off_par": off_par,
            "gpus": world,
            "off_ckpt": off_ckpt,
        }
        return per_gpu(**{**args, **kw})["total"] <= hw.gpu_memory_gb

    if not ckpt and fits(ckpt=True):
        out.append("model.gradient_checkpointing=true")
    for micro in range(t.micro_batch_size - 1, 0, -1):
        if fits(micro=micro, ckpt=True):
            out.append(f"train.micro_batch_size={micro} model.gradient_checkpointing=true")
            break
    if not off_ckpt and fits(ckpt=True, off_ckpt=True):
        out.append("model.gradient_checkpointing=true model.checkpoint_offload=true")
    if not off_opt and fits(micro=1, ckpt=True, off_opt=True):
        out.append(
            "train.micro_batch_size=1 model.gradient_checkpointing=true deepspeed.offload_optimizer=true"
        )
    elif not off_par and fits(micro=1, ckpt=True, off_opt=True, off_par=True):
        out.append("train.micro_batch_size=1 model.gradient_checkpointing=true deepspeed=zero3_offload")
    for nodes in range(hw.nodes + 1, hw.nodes * 64 + 1):
        if fits(gpus=nodes * hw.gpus_per_node, ckpt=True, micro=1):
            out.append(f"{nodes} nodes x {hw.gpus_per_node} GPUs with micro-batch 1 and checkpointing")
            break
    return out or ["nothing here fits: a shorter data.max_length, or a smaller model"]


def format_plan(p: dict[str, Any]) -> str:
    m, g, d = p["model"], p["per_gpu_gb"], p["data"]
    spe = p["steps_per_epoch"]
    lines = [
        f"world size {p['world_size']} = {p['nodes']} nodes x {p['gpus_per_node']} GPUs of {p['gpu_memory_gb']:.0f} GB",
        *([f"planned with {p['batch_adjusted']} (pass it to sft launch)"] if p["batch_adjusted"] else []),
        f"batch: {p['micro_batch_size']} micro x {p['gradient_accumulation']} accumulation x "
        f"{p['world_size'] // p['sequence_parallel_size']} data-parallel ranks"
        f" = {p['global_batch_size']} rows of {p['max_length']} tokens"
        + (
            f" (each row over {p['sequence_parallel_size']} sequence-parallel ranks)"
            if p["sequence_parallel_size"] > 1
            else ""
        ),
        f"tokens per optimizer step: {p['tokens_per_step']:.0f}; steps per epoch: "
        + (f"{spe}" if spe is not None else "unknown until the data is prepared (sft prepare)"),
        f"data: {d['source']}",
        f"model: {m['params'] / 1e9:.3f}B params ({m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']}), "
        f"largest module {m['largest_layer_params'] / 1e6:.1f}M; {p['precision']}, attention {p['attention']}",
        "deepspeed: " + json.dumps(p["deepspeed"], indent=2).replace("\n", "\n  "),
        "per GPU (GB):",
        f"  model states    {g['model_states']:8.2f}  (params {g['params']:.2f}, grads {g['grads']:.2f}, "
        f"optimizer {g['optimizer']:.2f}, gathered largest module {g['gathered_layer']:.2f})"
        + (f"; {g['cpu_offloaded']:.2f} offloaded to CPU" if g["cpu_offloaded"] else ""),
        f"  activations     {g['activations']:8.2f}  (checkpointing {'on' if p['gradient_checkpointing'] else 'off'}:"
        f" {g['activations_checkpointing']:.2f} with, {g['activations_no_checkpointing']:.2f} without,"
        f" {g['activations_checkpoint_offload']:.2f} with the layer inputs in host memory)"
        + (
            f"; checkpoint offload on: {g['checkpoint_offload_host']:.2f} of layer inputs in host memory"
            if g["checkpoint_offload_host"]
            else ""
        ),
        f"  logits + loss   {g['logits']:8.2f}  (tiled loss {'on' if p['tiled_loss'] else 'off'}; tiled MLP "
        f"{'on' if p['tiled_mlp'] else 'off'})",
        f"  reserve         {g['reserve']:8.2f}  (CUDA context, communication buffers, fragmentation)",
        f"  total           {g['total']:8.2f}  of {p['gpu_memory_gb']:.1f}: "
        + ("fits" if p["fits"] else "DOES NOT FIT"),
    ]
    if not p["fits"]:
        lines.append("would fit: " + "; ".join(p["would_fit"]))
    return "\n".join(lines)


def run_plan(cfg: Any, hw: Hardware, as_json: bool = False, check: bool = False) -> int:
    """`sft plan`: print the plan (`as_json`: one JSON object); `check`: exit 2 if it does not fit."""
    plan = make_plan(cfg, hw)
    print(json.dumps(plan) if as_json else format_plan(plan), flush=True)
    if check and not plan["fits"]:
        print(
            f"error: the plan does not fit: {plan['per_gpu_gb']['total']:.1f} GB per GPU needed, "
            f"{hw.gpu_memory_gb:.1f} GB available; would fit: {'; '.join(plan['would_fit'])}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_USER
    return EXIT_OK


def check_for_launch(cfg: Any, nproc: int) -> None:
    """`sft launch --check-plan`: refuse, with one line, a run that does not fit this machine's GPUs."""
    import torch

    if not torch.cuda.is_available():
        print("plan: no GPU here, nothing to check", flush=True)
        return
    memory = Hardware.local().gpu_memory_gb
    plan = make_plan(cfg, Hardware(1, nproc, memory))
    if not plan["fits"]:
        raise ValueError(
            f"the plan does not fit: {plan['per_gpu_gb']['total']:.1f} GB per GPU needed, {memory:.1f} GB "
            f"available (sft plan for the details); would fit: {'; '.join(plan['would_fit'])}"
        )
