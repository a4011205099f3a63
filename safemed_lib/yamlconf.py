"""Typed blocks from YAML files: dotted overrides, defaults laid under a file block by block, errors that name the key.

The mechanism behind ``config.load`` (profiles) and ``scripts/train_grpo.py`` (GRPO recipes): any
pydantic block class whose blocks forbid unknown keys.
"""
from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A file or an override that does not fit its block class; the message names the key."""


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["attack.eps=4", "sft.think.steps=10"]`` -> ``{"attack.eps": 4, ...}`` (values read as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r}: expected key=value, e.g. attack.eps=4")
        out[key.strip()] = yaml.safe_load(value)
    return out


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a block class (blocks inside it included)."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        for sub in _alternatives(field.annotation):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                out += keys(sub, f"{prefix}{name}.")
    return out


def _unknown(key: str, cls: type[BaseModel], noun: str = "configuration") -> ConfigError:
    close = difflib.get_close_matches(key, keys(cls), n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    lists = "; `python -m safemed_lib config` lists them all" if noun == "configuration" else ""
    return ConfigError(f"unknown {noun} key {key!r}{hint}{lists}")


def _known(key: str, cls: type[BaseModel]) -> bool:
    """Whether ``key`` names a field of ``cls`` or an entry of one of its mapping fields (``data.train_filter.x``)."""
    node, parts = cls, key.split(".")
    for i, part in enumerate(parts):
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return False
        subs = _alternatives(field.annotation)
        blocks = [a for a in subs if isinstance(a, type) and issubclass(a, BaseModel)]
        if i == len(parts) - 1:
            return True
        if blocks:
            node = blocks[0]
        else:  # a mapping field takes any entry; anything else has no sub-keys
            return any(typing.get_origin(a) is dict or a is dict for a in subs)
    return True


def _alternatives(annotation) -> tuple:
    """The members of a union annotation (``X | None``), or the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i + 1])} is not a block")
        node = nxt
    node[keys[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    """``over`` laid over ``base``, block by block (a block given in part keeps its other defaults)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _explain(errors: list[dict], where: str, cls: type[BaseModel], noun: str = "configuration") -> ConfigError:
    lines = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            return ConfigError(f"{where}: {_unknown(loc, cls, noun)}")
        lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError(f"{where}: " + "; ".join(lines))


def load_file(cls: type[BaseModel], path: str | Path, overrides: dict[str, Any] | None = None, *,
              what: str = "profile", defaults: dict | None = None, setdefault: dict | None = None):
    """A block of class ``cls`` from the YAML file ``path``, laid over ``defaults`` (block by block),
    with ``overrides`` (dotted keys) applied; a :class:`ConfigError` naming the file (``what``) or
    the overrides and the key for anything that does not fit. Keys the file lacks but the class
    requires may come from the overrides."""
    path, noun = Path(path), "configuration" if what == "profile" else what
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: not valid YAML ({e})") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of keys to values, got {type(tree).__name__}")
    for k, v in (setdefault or {}).items():
        tree.setdefault(k, v)
    try:
        cls.model_validate(tree)  # the file alone: its errors name the file
    except ValidationError as e:
        errors = [err for err in e.errors() if err["type"] != "missing"]
        if errors:
            raise _explain(errors, f"{what} {path}", cls, noun) from None
    tree = _merge(defaults or {}, tree)
    for key, value in (overrides or {}).items():
        if not _known(key, cls):
            raise _unknown(key, cls, noun)
        _set(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise _explain(e.errors(), f"{what} {path} with overrides {overrides}" if overrides else f"{what} {path}",
                       cls, noun) from None
