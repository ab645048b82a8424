"""The ``compress`` flow: load -> trajectories -> calibration set -> quantize -> evaluate -> log.

Every artifact is written under the run's output folder first (atomically), then logged to
MLflow; ``summary.json`` is written last. Any failure marks the MLflow run FAILED.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

from diffquant.flows.sensitivity import sensitivity_flow, task_runner_for
from diffquant.registry.home import diffquant_home, ensure_writable, tracking_uri
from diffquant.registry.models import add_onnx_flavor
from diffquant.registry.tracking import RunTracker, git_sha, tracked_run
from diffquant.tasks.calibrate import quantize_task, select_calibration_task
from diffquant.tasks.evaluate import evaluate_task
from diffquant.tasks.finetune import finetune_task
from diffquant.tasks.load import load_model_task
from diffquant.tasks.onnx_export import export_task
from diffquant.tasks.register import register_task
from diffquant.tasks.sensitivity import allocate_task
from diffquant.tasks.trajectories import collect_trajectories_task
from prefect import flow

import diffquant
from diffquant.calibration.labels import read_labels_file
from diffquant.calibration.pool import POOL_CODE_VERSION
from diffquant.mixed_precision.sensitivity import SENSITIVITY_CODE_VERSION
from diffquant.report import quality_notes
from diffquant.spec import CompressionSpec, spec_from_dict
from diffquant.storage import load_safetensors, sha256_file, write_json

logger = logging.getLogger(__name__)

EXPORT_SKIPPED = "export.onnx is false"


def default_out_dir(spec: CompressionSpec, home: Path) -> Path:
    """``<home>/runs/<UTC timestamp>-<spec hash>``."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return home / "runs" / f"{stamp}-{spec.spec_hash()[:8]}"


def _plan_description(spec: CompressionSpec) -> str:
    if spec.allocation is not None:
        budget = ", ".join(f"{k} <= {v:g}" for k, v in spec.allocation.budget.as_dict().items())
        return f"mixed precision, W{spec.allocation.weight_bits} A{spec.allocation.activation_bits}, {budget}"
    w, a = spec.quantize.weight.bits, spec.quantize.activation.bits
    text = f"W{w or 'fp'}A{a or 'fp'} uniform, {spec.quantize.weight.granularity}"
    if spec.quantize.weight.group_size:
        text += f" (groups of {spec.quantize.weight.group_size})"
    if spec.quantize.keep_full_precision is None:
        text += ", FP: the model family's defaults"
    elif spec.quantize.keep_full_precision:
        text += f", FP: {', '.join(spec.quantize.keep_full_precision)}"
    return text


def _grid(out: Path, fp: dict[str, Any], quant: dict[str, Any]) -> Path:
    from diffquant.report import comparison_grid

    left = load_safetensors(Path(fp["samples_path"]))["samples"]
    right = load_safetensors(Path(quant["samples_path"]))["samples"]
    return comparison_grid(left, right, out / "samples" / "fp_vs_quantized.png")


def _model_files(out: Path, cfg: CompressionSpec, quant: dict[str, Any], onnx_path: str | None) -> Path:
    """Gather what a registered version ships into ``<out>/model``: plan, scales, spec and the ONNX flavor."""
    import shutil

    folder = out / "model"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy2(quant["plan_path"], folder / "plan.json")
    shutil.copy2(quant["scales_path"], folder / "quantizer_scales.safetensors")
    (folder / "spec.yaml").write_text(cfg.to_yaml())
    if quant.get("weights_path"):
        shutil.copy2(quant["weights_path"], folder / "finetuned_denoiser.safetensors")
    if onnx_path is not None:
        add_onnx_flavor(Path(onnx_path), folder)
    return folder


def _finetune(
    stages: _Stages,
    cfg: CompressionSpec,
    data: dict[str, Any],
    quant: dict[str, Any],
    q: dict[str, Any],
    fp: dict[str, Any],
    pool: dict[str, Any],
    calib: dict[str, Any],
    allocation: dict[str, Any] | None,
    out: Path,
    home: Path,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fine-tune the PTQ model, evaluate it, and keep it only if it is no worse on FD to FP.

    Returns:
        The kept model's quantize result and evaluation, and the ``finetune`` summary section.
    """
    tuned = stages.run(
        "finetune",
        finetune_task,
        data,
        quant,
        pool["pool_path"],
        str(out),
        str(home / "cache" / "finetune"),
        tracking_uri(home),
        stages.tracker.run_id,
        allocation["sensitivity"]["csv_path"] if allocation else None,
    )
    q_ft = stages.run(
        "evaluate_finetuned",
        evaluate_task,
        data,
        "finetuned",
        str(out),
        calib["sqnr_path"],
        quantized=tuned,
        fp=fp,
    )
    before, after = q["metrics"], q_ft["metrics"]
    keep_tuned = after.get("fd_fp", float("inf")) <= before.get("fd_fp", float("inf"))
    reason = (
        f"fine-tuned FD to FP {after.get('fd_fp', float('nan')):.4g} vs PTQ {before.get('fd_fp', float('nan')):.4g}: "
        + ("kept the fine-tuned model" if keep_tuned else "fine-tuning made it worse; kept the PTQ model")
    )
    logger.info(reason)
    section = {
        "kept": "finetuned" if keep_tuned else "ptq",
        "reason": reason,
        "before": before,
        "after": after,
        "steps": tuned["result"]["steps"],
        "resumed_from": tuned["result"]["resumed_from"],
        "seconds": tuned["result"]["seconds"],
        "trainable_parameters": tuned["result"]["trainable_parameters"],
        "trainable_layers": len(tuned["result"]["layers"]),
        "first_loss": tuned["result"]["first_loss"],
        "last_loss": tuned["result"]["last_loss"],
        "weights_path": tuned["weights_path"],
    }
    return (tuned, q_ft, section) if keep_tuned else (quant, q, section)


def _export_summary(exported: dict[str, Any] | None) -> dict[str, Any]:
    if exported is None:
        return {"status": "skipped", "reason": EXPORT_SKIPPED, "onnx": None, "engine": None}
    engine = exported["engine"]
    return {
        "status": "exported",
        "reason": "engine built" if engine.get("built") else f"no TensorRT engine: {engine.get('skip_reason')}",
        "onnx": exported["onnx_path"],
        "onnx_weight_bytes": exported["onnx_weight_bytes"],
        "parity": {k: exported["parity"][k] for k in ("passed", "failures")},
        "parity_path": exported["parity_path"],
        "onnx_metrics": exported["metrics"],
        "engine": engine,
    }


def _version_tags(cfg: CompressionSpec, quant: dict[str, Any], fp_run_id: str) -> dict[str, str]:
    return {
        "spec_hash": cfg.spec_hash(),
        "plan_sha256": sha256_file(Path(quant["plan_path"])),
        "git_sha": git_sha(),
        "diffquant_version": diffquant.__version__,
        "fp_baseline_run": fp_run_id,
        "source_model": cfg.model.name or str(cfg.model.path),
    }


def _candidate(fp: dict[str, float], q: dict[str, float], sizes: dict[str, Any]) -> dict[str, Any]:
    inf = float("inf")
    return {
        "fd_real": float(q.get("fd_real", inf)),
        "fp_fd_real": float(fp.get("fd_real", inf)),
        "accuracy": q.get("accuracy"),
        "size_bytes": int(sizes["packed_bytes"]),
        "fp32_bytes": int(sizes["fp32_bytes"]),
    }


def _prefect_summary_artifact(markdown: str) -> None:
    """Attach the report as a markdown artifact to the Prefect flow run (best effort)."""
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(markdown=markdown, key="compress-summary", description="diffquant compress summary")
    except Exception as error:  # the API may refuse artifacts (old server); the run itself succeeded
        logger.warning("could not create the Prefect summary artifact: %s", error)


class _Stages:
    """Runs stages as nested MLflow runs, recording wall time and run id of each."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self.seconds: dict[str, float] = {}
        self.run_ids: dict[str, str] = {}

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        with self.tracker.stage(name) as stage:
            self.run_ids[name] = stage.run_id
            result = fn(*args, **kwargs)
            if isinstance(result, dict) and isinstance(result.get("metrics"), dict):
                stage.log_metrics(result["metrics"])
        self.seconds[name] = time.perf_counter() - start
        return result


def _run_cached(task_fn: Any, args: tuple[Any, ...], path_key: str) -> tuple[dict[str, Any], bool]:
    """Run a cached task; if its cached result points at a file that is gone, run it again.

    Returns:
        The task's result and whether it came from Prefect's cache.
    """
    state = task_fn(*args, return_state=True)
    result = dict(state.result())
    if state.name == "Cached" and not Path(result[path_key]).is_file():
        logger.warning("cached %s %s is gone; computing it again", path_key, result[path_key])
        return dict(task_fn.with_options(refresh_cache=True)(*args)), False
    return result, state.name == "Cached"


def _collect_pool(cfg: CompressionSpec, model_info: dict[str, Any], home: Path) -> tuple[dict[str, Any], bool]:
    """Run (or reuse from Prefect's cache) the pool task; returns its result and whether it was cached."""
    labels = None
    if cfg.calibration.labels_file:
        labels = read_labels_file(
            Path(cfg.calibration.labels_file), model_info["num_classes"], model_info["condition"]
        ).tolist()
    pool_spec = {
        "trajectories": cfg.calibration.trajectories,
        "seed": cfg.calibration.seed,
        "labels": labels,
        "prompts_sha256": model_info["prompts_sha256"],
    }
    args = (
        cfg.model.model_dump(),
        model_info["weights_sha256"],
        cfg.sampler.model_dump(),
        pool_spec,
        f"{diffquant.__version__}/{POOL_CODE_VERSION}",
        str(home / "cache" / "pools"),
    )
    return _run_cached(collect_trajectories_task, args, "pool_path")


def _sensitivity(cfg: CompressionSpec, model_info: dict[str, Any], calib: dict[str, Any], home: Path) -> dict[str, Any]:
    """Run the sensitivity subflow on the spec's task runner (cached per group of layers)."""
    alloc = cfg.allocation
    assert alloc is not None
    key = {
        "weights": model_info["weights_sha256"],
        "sampler": cfg.sampler.model_dump(),
        "weight_bits": alloc.weight_bits,
        "activation_bits": alloc.activation_bits,
        "observers": [cfg.quantize.weight.observer, cfg.calibration.observer],
        "groups": [alloc.group_bits, alloc.group_sizes],
        "quality_metric": alloc.quality_metric,
        "content_layers": alloc.content_layers,
        "content_samples": alloc.content_samples,
        "sensitivity_inputs": alloc.sensitivity_inputs,
        "seed": cfg.evaluate.seed,
    }
    run = sensitivity_flow.with_options(task_runner=task_runner_for(cfg.runtime))
    return run(
        key,
        cfg.to_dict(),
        model_info["layer_names"],
        calib["calibration_path"],
        sha256_file(Path(calib["calibration_path"])),
        f"{diffquant.__version__}/{SENSITIVITY_CODE_VERSION}",
        str(home / "cache" / "sensitivity"),
        cfg.runtime.layers_per_task,
    )


@flow(name="compress", log_prints=False)
def compress_flow(spec: dict[str, Any], out_dir: str | None = None) -> dict[str, Any]:
    """Compress the spec's model with its uniform plan and record everything.

    Args:
        spec: A :class:`~diffquant.spec.CompressionSpec` as data (validated here).
        out_dir: Output folder; defaults to ``<DIFFQUANT_HOME>/runs/<time>-<spec hash>``.

    Returns:
        The summary (also written to ``<out_dir>/summary.json``, path under ``summary_path``).
    """
    cfg = spec_from_dict(spec)
    home = ensure_writable(diffquant_home(), "diffquant home")
    out = ensure_writable(Path(out_dir) if out_dir else default_out_dir(cfg, home), "output folder")
    data = cfg.to_dict()
    model_info = load_model_task(data["model"])
    experiment = model_info["name"]
    with tracked_run(
        tracking_uri(home),
        experiment,
        f"compress-{cfg.spec_hash()[:8]}",
        home / "mlartifacts",
        tags={"spec_hash": cfg.spec_hash(), "model.weights_sha256": model_info["weights_sha256"]},
    ) as tracker:
        stages = _Stages(tracker)
        tracker.log_params(cfg.flat_params())
        spec_path = out / "spec" / "spec.yaml"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(cfg.to_yaml())
        tracker.log_artifact(spec_path, "spec")
        pool, pool_cached = stages.run("collect_trajectories", _collect_pool, cfg, model_info, home)
        calib = stages.run("select_calibration", select_calibration_task, pool["pool_path"], data, str(out))
        for key in ("selection_path", "histogram_png", "pca_png"):
            tracker.log_artifact(Path(calib[key]), "calibration")
        tracker.log_metrics({"calibration.selection_seconds": calib["selection_seconds"]})
        allocation = None
        if cfg.allocation is not None:
            sens = stages.run("sensitivity", _sensitivity, cfg, model_info, calib, home)
            tracker.log_artifact(Path(sens["csv_path"]), "sensitivity")
            tracker.log_artifact(Path(sens["heatmap_path"]), "sensitivity")
            allocation = stages.run(
                "allocate", allocate_task, data, calib["calibration_path"], sens["csv_path"], str(out)
            )
            allocation["sensitivity"] = sens
            tracker.log_artifact(Path(allocation["allocation_path"]), "plan")
            tracker.log_metrics({f"allocation.{k}": v for k, v in allocation["usage"].items()})
        quant = stages.run(
            "quantize",
            quantize_task,
            data,
            calib["calibration_path"],
            str(out),
            plan_path=allocation["plan_path"] if allocation else None,
        )
        tracker.log_artifact(Path(quant["plan_path"]), "plan")
        tracker.log_artifact(Path(quant["scales_path"]), "plan")
        fp = stages.run("evaluate_fp", evaluate_task, data, "fp", str(out), calib["sqnr_path"])
        q = stages.run(
            "evaluate_quantized",
            evaluate_task,
            data,
            "quantized",
            str(out),
            calib["sqnr_path"],
            quantized=quant,
            fp=fp,
        )
        finetune = None
        if cfg.finetune is not None:
            quant, q, finetune = _finetune(stages, cfg, data, quant, q, fp, pool, calib, allocation, out, home)
        exported = None
        if cfg.export.onnx:
            exported = stages.run("export", export_task, data, quant, calib["calibration_path"], str(out))
            tracker.log_artifact(Path(exported["onnx_path"]).parent, "onnx")
            tracker.log_metrics({"export.onnx_weight_bytes": exported["onnx_weight_bytes"]})
            tracker.log_metrics(exported["metrics"])
        grid = _grid(out, fp, q)
        tracker.log_artifact(grid, "samples")
        tracker.log_metrics({f"fp.{k}": v for k, v in fp["metrics"].items()})
        tracker.log_metrics({f"quantized.{k}": v for k, v in q["metrics"].items()})
        if finetune is not None:
            tracker.log_metrics({f"ptq.{k}": v for k, v in finetune["before"].items()})
        sizes = {
            "fp32_bytes": quant["fp32_bytes"],
            "packed_bytes": quant["packed_bytes"],
            "ratio": quant["packed_bytes"] / quant["fp32_bytes"],
            "onnx_weight_bytes": exported["onnx_weight_bytes"] if exported else None,
        }
        tracker.log_metrics({f"size.{k}": v for k, v in sizes.items() if v is not None})
        summary = {
            "run_id": tracker.run_id,
            "experiment": experiment,
            "tracking_uri": tracking_uri(home),
            "spec_hash": cfg.spec_hash(),
            "model": {
                "name": model_info["name"],
                "family": model_info["family"],
                "condition": model_info["condition"],
                "sample_shape": model_info["sample_shape"],
                "latent": model_info["latent"],
                "weights_sha256": model_info["weights_sha256"],
                "registered": None,
                "registered_reason": "promote.register_model is false",
                "alias": None,
            },
            "metrics": {"fp": fp["metrics"], "quantized": q["metrics"]}
            | ({"ptq": finetune["before"]} if finetune else {}),
            "notes": quality_notes(model_info, {"fp": fp["metrics"], "quantized": q["metrics"]}),
            "finetune": finetune,
            "sizes": sizes,
            "plan": {
                "path": quant["plan_path"],
                "scales_path": quant["scales_path"],
                "layers": quant["layers"],
                "quantized_layers": quant["quantized_layers"],
                "description": _plan_description(cfg),
                "outlier_tokens": quant.get("outlier_tokens"),
            },
            "calibration": {
                "strategy": cfg.calibration.strategy,
                "size": calib["size"],
                "pool_size": pool["pool_size"],
                "pool_path": pool["pool_path"],
                "pool_cache_hit": pool_cached,
                "selection_seconds": calib["selection_seconds"],
                "selection_path": calib["selection_path"],
                "histogram_png": calib["histogram_png"],
                "pca_png": calib["pca_png"],
            },
            "samples": {"fp": fp["samples_path"], "quantized": q["samples_path"], "grid": str(grid)},
            "allocation": None
            if allocation is None
            else {
                "budget": cfg.allocation.budget.as_dict(),
                "usage": allocation["usage"],
                "objective": allocation["objective"],
                "plan_path": allocation["plan_path"],
                "allocation_path": allocation["allocation_path"],
                "sensitivity_csv": allocation["sensitivity"]["csv_path"],
                "sensitivity_cache_hit": allocation["sensitivity"]["cache_hit"],
                "sensitivity_tasks": allocation["sensitivity"]["tasks"],
                "sensitivity_tasks_cached": allocation["sensitivity"]["tasks_cached"],
                "runner": cfg.runtime.model_dump(),
            },
            "export": _export_summary(exported),
            "timings": stages.seconds,
            "out_dir": str(out),
        }
        if cfg.promote.register_model:
            registration = stages.run(
                "register",
                register_task,
                tracking_uri(home),
                tracker.run_id,
                cfg.registered_model_name(),
                str(_model_files(out, cfg, quant, exported["onnx_path"] if exported else None)),
                _version_tags(cfg, quant, stages.run_ids.get("evaluate_fp", "")),
                _candidate(fp["metrics"], q["metrics"], sizes),
                cfg.promote.gates.model_dump(),
            )
            summary["model"].update(
                registered=registration["version"],
                registered_name=registration["name"],
                registered_reason=None,
                alias="champion" if registration["champion"] == registration["version"] else "challenger",
                champion=registration["champion"],
                promotion={k: registration[k] for k in ("passed", "reasons", "previous_champion")},
            )
        from diffquant.report import render_report, write_report

        report = write_report(summary, out / "report.md")
        tracker.log_artifact(report)
        summary_path = write_json(summary, out / "summary.json")
        tracker.log_artifact(summary_path)
        _prefect_summary_artifact(render_report(summary))
    summary["summary_path"] = str(summary_path)
    logger.info("compress finished: %s", summary_path)
    return summary
