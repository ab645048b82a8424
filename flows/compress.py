"""The ``compress`` flow: load, calibrate, [allocate], quantize, evaluate, [fine-tune], export, register.

The flow only composes stages: every decision is the core's (:mod:`diffquant.ptq`,
:mod:`diffquant.finetuning.policy`, :func:`diffquant.export.tensorrt.engine_for_export`). Each
stage is a Prefect task that takes and returns typed artifacts (:mod:`diffquant.tasks.artifacts`)
and runs inside a nested MLflow run. Every artifact is written under the run's output folder
first (atomically), then logged; ``summary.json`` is written last. Any failure marks the MLflow
run FAILED.

Each stage's wall time and peak memory (:class:`diffquant.memory.PeakMemory`) go to summary.json
and MLflow, next to the cost estimated before the stages run (:mod:`diffquant.cost`). The pool and
the full-precision evaluation are cached across runs (checked by sha256 when reused).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow

import diffquant
from diffquant.calibration.labels import read_labels_file
from diffquant.clip_score import check_clip_model
from diffquant.errors import spec_section
from diffquant.finetuning.policy import keep_finetuned
from diffquant.flows.sensitivity import sensitivity_flow, task_runner_for
from diffquant.memory import PeakMemory
from diffquant.placement import resolve_device
from diffquant.registry.home import diffquant_home, ensure_writable, tracking_uri
from diffquant.registry.models import WEIGHTS_TAG, add_onnx_flavor
from diffquant.registry.promotion import Candidate
from diffquant.registry.tracking import RunTracker, git_sha, tracked_run
from diffquant.report import comparison_grid, evaluation_section, quality_notes, render_report, write_report
from diffquant.spec import CompressionSpec, check_memory, spec_from_dict
from diffquant.storage import load_safetensors, write_json, write_text
from diffquant.summary import SCHEMA_VERSION, RunSummary
from diffquant.tasks.artifacts import (
    AllocationArtifact,
    CalibrationArtifact,
    EvalArtifact,
    ExportArtifact,
    FinetuneRequest,
    FpEvalRequest,
    ModelInfo,
    PoolArtifact,
    PoolRequest,
    QuantizeArtifact,
    Registration,
    SamplesArtifact,
    SensitivityArtifact,
    SensitivityRequest,
    TrackingRef,
)
from diffquant.tasks.calibrate import quantize_task, select_calibration_task
from diffquant.tasks.estimate import estimate_task
from diffquant.tasks.evaluate import evaluate_task, fp_samples_task
from diffquant.tasks.finetune import finetune_task
from diffquant.tasks.load import load_model_task
from diffquant.tasks.onnx_export import export_task, parity_precheck_task
from diffquant.tasks.register import register_task
from diffquant.tasks.sensitivity import allocate_task
from diffquant.tasks.trajectories import collect_trajectories_task

logger = logging.getLogger(__name__)

EXPORT_SKIPPED = "export.onnx is false"


def default_out_dir(spec: CompressionSpec, home: Path) -> Path:
    """``<home>/runs/<UTC timestamp>-<spec hash>``."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return home / "runs" / f"{stamp}-{spec.spec_hash()[:8]}"


@dataclass
class _Run:
    """One compress run: spec, folders, tracker, and each stage's wall time, peak memory and MLflow run id."""

    cfg: CompressionSpec
    home: Path
    out: Path
    tracker: RunTracker
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)

    @property
    def tracking(self) -> TrackingRef:
        return TrackingRef(uri=tracking_uri(self.home), run_id=self.tracker.run_id)

    def stage(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` as stage ``name`` in a nested MLflow run; log its metrics (if any) and its peak memory."""
        start = time.perf_counter()
        with self.tracker.stage(name) as stage:
            self.run_ids[name] = stage.run_id
            with PeakMemory(resolve_device(self.cfg.runtime.device)) as peak:
                result = fn(*args, **kwargs)
            assert peak.result is not None
            self.memory[name] = peak.result.to_dict()
            metrics = {"memory.peak_rss_mb": peak.result.peak_rss_bytes / 2**20}
            if peak.result.peak_cuda_bytes is not None:
                metrics["memory.peak_cuda_mb"] = peak.result.peak_cuda_bytes / 2**20
            artifact = result[0] if isinstance(result, tuple) else result
            if isinstance(getattr(artifact, "metrics", None), dict):
                metrics |= artifact.metrics
            stage.log_metrics(metrics)
        self.seconds[name] = time.perf_counter() - start
        return result

    def log(self, folder: str, *paths: str | Path) -> None:
        for path in paths:
            self.tracker.log_artifact(Path(path), folder)


def _cached(task_fn: Any, *args: Any) -> tuple[Any, bool]:
    """Run a cached task; a cached result whose files are gone or changed (sha256) is computed again.

    Returns:
        The result and whether it came from Prefect's cache.
    """
    state = task_fn(*args, return_state=True)
    result = state.result()
    if state.name == "Cached" and not result.intact():
        logger.warning("a cached %s file is gone or changed; computing it again", task_fn.name)
        return task_fn.with_options(refresh_cache=True)(*args), False
    return result, state.name == "Cached"


def _pool_request(cfg: CompressionSpec, info: ModelInfo) -> PoolRequest:
    cal = cfg.calibration
    labels = None
    if cal.labels_file:
        labels = read_labels_file(Path(cal.labels_file), info.num_classes, info.condition).tolist()
    return PoolRequest.from_spec(cfg, info, labels)


def cached_stages(cfg: CompressionSpec, home: Path, info: ModelInfo) -> tuple[bool, bool]:
    """Whether the pool and the FP evaluation of ``cfg`` are in ``home``'s cache (their files are there).

    A file can be there while Prefect's record of it is gone (or the reverse): the cost estimate
    takes the files' word for it.
    """
    cache = home / "cache"
    pool = cache / "pools" / f"pool-{_pool_request(cfg, info).key()}.safetensors"
    fp = cache / "fp_eval" / f"fp-{FpEvalRequest.from_spec(cfg, info).key()}.safetensors"
    return pool.is_file(), fp.is_file()


def _pool(run: _Run, info: ModelInfo) -> tuple[PoolArtifact, bool]:
    request = _pool_request(run.cfg, info)
    cache = str(run.home / "cache" / "pools")
    return _cached(collect_trajectories_task, request, cache, run.cfg.runtime, run.cfg.sampling_batch)


def _evaluate_fp(run: _Run, info: ModelInfo, calib: CalibrationArtifact) -> tuple[EvalArtifact, SamplesArtifact, bool]:
    """The FP evaluation: its samples and metrics from the cache (or sampled and cached), the SQNR reference per run."""
    cache = str(run.home / "cache" / "fp_eval")
    sampled, hit = _cached(fp_samples_task, FpEvalRequest.from_spec(run.cfg, info), cache, run.cfg.runtime)
    return evaluate_task(run.cfg, "fp", str(run.out), calib, sampled=sampled), sampled, hit


def _estimate(run: _Run, info: ModelInfo) -> dict[str, Any]:
    """The cost estimate of this run (pool and FP evaluation taken as cached where their files are there)."""
    return estimate_task(run.cfg, *cached_stages(run.cfg, run.home, info))


def _allocation(
    run: _Run, info: ModelInfo, calib: CalibrationArtifact
) -> tuple[SensitivityArtifact, AllocationArtifact]:
    request = SensitivityRequest.from_spec(run.cfg, info, calib)
    subflow = sensitivity_flow.with_options(task_runner=task_runner_for(run.cfg.runtime))
    cache = str(run.home / "cache" / "sensitivity")
    sens = run.stage("sensitivity", subflow, request, run.cfg, info.layer_names, calib, cache)
    run.log("sensitivity", sens.csv.path, sens.heatmap_png)
    allocation = run.stage("allocate", allocate_task, run.cfg, calib, sens.csv, str(run.out))
    run.log("plan", allocation.answer.path)
    run.tracker.log_metrics({f"allocation.{k}": v for k, v in allocation.usage.items()})
    return sens, allocation


@dataclass(frozen=True)
class _Kept:
    """The model a run keeps after fine-tuning, its evaluation and the summary's ``finetune`` section."""

    quantize: QuantizeArtifact
    evaluation: EvalArtifact
    section: dict[str, Any]


def _finetune(run: _Run, info: ModelInfo, pool: PoolArtifact, stages: dict[str, Any]) -> _Kept:
    """Fine-tune the PTQ model, evaluate it, keep it only if it is no worse (:func:`keep_finetuned`)."""
    quant, q = stages["quantize"], stages["evaluate_quantized"]
    request = FinetuneRequest.from_spec(run.cfg, info, quant, pool)
    checkpoints = str(run.home / "cache" / "finetune")
    args = (run.cfg, request, quant, pool, str(run.out), checkpoints, run.tracking, stages.get("sensitivity"))
    tuned = run.stage("finetune", finetune_task, *args)
    q_ft = run.stage(
        "evaluate_finetuned",
        evaluate_task,
        run.cfg,
        "finetuned",
        str(run.out),
        stages["calib"],
        tuned.quantized,
        stages["fp"],
    )
    decision = keep_finetuned(q.metrics, q_ft.metrics)
    logger.info(decision.reason)
    result = tuned.result
    section = {
        **decision.to_dict(),
        "before": q.metrics,
        "after": q_ft.metrics,
        **{
            k: result[k]
            for k in ("steps", "resumed_from", "seconds", "trainable_parameters", "first_loss", "last_loss")
        },
        "trainable_layers": len(result["layers"]),
        "weights_path": tuned.quantized.weights.path if tuned.quantized.weights else None,
    }
    return _Kept(tuned.quantized, q_ft, section) if decision.kept == "finetuned" else _Kept(quant, q, section)


def _export(
    run: _Run, quant: QuantizeArtifact, calib: CalibrationArtifact, evaluation: EvalArtifact
) -> ExportArtifact | None:
    if not run.cfg.export.onnx:
        return None
    exported = run.stage("export", export_task, run.cfg, quant, calib, str(run.out), evaluation)
    run.log("onnx", Path(exported.onnx.path).parent)
    run.tracker.log_metrics({"export.onnx_weight_bytes": exported.onnx_weight_bytes, **exported.metrics})
    return exported


def _register(
    run: _Run,
    info: ModelInfo,
    quant: QuantizeArtifact,
    fp: EvalArtifact,
    q: EvalArtifact,
    exported: ExportArtifact | None,
) -> Registration | None:
    cfg = run.cfg
    if not cfg.promote.register_model:
        return None
    folder = run.out / "model"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy2(quant.plan.path, folder / "plan.json")
    shutil.copy2(quant.scales.path, folder / "quantizer_scales.safetensors")
    (folder / "spec.yaml").write_text(cfg.to_yaml())
    if quant.weights is not None:
        shutil.copy2(quant.weights.path, folder / "finetuned_denoiser.safetensors")
    if exported is not None:
        add_onnx_flavor(Path(exported.onnx.path), folder)
    tags = {
        "spec_hash": cfg.spec_hash(),
        WEIGHTS_TAG: info.weights_sha256,
        "plan_sha256": quant.plan.sha256,
        "git_sha": git_sha(),
        "diffquant_version": diffquant.__version__,
        "fp_baseline_run": run.run_ids.get("evaluate_fp", ""),
        "source_model": cfg.model.name or str(cfg.model.path),
        "device_class": cfg.export.device.name,
    }
    inf = float("inf")
    candidate = Candidate(
        fd_real=float(q.metrics.get("fd_real", inf)),
        fp_fd_real=float(fp.metrics.get("fd_real", inf)),
        accuracy=q.metrics.get("accuracy"),
        size_bytes=quant.packed_bytes,
        fp32_bytes=quant.fp32_bytes,
    )
    name = cfg.registered_model_name()
    return run.stage("register", register_task, run.tracking, name, str(folder), tags, candidate, cfg.promote.gates)


def _methods_description(quantize: Any) -> str:
    parts = []
    if quantize.activation.shift != "none":
        parts.append("per-channel input shift")
    if quantize.smooth is not None:
        alpha = "alpha searched per layer" if quantize.smooth.search else f"alpha {quantize.smooth.alpha:g}"
        parts.append(f"SmoothQuant ({alpha})")
    if quantize.low_rank is not None:
        parts.append(f"low-rank branch rank {quantize.low_rank.rank} ({quantize.low_rank.dtype})")
    return f"; {', '.join(parts)}" if parts else ""


def _plan_description(spec: CompressionSpec) -> str:
    if spec.allocation is not None:
        budget = ", ".join(f"{k} <= {v:g}" for k, v in spec.allocation.budget.as_dict().items())
        alloc = spec.allocation
        text = f"mixed precision, W{alloc.weight_bits} A{alloc.activation_bits}"
        if alloc.weight_formats or alloc.activation_formats:
            text += f", float formats {', '.join([*alloc.weight_formats, *alloc.activation_formats])}"
        if any(alloc.ranks):
            text += f", low-rank branch ranks {[r for r in alloc.ranks if r]}"
        return f"{text}, {budget}" + _methods_description(spec.quantize)
    w, a = spec.quantize.weight, spec.quantize.activation.bits
    text = f"W{w.bits if w else 'fp'}A{a or 'fp'} uniform, {w.granularity if w else 'float weights'}"
    if w is not None and w.group_size:
        text += f" (groups of {w.group_size})"
    formats = [
        f"{part} {fmt}"
        for part, fmt in (("weights", w and w.format), ("inputs", a and spec.quantize.activation.format))
        if fmt and fmt != "int"
    ]
    if formats:
        text += f", {', '.join(formats)}"
    if spec.quantize.keep_full_precision is None:
        text += ", FP: the model family's defaults"
    elif spec.quantize.keep_full_precision:
        text += f", FP: {', '.join(spec.quantize.keep_full_precision)}"
    return text + _methods_description(spec.quantize)


def _export_section(exported: ExportArtifact | None) -> dict[str, Any]:
    if exported is None:
        return {"status": "skipped", "reason": EXPORT_SKIPPED, "onnx": None, "engine": None}
    engine = exported.engine
    return {
        "status": "exported",
        "reason": "engine built" if engine.get("built") else f"no TensorRT engine: {engine.get('skip_reason')}",
        "onnx": exported.onnx.path,
        "onnx_weight_bytes": exported.onnx_weight_bytes,
        "parity": {k: exported.parity[k] for k in ("passed", "failures")},
        "parity_path": exported.parity_path,
        "onnx_metrics": exported.metrics,
        "engine": engine,
    }


def _registry_section(run: _Run, registration: Registration | None) -> dict[str, Any]:
    if registration is None:
        return {"registered": None, "registered_reason": "promote.register_model is false", "alias": None}
    champion = registration.champion == registration.version
    return {
        "registered": registration.version,
        "registered_name": registration.name,
        "registered_reason": None,
        "alias": "champion" if champion else "challenger",
        "champion": registration.champion,
        "promotion": {
            "passed": registration.passed,
            "reasons": registration.reasons,
            "previous_champion": registration.previous_champion,
        },
    }


def _summary(run: _Run, info: ModelInfo, stages: dict[str, Any]) -> RunSummary:
    """The run's summary from its stage artifacts."""
    cfg, quant, fp, q = run.cfg, stages["quantize"], stages["fp"], stages["q"]
    pool, calib, allocation, sens = stages["pool"], stages["calib"], stages.get("allocation"), stages.get("sensitivity")
    exported, finetune = stages.get("export"), stages.get("finetune")
    metrics = {"fp": fp.metrics, "quantized": q.metrics} | ({"ptq": finetune["before"]} if finetune else {})
    model = {k: getattr(info, k) for k in ("name", "family", "condition", "sample_shape", "latent", "weights_sha256")}
    sizes = {
        "fp32_bytes": quant.fp32_bytes,
        "packed_bytes": quant.packed_bytes,
        "ratio": quant.packed_bytes / quant.fp32_bytes,
        "onnx_weight_bytes": exported.onnx_weight_bytes if exported else None,
        "deployed_bytes": quant.deployed_bytes,
    }
    return RunSummary(
        schema_version=SCHEMA_VERSION,
        run_id=run.tracker.run_id,
        experiment=info.name,
        tracking_uri=tracking_uri(run.home),
        spec_hash=cfg.spec_hash(),
        model={**model, **_registry_section(run, stages.get("registration"))},
        metrics=metrics,
        notes=quality_notes(info.model_dump(), {"fp": fp.metrics, "quantized": q.metrics}),
        evaluation=evaluation_section(info.model_dump(), {"fp": fp.metrics, "quantized": q.metrics})
        | {"fp_cache_hit": stages["fp_cached"], "fp_cache_path": stages["fp_sampled"].samples.path},
        finetune=finetune,
        sizes=sizes,
        plan={
            "path": quant.plan.path,
            "scales_path": quant.scales.path,
            "layers": quant.layers,
            "quantized_layers": quant.quantized_layers,
            "description": _plan_description(cfg),
            "outlier_tokens": quant.outlier_tokens,
        },
        calibration={
            "strategy": cfg.calibration.strategy,
            "size": calib.size,
            "pool_size": pool.size,
            "pool_path": pool.pool.path,
            "pool_cache_hit": stages["pool_cached"],
            "selection_seconds": calib.seconds,
            "selection_path": calib.selection.path,
            "histogram_png": calib.histogram_png,
            "pca_png": calib.pca_png,
        },
        samples={"fp": fp.samples.path, "quantized": q.samples.path, "grid": str(stages["grid"])},
        allocation=None
        if allocation is None
        else {
            "budget": cfg.allocation.budget.as_dict(),
            "cost": cfg.allocation.cost,
            "usage": allocation.usage,
            "objective": allocation.objective,
            "plan_path": allocation.plan.path,
            "allocation_path": allocation.answer.path,
            "sensitivity_csv": sens.csv.path,
            "sensitivity_cache_hit": sens.cache_hit,
            "sensitivity_tasks": sens.tasks,
            "sensitivity_tasks_cached": sens.tasks_cached,
            "runner": cfg.runtime.model_dump(),
        },
        export=_export_section(exported),
        timings=run.seconds,
        memory=run.memory,
        estimate=stages["estimate"],
        out_dir=str(run.out),
    )


def _finish(run: _Run, info: ModelInfo, stages: dict[str, Any]) -> dict[str, Any]:
    """Log the final metrics and grid, write report.md and summary.json (last)."""
    fp, q, quant = stages["fp"], stages["q"], stages["quantize"]
    stored = [load_safetensors(Path(e.samples.path)) for e in (fp, q)]
    left, right = (data.get("images", data["samples"]) for data in stored)  # a latent model's decoded images
    titles = ("full precision", f"quantized: {_plan_description(run.cfg)}")
    stages["grid"] = comparison_grid(left, right, run.out / "samples" / "fp_vs_quantized.png", titles)
    run.log("samples", stages["grid"])
    run.tracker.log_metrics({f"fp.{k}": v for k, v in fp.metrics.items()})
    run.tracker.log_metrics({f"quantized.{k}": v for k, v in q.metrics.items()})
    run.tracker.log_metrics({f"memory.{k}.peak_rss_mb": v["peak_rss_bytes"] / 2**20 for k, v in run.memory.items()})
    if stages.get("finetune"):
        run.tracker.log_metrics({f"ptq.{k}": v for k, v in stages["finetune"]["before"].items()})
    summary = _summary(run, info, stages).to_dict()
    run.tracker.log_metrics({f"size.{k}": v for k, v in summary["sizes"].items() if v is not None})
    run.log("plan", quant.plan.path, quant.scales.path)
    run.log("", write_report(summary, run.out / "report.md"))
    summary_path = write_json(summary, run.out / "summary.json")
    run.log("", summary_path)
    _prefect_summary_artifact(render_report(summary, grid_image=False))  # no run folder to link from there
    return {**summary, "summary_path": str(summary_path)}


def _prefect_summary_artifact(markdown: str) -> None:
    """Attach the report as a markdown artifact to the Prefect flow run (best effort)."""
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(markdown=markdown, key="compress-summary", description="diffquant compress summary")
    except Exception as error:  # the API may refuse artifacts (old server); the run itself succeeded
        logger.warning("could not create the Prefect summary artifact: %s", error)


@flow(name="compress", log_prints=False)
def compress_flow(spec: dict[str, Any], out_dir: str | None = None) -> dict[str, Any]:
    """Compress the spec's model and record everything.

    Args:
        spec: A :class:`~diffquant.spec.CompressionSpec` as data (validated here).
        out_dir: Output folder; defaults to ``<DIFFQUANT_HOME>/runs/<time>-<spec hash>``.

    Returns:
        The summary (also written to ``<out_dir>/summary.json``, path under ``summary_path``).
    """
    cfg = spec_from_dict(spec)
    home = ensure_writable(diffquant_home(), "diffquant home")
    out = ensure_writable(Path(out_dir) if out_dir else default_out_dir(cfg, home), "output folder")
    info = load_model_task(cfg.model)
    check_memory(cfg, tuple(info.sample_shape))
    if cfg.evaluate.clip_model is not None:
        with spec_section("evaluate"):
            check_clip_model(cfg.evaluate.clip_model, text_model=info.condition == "text")
    tags = {"spec_hash": cfg.spec_hash(), "model.weights_sha256": info.weights_sha256}
    run_name = f"compress-{cfg.spec_hash()[:8]}"
    with tracked_run(tracking_uri(home), info.name, run_name, home / "mlartifacts", tags=tags) as tracker:
        run = _Run(cfg, home, out, tracker)
        tracker.log_params(cfg.flat_params())
        run.log("spec", write_text(cfg.to_yaml(), out / "spec" / "spec.yaml"))
        s: dict[str, Any] = {"estimate": run.stage("estimate", _estimate, run, info)}
        s["pool"], s["pool_cached"] = run.stage("collect_trajectories", _pool, run, info)
        s["calib"] = calib = run.stage("select_calibration", select_calibration_task, s["pool"], cfg, str(out))
        run.log("calibration", calib.selection.path, calib.histogram_png, calib.pca_png)
        tracker.log_metrics({"calibration.selection_seconds": calib.seconds})
        if cfg.allocation is not None:
            s["sensitivity"], s["allocation"] = _allocation(run, info, calib)
        s["quantize"] = run.stage("quantize", quantize_task, cfg, calib, str(out), s.get("allocation"))
        if cfg.export.onnx:  # a broken export fails in seconds, before the slow evaluation
            run.stage("parity_precheck", parity_precheck_task, cfg, s["quantize"], calib, str(out))
        s["fp"], s["fp_sampled"], s["fp_cached"] = run.stage("evaluate_fp", _evaluate_fp, run, info, calib)
        s["q"] = s["evaluate_quantized"] = run.stage(
            "evaluate_quantized", evaluate_task, cfg, "quantized", str(out), calib, s["quantize"], s["fp"]
        )
        if cfg.finetune is not None:
            kept = _finetune(run, info, s["pool"], s)
            s["quantize"], s["q"], s["finetune"] = kept.quantize, kept.evaluation, kept.section
        s["export"] = _export(run, s["quantize"], calib, s["q"])
        s["registration"] = _register(run, info, s["quantize"], s["fp"], s["q"], s["export"])
        summary = _finish(run, info, s)
    logger.info("compress finished: %s", summary["summary_path"])
    return summary
