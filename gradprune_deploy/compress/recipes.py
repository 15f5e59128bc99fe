"""Named settings for `gradprune compress`: `--recipe paper` is GradPruner's own configuration in one switch.

A recipe fills the options the user did not give; an option given on the command line, in a YAML file or to
`CompressConfig(...)` wins. Which options were given is known exactly, without sentinel defaults: the CLI and a
YAML file hand `CompressConfig` only the options they were given (`config_schema.build_config`: argparse
suppresses unset flags, and a YAML file holds only its keys), and the Python API passes what the caller wrote.
So the options given are the constructor's arguments; `remember_given_options` records their names before the
dataclass's `__init__` runs `__post_init__`, where `apply_recipe` fills the rest, before validation. The
resolved values (and `recipe`) are what gradprune.json's `config` records.

`paper` (GradPruner, arXiv 2601.19503, and its official code, secretflow/ACoLab PaperCode/GradPrune; read line by
line in ANCHORS.md):
- merge K = 3 of the dropped layers: the official code drops 13 layers of Llama-3.1-8B and merges 3 (18, 19, 30
  into 17), the top of the paper's 1-3. A cut of n < 3 layers merges all n (`igia.merge.layers_to_merge` takes
  the min(K, n) highest-scoring), so K = 3 is min(3, n);
- the merged entries: top 20% by summed squared IGIA, same sign (`--keep-top-p 0.2`, `--merge-criterion igia`);
- the layer score: the paper's formula (Σ_t ‖∇B·∇A‖²_F, `--igia-reduce squared`), gradients unclipped
  (this project's reading of the formula; `--probe-clip-grad-norm 1.0` is the official code's);
- the probe: 1% of the planned steps with no floor beyond one informative step (`--probe-fraction 0.01
  --probe-min-steps 1`): the paper fixes 1%; this project's default floor of 8 steps is its own, measured choice;
- recovery: a LoRA of rank 8, alpha 32 (the official code's `r=8, lora_alpha=32`), learning rate 1e-4 (the
  official LoRA rate; 1e-5 when `--finetune full` is given, its full fine-tune rate).
The budget (epochs, steps, batch) is the user's: the paper's 3 epochs over its data is a property of its task.
The project's defaults are not this recipe; they follow the measured comparison in docs/results.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError
from ..formatting import help_field
from .scorers.names import IGIA, MERGING_SCORERS

logger = logging.getLogger(__name__)

PAPER = "paper"
# The official code's learning rates by recovery: full fine-tuning 1e-5, LoRA (and so PrunedLoRA) 1e-4 (ANCHORS.md).
PAPER_LEARNING_RATES = {"full": 1e-5}
PAPER_LORA_LEARNING_RATE = 1e-4
RECIPES: dict[str, dict[str, Any]] = {
    PAPER: {
        "scorer": IGIA,
        "merge_layers": "3",
        "keep_top_p": 0.2,
        "merge_criterion": "igia",
        "igia_reduce": "squared",
        "probe_clip_grad_norm": None,
        "probe_steps": None,
        "probe_fraction": 0.01,
        "probe_min_steps": 1,
        "finetune": "lora",
        "lora_r": 8,
        "lora_alpha": 32,
    }
}
GIVEN_OPTIONS = "_given_options"  # the instance attribute remember_given_options writes


@dataclass
class RecipeConfig:
    """One switch for a published configuration (compress/recipes.py)."""

    recipe: Literal["paper"] | None = help_field(
        None,
        "set a published configuration; options you give win. paper: GradPruner's own setting (merge 3 dropped layers, "
        "top 20% by squared IGIA, probe 1% of the steps with a 1-step floor, LoRA r 8 / alpha 32, lr 1e-4); the "
        "defaults are this project's measured choice (docs/results.md)",
    )


def recipe_values(name: str, *, finetune: str) -> dict[str, Any]:
    """The option values recipe `name` sets, for a run whose recovery is `finetune` (it sets the learning rate)."""
    values = dict(RECIPES[name])
    values["learning_rate"] = PAPER_LEARNING_RATES.get(finetune, PAPER_LORA_LEARNING_RATE)
    return values


def apply_recipe(config: Any) -> list[str]:
    """Fill `config`'s options from its recipe where the user gave none; the names filled. An unknown recipe
    name is left to the schema's check (validate_fields), which names the choices."""
    name = getattr(config, "recipe", None)
    if not isinstance(name, str) or name not in RECIPES:
        return []
    given = getattr(config, GIVEN_OPTIONS, frozenset())
    if "scorer" in given and config.scorer not in MERGING_SCORERS:
        raise ConfigError(
            f"--recipe {name} is GradPruner's setting (the IGIA scorer and its merge), which --scorer {config.scorer} "
            "does not run: drop --scorer or --recipe"
        )
    finetune = config.finetune if "finetune" in given else RECIPES[name]["finetune"]
    values = recipe_values(name, finetune=finetune)
    filled = [field for field in values if field not in given]
    for field in filled:
        setattr(config, field, values[field])
    logger.info("--recipe %s set %s", name, ", ".join(filled) or "nothing (every option it sets was given)")
    return filled


def remember_given_options(cls: type) -> type:
    """Class decorator for a config dataclass: each instance records the names of the options passed to its
    constructor (keyword or positional) as `_given_options`, before `__post_init__` runs."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, GIVEN_OPTIONS, frozenset(names[: len(args)]) | frozenset(kwargs))
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls
