"""Stage: estimate the run's cost (denoiser evaluations, seconds, peak memory per stage) before it runs."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task

from diffquant.cost import TIMING_BUDGET_S, CostEstimate, estimate_cost
from diffquant.errors import spec_section
from diffquant.export.parity import onnxruntime_denoiser
from diffquant.models.cache import model_copy
from diffquant.spec import CompressionSpec

RUN_TIMING_BUDGET_S = 1.0
"""Timing budget per kind of forward in a real run (its estimate is one stage of it; ``--dry-run`` takes
:data:`~diffquant.cost.TIMING_BUDGET_S`)."""


def run_estimate(
    spec: CompressionSpec,
    pool_cached: bool,
    fp_cached: bool,
    budget_s: float = TIMING_BUDGET_S,
    time_export: bool = True,
) -> CostEstimate:
    """:func:`diffquant.cost.estimate_cost` of ``spec`` with the parity passes timed through onnxruntime.

    With ``time_export`` (``--dry-run``) the timing copy is exported to a temporary folder (removed
    afterwards) when the spec exports; without it the parity passes are costed as the fake-quant
    forward.
    """
    model = model_copy(name=spec.model.name, path=spec.model.path, prompts=spec.model.prompts)
    with tempfile.TemporaryDirectory(prefix="diffquant-estimate-") as folder, spec_section("runtime"):
        exported = None
        if spec.export.onnx and time_export:
            exported = partial(
                onnxruntime_denoiser, folder=Path(folder), opset=spec.export.opset, target=spec.export.target
            )
        return estimate_cost(
            spec, model, pool_cached=pool_cached, fp_cached=fp_cached, exported=exported, budget_s=budget_s
        )


@task(name="estimate")
def estimate_task(spec: CompressionSpec, pool_cached: bool, fp_cached: bool) -> dict[str, Any]:
    """The run's cost estimate (:func:`run_estimate`, what ``--dry-run`` prints), as data.

    A real run does not export a timing copy (3-4 s of a short run on the reference model): its
    parity passes are costed as the fake-quant forward, which ``--dry-run`` times through onnxruntime.
    """
    return run_estimate(spec, pool_cached, fp_cached, RUN_TIMING_BUDGET_S, time_export=False).to_dict()
