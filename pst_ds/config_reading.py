"""Reading an experiment config: a YAML file and ``key=value`` overrides, validated into the
dataclasses of config.py, with every mistake said as one ConfigError line naming the key (an
unknown key with the nearest known one, a mistyped value, a value out of its range)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any

import pydantic
import yaml

from .config import ExperimentConfig
from .errors import ConfigError
from .paths import resolve_path

# What a pydantic error type says a value must be, in our one-line messages.
_EXPECTED = {"int": "int", "float": "float", "string": "str", "bool": "bool", "list": "a list"}
_EXPECTED.update({"dict": "a mapping", "dataclass": "a mapping", "model": "a mapping"})


def _sections_filled(cls: type, data: Any) -> Any:
    """``data`` with every empty section (``train:`` with nothing under it reads as None) as {}."""
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    return {
        key: _sections_filled(hints[key], value or {})
        if key in hints
        and dataclasses.is_dataclass(hints[key])
        and (value is None or isinstance(value, dict))
        else value
        for key, value in data.items()
    }


def _section_of(cls: type, parents: list[str]) -> type:
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return cls


def _constraints(annotation: Any) -> list[Any]:
    """The constraints of a field's type, the numeric member's of a union (``Share | 'auto'``) too."""
    if typing.get_origin(annotation) is Annotated:
        found = []
        for extra in annotation.__metadata__:
            found += [extra, *getattr(extra, "metadata", [])]  # Field(ge=...) keeps them in .metadata
        return found
    return [c for member in typing.get_args(annotation) for c in _constraints(member)]


def _allowed_range(section: type, leaf: str) -> str:
    """A field's bounds as a user reads them: 'in [0, 1)', '>= 1', '> 0'."""
    bounds = {}
    for constraint in _constraints(typing.get_type_hints(section, include_extras=True)[leaf]):
        bounds.update({k: getattr(constraint, k) for k in ("ge", "gt", "le", "lt") if hasattr(constraint, k)})
    low = next((f"{'[' if k == 'ge' else '('}{bounds[k]:g}" for k in ("ge", "gt") if k in bounds), None)
    high = next((f"{bounds[k]:g}{']' if k == 'le' else ')'}" for k in ("le", "lt") if k in bounds), None)
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
    return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"


def _field_loc(cls: type, loc: tuple[Any, ...]) -> tuple[list[Any], list[str]]:
    """(an error's location as config keys, pydantic's names of the union members it tried)."""
    keys: list[Any] = []
    members: list[str] = []
    section: Any = cls
    for part in loc:
        if dataclasses.is_dataclass(section) or isinstance(part, int):  # a key, or a list's index
            keys.append(part)
            section = typing.get_type_hints(section).get(part) if dataclasses.is_dataclass(section) else None
        elif typing.get_origin(section) in (typing.Union, types.UnionType):
            members.append(part)
    return keys, members


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build a config dataclass from a dict with pydantic's validation (its lax mode: "1e-4",
    which PyYAML reads as a string, is a float); an unknown key, a mistyped value or one out of
    its range becomes one ConfigError line naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    try:
        return pydantic.TypeAdapter(cls).validate_python(_sections_filled(cls, data))
    except pydantic.ValidationError as err:
        errors = err.errors()
        error = errors[0]
        loc, members = _field_loc(cls, error["loc"])
        if members:  # a value that is a number or a word (0.5 or auto): one line for both
            words = [e["ctx"]["expected"] for e in errors if e["type"] == "literal_error"]
            *parents, leaf = [str(part) for part in loc]
            bounds = _allowed_range(_section_of(cls, parents), leaf)
            said = f"must be a number {bounds} or {' or '.join(words)}"
            raise ConfigError(f"{prefix}{'.'.join(loc)} {said}, got {error.get('input')!r}") from None
        *parents, leaf = [str(part) for part in loc] or ["config"]
        where = prefix + ".".join([*parents, leaf])
        kind = error["type"]
        if kind == "unexpected_keyword_argument":
            names = [f.name for f in dataclasses.fields(_section_of(cls, parents))]
            close = difflib.get_close_matches(leaf, names, n=1)
            known = prefix + "".join(f"{p}." for p in parents)
            hint = f" (did you mean {known}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {where}{hint}") from None
        if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            said = f"must be {_allowed_range(_section_of(cls, parents), leaf)}"
        elif kind == "literal_error":
            said = f"must be one of {error['ctx']['expected']}"
        elif kind == "too_short":
            said = "must not be empty"
        else:
            expected = _EXPECTED.get(kind.split("_")[0])
            said = f"must be {expected}" if expected else error["msg"].lower()
        raise ConfigError(f"{where} {said}, got {error.get('input')!r}") from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(
            f"override {override!r}: the value is not valid YAML ({problem}); quote it, e.g. {key}='...'"
        ) from None


def read_experiment(path: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML (or start from the defaults), apply overrides, validate the data
    (the method's own rules come after: pst_ds/experiment.py)."""
    data: dict[str, Any] = {}
    if path is not None:
        file = resolve_path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    for override in overrides:
        apply_override(data, override)
    return build_section(ExperimentConfig, data, "")
