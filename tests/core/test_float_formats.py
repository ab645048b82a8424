"""FP8 / FP6 / FP4 fake quant against a table-driven reference over every code of each format.

The reference decodes every bit pattern of the format (its own decoder, not the module's), and
rounds by brute force: the nearest table value, a tie going to the code with an even mantissa,
after saturating to the largest finite value. The fake quant must equal it bit for bit, and so
must torch's float8 casts (after the same clamp) and ml_dtypes' FP6/FP4 casts.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant.quant.float_formats import FLOAT_FORMATS, NVFP4_BLOCK, float_format, nvfp4_scales
from diffquant.quant.formats import fake_quant, fake_quant_grouped, scale_from_absmax

# name -> (exponent bits, mantissa bits, special patterns: "fn" = only S.1..1.1..1 is NaN, "ieee" = top exponent is Inf/NaN, None)
LAYOUTS = {
    "fp8_e4m3": (4, 3, "fn"),
    "fp8_e5m2": (5, 2, "ieee"),
    "fp6_e3m2": (3, 2, None),
    "fp6_e2m3": (2, 3, None),
    "fp4_e2m1": (2, 1, None),
}
ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
FINITE_CODES = {"fp8_e4m3": 254, "fp8_e5m2": 248, "fp6_e3m2": 64, "fp6_e2m3": 64, "fp4_e2m1": 16}


def decode_table(name: str) -> dict[int, float]:
    """code -> value for every finite bit pattern of the format."""
    e, m, special = LAYOUTS[name]
    bias = 2 ** (e - 1) - 1
    table = {}
    for code in range(2 ** (1 + e + m)):
        sign = -1.0 if code >> (e + m) else 1.0
        field = (code >> m) & (2**e - 1)
        mantissa = code & (2**m - 1)
        if special == "fn" and field == 2**e - 1 and mantissa == 2**m - 1:
            continue
        if special == "ieee" and field == 2**e - 1:
            continue
        if field == 0:
            value = mantissa / 2**m * 2.0 ** (1 - bias)
        else:
            value = (1 + mantissa / 2**m) * 2.0 ** (field - bias)
        table[code] = sign * value
    return table


def reference_round(name: str, inputs: np.ndarray) -> np.ndarray:
    """Brute-force round-to-nearest-even with saturation over the decoded table."""
    table = decode_table(name)
    codes = np.array(list(table))
    values = np.array([table[c] for c in codes])
    largest = values.max()
    out = np.empty_like(inputs, dtype=np.float64)
    for i, v in enumerate(inputs.astype(np.float64)):
        if math.isnan(v):
            out[i] = np.nan
            continue
        v = min(max(v, -largest), largest)
        distance = np.abs(values - v)
        best = distance.min()
        tied = codes[distance == best]
        even = [c for c in tied if c % 2 == 0]  # the mantissa's last bit is the code's last bit
        out[i] = table[int((even or list(tied))[0])]
    return out


def probe_inputs(name: str) -> np.ndarray:
    """Every value, every midpoint (a tie), one float32 ulp either side of it, and out-of-range values."""
    fmt = FLOAT_FORMATS[name]
    values = np.unique(np.array(list(decode_table(name).values())))
    mids = (values[1:] + values[:-1]) / 2
    mids32 = mids.astype(np.float32)
    nearby = np.concatenate([np.nextafter(mids32, np.float32(np.inf)), np.nextafter(mids32, np.float32(-np.inf))])
    beyond = np.array([1.0001, 1.5, 4.0, 1e6]) * fmt.max_value
    rng = np.random.default_rng(0)
    random = rng.choice([-1, 1], 2000) * np.exp(rng.uniform(np.log(1e-4), np.log(fmt.max_value * 2), 2000))
    return np.concatenate([values, mids, nearby, beyond, -beyond, random]).astype(np.float32)


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
def test_table_has_every_finite_code_and_matches_the_format(name):
    table = decode_table(name)
    assert len(table) == FINITE_CODES[name]
    fmt = FLOAT_FORMATS[name]
    assert fmt.max_value == max(table.values())
    assert torch.equal(fmt.values(), torch.tensor(sorted(set(table.values())), dtype=torch.float64))
    assert fmt.bits == 1 + LAYOUTS[name][0] + LAYOUTS[name][1]


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_equals_brute_force_reference_over_all_codes(name, dtype):
    inputs = probe_inputs(name)
    expected = torch.from_numpy(reference_round(name, inputs)).to(dtype)
    got = FLOAT_FORMATS[name].round(torch.from_numpy(inputs).to(dtype))
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("name", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_is_bit_exact_with_torch_saturating_cast(name, dtype):
    fmt = FLOAT_FORMATS[name]
    x = torch.from_numpy(probe_inputs(name))
    scale = torch.tensor(0.37)
    cast = (x / scale).clamp(-fmt.max_value, fmt.max_value).to(dtype).float() * scale
    assert torch.equal(fake_quant(x, scale, fmt), cast)
    generic = fmt.round((x / scale).double()).float() * scale  # the arithmetic path agrees with the cast
    assert torch.equal(generic, cast)


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
def test_matches_ml_dtypes_casts_after_clamping(name):
    fmt = FLOAT_FORMATS[name]
    x = probe_inputs(name)
    clamped = np.clip(x, -fmt.max_value, fmt.max_value)
    expected = clamped.astype(ML_DTYPES[name]).astype(np.float32)
    assert np.array_equal(fmt.round(torch.from_numpy(x)).numpy(), expected)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(list(FLOAT_FORMATS)),
    st.floats(min_value=1e-3, max_value=1e3),
    st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), min_size=1, max_size=32),
)
def test_fake_quant_idempotent_on_grid_and_saturating(name, s, xs):
    fmt = FLOAT_FORMATS[name]
    scale = torch.tensor(s, dtype=torch.float32)
    x = torch.tensor(xs, dtype=torch.float32)
    once = fake_quant(x, scale, fmt)
    assert torch.equal(fake_quant(once, scale, fmt), once)
    assert bool((once.abs() <= fmt.max_value * scale * (1 + 1e-6)).all())
    on_grid = torch.isin((once / scale).double(), fmt.values()) | torch.isclose(
        (once / scale).double().unsqueeze(-1), fmt.values()
    ).any(-1)
    assert bool(on_grid.all())


def test_straight_through_gradient_inside_range_only():
    fmt = float_format("fp8_e4m3")
    scale = torch.tensor(0.01)
    x = torch.tensor([-10.0, -1.3, 0.0, 0.7, 4.47, 4.49, 100.0], requires_grad=True)
    out = fake_quant(x, scale, fmt)
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert torch.equal(out.detach(), fake_quant(x.detach(), scale, fmt))


def test_scale_maps_absmax_to_the_largest_value():
    for fmt in FLOAT_FORMATS.values():
        scale = scale_from_absmax(torch.tensor(3.0), fmt)
        assert float(fake_quant(torch.tensor(3.0), scale, fmt)) == pytest.approx(3.0, rel=1e-6)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="fp8_e4m3"):
        float_format("fp7_e3m3")


def nvfp4_reference(w: torch.Tensor) -> torch.Tensor:
    """NVFP4 by hand: global = absmax / 2688, code = E4M3(block absmax / 6 / global), element = E2M1(w / (code*global))."""
    e4m3, e2m1 = FLOAT_FORMATS["fp8_e4m3"], FLOAT_FORMATS["fp4_e2m1"]
    global_scale = w.abs().max() / (6 * 448)
    blocks = w.reshape(w.shape[0], -1, NVFP4_BLOCK)
    codes = torch.from_numpy(
        reference_round("fp8_e4m3", (blocks.abs().amax(-1) / 6 / global_scale).numpy().ravel())
    ).float()
    codes = torch.clamp(codes.reshape(blocks.shape[:2]), min=2.0**-9)
    block_scale = (codes * global_scale).unsqueeze(-1)
    elements = torch.from_numpy(reference_round("fp4_e2m1", (blocks / block_scale).numpy().ravel())).float()
    assert e4m3.max_value == 448 and e2m1.max_value == 6
    return (elements.reshape(blocks.shape) * block_scale).reshape(w.shape)


def test_nvfp4_two_level_scales_match_the_hand_reference():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 64)
    w[3, 16:32] = 0.0  # an all-zero block keeps a positive scale
    codes, global_scale = nvfp4_scales(w)
    assert codes.shape == (8, 4) and global_scale.shape == ()
    assert bool(torch.isin(codes.double(), FLOAT_FORMATS["fp8_e4m3"].values()).all()) and bool((codes > 0).all())
    out = fake_quant_grouped(w, codes * global_scale, FLOAT_FORMATS["fp4_e2m1"], NVFP4_BLOCK)
    assert torch.equal(out, nvfp4_reference(w))
    assert torch.equal(out[3, 16:32], torch.zeros(16))
