"""Selection strategies: sizes, determinism, and timestep histograms that match each strategy."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant.calibration.selection import (
    STRATEGIES,
    SelectionParams,
    farthest_points,
    select_indices,
    timestep_weights,
)
from diffquant.errors import DataError

STEPS = 20
TRAJ = 16
TIMESTEPS = torch.arange(STEPS - 1, -1, -1) * 50  # 950, 900, ..., 0 like DDIM


def make_pool(seed=0, dim=6):
    t = TIMESTEPS.repeat(TRAJ)  # trajectory-major, like collect_pool
    g = torch.Generator().manual_seed(seed)
    # features drift with t, so timesteps are distinguishable
    features = torch.randn(t.numel(), dim, generator=g) * 0.3 + (t.float() / 1000)[:, None] * torch.linspace(1, 2, dim)
    return t, features


def histogram(t, chosen):
    return {int(v): int((t[chosen] == v).sum()) for v in torch.unique(t)}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(STRATEGIES), st.integers(1, STEPS * TRAJ), st.integers(0, 1000))
def test_sizes_unique_and_deterministic(strategy, size, seed):
    t, f = make_pool()
    a = select_indices(t, f, strategy, size, seed)
    assert a.numel() == size and a.unique().numel() == size
    assert int(a.min()) >= 0 and int(a.max()) < t.numel()
    assert torch.equal(a, select_indices(t, f, strategy, size, seed))


def test_seeds_change_the_selection():
    t, f = make_pool()
    for strategy in STRATEGIES:
        assert not torch.equal(select_indices(t, f, strategy, 64, 0), select_indices(t, f, strategy, 64, 1))


def test_uniform_timesteps_histogram_is_flat():
    t, f = make_pool()
    counts = list(histogram(t, select_indices(t, f, "uniform_timesteps", 100, 0)).values())
    assert max(counts) - min(counts) <= 1 and sum(counts) == 100
    few = histogram(t, select_indices(t, f, "uniform_timesteps", 5, 0))
    chosen_t = [k for k, v in few.items() if v]
    assert len(chosen_t) == 5 and chosen_t[0] == 0 and chosen_t[-1] == 950  # evenly spread, ends included


def test_normal_timesteps_histogram_follows_the_normal():
    t, f = make_pool()
    params = SelectionParams(normal_mean=0.3, normal_std=0.1)
    hist = histogram(t, select_indices(t, f, "normal_timesteps", 80, 0, params))
    mean = sum(k * v for k, v in hist.items()) / 80
    assert 250 < mean < 350
    assert hist[950] == 0 and hist[0] <= 2
    near = sum(v for k, v in hist.items() if 150 <= k <= 450)  # +-1.5 std holds 87% of the mass
    assert near >= 0.8 * 80


def test_normal_timesteps_overflow_goes_to_neighbours():
    t, f = make_pool()
    params = SelectionParams(normal_mean=0.5, normal_std=0.001)
    hist = histogram(t, select_indices(t, f, "normal_timesteps", 40, 0, params))
    assert hist[500] == TRAJ  # full, the rest spills to the nearest timesteps
    assert hist[450] + hist[550] == 40 - TRAJ


def test_density_diversity_allocation_follows_weights():
    t, f = make_pool()
    weights = timestep_weights(t, f, SelectionParams())
    assert weights.shape == (STEPS,) and float(weights.min()) >= 0
    hist = histogram(t, select_indices(t, f, "density_diversity", 100, 0))
    counts = torch.tensor([hist[int(v)] for v in torch.unique(t)])
    expected = weights / weights.sum() * 100
    assert int(counts.sum()) == 100
    assert float((counts - expected).abs().max()) <= 1.0 + 1e-9


def test_density_diversity_weights_brute_force():
    t, f = make_pool(dim=3)
    params = SelectionParams(radius=0.05, diversity_weight=0.7)
    values = torch.unique(t)
    means = [f[t == v].double().mean(0) for v in values]
    n = len(values)
    density = torch.zeros(n, dtype=torch.float64)
    diversity = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                density[i] += float(((means[i] - means[j]) ** 2).mean() <= 0.05)
                diversity[i] += 1 - torch.nn.functional.cosine_similarity(means[i], means[j], dim=0)

    def mm(v):
        return (v - v.min()) / (v.max() - v.min())

    assert torch.allclose(timestep_weights(t, f, params), mm(density) + 0.7 * mm(diversity))


def test_farthest_points_covers_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(25, 2, generator=g) for c in centers])
    chosen = farthest_points(points, 4, torch.Generator().manual_seed(1))
    assert sorted({int(i) // 25 for i in chosen}) == [0, 1, 2, 3]


def test_errors():
    t, f = make_pool()
    with pytest.raises(DataError, match="unknown calibration strategy"):
        select_indices(t, f, "magic", 4, 0)
    with pytest.raises(DataError, match="pool size"):
        select_indices(t, f, "random", t.numel() + 1, 0)
    with pytest.raises(DataError, match="features"):
        select_indices(t, None, "density_diversity", 4, 0)


def test_a_selection_that_takes_the_whole_pool_is_refused_naming_the_size():
    """Nothing would be left for SQNR (the evaluation crashed on an empty set): refused before any work."""
    from diffquant.calibration.pool import collect_pool
    from diffquant.calibration.selection import select_calibration
    from diffquant.errors import ConfigError
    from diffquant.models.loading import load_model
    from diffquant.spec import CalibrationSpec

    model = load_model("digits-unet")
    pool = collect_pool(model, trajectories=2, steps=4)
    with pytest.raises(ConfigError, match=r"^size: 8 takes the whole candidate pool of 8 inputs"):
        select_calibration(pool, model, CalibrationSpec(strategy="random", size=8))
    assert len(select_calibration(pool, model, CalibrationSpec(strategy="random", size=7)).sqnr) == 1
