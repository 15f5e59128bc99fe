import pytest
import torch

from gradprune_deploy.compress.selection import drop_count_from_ratio, select_layers_to_drop
from gradprune_deploy.errors import ConfigError

SCORES = torch.tensor([9.0, 1.0, 5.0, 1.0, 3.0, 8.0], dtype=torch.float64)


def test_drops_lowest_scores_ties_toward_deeper_layer():
    assert select_layers_to_drop(SCORES, drop_count=1) == [3]  # 1 and 3 tie: deeper first
    assert select_layers_to_drop(SCORES, drop_count=3) == [1, 3, 4]


def test_ratio_count_and_protection():
    assert drop_count_from_ratio(0.4, 30) == 12
    assert select_layers_to_drop(SCORES, drop_ratio=0.5) == [1, 3, 4]
    assert select_layers_to_drop(SCORES, drop_count=2, protect_first=2) == [3, 4]
    assert select_layers_to_drop(SCORES, drop_count=2, protect_last=3) == [1, 2]


def test_target_params_drops_until_budget():
    layer_params = [10, 10, 10, 10, 10, 10]
    assert select_layers_to_drop(SCORES, target_params=85, layer_params=layer_params, total_params=100) == [1, 3]
    with pytest.raises(ConfigError, match="out of reach"):
        select_layers_to_drop(SCORES, target_params=5, layer_params=layer_params, total_params=100, protect_first=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop_ratio": 0.0}, "between 0 and 1"),
        ({"drop_ratio": 1.0}, "between 0 and 1"),
        ({"drop_ratio": 0.01}, "drops no layer"),
        ({"drop_count": 6}, "leave no layer"),
        ({"drop_count": 3, "protect_first": 2, "protect_last": 2}, "protect"),
        ({}, "exactly one"),
    ],
)
def test_bad_budgets(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        select_layers_to_drop(SCORES, **kwargs)
