"""Selection strategies: sizes, determinism, and timestep histograms that match each strategy."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant.calibration.selection import (
    STRATEGIES,
    SelectionParams,
    farthest_points,
    mean_feature_weights,
    pair_statistics,
    paired_slots,
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


def official_weights(t, features, radius, lam):
    """EDA-DM's TDAC weights as its generator computes them: one (B, C, H, W) map per timestep, loops."""
    values = torch.unique(t)
    maps = [features[t == v].double() for v in values]  # pool order keeps trajectories aligned
    cosine = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    n = len(maps)
    density = torch.zeros(n, dtype=torch.float64)
    diversity = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                density[i] += float(torch.mean((maps[i] - maps[j]) ** 2) <= radius)
                diversity[i] += torch.sum(1 - cosine(maps[i], maps[j]))

    def mm(v):
        return (v - v.min()) / (v.max() - v.min())

    return mm(density) + lam * mm(diversity)


def map_pool(seed=0, steps=6, traj=3, shape=(4, 3, 2)):
    """Timestep-major pool (like collect_pool) of per-sample features that drift with t."""
    t = (torch.arange(steps - 1, -1, -1) * 100).repeat_interleave(traj)
    g = torch.Generator().manual_seed(seed)
    drift = (t.float() / 300).reshape(-1, *[1] * len(shape))
    features = torch.randn(t.numel(), *shape, generator=g) + drift * torch.randn(1, *shape, generator=g)
    return t, features


def _slots(t):
    return paired_slots([torch.nonzero(t == v).squeeze(1) for v in torch.unique(t)])


def test_density_diversity_weights_match_the_official_generator():
    """Per-sample features paired across timesteps; averaging over samples first (the old formula) differs."""
    t, f = map_pool()
    params = SelectionParams(radius=1.5, diversity_weight=1.2)
    expected = official_weights(t, f, 1.5, 1.2)
    assert torch.allclose(timestep_weights(t, f, params), expected, atol=1e-9)
    # the oracle tells the formulas apart: sample-averaged features give other weights
    means = torch.stack([f[t == v].mean(0) for v in torch.unique(t)])
    assert not torch.allclose(official_weights(torch.unique(t), means, 1.5, 1.2), expected)


def test_pair_statistics_in_chunks_equal_one_pass_and_brute_force():
    t, f = map_pool(seed=3, traj=5)
    slots = _slots(t)
    one = pair_statistics(f, slots)
    small = pair_statistics(f, slots, chunk_elements=1)  # one trajectory at a time
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(one, small, strict=True))
    a, b = f[slots[0]].double(), f[slots[4]].double()
    assert float(one[0][0, 4]) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-6)
    assert float(one[1][0, 4]) == pytest.approx(float((1 - cos).sum()), rel=1e-9)


def test_token_features_take_the_last_axis_as_channels():
    """Transformer features (N, tokens, D): the cosine is over D, per token."""
    t, f = map_pool(shape=(5, 4))
    slots = _slots(t)
    _, cosine = pair_statistics(f, slots)
    a, b = f[slots[1]].double(), f[slots[2]].double()
    expected = (1 - torch.nn.functional.cosine_similarity(a, b, dim=2, eps=1e-6)).sum()
    assert float(cosine[1, 2]) == pytest.approx(float(expected), rel=1e-9)


def test_density_diversity_draws_at_random_within_each_timestep():
    t, f = make_pool()
    chosen = [select_indices(t, f, "density_diversity", 60, seed) for seed in range(2)]
    assert histogram(t, chosen[0]) == histogram(t, chosen[1])  # the same counts per timestep
    assert not torch.equal(chosen[0], chosen[1])  # different samples within them


def test_default_features_are_the_mid_attention_input():
    """digits-unet: the family's feature module's output is what the mid-block attention reads."""
    from diffquant.calibration.pool import collect_pool
    from diffquant.calibration.selection import pool_features
    from diffquant.models.loading import load_model

    model = load_model("digits-unet")
    pool = collect_pool(model, trajectories=2, steps=3)
    seen = []
    handle = model.unet.mid_block.attentions[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        features = pool_features(model.unet, pool, model.conditional, model.family_info.feature_module)
    finally:
        handle.remove()
    assert features.dim() == 4 and torch.equal(features, torch.cat(seen))


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


def test_kcenter_weights_match_a_brute_force_of_the_mean_feature_formula():
    t, f = make_pool()
    params = SelectionParams()
    weights = mean_feature_weights(t, f, params)
    steps = sorted(torch.unique(t).tolist())
    means = [f[t == s].double().mean(0) for s in steps]
    n = len(steps)
    sq = [[float(((means[i] - means[j]) ** 2).mean()) for j in range(n)] for i in range(n)]
    off = [sq[i][j] for i in range(n) for j in range(n) if i != j]
    radius = sorted(off)[(len(off) - 1) // 2]  # torch's median: the lower middle value
    density = torch.tensor([sum(1 for j in range(n) if j != i and sq[i][j] <= radius) for i in range(n)]).double()
    cos = [
        [float(torch.nn.functional.cosine_similarity(means[i], means[j], dim=0)) for j in range(n)] for i in range(n)
    ]
    diversity = torch.tensor([sum(1 - cos[i][j] for j in range(n) if j != i) for i in range(n)]).double()

    def norm(v):
        return (v - v.min()) / (v.max() - v.min())

    assert torch.allclose(weights, norm(density) + params.diversity_weight * norm(diversity), atol=1e-9)


def test_kcenter_picks_the_greedy_farthest_points_within_each_timestep():
    t, f = make_pool()
    chosen = select_indices(t, f, "density_diversity_kcenter", 60, 3)
    for step in torch.unique(t[chosen]).tolist():
        idx = torch.nonzero(t == step).squeeze(1)
        picked = [i for i in chosen.tolist() if int(t[i]) == step]
        k = len(picked)
        if k < 3 or k >= idx.numel():
            continue
        points = f[idx].float()
        # greedy oracle: every pick after the first is the point farthest from those before it
        order = farthest_points(points, k, torch.Generator().manual_seed(0))
        assert len(set(order.tolist())) == k
        for m in range(1, k):
            before = points[order[:m]]
            gaps = torch.cdist(points, before).min(1).values
            assert float(gaps[order[m]]) == pytest.approx(float(gaps.max()))
        assert set(idx[farthest_points(points, k, torch.Generator().manual_seed(0))].tolist()) <= set(idx.tolist())


def test_kcenter_needs_features():
    t, _ = make_pool()
    with pytest.raises(DataError, match="density_diversity_kcenter needs denoiser features"):
        select_indices(t, None, "density_diversity_kcenter", 10, 0)
