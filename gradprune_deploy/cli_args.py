"""Config dataclasses become CLI flags and YAML recipes: one schema, no hand-written parsers.

Each field's `metadata["help"]` is its help text; `metadata["positional"]` makes it a positional
argument; `metadata["flag"]` overrides the flag name. A `--config recipe.yaml` file supplies
values for any field (keys use the field names); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

_MISSING = object()


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=str, help=help_text, nargs=f.metadata.get("nargs"))
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = get_args(tp)[0]
        else:
            kwargs["type"] = tp if tp in (int, float, str) else str
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, dataclasses.MISSING) and not isinstance(default, bool):
            kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(flag, dest=f.name, **kwargs)


def read_yaml_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, namespace: argparse.Namespace, recipe: str | None = None):
    """Defaults < YAML recipe < command-line flags; unknown recipe keys are an error."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    if recipe:
        from_yaml = read_yaml_recipe(recipe)
        unknown = sorted(set(from_yaml) - names)
        if unknown:
            raise ConfigError(f"--config {recipe}: unknown option(s) {', '.join(unknown)}")
        values.update(from_yaml)
    values.update({k: v for k, v in vars(namespace).items() if k in names})
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
