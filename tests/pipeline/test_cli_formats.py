"""Float formats at the CLI: what a device class cannot run is one line, exit 2, before any work."""

import pytest

from tests.pipeline.test_cli import assert_clean_failure, invoke, set_args

NVFP4 = [
    "quantize.weight.bits=4",
    "quantize.weight.format=fp4_e2m1",
    "quantize.weight.granularity=per_group",
    "quantize.weight.group_size=16",
    "export.device_class=blackwell",
]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["quantize.weight.format=fp8_e4m3"],
            "fp8_e4m3 cannot run on device class orin: FP8 needs compute capability 8.9",
        ),
        ([*NVFP4, "quantize.keep_full_precision=[]"], "layer conv_in has 1 input channels, not a multiple of 16"),
        (NVFP4, "FP4 (NVFP4) weights run only on GEMM (Linear) layers on blackwell, not on a convolution"),
        (
            ["allocation={weight_formats: [fp8_e4m3]}"],
            "allocation.weight_formats fp8_e4m3 cannot run on device class orin: FP8 needs compute capability 8.9",
        ),
        (
            ["allocation={weight_formats: [fp4_e2m1]}", "export.device_class=ada"],
            "allocation.weight_formats fp4_e2m1 cannot run on device class ada: FP4 (NVFP4) needs compute capability 10.0",
        ),
        (
            ["allocation={ranks: [0, 8]}", "quantize.low_rank={rank: 8}"],
            "allocation.ranks offers low-rank branches per layer, quantize.low_rank gives every layer one",
        ),
    ],
    ids=[
        "fp8_for_orin",
        "fp4_inputs_not_multiple_of_16",
        "fp4_on_a_convolution",
        "fp8_option_for_orin",
        "fp4_option_for_ada",
        "ranks_and_low_rank",
    ],
)
def test_float_formats_the_target_cannot_run_fail_before_any_work(isolated_home, tmp_path, overrides, fragment):
    out = tmp_path / "out"
    assert_clean_failure(invoke(*set_args(overrides), "--out", str(out)), fragment, isolated_home)
    assert not out.exists()
