"""The bodies of the `sft` commands; each takes its parsed arguments (`args.overrides`: Hydra's) and returns an
exit code. Their names, options and help are in `launcher.launch.cli.COMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.config_errors import compose_config
from launcher.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from launcher.launch import preflight
from launcher.stop import Preempted


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def train(args: argparse.Namespace) -> int:
    cfg = compose_config(args.overrides)
    preflight.check(cfg, _world_size(), _device_type())
    from launcher.train import train as run_training

    try:
        run_training(cfg)  # ends with a barrier: every rank has finished writing
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped after the same step: one says it
            print(f"rank 0: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return EXIT_OK


def launch(args: argparse.Namespace) -> int:
    import torch

    from launcher.launch.supervise import run_ranks

    cfg = compose_config(args.overrides)  # fail here, before starting processes, on a bad config
    nproc = args.nproc or torch.cuda.device_count() or 2
    preflight.check(cfg, nproc, _device_type())
    if args.check_plan:
        from launcher.launch.plan import check_for_launch

        check_for_launch(cfg, nproc)  # refuse, before any rank starts, a run that does not fit the GPUs
    run_dir = Path(cfg.run_dir).resolve()
    # One run dir for all ranks, fixed before they start.
    overrides = [a for a in args.overrides if not a.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    _prepared(cfg)  # bad data rows fail here, once; the ranks then read the cache
    return run_ranks(overrides, nproc, run_dir)


def _prepared(cfg):
    from launcher.data.pipeline import cached_prepare
    from launcher.model import load_tokenizer

    return cached_prepare(
        cfg.data,
        load_tokenizer(cfg.model),
        cfg.model.chat_template,
        cfg.cache_dir,
        build=True,
        progress=cfg.logging.progress,
    )


def prepare(args: argparse.Namespace) -> int:
    from launcher.data.command import prepare as run_prepare

    cfg = compose_config(args.overrides)
    preflight.check_inputs(cfg)
    return run_prepare(cfg, args.shard)


def render_trained(tok, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded example with trained spans in colour (TTY) or [[double brackets]]."""
    open_, close = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    out, span, trained = [], [], False
    for tid, lab in zip(input_ids, labels):
        if (lab != -100) != trained:
            out.append(tok.decode(span))
            out.append(open_ if not trained else close)
            span, trained = [], not trained
        span.append(tid)
    out.append(tok.decode(span) + (close if trained else ""))
    return "".join(out)


def preview(args: argparse.Namespace) -> int:
    from launcher.data.packing import doc_lengths
    from launcher.data.pipeline import format_report, prepare_data
    from launcher.model import load_tokenizer

    cfg = compose_config(args.overrides)
    preflight.check_inputs(cfg)
    tok = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg.data, tok, cfg.model.chat_template)
    # Documents exactly as the trainer sees them inside packed rows (first token of each never trained).
    shown = 0
    for row in prepared.train_rows:
        start = 0
        for length in doc_lengths(row["position_ids"]):
            if shown == args.n:
                break
            ids, labels = row["input_ids"][start : start + length], row["labels"][start : start + length]
            print(f"---- example {shown} ({length} tokens, {sum(x != -100 for x in labels)} trained)")
            print(render_trained(tok, ids, labels, sys.stdout.isatty()))
            start += length
            shown += 1
    print(format_report(prepared.report))
    return EXIT_OK


def check(args: argparse.Namespace) -> int:
    """Packed vs per-document outputs (final hidden states, logits at sampled positions) of the model exactly as
    training builds it (`launcher.run`), in this process, on this machine's device."""
    import torch

    from launcher.data.pipeline import prepare_data
    from launcher.evaluate import check_packing
    from launcher.long_context.sequence_parallel import SequenceParallel
    from launcher.model import load_tokenizer, model_config
    from launcher.run import build_training_model, decide

    cfg = compose_config(args.overrides)
    preflight.check_inputs(cfg)
    device = torch.device(_device_type())
    tok = load_tokenizer(cfg.model)
    rows = prepare_data(cfg.data, tok, cfg.model.chat_template).train_rows[:64]
    choice = decide(
        cfg, device, model_config(cfg.model, len(tok)), training=False
    )  # as the preflight decides
    model, _ = build_training_model(cfg, choice, len(tok), SequenceParallel(1, 0, 1), device)
    model.to(device)
    tol = choice.precision.tol
    try:
        result = check_packing(model, rows, choice.attention, device, tol)
    except ValueError as e:  # documents leak into each other: the check's own verdict, not a usage error
        print(f"FAIL: {e}")
        return 1
    print({"attention": choice.attention, **result})
    if "packing_check_rel" not in result:
        print(f"PASS (vacuous): {result['packing_check']}")
    else:
        print(
            f"PASS: packed outputs equal per-document outputs for attention={choice.attention} "
            f"(relative difference {result['packing_check_rel']:.2g} <= {tol})"
        )
    return EXIT_OK


def plan(args: argparse.Namespace) -> int:
    from launcher.launch.plan import Hardware, run_plan

    local = Hardware.local()
    hw = Hardware(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node or local.gpus_per_node,
        gpu_memory_gb=args.gpu_memory_gb or local.gpu_memory_gb,
    )
    return run_plan(compose_config(args.overrides), hw, as_json=args.json, check=args.check)


def models(args: argparse.Namespace) -> int:
    from launcher.model.families import format_table

    if args.overrides:
        raise UserError(f"sft models takes no overrides (got {' '.join(args.overrides)})")
    print(format_table())
    return EXIT_OK


def config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(compose_config(args.overrides)))
    return EXIT_OK
