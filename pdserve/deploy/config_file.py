"""`pdserve serve --config FILE.yaml`: the file's settings become the flags' defaults, so a flag given
on the command line overrides the file. Keys are the flags' names (`max-num-seqs` or
`max_num_seqs`), plus `pools` (per pool: `replicas`, `min`, `max`, `resources`), `autoscaler` (the
autoscaler's thresholds; `autoscale: true` turns it on) and `drain`. Unknown keys are errors."""

from __future__ import annotations

import argparse
import json
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
    flags = {
        option.removeprefix("--").replace("-", "_"): (option, action)
        for action in parser._actions
        if action.dest not in NOT_IN_FILES
        for option in action.option_strings
        if option.startswith("--")
    }
    values: dict[str, object] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "pools":
            settings = _pools(path, value)
        elif name in SECTIONS:
            settings = {name: _section(path, name, value)}
        elif name in flags:
            option, action = flags[name]
            settings = {action.dest: _flag_value(path, key, option, action, value)}
        else:
            raise ConfigFileError(f"{path}: unknown setting {key!r}")
        if settings.keys() & values.keys():  # e.g. decode-workers and pools.decode.replicas, in either order
            raise ConfigFileError(f"{path}: {key} sets what another key of the file already set")
        values.update(settings)
    return values


def _flag_value(path: str, key: str, option: str, action: argparse.Action, value: object) -> object:
    """The flag's value as the command line would give it: a YAML value of the flag's type (or text
    that converts to it); a repeatable flag takes one value or a list of them; a switch takes true
    (as if given: `enforce-eager: true`, `no-prefix-caching: true`) or false (the other way)."""
    if action.nargs == 0:  # --x, --no-x
        if not isinstance(value, bool):
            raise ConfigFileError(f"{path}: {key} must be true or false, got {value!r}")
        sets = action.const if isinstance(action.const, bool) else not option.startswith("--no-")
        return value if sets else not value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):  # a string is one value, never its characters
        return [_scalar(path, key, action, item) for item in (value if isinstance(value, list) else [value])]
    return _scalar(path, key, action, value)


def _scalar(path: str, key: str, action: argparse.Action, value: object) -> object:
    if value is None and action.default is None:
        return None
    kind = _KIND_NAMES.get(action.type, "text") if isinstance(action.type, type) else "text"
    is_converter = callable(action.type) and not isinstance(action.type, type)  # e.g. token counts, "32k"
    if is_converter and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # as the command line gives it
    elif is_converter and isinstance(value, list):  # a list flag's YAML list: the JSON its flag takes
        value = json.dumps(value)
    if isinstance(value, str) and callable(action.type):
        try:
            value = action.type(value)
        except ValueError as exc:
            message = f"{key}: {exc}" if is_converter else f"{key} must be {kind}, got {value!r}"
            raise ConfigFileError(f"{path}: {message}") from exc
    elif not _is_kind(value, action.type):
        raise ConfigFileError(f"{path}: {key} must be {kind}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ConfigFileError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return float(value) if action.type is float and isinstance(value, int) else value


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def _is_kind(value: object, kind: object) -> bool:
    """Whether a YAML value is already of a flag's or setting's type (a bool is neither an integer
    nor a number)."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, str)


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
        for file_key in ("replicas", "min", "max"):
            if file_key in section and not _is_kind(section[file_key], int):
                raise ConfigFileError(f"{path}: pools.{role}.{file_key} must be an integer, got {section[file_key]!r}")
        resources = section.get("resources") or {}
        if not isinstance(resources, dict):
            raise ConfigFileError(f"{path}: pools.{role}.resources must map resource names to amounts, got {resources!r}")
        if "replicas" in section:
            values[f"{role}_workers"] = section["replicas"]
        bounds = {
            "min_replicas": section.get("min", PoolConfig.min_replicas),
            "max_replicas": section.get("max", PoolConfig.max_replicas),
        }
        try:
            values[f"{role}_pool"] = PoolConfig(**bounds, resources=dict(resources))
        except (TypeError, ValueError) as exc:
            raise ConfigFileError(f"{path}: pools.{role}: {exc}") from exc
    return values


def _section(path: str, name: str, value: object) -> dict[str, object]:
    """The section's settings as keyword arguments of its config class, each of its type and
    checked together by building the class once here."""
    config_class = SECTIONS[name]
    types = {f.name: type(f.default) for f in fields(config_class)}
    known = set(types) - {"enabled"}
    if not isinstance(value, dict) or not set(value) <= known:
        extra = sorted(map(str, set(value) - known)) if isinstance(value, dict) else ["(not a mapping)"]
        raise ConfigFileError(f"{path}: {name}: unknown {', '.join(extra)} (known: {', '.join(sorted(known))})")
    for key, setting in value.items():
        if not _is_kind(setting, types[key]):
            raise ConfigFileError(f"{path}: {name}.{key} must be {_KIND_NAMES[types[key]]}, got {setting!r}")
    try:
        config_class(**value)
    except ValueError as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc
    return dict(value)
