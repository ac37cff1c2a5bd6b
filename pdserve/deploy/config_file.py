"""`pdserve serve --config FILE.yaml`: the file's settings become the flags' defaults, so a flag given
on the command line overrides the file. Keys are the flags' names (`max-num-seqs` or
`max_num_seqs`), plus `pools` (per pool: `replicas`, `min`, `max`, `resources`), `autoscaler` (the
autoscaler's thresholds; `autoscale: true` turns it on) and `drain`. Unknown keys are errors."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import yaml

from pdserve.deploy.config import ROLES, AutoscaleConfig, DrainConfig, PoolConfig

POOL_KEYS = {"replicas", "min", "max", "resources"}
SECTIONS = {"autoscaler": AutoscaleConfig, "drain": DrainConfig}
NOT_IN_FILES = {"help", "config"}


class ConfigFileError(ValueError):
    """A --config file pdserve cannot use; the message names the file and the setting."""


def file_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """The file's settings as `parser` destinations: pass them to `parser.set_defaults`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_IN_FILES}
    values: dict[str, object] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest == "pools":
            values.update(_pools(path, value))
        elif dest in SECTIONS:
            values[dest] = _section(path, dest, value)
        elif dest in actions:
            values[dest] = _flag_value(path, key, actions[dest], value)
        else:
            raise ConfigFileError(f"{path}: unknown setting {key!r}")
    return values


def _flag_value(path: str, key: str, action: argparse.Action, value: object) -> object:
    if action.nargs == 0:  # store_true / --x/--no-x
        if not isinstance(value, bool):
            raise ConfigFileError(f"{path}: {key} must be true or false, got {value!r}")
        return value
    if action.type is not None and isinstance(value, str):
        try:
            value = action.type(value)
        except ValueError as exc:
            raise ConfigFileError(f"{path}: {key}: {exc}") from exc
    if action.choices is not None and value not in action.choices:
        raise ConfigFileError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _pools(path: str, value: object) -> dict[str, object]:
    if not isinstance(value, dict) or not set(value) <= set(ROLES):
        raise ConfigFileError(f"{path}: pools must map prefill and/or decode to their settings")
    values: dict[str, object] = {}
    for role, section in value.items():
        section = section or {}
        unknown = set(section) - POOL_KEYS if isinstance(section, dict) else {"(not a mapping)"}
        if unknown:
            raise ConfigFileError(
                f"{path}: pools.{role}: unknown {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(POOL_KEYS))})"
            )
        if "replicas" in section:
            values[f"{role}_workers"] = section["replicas"]
        bounds = {
            "min_replicas": section.get("min", PoolConfig.min_replicas),
            "max_replicas": section.get("max", PoolConfig.max_replicas),
        }
        try:
            values[f"{role}_pool"] = PoolConfig(**bounds, resources=dict(section.get("resources") or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigFileError(f"{path}: pools.{role}: {exc}") from exc
    return values


def _section(path: str, name: str, value: object) -> dict[str, object]:
    """The section's settings as keyword arguments of its config class (checked when it is built)."""
    known = {f.name for f in fields(SECTIONS[name])} - {"enabled"}
    if not isinstance(value, dict) or not set(value) <= known:
        extra = sorted(map(str, set(value) - known)) if isinstance(value, dict) else ["(not a mapping)"]
        raise ConfigFileError(f"{path}: {name}: unknown {', '.join(extra)} (known: {', '.join(sorted(known))})")
    return dict(value)
