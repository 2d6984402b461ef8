"""Checkpoints you can trust: DeepSpeed's shards, every rank's RNG state, and a manifest written last.

    state = resume(eng, cfg, run_dir, sampler_info, say)     # collective: TrainState to continue from
    save(eng, run_dir / "checkpoints", state, cfg, sampler_info, say)    # collective

On disk: `<run_dir>/checkpoints/step<N>/` holds the DeepSpeed shards (one per rank), `rng_rank<r>.pt` (Python,
NumPy, torch and CUDA generators of rank r, so dropout continues exactly) and `manifest.json` (step, tokens seen,
the losses so far, the config that decides the run and its hash, every file with its size). `latest` names the
newest step for DeepSpeed's own tools (`zero_to_fp32.py`).

A checkpoint counts only when its manifest is there and every file it lists has the listed size: the manifest is
written after every rank's files are on disk, so a save that was killed, truncated or ran out of space never
counts. `resume=auto` takes the newest complete one and names every newer one it skipped and why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from launcher import engine as ds_engine
from launcher.model import param_shape

MANIFEST = "manifest.json"

# What decides the trained weights: a resume with any of these changed would not continue the same run.
EXACTNESS_KEYS = (
    "data",
    "model.name_or_path",
    "model.init",
    "model.tokenizer",
    "model.chat_template",
    "model.dtype",
    "train.global_batch_size",
    "train.seed",
    "train.lr",
    "train.min_lr_ratio",
    "train.warmup_steps",
    "train.warmup_ratio",
    "train.schedule",
    "train.weight_decay",
    "train.adam_beta1",
    "train.adam_beta2",
    "train.adam_eps",
    "train.grad_clip",
)


@dataclass
class TrainState:
    """Where a run stands; saved in each checkpoint's manifest."""

    step: int = 0
    tokens_seen: int = 0  # input tokens over all ranks
    trained_tokens: int = 0  # target tokens over all ranks
    first_loss: float | None = None
    last_loss: float | None = None

    def advance(self, out: dict[str, float]) -> None:
        self.step += 1
        self.tokens_seen += int(out["tokens"])
        self.trained_tokens += int(out["trained_tokens"])
        self.first_loss = out["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = out["loss"]


def exactness_config(cfg: DictConfig) -> dict[str, Any]:
    """The config keys that decide the run, flattened (`data.sources.0.path`); max_steps too for a decaying
    schedule, whose shape depends on it."""
    full = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    full["data"].pop("num_proc", None)  # how many processes prepare the data does not change it
    keys = EXACTNESS_KEYS + (("train.max_steps",) if cfg.train.schedule.value != "constant" else ())
    out: dict[str, Any] = {}
    for key in keys:
        value: Any = full
        for part in key.split("."):
            value = value[part]
        _flatten(key, value, out)
    return out


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = value


def config_hash(exact: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(exact, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- RNG ----


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- what is on disk ----


def step_of(path: Path) -> int:
    return int(path.name[4:]) if path.name.startswith("step") and path.name[4:].isdigit() else -1


def step_dirs(root: Path) -> list[Path]:
    """Checkpoint dirs under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of)


def problem(tag_dir: Path) -> str | None:
    """Why this checkpoint cannot be trusted, or None when its manifest matches the disk."""
    path = tag_dir / MANIFEST
    if not path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"manifest.json is unreadable ({e})"
    for name, size in sorted(files.items()):
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, the manifest says {size}"
    return None


def newest_complete(root: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest trustworthy checkpoint under `root` or `root` itself, [(skipped dir, why)] newest first)."""
    candidates = [root] if (root / MANIFEST).exists() or step_of(root) >= 0 else step_dirs(root)[::-1]
    skipped = []
    for tag_dir in candidates:
        why = problem(tag_dir)
        if why is None:
            return tag_dir, skipped
        skipped.append((str(tag_dir), why))
    return None, skipped


def _manifest_files(tag_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- save ----


def estimated_size(engine: Any, root: Path) -> int:
    """Bytes the next checkpoint will take: the last complete one's, or from the parameter count (fp32 master
    weights and two Adam moments, plus the model's own copy) before the first."""
    last, _ = newest_complete(root)
    if last is not None:
        return sum(json.loads((last / MANIFEST).read_text())["files"].values())
    numel = sum(int(np.prod(param_shape(p))) for p in engine.module.parameters())
    weight_bytes = next(engine.module.parameters()).element_size()
    return numel * (12 + weight_bytes)


def ensure_space(engine: Any, root: Path, tag: str) -> None:
    """Refuse, on every rank at once, to start a checkpoint the file system cannot hold (a half-written save
    could otherwise be taken for the newest one)."""
    root.mkdir(parents=True, exist_ok=True)
    need = estimated_size(engine, root)
    free = shutil.disk_usage(root).free
    short = torch.tensor([1.0 if free < need * 1.05 else 0.0], device=_device(engine))
    dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item():
        last, _ = newest_complete(root)
        raise ValueError(
            f"no space left on device for checkpoint {root / tag}: it needs about {need / 2**20:.1f} MiB and "
            f"{free / 2**20:.1f} MiB are free here (or on another rank's disk); nothing was written, the newest "
            f"complete checkpoint is still {last.name if last else 'none'}"
        )


def _device(engine: Any) -> torch.device:
    return next(engine.module.parameters()).device


def save(
    engine: Any,
    root: Path,
    state: TrainState,
    cfg: DictConfig,
    sampler_info: dict[str, Any],
    say: Callable[[str], None],
) -> Path:
    """Save every rank's shards and RNG state, then the manifest, `latest`, and the rotation (collective)."""
    tag = f"step{state.step}"
    ensure_space(engine, root, tag)
    tag_dir = root / tag
    try:
        ds_engine.save_checkpoint(engine, root, tag)
        torch.save(rng_state(), tag_dir / f"rng_rank{dist.get_rank()}.pt")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ValueError(
                f"no space left on device writing checkpoint {tag_dir}: the save is incomplete and will not be "
                "resumed from; free space or point run_dir elsewhere"
            ) from None
        raise
    dist.barrier()
    if dist.get_rank() == 0:
        exact = exactness_config(cfg)
        manifest = {
            **asdict(state),
            "world_size": dist.get_world_size(),
            "sampler": sampler_info,
            "config_hash": config_hash(exact),
            "config": exact,
            "files": _manifest_files(tag_dir),
        }
        _write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1, default=str))  # last: it vouches
        _write_atomic(root / "latest", tag)
        for old in rotate(root, cfg.train.keep_last):
            say(f"removed old checkpoint {old.name} (train.keep_last={cfg.train.keep_last})")
    dist.barrier()
    return tag_dir


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete checkpoints older than the `keep_last` newest complete ones (0 keeps all); returns the removed."""
    if keep_last <= 0:
        return []
    complete = [d for d in step_dirs(root) if problem(d) is None]
    if not complete:
        return []
    oldest_kept = step_of(complete[-keep_last:][0])
    removed = [d for d in step_dirs(root) if step_of(d) < oldest_kept]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


# ---- resume ----


def resume(
    engine: Any, cfg: DictConfig, run_dir: Path, sampler_info: dict[str, Any], say: Callable[[str], None]
) -> TrainState:
    """Load the checkpoint `train.resume` names (`auto`: the newest complete one in the run dir) and return the
    state to continue from; a fresh TrainState when there is nothing to resume (collective)."""
    setting = cfg.train.resume
    if not setting:
        return TrainState()
    root = run_dir / "checkpoints" if setting == "auto" else Path(setting).expanduser()
    picked: list[Any] = [None, None, []]
    if dist.get_rank() == 0:  # one view of the file system for every rank
        tag_dir, skipped = newest_complete(root)
        manifest = json.loads((tag_dir / MANIFEST).read_text()) if tag_dir else None
        picked = [str(tag_dir) if tag_dir else None, manifest, skipped]
    dist.broadcast_object_list(picked, src=0)
    tag_dir_s, manifest, skipped = picked
    for where, why in skipped:
        say(f"skipping checkpoint {where}: {why}")
    if tag_dir_s is None:
        if setting == "auto":
            say(f"train.resume=auto: no complete checkpoint in {root}, starting at step 0")
            return TrainState()
        raise ValueError(
            f"train.resume={setting}: no complete checkpoint there"
            + (
                f" ({len(skipped)} skipped, see above)"
                if skipped
                else " (no step<N> dir with a manifest.json)"
            )
        )
    tag_dir = Path(tag_dir_s)
    for note in check_compatible(manifest, cfg, tag_dir, sampler_info, dist.get_world_size()):
        say(note)
    ds_engine.load_checkpoint(engine, tag_dir.parent, tag_dir.name)
    set_rng_state(torch.load(tag_dir / f"rng_rank{dist.get_rank()}.pt", weights_only=False))
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in manifest.items() if k in fields})


def preflight(cfg: DictConfig, world: int) -> None:
    """Before any rank starts: refuse a resume the ranks would refuse (an explicit checkpoint that is not
    there or not complete, ranks or config that differ from the checkpoint's)."""
    setting = cfg.train.resume
    if not setting:
        return
    root = Path(cfg.run_dir) / "checkpoints" if setting == "auto" else Path(setting).expanduser()
    tag_dir, skipped = newest_complete(root)
    if tag_dir is None:
        if setting != "auto":
            if skipped:
                why = f"; {skipped[0][0]}: {skipped[0][1]}"
            elif not root.is_dir():
                why = f" (no such directory {root.resolve()})"
            else:
                why = f" ({root.resolve()} has no step<N> dir with a manifest.json)"
            raise ValueError(f"train.resume={setting}: no complete checkpoint there{why}")
        return
    check_compatible(json.loads((tag_dir / MANIFEST).read_text()), cfg, tag_dir, None, world)


# Where the run's inputs live rather than what they are: a run moved to another machine, container or clone
# resumes when the prepared data is the same (its content digest, compared by the ranks once it is loaded).
PATH_KEYS = re.compile(r"^(data\.(sources|eval_sources)\.\d+\.path|model\.name_or_path|model\.tokenizer)$")


def check_compatible(
    manifest: dict, cfg: DictConfig, tag_dir: Path, sampler_info: dict[str, Any] | None, world: int
) -> list[str]:
    """Refuse a resume that cannot continue the same run, naming what differs (the prepared data when
    `sampler_info` is given: the ranks, once it is loaded). Returns notes for what was accepted (moved paths)."""
    if manifest["world_size"] != world:
        raise ValueError(
            f"checkpoint {tag_dir} was saved by {manifest['world_size']} ranks and this run has {world}: ZeRO "
            f"shards belong to their ranks, resume with {manifest['world_size']} ranks"
        )
    if cfg.train.allow_config_change:
        return []
    now = exactness_config(cfg)
    then = manifest["config"]
    changed = sorted(k for k in set(now) | set(then) if now.get(k, "<unset>") != then.get(k, "<unset>"))

    def listed(keys: list[str]) -> str:
        shown = ", ".join(f"{k} ({then.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r})" for k in keys[:6])
        return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    moved = [k for k in changed if PATH_KEYS.match(k)]
    if len(moved) < len(changed):
        raise ValueError(
            f"train.resume: the config differs from checkpoint {tag_dir}'s in {listed(changed)}; resuming would "
            "not continue the same run: start a new run_dir, or set train.allow_config_change=true to resume anyway"
        )
    if sampler_info is None:  # before the ranks: moved paths wait for the prepared data's digest
        return []
    was = manifest["sampler"]
    differs = [k for k in sampler_info if k in was and was[k] != sampler_info[k]]
    if moved and "data" not in was:
        differs.append("data")  # a checkpoint from before content digests: nothing proves the data the same
    if differs:
        what = f"{listed(moved)} moved and " if moved else ""
        raise ValueError(
            f"train.resume: {what}the prepared data differs from checkpoint {tag_dir}'s ("
            + ", ".join(f"{k} {was.get(k, '<not recorded>')} then, {sampler_info[k]} now" for k in differs)
            + "; did the data files change?): start a new run_dir, or set train.allow_config_change=true to "
            "resume anyway"
        )
    return [f"resuming with moved paths, the same prepared data: {listed(moved)}"] if moved else []
