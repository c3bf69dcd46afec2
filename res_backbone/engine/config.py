"""YAML configs at the tool boundary: ``--config file.yaml`` sets defaults, explicit flags win.

Keys are the tools' long option names with ``_`` for ``-`` (``batch_size: 8`` for ``--batch-size``),
so a config file and a command line say the same thing. Unknown keys are an error naming the key
and the file (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config file that cannot be used (unreadable, not a mapping, unknown keys, bad types)."""


def load_yaml(path) -> Dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from ``--config`` (if the parser has it) then the flags.

    The returned namespace has ``config_sources``: which file set which keys.
    """
    pre, _ = parser.parse_known_args(argv)
    cfg_path = getattr(pre, "config", None)
    sources: Dict[str, str] = {}
    if cfg_path:
        cfg = load_yaml(cfg_path)
        known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(k for k in cfg if k.replace("-", "_") not in known)
        if unknown:
            raise ConfigError(
                f"config {cfg_path}: unknown key(s) {unknown}; valid keys are the long options with '_': "
                + ", ".join(sorted(known))
            )
        defaults = {}
        for key, value in cfg.items():
            dest = key.replace("-", "_")
            action = known[dest]
            defaults[dest] = _coerce(value, action, cfg_path, key)
            sources[dest] = str(cfg_path)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.config_sources = sources
    return args


def _coerce(value: Any, action: argparse.Action, path, key: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"config {path}: {key} must be true or false, got {value!r}")
        return value
    out = value
    if value is not None and action.type is not None:
        try:
            if action.nargs in ("+", "*") or isinstance(value, list):
                out = [action.type(v) for v in (value if isinstance(value, list) else [value])]
            else:
                out = action.type(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config {path}: {key}={value!r} is not valid ({e})") from e
    if action.choices is not None and out is not None:
        for v in out if isinstance(out, list) else [out]:
            if v not in action.choices:
                raise ConfigError(f"config {path}: {key}={v!r}; choose one of {list(action.choices)}")
    return out


def resolved_config(args: argparse.Namespace, skip: Sequence[str] = ("config_sources", "config")) -> Dict[str, Any]:
    """The run's full configuration (every option's final value) as plain YAML-safe types. The ``--config`` path
    itself is left out: its values are in the result, and the result must be usable as ``--config`` again."""
    out: Dict[str, Any] = {}
    for k, v in vars(args).items():
        if k in skip or callable(v):
            continue
        out[k] = list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, Path) else v)
    return out


def dump_yaml(data: Dict[str, Any], path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def opt_int(value: str) -> Optional[int]:
    """argparse type: an int, or ``None`` for ``none``/empty (e.g. ``--limit-test none``)."""
    return None if str(value).lower() in ("none", "") else int(value)


def opt_float(value: str) -> Optional[float]:
    """argparse type: a float, or ``None`` for ``none``/empty."""
    return None if str(value).lower() in ("none", "") else float(value)
