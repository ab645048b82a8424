import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant.quant.formats import IntFormat, dequantize, fake_quant, quantize, scale_from_absmax

bits = st.integers(min_value=2, max_value=8)
scales = st.floats(min_value=1e-4, max_value=1e3, allow_nan=False)
values = st.lists(st.floats(min_value=-1.0, max_value=1.0, allow_nan=False), min_size=1, max_size=64)


@given(bits)
def test_format_range(b):
    fmt = IntFormat(b)
    assert fmt.qmax - fmt.qmin + 1 == 2**b
    assert fmt.qmin == -fmt.qmax - 1


def test_format_rejects_out_of_range_bits():
    for b in (0, 1, 9, 16):
        try:
            IntFormat(b)
        except ValueError as error:
            assert str(b) in str(error)
        else:
            raise AssertionError(f"{b} bits accepted")


@settings(max_examples=200, deadline=None)
@given(bits, scales, values)
def test_round_trip_within_half_step_inside_range(b, s, unit):
    fmt = IntFormat(b)
    scale = torch.tensor(s, dtype=torch.float64)
    # map [-1, 1] onto the representable range [qmin*s, qmax*s]
    x = torch.tensor(unit, dtype=torch.float64)
    x = torch.where(x < 0, -x * fmt.qmin * s, x * fmt.qmax * s)
    err = (dequantize(quantize(x, scale, fmt), scale) - x).abs()
    assert bool((err <= s / 2 * (1 + 1e-9)).all())


@settings(max_examples=200, deadline=None)
@given(bits, scales, values)
def test_fake_quant_idempotent_and_on_grid(b, s, unit):
    fmt = IntFormat(b)
    scale = torch.tensor(s, dtype=torch.float64)
    x = torch.tensor(unit, dtype=torch.float64) * 3 * fmt.qmax * s  # includes clamped values
    once = fake_quant(x, scale, fmt)
    assert torch.equal(fake_quant(once, scale, fmt), once)
    q = once / s
    assert torch.allclose(q, q.round(), atol=1e-6)
    assert bool((q >= fmt.qmin - 1e-6).all() and (q <= fmt.qmax + 1e-6).all())


@given(bits, st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
def test_scale_positive(b, absmax):
    assert float(scale_from_absmax(torch.tensor(absmax), IntFormat(b))) > 0


def test_straight_through_gradient_is_one_inside_zero_outside():
    fmt = IntFormat(4)
    scale = torch.tensor(0.1)
    x = torch.tensor([-2.0, -0.33, 0.0, 0.26, 0.69, 5.0], requires_grad=True)
    fake_quant(x, scale, fmt).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_per_channel_scales_broadcast_on_axis():
    fmt = IntFormat(8)
    w = torch.tensor([[1.0, -0.5], [10.0, 5.0]])
    scale = torch.tensor([1.0 / 127, 10.0 / 127])
    out = fake_quant(w, scale, fmt, axis=0)
    assert torch.allclose(out, w, atol=10.0 / 127 / 2)
    assert out[0, 0] == 1.0 and out[1, 0] == 10.0


@settings(max_examples=200, deadline=None)
@given(bits, scales, st.lists(st.floats(min_value=-3.0, max_value=3.0, allow_nan=False), min_size=1, max_size=64))
def test_inference_path_matches_autograd_path(b, s, unit):
    fmt = IntFormat(b)
    x = torch.tensor(unit, dtype=torch.float32) * fmt.qmax * s
    scale = torch.tensor(s, dtype=torch.float32)
    with torch.no_grad():
        fast = fake_quant(x, scale, fmt)
    slow = fake_quant(x.clone().requires_grad_(True), scale, fmt).detach()
    assert torch.equal(fast, slow)


def test_per_channel_gradient():
    fmt = IntFormat(4)
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scale = torch.tensor([0.1, 0.2, 0.05])
    out = fake_quant(w, scale, fmt, axis=0)
    with torch.no_grad():
        assert torch.equal(out, fake_quant(w, scale, fmt, axis=0))
    out.sum().backward()
    inside = (w.abs() <= 7 * scale[:, None]).float()
    assert torch.equal(w.grad, inside)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([2, 4, 8]),
    st.integers(1, 4),
    st.integers(1, 3),
    st.sampled_from([(), (3, 3), (1, 1)]),
    st.integers(0, 10_000),
)
def test_grouped_fake_quant_matches_per_group_loop(b, out_ch, n_groups, kernel, seed):
    from diffquant.quant.formats import fake_quant_grouped
    from diffquant.quant.observers import weight_scale

    group = 4
    torch.manual_seed(seed)
    w = torch.randn(out_ch, n_groups * group, *kernel)
    fmt = IntFormat(b)
    scale = weight_scale(w, fmt, "minmax", group_size=group)
    assert scale.shape == (out_ch, n_groups, *kernel)
    got = fake_quant_grouped(w, scale, fmt, group)
    expected = torch.empty_like(w)
    for o in range(out_ch):
        for gi in range(n_groups):
            block = w[o, gi * group : (gi + 1) * group]  # (group, *kernel): one scale per kernel position
            s = scale_from_absmax(block.abs().amax(dim=0), fmt)
            expected[o, gi * group : (gi + 1) * group] = torch.clamp(torch.round(block / s), fmt.qmin, fmt.qmax) * s
    assert torch.allclose(got, expected, atol=1e-6)


def test_group_view_rejects_indivisible_channels():
    from diffquant.quant.formats import group_view

    with pytest.raises(ValueError, match="no groups of 4"):
        group_view(torch.zeros(2, 6), 4)
