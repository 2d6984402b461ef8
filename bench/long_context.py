#!/usr/bin/env python
"""Long-context memory benchmark: peak memory per rank of one training step, full vs tiled LM-head loss, S=1 vs
S=2 sequence parallelism, on 2 CPU ranks with a large-vocabulary model; and the longest row that trains within
a memory budget in each setting.

    python bench/long_context.py                                  # 2 CPU ranks, prints a table, writes JSON
    python bench/long_context.py --lengths 1024 2048 4096 8192 --budget-gib 2 --out bench/results/long_context_cpu.json

Every setting runs in its own `torchrun --nproc_per_node 2` (gloo, real DeepSpeed ZeRO-3, fp32): the model,
engine and loss `sft train` builds (`launcher.run.build_trainable` on a composed config), stepped by
`launcher.train.train_step`, one optimizer step per row length, lengths ascending, stopping after the first
length over the budget. One packed row per step (global batch 1 row per data-parallel rank), documents of about
length/4 tokens, every token trained (the worst case for the logits).

Memory, CPU: the process's peak resident set size during the step (`launcher.metrics.PeakMemory`, what training
logs as `peak_mem_gb`: `VmHWM`, reset through `/proc/self/clear_refs` just before the step), and `step_gib`, that
peak minus the resident size just before the step: what the step itself needed on top of weights, optimizer
state and the Python/torch runtime. Measured on the CPU, not on a GPU (none was lent to this task); the ratios carry over, the absolute figures do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name: (sequence_parallel_size, tiled loss, tiled MLP)
    "full_loss_s1": (1, False, False),
    "tiled_loss_s1": (1, True, False),
    "full_loss_s2": (2, False, False),
    "tiled_loss_s2": (2, True, False),
    "tiled_loss_mlp_s2": (2, True, True),
}
MODEL = dict(  # a Qwen2-like vocabulary on a small body: the logits dominate, as in 0.5B-1B models
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=65536,
    tie_word_embeddings=True,
)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from launcher import engine as ds_engine
    from launcher.config import compose
    from launcher.data import pack_examples
    from launcher.long_context.sequence_parallel import SequenceParallel
    from launcher.metrics import PeakMemory
    from launcher.run import build_trainable
    from launcher.train import train_step

    size, tiled, tiled_mlp = SETTINGS[args.setting]
    info = ds_engine.init_distributed(timeout_minutes=30)
    rank, world = info.rank, info.world_size
    sp = SequenceParallel(size, rank, world)
    # What `sft train` builds for this config (`launcher.run.build_trainable`): ZeRO-3, activation checkpointing,
    # sequence parallelism, the tiled loss and MLP as the run decides them.
    cfg = compose(
        [
            "model=tiny",
            "model.attention=sdpa",
            "model.dtype=fp32",
            "model.gradient_checkpointing=true",
            f"train.max_steps={len(args.lengths)}",
            f"train.global_batch_size={sp.dp_world}",
            "train.micro_batch_size=1",
            "train.lr=1e-4",
            "train.warmup_steps=0",
            "train.grad_clip=1.0",
            f"train.sequence_parallel_size={size}",
            f"train.tiled_loss={str(tiled).lower()}",
            f"train.tiled_mlp={str(tiled_mlp).lower()}",
        ]
    )
    OmegaConf.update(cfg, "model.init", {k: v for k, v in MODEL.items() if k != "vocab_size"}, merge=False)
    torch.manual_seed(0)
    trainable = build_trainable(cfg, info, MODEL["vocab_size"], sp, say=lambda _m: None)
    assert trainable.choice.tiled_loss == tiled, trainable.choice
    eng, loss_fn = trainable.engine, trainable.loss_fn
    g = torch.Generator().manual_seed(rank // size)
    mem = PeakMemory(info.device)  # the training loop's own measure (peak_mem_gb)
    assert mem.per_interval, "/proc/self/clear_refs cannot be written: no per-step peak"
    results = []
    for length in args.lengths:
        docs = []
        while sum(len(d["input_ids"]) for d in docs) < length:
            n = min(max(8, length // 4), length - sum(len(d["input_ids"]) for d in docs))
            ids = torch.randint(3, MODEL["vocab_size"], (n,), generator=g).tolist()
            docs.append({"input_ids": ids, "labels": [-100] + ids[1:]})
        rows = pack_examples(docs, max_length=length)
        assert len(rows) == 1, len(rows)
        mem.take()  # the step's interval starts here
        before = mem.now()
        t0 = time.time()
        out = train_step(eng, rows, 1, "sdpa", info.device, 0, world, loss_fn, sp)
        seconds = time.time() - t0
        peak = mem.take()
        stats = torch.tensor([peak, peak - before], dtype=torch.float64)
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats)
        peak_max = max(float(s[0]) for s in gathered)
        step_max = max(float(s[1]) for s in gathered)
        results.append(
            {
                "length": length,
                "peak_rss_gib": round(peak_max, 3),
                "step_gib": round(step_max, 3),
                "seconds": round(seconds, 2),
                "loss": out["loss"],
            }
        )
        if step_max > args.budget_gib:  # every rank saw the same numbers: all stop together
            break
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(results))
    dist.barrier()
    ds_engine.exit_now(0)


def run_setting(name: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    cmd += ["--worker", "--setting", name, "--worker-out", str(out), "--budget-gib", str(args.budget_gib)]
    cmd += ["--lengths", *map(str, args.lengths)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--budget-gib", type=float, default=2.0, help="per-rank step memory budget (step_gib)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import tempfile

    import torch

    report = {
        "machine": {
            "host": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "device": "CPU only (no GPU lent to this task)",
            "torch": torch.__version__,
        },
        "model": MODEL,
        "ranks": 2,
        "memory": "peak RSS per rank during one step (VmHWM reset before it); step_gib = peak - RSS before",
        "budget_gib": args.budget_gib,
        "settings": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            rows = run_setting(name, args, Path(tmp))
            fits = [r["length"] for r in rows if r["step_gib"] <= args.budget_gib]
            report["settings"][name] = {"steps": rows, "longest_within_budget": max(fits) if fits else None}
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def table(report: dict) -> str:
    lengths = sorted({r["length"] for s in report["settings"].values() for r in s["steps"]})
    head = (
        "| setting | "
        + " | ".join(f"{n} tok: step GiB (peak)" for n in lengths)
        + " | longest within budget |"
    )
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for name, s in report["settings"].items():
        by = {r["length"]: r for r in s["steps"]}
        cells = [
            f"{by[n]['step_gib']:.2f} ({by[n]['peak_rss_gib']:.2f})" if n in by else "-" for n in lengths
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['longest_within_budget']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
