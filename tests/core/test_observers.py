import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant.quant.formats import IntFormat, fake_quant
from diffquant.quant.observers import MSE_GRID, ActivationObserver, mse_scale, weight_scale


def test_minmax_per_channel_matches_absmax():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    fmt = IntFormat(8)
    scale = weight_scale(w, fmt, "minmax", axis=0)
    expected = w.abs().reshape(6, -1).amax(1) / 127
    assert torch.allclose(scale, expected)


def test_per_tensor_scale_is_scalar():
    w = torch.randn(4, 5)
    assert weight_scale(w, IntFormat(8), "minmax", axis=None).shape == ()


def test_percentile_is_below_minmax_with_outlier():
    w = torch.randn(1, 10000, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 100.0
    fmt = IntFormat(8)
    assert weight_scale(w, fmt, "percentile", axis=0) < weight_scale(w, fmt, "minmax", axis=0) / 10


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10_000))
def test_mse_scale_equals_brute_force_over_grid(b, seed):
    fmt = IntFormat(b)
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * torch.tensor([[1.0], [5.0], [0.1]])
    found = mse_scale(x, fmt, axis=0)
    for c in range(3):
        row = x[c]
        errors = []
        for ratio in MSE_GRID:
            s = torch.clamp(row.abs().max() * ratio / fmt.qmax, min=1e-12)
            errors.append(float((fake_quant(row, s, fmt) - row).pow(2).mean()))
        best = min(errors)
        got = float((fake_quant(row, found[c], fmt) - row).pow(2).mean())
        assert got <= best * (1 + 1e-5) + 1e-12


def test_mse_never_worse_than_minmax():
    fmt = IntFormat(4)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    mm = weight_scale(x, fmt, "minmax", axis=0)
    mse = weight_scale(x, fmt, "mse", axis=0)
    err = lambda s: (fake_quant(x, s, fmt, axis=0) - x).pow(2).mean(1)  # noqa: E731
    assert bool((err(mse) <= err(mm) + 1e-9).all())


def test_activation_observer_accumulates_batches():
    obs = ActivationObserver("minmax")
    obs.update(torch.tensor([1.0, -3.0]))
    obs.update(torch.tensor([2.0]))
    assert float(obs.scale(IntFormat(8))) == pytest.approx(3.0 / 127)


def test_activation_observer_percentile_and_mse_deterministic():
    data = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    for name in ("percentile", "mse"):
        scales = []
        for _ in range(2):
            obs = ActivationObserver(name, seed=3)
            for batch in data:
                obs.update(batch)
            scales.append(float(obs.scale(IntFormat(6))))
        assert scales[0] == scales[1] > 0


def test_activation_observer_rejects_nan():
    obs = ActivationObserver("minmax")
    try:
        obs.update(torch.tensor([1.0, float("nan")]))
    except FloatingPointError:
        return
    raise AssertionError("NaN accepted")


def test_unknown_observer():
    try:
        weight_scale(torch.ones(2, 2), IntFormat(8), "bogus")
    except ValueError as error:
        assert "bogus" in str(error)
    else:
        raise AssertionError


@pytest.mark.parametrize("observer", ["percentile"])
def test_reservoir_is_uniform_over_batches_whatever_their_order(observer):
    """48 batches of constant value i (i = 0..47, 4.8M values in all, past the reservoir's 1M): the kept
    sample's median is the data's (23.5), in either order (the old reservoir decayed early batches: 40)."""
    from diffquant.quant.observers import RESERVOIR_SIZE, ActivationObserver

    batches = [torch.full((100_000,), float(i)) for i in range(48)]
    medians, scales = [], []
    for order in (batches, batches[::-1]):
        obs = ActivationObserver(observer, seed=0)
        for batch in order:
            obs.update(batch)
        assert obs._values.numel() == RESERVOIR_SIZE
        medians.append(float(obs._values.median()))
        scales.append(float(obs.scale(IntFormat(8))))
    assert all(22.5 <= m <= 25.5 for m in medians), medians
    assert abs(scales[0] - scales[1]) <= 0.02 * scales[0], scales


def test_reservoir_memory_is_bounded_and_small_batches_are_kept_whole():
    from diffquant.quant.observers import ActivationObserver

    obs = ActivationObserver("percentile", reservoir=1000)
    obs.update(torch.arange(600.0))
    assert obs._values.numel() == 600 and set(obs._values.tolist()) == set(range(600))
    obs.update(torch.arange(600.0, 10_600.0))
    assert obs._values.numel() == 1000 and obs._keys.numel() == 1000
    assert len(set(obs._values.tolist())) == 1000  # without replacement
