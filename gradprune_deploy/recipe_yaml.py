"""YAML recipes (`--config recipe.yaml`): read safely, with YAML 1.2 scalars, and bounded.

- Scalars follow YAML 1.2's core schema: only true/false are booleans (yes/no/on/off stay strings,
  and are then refused for a boolean option), and `2e-4` is a float.
- A duplicate key is refused with its line (YAML would silently keep the last), in nested mappings
  too; a merge key's override (`<<: *base` then `seed: 2`) is not a duplicate.
- The document is composed into its node graph first and measured with every alias expanded, each
  distinct node counted once: past `MAX_RECIPE_NODES` values (an alias bomb: a few lines of
  `&a [*b, *b, ...]` that expand exponentially), an alias that contains itself, or nesting past
  Python's recursion limit is refused before anything is built from it.

Every refusal is one ConfigError naming `--config` and the file. The config-schema engine
(config_schema.py) checks the values against the command's schema.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, first_line


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 core schema for scalars: only true/false are booleans (yes/no/on/off stay strings,
    and are then refused for a boolean option), and `2e-4` is a float."""


_RecipeLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _construct_float(loader, node):
    text = loader.construct_scalar(node)
    if re.fullmatch(r"[-+]?[0-9]+", text):  # the float pattern also matches plain integers
        return int(text)
    return float(text.replace("_", ""))


_RecipeLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _construct_mapping_without_duplicates(loader, node, deep=False):
    """A mapping whose keys are unique: YAML would silently keep the last of two equal keys."""
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *base` merges keys that this mapping may override: not a duplicate
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue  # an unhashable key: construct_mapping below refuses it in its own words
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {repr(key)[:80]} on line {key_node.start_mark.line + 1}: give each option once", None
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_RecipeLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping_without_duplicates)

# A recipe is a handful of options: far more nodes than this, once aliases are expanded, is an alias
# bomb (a few lines of `&a [*b, *b, ...]` that expand exponentially), refused before it is built.
MAX_RECIPE_NODES = 10_000


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes `node` stands for with every alias expanded; stops early past MAX_RECIPE_NODES.

    Aliases share their node object, so each distinct node is sized once (memo) and the count never
    expands anything."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise ConfigError("an alias refers to the node that contains it (a recursive recipe)")
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_nodes(child, memo, open_nodes)
        if size > MAX_RECIPE_NODES:
            break
    open_nodes.discard(key)
    memo[key] = size
    return size


def _load_recipe(text: str) -> Any:
    """Compose the YAML graph, bound its expanded size, then build the values (duplicates refused)."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, set()) > MAX_RECIPE_NODES:
            raise ConfigError(f"more than {MAX_RECIPE_NODES} values once its aliases are expanded (an alias bomb?)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, a FIFO, /dev/stdin: not a recipe file
        raise ConfigError(f"--config {path}: not a regular file: give a YAML recipe file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = _load_recipe(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({first_line(exc)})") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply to be a recipe") from None
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}
