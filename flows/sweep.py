"""The ``sweep`` flow: one allocation, quantization and evaluation per budget, plus uniform baselines.

Each point is a full ``compress`` run (its own MLflow run, tagged with the sweep id); the
sensitivity table is computed once and reused from Prefect's cache by every budget. The sweep
writes ``sweep.json`` and ``pareto.png`` (packed bytes vs FD to real and vs accuracy, mixed
precision and uniform baselines on the same axes) and logs both to an MLflow run of its own.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from prefect import flow

from diffquant.errors import SpecError
from diffquant.flows.compress import compress_flow
from diffquant.registry.home import diffquant_home, ensure_writable, tracking_uri
from diffquant.registry.tracking import tracked_run
from diffquant.report import pareto_plot
from diffquant.spec import spec_from_dict
from diffquant.storage import write_json

logger = logging.getLogger(__name__)


def _point(label: str, kind: str, summary: dict[str, Any]) -> dict[str, Any]:
    quantized = summary["metrics"]["quantized"]
    usage = (summary.get("allocation") or {}).get("usage", {})
    return {
        "label": label,
        "kind": kind,
        "run_id": summary["run_id"],
        "packed_bytes": summary["sizes"]["packed_bytes"],
        "avg_weight_bits": usage.get("avg_weight_bits"),
        "fd_real": quantized.get("fd_real"),
        "fd_fp": quantized.get("fd_fp"),
        "accuracy": quantized.get("accuracy"),
        "psnr": quantized.get("psnr"),
        "sensitivity_cache_hit": (summary.get("allocation") or {}).get("sensitivity_cache_hit"),
        "summary_path": summary["summary_path"],
    }


def baseline_spec(base: dict[str, Any], bits: int, activation_bits: int) -> dict[str, Any]:
    """The spec of a sweep's uniform baseline: ``base`` without its allocation, every weight at ``bits``.

    Inputs are quantized at ``activation_bits`` (the allocation's first activation option) with the
    activation section's defaults otherwise; the weight section keeps its format and observer.
    """
    quantize = {
        **base["quantize"],
        "weight": {**base["quantize"]["weight"], "bits": bits},
        "activation": {"bits": activation_bits},
    }
    return {**base, "allocation": None, "quantize": quantize}


@flow(name="sweep", log_prints=False)
def sweep_flow(
    spec: dict[str, Any], budgets: list[float], baselines: list[int], out_dir: str | None = None
) -> dict[str, Any]:
    """Run the spec's allocation at each average-weight-bits budget and uniform baselines.

    Args:
        spec: A spec with an ``allocation`` section (its budget is replaced per point).
        budgets: Average weight bits budgets.
        baselines: Uniform weight bit-widths to compare against (same activation bits).
        out_dir: Output folder (default ``<DIFFQUANT_HOME>/sweeps/<time>``).

    Returns:
        Points, paths of ``sweep.json`` and ``pareto.png``, and the MLflow run id.

    Raises:
        SpecError: If the spec has no allocation section or a budget is not positive.
    """
    cfg = spec_from_dict(spec)
    if cfg.allocation is None:
        raise SpecError("sweep needs a spec with an 'allocation' section")
    if not budgets or any(b <= 0 for b in budgets):
        raise SpecError("--budgets must be positive numbers, e.g. 3,3.5,4")
    home = ensure_writable(diffquant_home(), "diffquant home")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = ensure_writable(Path(out_dir) if out_dir else home / "sweeps" / stamp, "output folder")
    base = cfg.to_dict()
    base["promote"] = {**base["promote"], "register_model": False}  # a sweep explores; it registers nothing
    points = []
    experiment = "sweeps"
    for budget in budgets:
        data = {**base, "allocation": {**base["allocation"], "budget": {"avg_weight_bits": budget}}}
        summary = compress_flow(spec=data, out_dir=str(out / f"mixed-{budget:g}"))
        points.append(_point(f"mixed <= {budget:g} bits", "mixed", summary))
        experiment = summary["experiment"]
    act = cfg.allocation.activation_bits[0]
    for bits in baselines:
        summary = compress_flow(spec=baseline_spec(base, bits, act), out_dir=str(out / f"uniform-w{bits}"))
        point = _point(f"uniform W{bits}A{act}", "uniform", summary)
        point["avg_weight_bits"] = float(bits)
        points.append(point)
    sweep_path = write_json({"spec_hash": cfg.spec_hash(), "budgets": budgets, "points": points}, out / "sweep.json")
    plot = pareto_plot(points, out / "pareto.png")
    with tracked_run(
        tracking_uri(home),
        experiment,
        f"sweep-{stamp}",
        home / "mlartifacts",
        tags={"spec_hash": cfg.spec_hash()},
    ) as tracker:
        tracker.log_params({"budgets": budgets, "baselines": baselines})
        tracker.log_artifact(sweep_path)
        tracker.log_artifact(plot)
        run_id = tracker.run_id
    return {"points": points, "sweep_path": str(sweep_path), "pareto_path": str(plot), "run_id": run_id}
