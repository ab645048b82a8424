"""Sensitivity stage on 1 vs 2 workers: Prefect's thread pool and prefect-dask's LocalCluster.

Measures the ``sensitivity`` subflow (the mapped per-layer tasks of
``configs/digits-unet-mixed-w4a8.yaml``: weight options 2/3/4/6/8 bits per channel and int4 in
groups of 32/64, 8-bit inputs, 128 calibration inputs) on digits-unet with a fresh cache each time,
so every task computes. Variants: the default runner with 1 thread, Dask with 1 worker process
and Dask with 2 worker processes (one thread each). Checks that every variant produced the same
table and writes the ``parallel`` section of BENCHMARKS.md and ``bench/results/parallel.json``.

Run: ``.venv/bin/python bench/parallel.py`` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, machine, replace_section, temporary_home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers-per-task", type=int, default=4)
    parser.add_argument("--variants", default="default:1,dask:1,dask:2")
    args = parser.parse_args()
    home = temporary_home("diffquant-parallel-")
    from diffquant.calibration.pool import collect_pool, subset
    from diffquant.calibration.selection import select
    from diffquant.flows.sensitivity import sensitivity_flow, task_runner_for
    from diffquant.mixed_precision.sensitivity import SensitivityTable
    from diffquant.models.loading import load_model
    from diffquant.quant.plan import quantizable_layers
    from diffquant.spec import RuntimeSpec, load_spec
    from diffquant.tasks.artifacts import CalibrationArtifact, FileRef, ModelInfo, SensitivityRequest
    from diffquant.tasks.common import save_trajectories

    spec = load_spec(ROOT / "configs" / "digits-unet-mixed-w4a8.yaml")
    model = load_model("digits-unet")
    pool = collect_pool(model, spec.calibration.trajectories, spec.sampler.steps, spec.calibration.seed)
    calib = subset(pool, select(pool, "random", spec.calibration.size, 0))
    calib_path = save_trajectories(calib, home / "calibration.safetensors")
    layers = quantizable_layers(model.unet)
    runs, tables = [], {}
    for variant in args.variants.split(","):
        runner, workers = variant.split(":")
        runtime = RuntimeSpec(runner=runner, workers=int(workers), layers_per_task=args.layers_per_task)
        cache = home / f"cache-{runner}-{workers}"
        start = time.perf_counter()
        bench_spec = spec.model_copy(update={"runtime": runtime})
        info = ModelInfo(
            name="digits-unet",
            family=model.family,
            condition=model.condition,
            weights_sha256=f"{model.weights_sha256}-{variant}",  # a fresh cache entry per variant
            prompts_sha256=None,
            sample_shape=list(model.sample_shape),
            num_classes=model.num_classes,
            latent=model.latent,
            layer_names=layers,
            source_dir=str(model.source_dir),
        )
        ref = FileRef.of(calib_path)
        calibration = CalibrationArtifact(
            calibration=ref, sqnr=ref, selection=ref, histogram_png="", pca_png="", size=len(calib), seconds=0.0
        )
        request = SensitivityRequest.from_spec(bench_spec, info, calibration)
        result = sensitivity_flow.with_options(task_runner=task_runner_for(runtime))(
            request, bench_spec, layers, calibration, str(cache)
        )
        seconds = time.perf_counter() - start
        assert result.tasks_cached == 0
        tables[variant] = SensitivityTable.load_csv(Path(result.csv.path))
        runs.append({"runner": runner, "workers": int(workers), "seconds": seconds, "tasks": result.tasks})
        print(f"{variant}: {seconds:.1f} s for {result.tasks} tasks ({len(layers)} layers)", flush=True)
    first = next(iter(tables.values()))
    max_db = max(
        abs(a["sqnr_db"] - b["sqnr_db"])
        for table in tables.values()
        for a, b in zip(first.rows, table.rows, strict=True)
        if a["sqnr_db"] != float("inf")
    )
    base = {(r["runner"], r["workers"]): r["seconds"] for r in runs}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "parallel.json").write_text(
        json.dumps({"machine": machine(), "runs": runs, "max_sqnr_difference_db": max_db}, indent=2)
    )
    lines = [
        "## Parallel sensitivity (Prefect thread pool vs prefect-dask)",
        "",
        f"Command: `.venv/bin/python bench/parallel.py` (the sensitivity subflow on digits-unet, {len(layers)} "
        f"layers, {len(first.rows)} measurements, {args.layers_per_task} layers per task, fresh cache each run). "
        f"Machine: {machine()}.",
        "",
        "| runner | workers | seconds | speedup vs Dask 1 worker |",
        "|---|---|---|---|",
    ]
    one = base.get(("dask", 1))
    for r in runs:
        ratio = f"{one / r['seconds']:.2f}x" if one else "-"
        lines.append(f"| {r['runner']} | {r['workers']} | {r['seconds']:.1f} | {ratio} |")
    lines += ["", f"All variants give the same table (largest SQNR difference {max_db:.2g} dB)."]
    replace_section("parallel", "\n".join(lines))


if __name__ == "__main__":
    main()
