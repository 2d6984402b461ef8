"""Everything a run needs, checked before any rank starts: one clear line naming what and where.

    cfg = compose_config(overrides)      # launcher.config_errors: Hydra's detail + "did you mean"
    check(cfg, world_size, "cpu")        # config values, model/tokenizer, data files, DeepSpeed JSON,
                                         # resume dir, run dir writable, dtype vs device

`sft launch` runs both in the launcher; `sft train` (under torchrun, srun or alone) runs them on every rank,
where they are cheap (file checks and hub-cache lookups only, no network when HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from launcher.errors import UserError

# ---- paths and files ----


def _looks_like_path(value: str) -> bool:
    """A local path rather than a hub id `org/name`: absolute, relative with ./ ../ ~, or more than one slash."""
    return value.startswith(("/", "./", "../", "~", ".")) or value.count("/") > 1 or value.endswith("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_cached(repo: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = f"{repo_type}s--{repo.replace('/', '--')}"
    return (Path(constants.HF_HUB_CACHE) / folder / "snapshots").is_dir()


def _hub_exists(repo: str, repo_type: str) -> str | None:
    """None if the hub has the repo, else why not (not found, unreachable). One short request, 10 s timeout."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo, repo_type=repo_type, timeout=10)
    except GatedRepoError:
        return None  # exists; the download will say what access is missing
    except RepositoryNotFoundError:
        return "not found on the hub"
    except Exception as e:  # network down, DNS, proxy: say so rather than retry for a minute
        return f"the hub is unreachable ({type(e).__name__})"
    return None


def check_pretrained(key: str, value: str, needs: tuple[str, ...], repo_type: str = "model") -> None:
    """A local dir with the files `needs` (any of them), or a hub id that exists (or is cached when offline)."""
    path = Path(value).expanduser()
    if path.is_file():
        raise UserError(
            f"{key}={value}: is a file; expected a directory (with {' or '.join(needs)}) or a hub id"
        )
    if path.is_dir():
        if needs and not any((path / n).exists() for n in needs):
            raise UserError(f"{key}={value}: directory {path.resolve()} has no {' or '.join(needs)}")
        return
    local = f"no local directory {path.resolve()}"
    if _looks_like_path(value) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
        raise UserError(f"{key}={value}: {local} (and not a hub id 'org/name')")
    if _hub_cached(value, repo_type):
        return
    if _offline():
        raise UserError(
            f"{key}={value}: {local}, and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy"
        )
    why = _hub_exists(value, repo_type)
    if why:
        raise UserError(f"{key}={value}: {local}, and {why}")


MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def check_model(m: Any) -> None:
    if m.name_or_path:
        check_pretrained("model.name_or_path", str(m.name_or_path), MODEL_FILES)
        path = Path(str(m.name_or_path)).expanduser()
        if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(
                f"model.name_or_path={m.name_or_path}: {path.resolve()} has no weights (*.safetensors, *.bin)"
            )
    tok = m.tokenizer or m.name_or_path
    if m.tokenizer:
        check_pretrained("model.tokenizer", str(tok), TOKENIZER_FILES)
    elif tok and Path(str(tok)).expanduser().is_dir():
        check_pretrained("model.name_or_path (as tokenizer)", str(tok), TOKENIZER_FILES)


def check_sources(d: Any) -> None:
    for kind in ("sources", "eval_sources"):
        for i, s in enumerate(d[kind]):
            key, value = f"data.{kind}[{i}].path", str(s.path)
            path = Path(value).expanduser()
            if path.exists():
                if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
                    raise UserError(
                        f"{key}={value}: unsupported file type {path.suffix!r} (json, jsonl, csv, parquet)"
                    )
                continue
            if path.suffix.lower() in DATA_SUFFIXES or _looks_like_path(value) or "/" not in value:
                raise UserError(f"{key}={value}: no such file or directory ({path.resolve()})")
            check_pretrained(key, value, (), repo_type="dataset")


def _probe_writable(key: str, value: str) -> None:
    """The dir exists and is writable, or can be created: tried for real (root ignores permission bits)."""
    path = Path(value).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={value}: {path} exists and is not a directory")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{key}={value}: cannot create it, {base} is a file")
    try:
        probe = tempfile.mkdtemp(prefix=".sft-probe-", dir=base)
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"{key}={value}: cannot write in {base} ({e.strerror})") from None


def check_deepspeed(ds: Any) -> None:
    if not ds.config_file:
        return
    path = Path(str(ds.config_file)).expanduser()
    key = f"deepspeed.config_file={ds.config_file}"
    if not path.is_file():
        raise UserError(f"{key}: no such file ({path.resolve()})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{key}: {path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{key}: {path}: not UTF-8 (byte offset {e.start})") from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: {path}: expected a JSON object, got {type(data).__name__}")


def check_resume(cfg: DictConfig, world_size: int) -> None:
    """A resume the ranks would refuse (no complete checkpoint, other ranks, a changed config), refused here."""
    from launcher.checkpoint import preflight

    try:
        preflight(cfg, world_size)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_device(m: Any, device_type: str) -> None:
    from launcher.precision import resolve_precision

    try:
        resolve_precision(m.dtype.value, device_type)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_model_config(cfg: DictConfig, device_type: str) -> None:
    """The model's config builds (random init) or reads (local dir), and what the run decides for it on this
    device (precision, attention backend, tiled loss; `launcher.run.decide`) can run; its heads split over the
    sequence-parallel group."""
    import torch

    from launcher.model import model_config
    from launcher.run import decide

    m, sp = cfg.model, cfg.train.sequence_parallel_size
    if m.name_or_path is not None and not Path(str(m.name_or_path)).expanduser().is_dir():
        return  # a hub id: its config comes with the download
    try:
        config = model_config(m)
    except Exception as e:  # transformers' and huggingface_hub's config validation errors share no base class
        from launcher.launch.rankerrors import one_line

        key = "model.init" if m.name_or_path is None else f"model.name_or_path={m.name_or_path}"
        raise UserError(f"{key}: {one_line(e)}") from None
    try:
        decide(cfg, torch.device(device_type), config)
        if sp > 1:
            from launcher.long_context.sequence_parallel import check_heads

            check_heads(sp, config)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_inputs(cfg: DictConfig) -> None:
    """What `sft prepare`, `preview` and `check` read: the data files and the model/tokenizer."""
    check_sources(cfg.data)
    check_model(cfg.model)


def check(cfg: DictConfig, world_size: int, device_type: str) -> None:
    """Every check that needs no model weights and no data rows; raises UserError (one line) on the first."""
    from launcher.config import validate

    try:
        validate(cfg, world_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_device(cfg.model, device_type)
    check_deepspeed(cfg.deepspeed)
    check_resume(cfg, world_size)
    check_sources(cfg.data)
    check_model(cfg.model)
    check_model_config(cfg, device_type)
    _probe_writable("run_dir", str(cfg.run_dir))
    _probe_writable("cache_dir", str(cfg.cache_dir))
