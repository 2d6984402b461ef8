"""Full-parameter SFT under DeepSpeed: `train(cfg)` is the whole run, top to bottom (setup, loop, finish).

    sft launch                                 # torchrun on every local GPU (or 2 CPU ranks)
    torchrun --nproc_per_node 8 -m launcher.cli train model=... data=...
    python -c "from launcher.config import compose; from launcher.train import train; train(compose())"

Loss normalisation: every micro-batch's loss is the *sum* of its token losses divided by the number of
target tokens in the whole optimizer step, all-reduced over ranks, so each token weighs the same whatever the
packing, micro-batch size, accumulation or world size.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from launcher import engine as ds_engine
from launcher.data.loader import collate
from launcher.evaluate import check_packing, exact_match
from launcher.export import export_hf, verify_export
from launcher.long_context.sequence_parallel import SequenceParallel
from launcher.loss import count_targets, target_token_loss
from launcher.metrics import peak_flops, step_flops
from launcher.model.families import model_type, registered_family
from launcher.run import Run, build_run
from launcher.stop import Preempted

# An eval loss this much above its step-0 value is reported as a likely misconfiguration (most often an lr meant
# for random-init weights applied to pretrained ones).
EVAL_RISE_WARNING = 1.10


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
    `loss_fn(engine, batch)` returns (summed loss, target count): `target_token_loss` or its tiled variant; for
    an MoE model also the router's auxiliary term (`launcher.model.moe.RouterAux.wrap`), normalised by the step's
    real tokens and returned apart as `aux_loss`.
    With sequence parallelism the S ranks of a group hold the same rows and each computes its slice of them."""
    sp = sp or SequenceParallel(1, 0, world)
    n_local = count_targets(my_rows)
    counts = torch.tensor(
        [n_local, sum(len(r["input_ids"]) for r in my_rows)], dtype=torch.float64, device=device
    )
    dist.all_reduce(counts)
    counts /= sp.size  # each row was counted by every rank of its group
    n_global, n_tokens = counts[:1], counts[1:]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, router auxiliary sum]
    counted = torch.zeros((), dtype=torch.long, device=device)
    has_aux = False
    for i in range(0, len(my_rows), micro):
        with sp.shard(collate(my_rows[i : i + micro], attention, pad_id, device, token_mask=True)) as b:
            loss_sum, n_targets, *aux = loss_fn(eng, b)
            counted += n_targets
            # DeepSpeed averages gradients over ranks; x world turns that average into the global token sum
            # (with SP too: every rank's gradient is its own tokens' part of the sum).
            loss = loss_sum * world / n_global.clamp(min=1).float()
            if aux:  # token-weighted over the step's real tokens, like the main loss over its targets
                loss = loss + aux[0].coef * aux[0].sum * world / n_tokens.clamp(min=1).float()
                totals[1] += aux[0].sum.detach().double()
                has_aux = True
            ds_engine.backward(eng, loss)
        eng.step()
        totals[0] += loss_sum.detach().double()
    if sp.size > 1:
        dist.all_reduce(counted, group=sp.group)  # the group's slices together hold the rows' targets
    # The normaliser counted what the loss summed. Padding-free batches lay rows end to end, so this also holds
    # the packer to its invariant: every row's first label is -100 (no row is a target of the row before it).
    assert int(counted) == n_local, (int(counted), n_local)
    dist.all_reduce(totals)
    out = {
        "loss": (totals[0] / n_global.clamp(min=1)).item(),
        "trained_tokens": int(counts[0].item()),
        "tokens": int(counts[1].item()),
    }
    if has_aux:
        out["aux_loss"] = (totals[1] / n_tokens.clamp(min=1)).item()
    return out


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run SFT as configured; returns the final metrics (rank 0 also prints them)."""
    run = build_run(cfg)
    t, state = cfg.train, run.state
    results = before_training(run)
    start_step, steps = state.step, run.sampler.steps_from(state.step)
    step_peak = 0.0
    while state.step < t.max_steps:
        rows = [run.data.train_rows[i] for i in next(steps)]
        run.memory.take()  # what ran since the last step (a save, the stop check) is no step's peak
        began = time.time()
        out = train_step(
            run.engine,
            rows,
            t.micro_batch_size,
            run.attention,
            run.device,
            run.pad_id,
            run.world,
            run.train_loss_fn,
            run.sp,
        )
        step_peak = max(step_peak, run.memory.take())  # until the next log
        state.advance(out)
        step = state.step
        if step % t.log_every == 0 or step == t.max_steps:
            log_step(run, out, rows, time.time() - began, step_peak)
            step_peak = 0.0
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps and run.data.eval_rows:
            evaluation = run.evaluate()
            evaluation["peak_mem_gb_eval"] = most_over_ranks(run.memory.take(), run.device)
            run.logger.log(evaluation, step)
            run.say(f"step {step}: eval_loss {evaluation['eval_loss']:.4f} (train loss {out['loss']:.4f})")
            warn_if_eval_rises(run, results, evaluation["eval_loss"], step)
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            run.save()
        if state.step < t.max_steps and (signame := run.stop.agreed(run.device)):  # one all-reduce
            run.say(f"{signame}: every rank stops after step {step} with a checkpoint")
            if not (t.save_every and step % t.save_every == 0):  # unless saved just above
                run.save()
            run.logger.close()
            raise Preempted(step, signame)
    return finish(run, results, start_step)


def before_training(run: Run) -> dict[str, Any]:
    """Where the run starts, the packing self-check, and the eval loss and accuracy before any step."""
    t, results = run.cfg.train, {"run_dir": str(run.run_dir)}
    if run.state.step:
        run.say(f"resumed at step {run.state.step} ({run.state.tokens_seen} tokens seen)")
        run.logger.log({"resumed_at": run.state.step}, run.state.step)
    else:
        run.say("starting at step 0")
    setup_peak = run.memory.take()
    # A model type not in the families table (or code shipped with the checkpoint) trains packed only when the
    # self-check proves packing exact on it, whatever train.check_packing says.
    unproven = (
        run.cfg.data.pack and registered_family(run.model.config, run.cfg.model.trust_remote_code) is None
    )
    if unproven and not t.check_packing:
        run.say(
            f"model type {model_type(run.model.config)!r} is not in `sft models`: the packing self-check runs"
        )
    if t.check_packing or unproven:
        rows = run.data.train_rows
        check = check_packing(
            run.engine.module,
            rows,
            run.attention,
            run.device,
            run.precision.tol,
            run.sp,
            skippable=not unproven,
        )
        check["peak_mem_gb_packing_check"] = most_over_ranks(run.memory.take(), run.device)
        results.update(check)
        run.say(f"packing self-check: {check}")
    if run.data.eval_rows and not run.state.step:
        results.update({f"{k}_before": v for k, v in run.evaluate().items()})
        run.logger.log({"eval_loss": results["eval_loss_before"], "eval_ppl": results["eval_ppl_before"]}, 0)
        run.say(f"step 0: eval_loss {results['eval_loss_before']:.4f}")
    if t.exact_match_eval and not run.state.step:
        results["accuracy_before"] = accuracy(run)
        run.say(f"held-out exact match before training: {results['accuracy_before']:.3f}")
    log_start_up_peaks(run, results, setup_peak)
    return results


def log_start_up_peaks(run: Run, results: dict[str, Any], setup_peak: float) -> None:
    """Start-up's peak memory, logged once under its own names (the steps' intervals begin after it):
    `peak_mem_gb_setup` (model, engine, resume, evaluation before training) and the self-check's."""
    peaks = {"peak_mem_gb_setup": most_over_ranks(max(setup_peak, run.memory.take()), run.device)}
    peaks.update({k: v for k, v in results.items() if k == "peak_mem_gb_packing_check"})
    if not run.memory.per_interval:  # /proc/self/clear_refs not writable: peaks since the process started
        peaks = {f"{k}_since_start": v for k, v in peaks.items()}
        results.pop("peak_mem_gb_packing_check", None)
    run.logger.log(peaks, run.state.step)
    results.update(peaks)


def most_over_ranks(value: float, device: torch.device) -> float:
    """The largest of every rank's value (a memory peak: what the fullest rank needed; collective)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def log_step(run: Run, out: dict[str, float], rows: list[dict], seconds: float, step_peak: float) -> None:
    """The step's metrics to metrics.jsonl, wandb and the progress bar (collective: the FLOPs are summed, the
    peak memory of the steps since the last log is the largest over ranks)."""
    flops = torch.tensor(
        [step_flops(run.model.config, run.n_params, rows)], device=run.device, dtype=torch.float64
    )
    dist.all_reduce(flops)
    flops /= run.sp.size  # the ranks of a sequence-parallel group hold the same rows
    step = run.state.step
    metrics = {
        "loss": out["loss"],
        **(
            {"aux_loss": out["aux_loss"]} if "aux_loss" in out else {}
        ),  # an MoE router's, apart from the loss
        "lr": run.engine.lr_scheduler.get_last_lr()[0],
        "grad_norm": float(run.engine.get_global_grad_norm() or 0.0),
        "tokens_per_s": out["tokens"] / seconds,
        "trained_tokens": out["trained_tokens"],
        "tokens_seen": run.state.tokens_seen,
        "epoch": step // run.sampler.steps_per_epoch,
    }
    key = "peak_mem_gb" if run.memory.per_interval else "peak_mem_gb_since_start"
    metrics[key] = most_over_ranks(step_peak, run.device)
    if run.offload is not None:  # host memory the layer inputs took at most, since the last log
        metrics.update(run.offload.metrics())
    if peak := peak_flops(run.device):
        metrics["mfu"] = flops.item() / seconds / (peak * run.world)
    run.logger.log(metrics, step)
    run.logger.progress(step, {"loss": f"{out['loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"})


def warn_if_eval_rises(run: Run, results: dict[str, Any], eval_loss: float, step: int) -> None:
    """Say once, on the console, when the eval loss has risen well above its step-0 value."""
    before = results.get("eval_loss_before")
    if before is None or eval_loss <= before * EVAL_RISE_WARNING or results.get("eval_rise_warned"):
        return
    results["eval_rise_warned"] = True
    t = run.cfg.train
    run.say(
        f"warning: eval loss rose from {before:.4f} at step 0 to {eval_loss:.4f} at step {step}: the likely cause "
        f"is a learning rate too high for these weights (train.lr={t.lr}; pretrained models fine-tune at about "
        "1e-5, train=default)"
    )


def accuracy(run: Run) -> float:
    t = run.cfg.train
    examples = run.data.eval_conversations[: t.exact_match_max_examples]
    return exact_match(run.engine.module, run.tok, examples, t.max_new_tokens, run.device)


def finish(run: Run, results: dict[str, Any], start_step: int) -> dict[str, Any]:
    """The final eval, checkpoint, export (checked against the engine's logits), accuracy and results.json."""
    t, state = run.cfg.train, run.state
    if start_step >= t.max_steps:
        run.say(f"the run had already finished (step {start_step} of {t.max_steps}): nothing to train")
    results.update(first_loss=state.first_loss, final_loss=state.last_loss, steps=state.step)
    results.update(tokens_seen=state.tokens_seen, balance=run.sampler.balance)
    if run.data.eval_rows:
        results.update(run.evaluate())
        run.logger.log({k: results[k] for k in ("eval_loss", "eval_ppl")}, state.step)
        warn_if_eval_rises(run, results, results["eval_loss"], state.step)
    if t.save_final_checkpoint and state.step > start_step:
        run.save()
    if t.export:
        export_hf(run.engine, run.tok, run.run_dir / "export")
        if t.verify_export:
            row = (run.data.eval_rows or run.data.train_rows)[0]
            export_dir = run.run_dir / "export"
            results.update(
                verify_export(
                    run.engine,
                    export_dir,
                    row,
                    run.attention,
                    run.precision.tol,
                    run.cfg.model.trust_remote_code,
                )
            )
            run.say(f"export check: {export_dir} reloads with the engine's hidden states and logits")
    if t.exact_match_eval:
        results["accuracy_after"] = accuracy(run)
    results.pop("eval_rise_warned", None)
    results["wall_s"] = time.time() - run.started
    run.logger.summary({k: v for k, v in results.items() if isinstance(v, (int, float))})
    run.logger.close()
    if run.rank == 0:
        (run.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        run.say(summary_line(results))
        if t.exact_match_eval:
            run.say(accuracy_line(results))
        run.say(f"run_dir: {run.run_dir}")
    dist.barrier()
    return results


def accuracy_line(results: dict[str, Any]) -> str:
    """`accuracy: before=A after=B`, held-out exact match (before is not measured when resuming: nan)."""
    before = results.get("accuracy_before", float("nan"))
    return f"accuracy: before={before:.3f} after={results['accuracy_after']:.3f}"


def summary_line(results: dict[str, Any]) -> str:
    """`final: loss A -> B, eval_loss C -> D` with what was measured (a resumed run keeps its first loss)."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    line = f"final: loss {fmt(results['first_loss'])} -> {fmt(results['final_loss'])}"
    if "eval_loss" in results:
        before = f"{fmt(results['eval_loss_before'])} -> " if "eval_loss_before" in results else ""
        line += f", eval_loss {before}{fmt(results['eval_loss'])}"
    return line
