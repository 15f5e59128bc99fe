"""The config-schema engine: a command's config dataclass becomes its CLI flags, its YAML recipe
schema and its validation — one schema, no hand-written parsers.

- argparse: `add_dataclass_arguments(parser, cls)` adds one flag per field. Each field's
  `metadata["help"]` is its help text; `metadata["positional"]` makes it a positional argument;
  `metadata["flag"]` overrides the flag name; `metadata["cli"] = False` keeps it off the CLI.
- YAML recipe: `--config recipe.yaml` supplies values for any field (keys use the field names);
  `build_config(cls, namespace, recipe)` merges defaults < recipe < command-line flags.
- Validation: one typed check serves every way in. `validate_fields(config)` (first line of a
  config's `__post_init__`) checks each value against its annotation — bool is only True/False, an
  int is an int (not 2.5, not "2", not True), a float is any real number, a Literal is one of its
  choices, None only where the field is Optional or defaults to None — then its range, when the
  field declares one (`metadata["range"]`, see `Range`) — and raises one ConfigError naming the
  flag: `--drop-layers: expected an integer, got 'two'`, `--port must be an integer from 1 to 65535, got 0`. Command-line text is parsed
  into those types first (`parse_text`); YAML and Python values must already have them. YAML
  recipes are read by recipe_yaml.py (YAML 1.2 booleans and floats, duplicate keys and alias
  bombs refused before anything is built).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import ConfigError
from .recipe_yaml import read_yaml_recipe

# -- the typed schema ---------------------------------------------------------------------------


def flag_name(f: dataclasses.Field) -> str:
    """How the user spells a field: `--drop-layers`, or the positional's name (`checkpoint`)."""
    if f.metadata.get("positional"):
        return f.name
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type inside Optional/`X | None`, whether None is allowed)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) < len(args)
    return tp, False


def _unwrap_optional(tp: Any) -> Any:
    return _optional(tp)[0]


_SHOW_CHARS = 80


def _show(value: Any) -> str:
    """A short picture of a value for a message: cut BEFORE repr, so a huge value (an alias-expanded
    recipe list, a megabyte string) costs nothing to describe."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value[:_SHOW_CHARS]) + ("..." if len(value) > _SHOW_CHARS else "")
    if isinstance(value, (list, tuple, dict)):
        items = list(value.items() if isinstance(value, dict) else value)
        head = ", ".join(_show(v) if not isinstance(v, tuple) else f"{_show(v[0])}: {_show(v[1])}" for v in items[:3])
        more = f", ... ({len(items)} items)" if len(items) > 3 else ""
        return f"{type(value).__name__} [{head}{more}]"[: _SHOW_CHARS * 2]
    return repr(value)[:_SHOW_CHARS]


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a numeric field accepts: `metadata={"range": Range(1, 65535)}` (or the tuple
    `(1, 65535)`, both ends inclusive; None = unbounded). `validate_fields` checks it after the type,
    so the CLI, YAML recipes and the Python API share it; `--help` shows it. Any ranged value must
    also be finite (inf is never a sensible option value)."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    why: str = ""  # said after the range in the message, e.g. "time per output token needs a second token"

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return not (self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)))

    def describe(self, kind: str = "a number") -> str:
        """e.g. "an integer ≥ 1", "an integer from 1 to 65535", "a number > 0 and ≤ 1"."""
        low = None if self.low is None else f"{'≥' if self.low_inclusive else '>'} {_num(self.low)}"
        high = None if self.high is None else f"{'≤' if self.high_inclusive else '<'} {_num(self.high)}"
        if low and high and self.low_inclusive and self.high_inclusive:
            return f"{kind} from {_num(self.low)} to {_num(self.high)}"
        return f"{kind} {' and '.join(b for b in (low, high) if b)}" if low or high else f"a finite {kind.split()[-1]}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def field_range(f: dataclasses.Field) -> Range | None:
    """The field's declared range (metadata["range"]: a Range or a (low, high) tuple), or None."""
    spec = f.metadata.get("range")
    if spec is None or isinstance(spec, Range):
        return spec
    return Range(*spec)


def check_range(flag: str, value: Any, bounds: Range | None) -> None:
    """ConfigError naming `flag` when a number falls outside `bounds` (None, non-numbers: nothing to check)."""
    if bounds is None or not _is_number(value) or bounds.contains(value):
        return
    kind = "an integer" if isinstance(value, int) else "a number"
    why = f" ({bounds.why})" if bounds.why else ""
    raise ConfigError(f"{flag} must be {bounds.describe(kind)}{why}, got {_show(value)}")


def _choices_text(choices: tuple) -> str:
    return ", ".join(str(c) for c in choices)


def _describe(tp: Any) -> str:
    tp, _ = _optional(tp)
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(m) for m in get_args(tp) if m is not type(None))
    if get_origin(tp) is Literal:
        return " or ".join(str(c) for c in get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_value(flag: str, tp: Any, value: Any, *, none_ok: bool = False) -> Any:
    """`value` checked against type `tp` (returned, ints widened to float for float fields)."""
    tp, optional = _optional(tp)
    if value is None:
        if optional or none_ok:
            return None
        raise ConfigError(f"{flag}: a value is required, got null")
    if isinstance(tp, type) and tp in _SCALAR_CHECKS:
        return _SCALAR_CHECKS[tp](flag, value)
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(flag, tp, value)
    if origin is Literal:
        return _check_literal(flag, tp, value)
    if origin in (list, tuple):
        return _check_sequence(flag, tp, value)
    return value  # a type this schema does not describe: the config's own __post_init__ judges it


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bool(flag: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    hint = " (write true or false, without quotes)" if isinstance(value, str) else ""
    raise ConfigError(f"{flag}: expected true or false, got {_show(value)}{hint}")


def _check_int(flag: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{flag}: expected an integer, got {_show(value)}")


def _check_float(flag: str, value: Any) -> float:
    if not _is_number(value):
        raise ConfigError(f"{flag}: expected a number, got {_show(value)}")
    if math.isnan(value):
        raise ConfigError(f"{flag}: expected a number, got nan")
    return float(value)


def _check_str(flag: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str):
        return value
    if _is_number(value):
        return str(value)  # YAML `split: 2024` or `drop_layers: 2` where text is accepted: its text
    raise ConfigError(f"{flag}: expected a string, got {_show(value)} (quote it in YAML)")


_SCALAR_CHECKS = {bool: _check_bool, int: _check_int, float: _check_float, str: _check_str}


def _check_union(flag: str, tp: Any, value: Any) -> Any:
    """e.g. int | Literal["auto"]: the first member that fits."""
    for member in get_args(tp):
        try:
            return check_value(flag, member, value)
        except ConfigError:
            continue
    raise ConfigError(f"{flag}: expected {_describe(tp)}, got {_show(value)}")


def _check_literal(flag: str, tp: Any, value: Any) -> Any:
    choices = get_args(tp)
    if any(value == c and type(value) is type(c) for c in choices):
        return value
    raise ConfigError(f"{flag}: expected one of {_choices_text(choices)}, got {_show(value)}")


def _check_sequence(flag: str, tp: Any, value: Any) -> list | tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{flag}: expected a list, got {_show(value)}")
    inner = (get_args(tp) or (Any,))[0]
    items = [check_value(flag, inner, v) for v in value]
    return type(value)(items) if get_origin(tp) is list else tuple(items)


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def validate_fields(config: Any) -> None:
    """Check (and normalise in place) every init field of dataclass instance `config`.

    Call it first in `__post_init__`, so the CLI, YAML recipes and the Python API share it.
    """
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        if not f.init or f.name not in hints:
            continue
        value = getattr(config, f.name)
        checked = check_value(flag_name(f), hints[f.name], value, none_ok=f.default is None)
        _check_field_range(f, checked)
        if checked is not value:
            object.__setattr__(config, f.name, checked)


def _check_field_range(f: dataclasses.Field, value: Any) -> None:
    """The field's declared range, on a number or on each number of a list."""
    bounds = field_range(f)
    for item in value if isinstance(value, (list, tuple)) else [value]:
        check_range(flag_name(f), item, bounds)


def validate_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The same checks on a dict of field values, before the dataclass is built."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    checked = {
        name: check_value(flag_name(fields[name]), hints[name], value, none_ok=fields[name].default is None)
        if name in fields and name in hints
        else value
        for name, value in values.items()
    }
    for name, value in checked.items():
        if name in fields:
            _check_field_range(fields[name], value)
    return checked


def parse_text(flag: str, tp: Any, text: str) -> Any:
    """Command-line text → the field's type, or a ConfigError naming the flag."""
    tp, optional = _optional(tp)
    if optional and text.lower() in ("none", "null") and tp is not str:  # a text field keeps the word: --merge-layers none
        return None
    if tp is int:
        return _parse_int(flag, text)
    if tp is float:
        return _parse_float(flag, text)
    if get_origin(tp) is Literal:
        return _parse_literal(flag, tp, text)
    if get_origin(tp) in (typing.Union, types.UnionType):
        return _parse_union(flag, tp, text)
    return text


def _parse_int(flag: str, text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{flag}: expected an integer, got {text!r}") from None


def _parse_float(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected a number, got {text!r}") from None
    if math.isnan(value):
        raise ConfigError(f"{flag}: expected a number, got {text!r}")
    return value


def _parse_literal(flag: str, tp: Any, text: str) -> Any:
    for choice in get_args(tp):
        if str(choice) == text:
            return choice
    raise ConfigError(f"{flag}: expected one of {_choices_text(get_args(tp))}, got {text!r}")


def _parse_union(flag: str, tp: Any, text: str) -> Any:
    for member in get_args(tp):
        if member is type(None):
            continue
        try:
            return parse_text(flag, member, text)
        except ConfigError:
            continue
    raise ConfigError(f"{flag}: expected {_describe(tp)}, got {text!r}")


# -- argparse -----------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ConfigError line (exit 2 via the CLI), not usage + message."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", lambda m: m.group(1).split("/")[0] + ": ", message)
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings: a bare % would crash --help


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp = _unwrap_optional(hints[f.name])
        help_text = _help(f.metadata.get("help", ""))
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=str, help=help_text, nargs=f.metadata.get("nargs"))
            continue
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str  # parsed by parse_text, so every bad value gets the same one-line message
            if get_origin(tp) is Literal:
                kwargs["metavar"] = "{" + ",".join(str(c) for c in get_args(tp)) + "}"
            elif get_origin(tp) in (list, tuple):
                kwargs["nargs"] = "+"
            else:
                kwargs["metavar"] = f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = "an integer" if tp is int else "a number"
        extras = [] if field_range(f) is None else [_help(field_range(f).describe(kind))]
        if default not in (None, dataclasses.MISSING) and not isinstance(default, bool):
            extras.append(f"default: {_help(str(default))}")
        if extras:
            kwargs["help"] = f"{help_text} ({'; '.join(extras)})"
        parser.add_argument(flag_name(f), dest=f.name, **kwargs)


def build_config(cls: type, namespace: argparse.Namespace, recipe: str | None = None):
    """Defaults < YAML recipe < command-line flags; unknown recipe keys and mistyped values are errors."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    if recipe:
        from_yaml = read_yaml_recipe(recipe)
        unknown = sorted(set(from_yaml) - set(fields))
        if unknown:
            raise ConfigError(f"--config {recipe}: unknown option(s) {', '.join(unknown)}: see --help for the option names")
        values.update(validate_values(cls, from_yaml))  # a broken recipe is refused even where a flag overrides it
    for name, value in vars(namespace).items():
        if name not in fields:
            continue
        tp = _unwrap_optional(hints[name])
        if isinstance(value, str) and not fields[name].metadata.get("positional"):
            value = parse_text(flag_name(fields[name]), hints[name], value)
        elif isinstance(value, list) and get_origin(tp) in (list, tuple):
            inner = (get_args(tp) or (str,))[0]
            value = [parse_text(flag_name(fields[name]), inner, v) if isinstance(v, str) else v for v in value]
        values[name] = value
    missing = [
        flag_name(f)
        for f in fields.values()
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required (see --help)")
    values = validate_values(cls, values)  # also for configs whose __post_init__ does not call validate_fields yet
    return cls(**values)
