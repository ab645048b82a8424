"""Bad outlier-method settings -> one line naming the key, exit 2, nothing written (before any model work)."""

from __future__ import annotations

import pytest

from tests.pipeline.conftest import isolated_home, mlflow_runs  # noqa: F401  (fixture reused)
from tests.pipeline.test_cli import assert_clean_failure, invoke
from tests.reliability.test_spec_input import assert_nothing_written


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["quantize.low_rank={rank: 64}"], "quantize.low_rank.rank: rank 64 is larger than min(out, in) = 32"),
        (["quantize.low_rank={rank: 4, layers: [nope*]}"], "quantize.low_rank.layers: pattern 'nope*' matches no"),
        (["quantize.smooth={alpha: 1.5}"], "quantize.smooth.alpha"),
        (["quantize.smooth={alpha: -0.1}"], "quantize.smooth.alpha"),
        (["quantize.activation.shift=zero_point"], "quantize.activation.shift"),
        (["quantize.smooth={}", "quantize.weight.rounding=gptq"], "quantize.weight.rounding: gptq cannot be combined"),
    ],
)
def test_bad_outlier_settings_fail_before_the_run(isolated_home, tmp_path, overrides, fragment):  # noqa: F811
    args = [arg for item in overrides for arg in ("--set", item)]
    result = invoke(*args, "--out", str(tmp_path / "out"))
    assert_clean_failure(result, fragment, isolated_home)
    assert_nothing_written(isolated_home, tmp_path / "out")
