import pytest
import torch

from gradprune_deploy.compress.igia.merge import merge_targets, same_sign_merge, top_p_mask


def test_merge_targets_nearest_preceding_else_following():
    assert merge_targets([2, 3, 5], 7) == {2: 1, 3: 1, 5: 4}
    assert merge_targets([0, 1, 4], 6) == {0: 2, 1: 2, 4: 3}


def test_top_p_mask_keeps_exactly_the_top_fraction():
    torch.manual_seed(0)
    importance = torch.rand(20, 10)
    mask = top_p_mask(importance, 0.2)
    assert int(mask.sum()) == 40
    assert importance[mask].min() > importance[~mask].max()
    assert int(top_p_mask(torch.zeros(5, 5), 0.2).sum()) == 5  # ties resolved deterministically
    assert torch.equal(top_p_mask(torch.zeros(5, 5), 0.2), top_p_mask(torch.zeros(5, 5), 0.2))


def test_top_p_mask_is_built_where_the_importance_lives():
    """On a GPU run the mask met CUDA weights from a CPU-made zeros() (cuda:0 and cpu); the meta device
    shows the placement without a GPU."""
    mask = top_p_mask(torch.rand(4, 5, device="meta"), 0.2)
    assert mask.device.type == "meta" and mask.dtype == torch.bool and mask.shape == (4, 5)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 1.0])
def test_same_sign_merge_against_brute_force(p):
    torch.manual_seed(1)
    kept, removed, importance = torch.randn(16, 12), torch.randn(16, 12), torch.rand(16, 12)
    kept[0, 0] = 0.0  # a zero kept weight has no sign to match
    removed[0, 0], importance[0, 0] = 1.0, 10.0
    merged, stats = same_sign_merge(kept, removed, importance, p)

    k = round(p * kept.numel())
    threshold = torch.sort(importance.flatten(), descending=True).values[k - 1]
    expected = kept.clone()
    n_added = 0
    for i in range(16):
        for j in range(12):
            if importance[i, j] >= threshold and kept[i, j] * removed[i, j] > 0:
                expected[i, j] += removed[i, j]
                n_added += 1
    assert torch.equal(merged, expected)
    assert merged[0, 0] == 0.0
    assert stats.top_p_entries == k and stats.merged_entries == n_added
    changed = merged != kept
    assert bool(((kept * removed)[changed] > 0).all())  # only same-sign entries change
    assert torch.equal(torch.sign(merged[kept != 0]), torch.sign(kept[kept != 0]))  # no sign flips


def test_merge_does_not_modify_inputs():
    kept, removed, importance = torch.randn(4, 4), torch.randn(4, 4), torch.rand(4, 4)
    k0, r0 = kept.clone(), removed.clone()
    same_sign_merge(kept, removed, importance, 0.5)
    assert torch.equal(kept, k0) and torch.equal(removed, r0)


def test_top_p_mask_is_the_stable_sorts_selection_ties_included():
    """Brute force: the entries a stable descending sort keeps first (ties by lower flat index), on
    importances drawn from 4 values so most entries tie."""
    torch.manual_seed(2)
    for _ in range(50):
        importance = torch.randint(0, 4, (7, 9)).float()
        for p in (0.0, 0.1, 0.2, 0.5, 0.99, 1.0):
            k = round(p * importance.numel())
            expected = torch.zeros(importance.numel(), dtype=torch.bool)
            expected[torch.sort(importance.flatten(), descending=True, stable=True).indices[:k]] = True
            assert torch.equal(top_p_mask(importance, p), expected.reshape(importance.shape))
