"""Hydra's and OmegaConf's errors rewritten as one line: which override, which key, what was expected, and the
near miss.

    cfg = compose_config(["train.max_stepz=3"])
    # UserError: unknown config key 'train.max_stepz' (did you mean 'max_steps'?); TrainConfig keys: ...
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from omegaconf import DictConfig

from launcher.errors import UserError


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


def config_groups() -> dict[str, list[str]]:
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
            options = config_groups().get(group, [])
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
