"""Everything a run needs, checked before any rank starts: one clear line naming what and where.

    cfg = compose_config(overrides)      # Hydra's detail (key, expected type, choices) + "did you mean"
    check(cfg, world_size, "cpu")        # config values, model/tokenizer, data files, DeepSpeed JSON,
                                         # resume dir, run dir writable, dtype vs device

`sft launch` runs both in the launcher; `sft train` (under torchrun, srun or alone) runs them on every rank,
where they are cheap (file checks and hub-cache lookups only, no network when HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


class UserError(ValueError):
    """A user's mistake: the message is the whole story (one line), no traceback."""


# ---- compose ----


def compose_config(overrides: list[str]) -> DictConfig:
    """`launcher.config.compose`, with Hydra's errors rewritten as one line with "did you mean"."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from launcher.config import compose

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("SFT_DEBUG"):
            raise
        raise UserError(explain_compose_error(e)) from e
    _check_schema(cfg, overrides)
    return cfg


def _check_schema(cfg: DictConfig, overrides: list[str]) -> None:
    """`+key=value` adds keys Hydra does not check against the schema: a typo there would be silently ignored."""
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from launcher.config import Config

    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg, resolve=False))
    except ConfigKeyError as e:
        added = [o for o in overrides if o.startswith("+")]
        wrapper = ConfigCompositionException(f"Could not override '{added[0] if added else e.full_key}'")
        wrapper.__cause__ = e
        raise UserError(explain_compose_error(wrapper)) from None


def _schema(type_name: str | None) -> list[str]:
    """Field names of a config dataclass named by OmegaConf's object_type (`TrainConfig`, `SourceConfig`...)."""
    from launcher import config

    cls = getattr(config, type_name or "", None)
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls)]


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _groups() -> dict[str, list[str]]:
    from launcher.config import CONF_DIR

    return {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF_DIR.iterdir() if p.is_dir()}


def _detail(cause: Exception) -> tuple[str, str, str]:
    """(message's first line, full_key, object type) of an OmegaConf error."""
    text = str(cause).split("\n")
    first = text[0].strip()
    full_key = getattr(cause, "full_key", None) or ""
    obj = getattr(cause, "object_type", None)
    obj_name = obj.__name__ if isinstance(obj, type) else ""
    return first, str(full_key), obj_name


def explain_compose_error(e: Exception) -> str:
    """One line: which override, which key, what was expected (type or choices), and a near-miss suggestion."""
    from hydra.errors import MissingConfigException, OverrideParseException

    msg = str(e)
    if isinstance(e, OverrideParseException) or msg.startswith("Error parsing override"):
        m = re.match(r"Error parsing override '(.*)'\n(.*)", msg)
        what, why = (m.group(1), m.group(2)) if m else (msg.split("\n")[0], "")
        hint = " (an override is key=value, e.g. train.max_steps=10)" if "EQUAL" in why else ""
        return f"cannot parse override {what!r}: {why.strip()}{hint}"
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
        if m:
            group, option = m.groups()
            options = _groups().get(group, [])
            return (
                f"{group}={option}: no such option in group {group!r}{_did_you_mean(option, options)}; "
                f"options: {', '.join(options)}"
            )
        return msg.split("\n")[0]
    cause = e.__cause__ or e.__context__
    override = ""
    m = re.match(r"(?:Could not override|Error merging override) '?([^'\n]+?)'?\.?$", msg.split("\n")[0])
    if m:
        override = m.group(1)
    if cause is None:
        return msg.split("\n")[0]
    first, full_key, obj = _detail(cause)
    key_of_override = override.split("=", 1)[0].lstrip("+~")
    # Inside a list item (data.sources=[{...}]) OmegaConf's full_key is relative to the item: name the list too.
    where = full_key
    if key_of_override and not full_key.startswith(key_of_override.split(".")[0]):
        where = f"{key_of_override}[...].{full_key}" if full_key else key_of_override
    name = getattr(cause, "key", None) or full_key.rsplit(".", 1)[-1]
    if "not in" in first or "is not in struct" in first:
        fields = _schema(obj)
        if obj == "Config":  # a top-level key: the groups and top-level fields
            fields = sorted(set(fields))
        suggestion = _did_you_mean(str(name), fields)
        known = f"; {obj} keys: {', '.join(fields)}" if fields else ""
        return f"unknown config key {where!r}{suggestion}{known} (list them with `sft config`)"
    enum = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
    if enum:
        value, choices = enum.group(1), [c.strip() for c in enum.group(2).split(",")]
        return f"{where}={value!r} is not a valid choice{_did_you_mean(value, choices)}; choose one of: {', '.join(choices)}"
    conv = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", first)
    if conv:
        return f"{where}={conv.group(1)!r}: expected {conv.group(3).lower()}, got {conv.group(2)}"
    return f"{where or override}: {first}"


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
    if m.dtype.value == "bf16" and device_type == "cpu":
        raise UserError("model.dtype=bf16 on CPU is not supported here: use model.dtype=auto or fp32")


def check_model_config(m: Any, device_type: str, sequence_parallel_size: int = 1) -> None:
    """The model's config builds (random init) or reads (local dir), the attention backend suits it, and its
    heads split over the sequence-parallel group."""
    import torch
    from transformers import AutoConfig

    from launcher.model.attention import resolve_backend

    try:
        if m.name_or_path is None:
            init = dict(m.init)
            config = AutoConfig.for_model(**init)
        elif Path(str(m.name_or_path)).expanduser().is_dir():
            config = AutoConfig.from_pretrained(str(m.name_or_path), trust_remote_code=m.trust_remote_code)
        else:
            return  # a hub id: its config comes with the download
    except Exception as e:  # transformers' and huggingface_hub's config validation errors share no base class
        from launcher.launch.rankerrors import one_line

        key = "model.init" if m.name_or_path is None else f"model.name_or_path={m.name_or_path}"
        raise UserError(f"{key}: {one_line(e)}") from None
    bf16 = m.dtype.value == "bf16" or (m.dtype.value == "auto" and device_type == "cuda")
    try:
        resolve_backend(
            m.attention.value, torch.device(device_type), config, torch.bfloat16 if bf16 else torch.float32
        )
        if sequence_parallel_size > 1:
            from launcher.long_context.sequence_parallel import check_heads

            check_heads(sequence_parallel_size, config)
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
    check_model_config(cfg.model, device_type, cfg.train.sequence_parallel_size)
    _probe_writable("run_dir", str(cfg.run_dir))
    _probe_writable("cache_dir", str(cfg.cache_dir))
