"""The hard end of quantization (issue 15's targets): W4A4 on digits-unet, outlier models at W8A8/W4A8, DiT W4A8.

Every row is a spec: a model and a list of ``--set``-style overrides on the default spec or on a
preset (``configs/digits-unet-w4a4-ptq.yaml``, ``configs/digits-dit-w4a8.yaml``,
``configs/digits-unet-w4a4-finetune.yaml``), or no overrides for the model's float row. The method
rows add the outlier methods one at a time and combined (``quantize.activation.shift=channel``,
``quantize.smooth={alpha: 0.5}`` or ``{search: true}``, ``quantize.low_rank={rank: 16}``, GPTQ
rounding alone: it is not combined with the methods yet), and FP8 E4M3 W8A8 for device class
``ada`` beside INT8 W8A8 on every reference. A row is quantized through the library API exactly as
``diffquant compress`` does (``diffquant.quantize``; ``diffquant.auto_quantize`` with an
``allocation``; ``diffquant.finetune`` on the FP pool with a ``finetune`` section) and evaluated
as ``bench/quality.py`` evaluates: ``--samples`` samples (2,000), DDIM 50, noise seed 0, the
digits classifier's accuracy and FD to the held-out digits, FD/PSNR against the FP samples of the
same noise, and SQNR of the denoiser output on 256 pool inputs outside the calibration set.
Calibration is the spec's: 256 inputs chosen by density_diversity from 64 FP trajectories.

The outlier models (``bench/outlier_models.py``) are built first into ``--models-dir``. Each target
gets a verdict line (met, or missed by how much).

Writes ``bench/results/hard_end.json`` and the ``hard_end`` section of BENCHMARKS.md. ``--groups``
runs some groups only and ``--only`` the rows whose label contains one of its comma-separated
fragments (plus the float rows), ``--resume`` skips the quantized rows already stored, ``--report``
runs nothing and rewrites the table and verdicts from the stored rows; their rows
replace those of an earlier run in the JSON (same ``--samples``), and the table is written from all
stored rows. Two processes may run different
groups at once (``OMP_NUM_THREADS=1`` each); the JSON is locked around every write.

Run: ``.venv/bin/python bench/hard_end.py`` (64 rows, about 90 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from common import ROOT, cell, machine, replace_section, write_results

import diffquant
from diffquant.calibration.pool import collect_pool, held_out_indices, subset
from diffquant.calibration.selection import pool_features, select
from diffquant.data import load_digits_split
from diffquant.evaluation import EvalResult, evaluate_model
from diffquant.mixed_precision.costs import layer_macs, plan_bitops
from diffquant.models.loading import DiffusionModel, load_model
from diffquant.models.reference import REFERENCE_MODELS, load_classifier
from diffquant.quant.plan import LayerPlan, packed_weight_bytes
from diffquant.sampling import Trajectories, denoiser_outputs
from diffquant.spec import CompressionSpec, load_spec
from diffquant.storage import load_safetensors, save_safetensors, write_json
from diffquant.training.outliers import VARIANTS, write_outlier_models

MSE = ("quantize.weight.observer=mse", "calibration.observer=mse")
W4A4 = ("quantize.weight.bits=4", "quantize.activation.bits=4")
W4A8 = ("quantize.weight.bits=4", "quantize.activation.bits=8")
W8A8 = ("quantize.weight.bits=8", "quantize.activation.bits=8")
FINETUNE_W4A4 = ROOT / "configs" / "digits-unet-w4a4-finetune.yaml"
PTQ_W4A4 = ROOT / "configs" / "digits-unet-w4a4-ptq.yaml"
DIT_PRESET = ROOT / "configs" / "digits-dit-w4a8.yaml"
NO_METHODS = ("quantize.activation.shift=none", "quantize.smooth=null", "quantize.low_rank=null")


@dataclass(frozen=True)
class Row:
    """One table row: a spec (model + overrides, optionally a preset file) or the model's float row.

    Attributes:
        group: The target the row belongs to (rows of a group share one verdict).
        model: A bundled reference or an outlier variant (:data:`diffquant.training.outliers.VARIANTS`).
        label: What the row is, in the table.
        overrides: ``--set`` overrides on ``config`` (None: the float model).
        config: A preset the overrides apply to (None: the default spec).
    """

    group: str
    model: str
    label: str
    overrides: tuple[str, ...] | None = None
    config: str | None = None

    @property
    def key(self) -> str:
        """Unique id of the row in the results."""
        return f"{self.group}/{self.model}/{self.label}"


SHIFT = ("quantize.activation.shift=channel",)
SMOOTH = ("quantize.smooth={alpha: 0.5}",)
SMOOTH_SEARCH = ("quantize.smooth={search: true}",)
GPTQ = ("quantize.weight.rounding=gptq",)
FP8_WEIGHTS = "quantize.weight={bits: 8, format: fp8_e4m3, granularity: per_channel, observer: minmax}"
FP8_INPUTS = "quantize.activation={bits: 8, format: fp8_e4m3}"
ADA = "export.device_class=ada"
FP8 = (FP8_WEIGHTS, FP8_INPUTS, ADA)


def low_rank(rank: int) -> tuple[str, ...]:
    """The override of a rank-``rank`` SVDQuant branch on every quantized layer."""
    return (f"quantize.low_rank={{rank: {rank}}}",)


def outlier_rows(model: str) -> list[Row]:
    """FP, the baselines (min-max, MSE ranges) and each outlier method at W8A8 and W4A8 on one outlier model.

    Every row keeps the family's float layers; the method rows add one method (or SVDQuant's
    smoothing + branch) to the MSE-range baseline of the same bits.
    """
    group = f"outliers {model}"
    return [
        Row(group, model, "FP32"),
        Row(group, model, "W8A8 naive (min-max)", W8A8),
        Row(group, model, "W8A8 MSE ranges", (*W8A8, *MSE)),
        Row(group, model, "W8A8 MSE + shift", (*W8A8, *MSE, *SHIFT)),
        Row(group, model, "W8A8 MSE + SmoothQuant (alpha searched)", (*W8A8, *MSE, *SMOOTH_SEARCH)),
        Row(group, model, "W8A8 MSE + SVDQuant (smooth 0.5 + rank 8)", (*W8A8, *MSE, *SMOOTH, *low_rank(8))),
        Row(group, model, "W8A8 FP8 E4M3 (min-max, device class ada)", FP8),
        Row(group, model, "W4A8 naive (min-max)", W4A8),
        Row(group, model, "W4A8 MSE + SVDQuant (smooth 0.5 + rank 8)", (*W4A8, *MSE, *SMOOTH, *low_rank(8))),
        Row(
            group,
            model,
            "W4A8 MSE + shift + SVDQuant (smooth 0.5 + rank 32)",
            (*W4A8, *MSE, *SHIFT, *SMOOTH, *low_rank(32)),
        ),
    ]


UNET_PTQ = "digits-unet W4A4 PTQ"
UNET_FT = "digits-unet W4A4 fine-tuned"
DIT = "digits-dit W4A8"
FP8_GROUP = "FP8 W8A8"
OUTLIER_MARGINS = (("W8A8", 0.005), ("W4A8", 0.015))
"""Issue 15's targets on the outlier models: accuracy within 0.5 points of FP at W8A8, 1.5 at W4A8."""
EVERY_LAYER = "quantize.keep_full_precision=[]"
DIAGNOSTIC = "(which half loses)"
"""Marks rows that explain a result (one half of a format changed) and take no part in a target's verdict."""
UNET_W4A4 = (*W4A4, *MSE)
DIT_W4A8 = (*W4A8, *MSE)
ROWS: list[Row] = [
    Row(UNET_PTQ, "digits-unet", "FP32"),
    Row(UNET_PTQ, "digits-unet", "W4A4 naive (min-max), every layer", (*W4A4, EVERY_LAYER)),
    Row(UNET_PTQ, "digits-unet", "W4A4 MSE ranges, every layer (bench/quality.py's row)", (*W4A4, *MSE, EVERY_LAYER)),
    Row(UNET_PTQ, "digits-unet", "W4A4 MSE ranges (family: conv_in, conv_out, time embedding float)", UNET_W4A4),
    Row(UNET_PTQ, "digits-unet", "W4A4 MSE + shift", (*UNET_W4A4, *SHIFT)),
    Row(UNET_PTQ, "digits-unet", "W4A4 MSE + SmoothQuant 0.5", (*UNET_W4A4, *SMOOTH)),
    Row(UNET_PTQ, "digits-unet", "W4A4 MSE + SmoothQuant (alpha searched)", (*UNET_W4A4, *SMOOTH_SEARCH)),
    Row(UNET_PTQ, "digits-unet", "W4A4 MSE + GPTQ", (*UNET_W4A4, *GPTQ)),
    Row(UNET_PTQ, "digits-unet", "W4A4 MSE + SVDQuant (smooth 0.5 + rank 8)", (*UNET_W4A4, *SMOOTH, *low_rank(8))),
    Row(
        UNET_PTQ,
        "digits-unet",
        "W4A4 MSE + shift + SVDQuant (smooth 0.5 + rank 8)",
        (*UNET_W4A4, *SHIFT, *SMOOTH, *low_rank(8)),
    ),
    Row(
        UNET_PTQ,
        "digits-unet",
        "configs/digits-unet-w4a4-ptq.yaml: W4A4 MSE + shift + SVDQuant (smooth searched + rank 16)",
        (),
        str(PTQ_W4A4),
    ),
    Row(
        UNET_PTQ,
        "digits-unet",
        "W4A4 MSE + shift + SVDQuant (smooth 0.5 + rank 32)",
        (*UNET_W4A4, *SHIFT, *SMOOTH, *low_rank(32)),
    ),
    Row(
        UNET_FT,
        "digits-unet",
        "W4A4 fine-tuned 1,500 steps, no outlier methods (the preset before issue 15)",
        (*NO_METHODS, "finetune.steps=1500"),
        str(FINETUNE_W4A4),
    ),
    Row(
        UNET_FT,
        "digits-unet",
        "configs/digits-unet-w4a4-finetune.yaml: 600 steps from shift + SVDQuant (smooth 0.5 + rank 8)",
        (),
        str(FINETUNE_W4A4),
    ),
    Row(DIT, "digits-dit", "FP32"),
    Row(DIT, "digits-dit", "W4A8 MSE weights (zoo row)", (*W4A8, "quantize.weight.observer=mse")),
    Row(DIT, "digits-dit", "W4A8 MSE ranges", DIT_W4A8),
    Row(DIT, "digits-dit", "W4A8 MSE + GPTQ", (*DIT_W4A8, *GPTQ)),
    Row(DIT, "digits-dit", "W4A8 MSE + shift", (*DIT_W4A8, *SHIFT)),
    Row(DIT, "digits-dit", "W4A8 MSE + SmoothQuant (alpha searched)", (*DIT_W4A8, *SMOOTH_SEARCH)),
    Row(DIT, "digits-dit", "W4A8 MSE + SVDQuant (smooth 0.5 + rank 8)", (*DIT_W4A8, *SMOOTH, *low_rank(8))),
    Row(
        DIT,
        "digits-dit",
        "W4A8 MSE + shift + SVDQuant (smooth 0.5 + rank 16)",
        (*DIT_W4A8, *SHIFT, *SMOOTH, *low_rank(16)),
    ),
    Row(
        DIT,
        "digits-dit",
        "configs/digits-dit-w4a8.yaml: W4A8 MSE + shift + SVDQuant (smooth 0.5 + rank 32)",
        (),
        str(DIT_PRESET),
    ),
    Row(FP8_GROUP, "digits-dit", f"W8A8 FP8 weights, INT8 inputs {DIAGNOSTIC}", (FP8_WEIGHTS, ADA)),
    Row(FP8_GROUP, "digits-dit", f"W8A8 INT8 weights, FP8 inputs {DIAGNOSTIC}", (FP8_INPUTS, ADA)),
    *[
        row
        for name in ("digits-unet", "digits-dit", "digits-t2i")
        for row in (
            Row(FP8_GROUP, name, "FP32"),
            Row(FP8_GROUP, name, "W8A8 INT8 (min-max)", W8A8),
            Row(FP8_GROUP, name, "W8A8 FP8 E4M3 (min-max, device class ada)", FP8),
        )
    ],
    *[row for variant in VARIANTS for row in outlier_rows(variant.name)],
]


PUBLISHED = (2000, 50)
"""(samples, DDIM steps) of the tables in BENCHMARKS.md."""
CACHE = Path(os.environ.get("DIFFQUANT_HOME", ".diffquant")) / "bench-cache"
"""FP pools and FP evaluations of the benchmark runs (deterministic, so reused across runs)."""


def cached(name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute()``'s tensors, stored as ``CACHE/<name>.safetensors`` the first time and read after."""
    path = CACHE / f"{name}.safetensors"
    if path.is_file():
        return load_safetensors(path)
    tensors = compute()
    save_safetensors(tensors, path)
    return tensors


class ModelBench:
    """One model's shared evaluation state: pool, calibration sets, SQNR inputs, FP result."""

    def __init__(self, model: DiffusionModel, samples: int, steps: int) -> None:
        """Sample the FP pool and pick the SQNR inputs (calibration sets are chosen per spec, cached)."""
        self.model, self.samples, self.steps = model, samples, steps
        self.classifier = load_classifier()
        self.real = load_digits_split().held_out_images
        self.pools: dict[tuple[int, int], Trajectories] = {}
        self.calibrations: dict[tuple, tuple[Trajectories, Trajectories, torch.Tensor]] = {}
        self.fp: EvalResult | None = None
        self.macs = None

    def pool(self, spec: CompressionSpec) -> Trajectories:
        """The FP candidate pool of the spec's calibration (trajectories, seed)."""
        cal = spec.calibration
        key = (cal.trajectories, cal.seed)
        if key not in self.pools:
            name = f"pool-{self.model.weights_sha256[:16]}-{cal.trajectories}-{cal.seed}-{self.steps}"
            tensors = cached(
                name, lambda: collect_pool(self.model, cal.trajectories, self.steps, cal.seed).to_tensors()
            )
            self.pools[key] = Trajectories(tensors["x"], tensors["t"], tensors["labels"])
        return self.pools[key]

    def fp_result(self) -> EvalResult:
        """The float model's evaluation (noise seed 0), cached on disk across runs."""
        if self.fp is None:
            name = f"fp-{self.model.weights_sha256[:16]}-{self.samples}-{self.steps}"
            path = CACHE / f"{name}.json"
            tensors = cached(name, lambda: self._fp_tensors(path))
            labels = tensors.get("labels")
            self.fp = EvalResult(tensors["samples"], labels, json.loads(path.read_text()))
        return self.fp

    def _fp_tensors(self, metrics_path: Path) -> dict[str, torch.Tensor]:
        result = self.evaluate(self.model, None)
        write_json(result.metrics, metrics_path)
        return {"samples": result.samples} | ({"labels": result.labels} if result.labels is not None else {})

    def calibration(self, spec: CompressionSpec) -> tuple[Trajectories, Trajectories, torch.Tensor]:
        """(calibration set, SQNR inputs, FP outputs on them) for the spec's calibration section."""
        cal = spec.calibration
        key = (cal.trajectories, cal.seed, cal.strategy, cal.size)
        if key not in self.calibrations:
            pool = self.pool(spec)
            features = pool_features(
                self.model.unet, pool, self.model.conditional, self.model.family_info.feature_module
            )
            chosen = select(pool, cal.strategy, cal.size, cal.seed, features)
            sqnr_in = subset(pool, held_out_indices(len(pool), chosen, 256, cal.seed))
            self.calibrations[key] = (subset(pool, chosen), sqnr_in, denoiser_outputs(self.model.unet, sqnr_in))
        return self.calibrations[key]

    def evaluate(self, model: DiffusionModel, spec: CompressionSpec | None) -> EvalResult:
        """Sample and score ``model`` as bench/quality.py does (paired metrics once the FP row ran)."""
        sqnr_in = fp_out = None
        if spec is not None:
            _, sqnr_in, fp_out = self.calibration(spec)
        return evaluate_model(
            model,
            self.samples,
            self.steps,
            0,
            1000,
            self.classifier,
            self.real,
            fp=self.fp,
            sqnr_inputs=sqnr_in,
            fp_outputs=fp_out,
        )

    def bitops(self, plan: LayerPlan, calib: Trajectories) -> float:
        """BitOps of one denoiser call at batch 1 (MACs x weight bits x input bits, 32 for float; branches at 16 x 16)."""
        if self.macs is None:
            self.macs = layer_macs(
                self.model.unet, (calib.x, calib.t, calib.labels if self.model.conditional else None)
            )
        return plan_bitops(self.model.unet, plan, self.macs)


def model_source(name: str, models_dir: Path) -> str:
    """The spec override that selects ``name`` (a bundled reference or a built outlier variant)."""
    return f"model.name={name}" if name in REFERENCE_MODELS else f"model.path={models_dir / name}"


def row_spec(row: Row, bench: ModelBench, models_dir: Path) -> CompressionSpec:
    """The row's full spec (model, sampler steps and sample count set for this run)."""
    base = [model_source(row.model, models_dir), f"sampler.steps={bench.steps}", f"evaluate.samples={bench.samples}"]
    return load_spec(Path(row.config) if row.config else None, [*base, *(row.overrides or ())])


def quantize_row(bench: ModelBench, spec: CompressionSpec) -> tuple[DiffusionModel, LayerPlan, dict]:
    """Quantize a copy of the model as ``diffquant compress`` does: PTQ (or allocation), then fine-tuning."""
    calib, _, _ = bench.calibration(spec)
    model = copy.deepcopy(bench.model)
    extra: dict = {}
    if spec.allocation is not None:
        result = diffquant.auto_quantize(
            model,
            spec.allocation,
            calib,
            quantize_config=spec.quantize,
            calibration=spec.calibration,
            steps=spec.sampler.steps,
            seed=spec.evaluate.seed,
            classifier=bench.classifier,
            target=spec.export.target,
            device_class=spec.export.device.name,
        )
        plan = result.plan
    else:
        plan = diffquant.quantize(
            model,
            spec.quantize,
            calib,
            calibration=spec.calibration,
            target=spec.export.target,
            device_class=spec.export.device.name,
        ).plan
    if spec.finetune is not None:
        done = diffquant.finetune(model, bench.model, spec.finetune, bench.pool(spec))
        extra = {"finetune_steps": done.steps, "finetune_seconds": done.seconds}
    return model, plan, extra


def run_row(row: Row, bench: ModelBench, models_dir: Path) -> dict:
    """Quantize (unless FP) and evaluate one row; returns its record."""
    start = time.perf_counter()
    fp_bytes = sum(p.numel() * 4 for p in bench.model.unet.parameters())
    record: dict = {"key": row.key, **asdict(row)}
    fp = bench.fp_result()
    if row.overrides is None:
        record.update(bytes=fp_bytes, **fp.metrics)
    else:
        spec = row_spec(row, bench, models_dir)
        quantized, plan, extra = quantize_row(bench, spec)
        calib, _, _ = bench.calibration(spec)
        result = bench.evaluate(quantized, spec)
        packed = packed_weight_bytes(bench.model.unet, plan)["packed"]
        record.update(bytes=packed, gbitops=bench.bitops(plan, calib) / 1e9, **extra, **result.metrics)
    record["size_ratio"] = record["bytes"] / fp_bytes
    record["seconds"] = time.perf_counter() - start
    print(
        f"{row.key:90s} acc {record.get('accuracy', float('nan')):.4f} fd_real {record.get('fd_real', float('nan')):.2f} "
        f"fd_fp {record.get('fd_fp', float('nan')):.2f} ({record['seconds']:.0f} s)",
        flush=True,
    )
    return record


def run_rows(
    rows: list[Row], samples: int, steps: int, models_dir: Path, save: Callable[[dict], None] | None = None
) -> list[dict]:
    """Run ``rows`` model by model (one pool and FP evaluation per model); ``save`` gets each record as it is done."""
    records = []
    for name in dict.fromkeys(row.model for row in rows):
        source = name if name in REFERENCE_MODELS else models_dir / name
        bench = ModelBench(load_model(source), samples, steps)
        for row in sorted((r for r in rows if r.model == name), key=lambda r: r.overrides is not None):
            records.append(run_row(row, bench, models_dir))
            if save is not None:
                save(records[-1])
    return records


def results_name(base: str, samples: int, steps: int) -> str:
    """The results file of a run: ``base`` at the published setting (2,000 samples, 50 steps), else suffixed.

    Runs at other settings (quick looks) never replace the published rows or BENCHMARKS.md.
    """
    return base if (samples, steps) == PUBLISHED else f"{base}-{samples}x{steps}"


def store(name: str, samples: int, steps: int, record: dict) -> list[dict]:
    """Merge ``record`` into ``bench/results/<name>.json`` (replacing its key; other sample counts are dropped).

    Runs of different groups can store into the same file at once (an exclusive lock around read and write).
    Returns every stored row.
    """
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    with (Path(tempfile.gettempdir()) / f"diffquant-bench-{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = merged([record], samples, name)
        write_results(name, {"machine": machine(), "samples": samples, "steps": steps, "rows": rows})
    return rows


def git_commit() -> str:
    """The commit the numbers were measured at (``+dirty`` when the tree has changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return sha.strip() + ("+dirty" if dirty.strip() else "")


def merged(records: list[dict], samples: int, name: str) -> list[dict]:
    """``records`` plus the stored rows of ``bench/results/<name>.json`` they do not replace (same sample count)."""
    path = ROOT / "bench" / "results" / f"{name}.json"
    if not path.is_file():
        return records
    stored = json.loads(path.read_text())
    if stored.get("samples") != samples:
        return records
    new = {r["key"] for r in records}
    return [r for r in stored["rows"] if r["key"] not in new] + records


def _fp(records: list[dict], group: str, model: str | None = None) -> dict | None:
    return next(
        (
            r
            for r in records
            if r["group"] == group and r["overrides"] is None and (model is None or r["model"] == model)
        ),
        None,
    )


def verdicts(records: list[dict]) -> list[str]:
    """One line per target: met, or missed by how much (best row of its group)."""
    lines = []

    def best(group: str, *, finetuned: bool | None = None) -> dict | None:
        rows = [r for r in records if r["group"] == group and r["overrides"] is not None]
        rows = [r for r in rows if finetuned is None or ("finetune_seconds" in r) == finetuned]
        return max(rows, key=lambda r: (r["accuracy"], -r["fd_real"]), default=None)

    fp, row = _fp(records, UNET_PTQ), best(UNET_PTQ)
    if fp and row:
        ok = row["accuracy"] >= 0.97 and row["fd_real"] <= 2 * fp["fd_real"]
        lines.append(
            f"- {UNET_PTQ} (target accuracy >= 0.97, FD to real <= 2x FP's = {2 * fp['fd_real']:.2f}): best row "
            f"'{row['label']}' {row['accuracy']:.4f} / {row['fd_real']:.2f}: {'met' if ok else 'missed'}"
            + ("" if ok else f" (accuracy {row['accuracy'] - 0.97:+.4f}, FD {row['fd_real'] / fp['fd_real']:.1f}x FP)")
        )
    row = best(UNET_FT, finetuned=True)
    if row:
        ok = row["accuracy"] >= 0.985 and row["finetune_seconds"] <= 300
        lines.append(
            f"- {UNET_FT} (target >= 0.985 within 300 s of fine-tuning): best row '{row['label']}' "
            f"{row['accuracy']:.4f} after {row['finetune_steps']} steps in {row['finetune_seconds']:.0f} s: "
            f"{'met' if ok else 'missed'}" + ("" if ok else f" (accuracy {row['accuracy'] - 0.985:+.4f})")
        )
    checks = [(f"outliers {v.name}", v.name, bits, margin) for v in VARIANTS for bits, margin in OUTLIER_MARGINS]
    fp8 = [
        (FP8_GROUP, m, "W8A8 FP8", 0.005) for m in dict.fromkeys(r["model"] for r in records if r["group"] == FP8_GROUP)
    ]
    for group, model, bits, margin in [*checks, (DIT, "digits-dit", "W4A8", 0.01), *fp8]:
        fp = _fp(records, group, model)
        rows = [
            r
            for r in records
            if r["group"] == group and r["model"] == model and bits in r["label"] and DIAGNOSTIC not in r["label"]
        ]
        if not fp or not rows:
            continue
        row = max(rows, key=lambda r: r["accuracy"])
        gap = fp["accuracy"] - row["accuracy"]
        verdict = "met" if gap <= margin + 1e-9 else f"missed by {(gap - margin) * 100:.2f} points"
        lines.append(
            f"- {model} {bits} (target within {margin * 100:g} points of FP {fp['accuracy']:.4f}): best row "
            f"'{row['label']}' {row['accuracy']:.4f}, {gap * 100:.2f} points below: {verdict}"
        )
    return lines


def table(records: list[dict], groups: list[str]) -> list[str]:
    """The markdown table of ``records``, grouped in ``groups`` order."""
    lines = [
        "| target | model | row | accuracy | FD to real | FD to FP | PSNR vs FP (dB) | SQNR (dB) | x FP32 size | GBitOps | fine-tuning | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in groups:
        for r in (r for r in records if r["group"] == group):
            f = partial(cell, r)
            tuned = f"{r['finetune_steps']} steps, {r['finetune_seconds']:.0f} s" if "finetune_seconds" in r else "-"
            lines.append(
                f"| {group} | {r['model']} | {r['label']} | {f('accuracy', '{:.4f}')} | {f('fd_real', '{:.2f}')} | "
                f"{f('fd_fp', '{:.2f}')} | {f('psnr', '{:.1f}')} | {f('sqnr_db', '{:.1f}')} | {r['size_ratio']:.3f} | "
                f"{f('gbitops', '{:.2f}')} | {tuned} | {r['seconds']:.0f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--groups", default=None, help="comma-separated groups (default: all)")
    parser.add_argument(
        "--only", default=None, help="comma-separated label substrings: run only the matching rows (and FP rows)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip the quantized rows already stored at this --samples / --steps"
    )
    parser.add_argument("--report", action="store_true", help="run nothing: rewrite the table from the stored rows")
    home = Path(os.environ.get("DIFFQUANT_HOME", ".diffquant"))
    parser.add_argument("--models-dir", type=Path, default=home / "outlier-models")
    args = parser.parse_args()
    groups = list(dict.fromkeys(row.group for row in ROWS))
    chosen = args.groups.split(",") if args.groups else groups
    unknown = set(chosen) - set(groups)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; choose from {groups}")
    rows = [row for row in ROWS if row.group in chosen]
    if args.only:
        wanted = args.only.split(",")
        rows = [row for row in rows if row.overrides is None or any(w in row.label for w in wanted)]
    if not args.report and any(row.model not in REFERENCE_MODELS for row in rows):
        write_outlier_models(args.models_dir)
    commit = git_commit()
    name = results_name("hard_end", args.samples, args.steps)
    if args.resume:
        done = {r["key"] for r in merged([], args.samples, name)}
        rows = [row for row in rows if row.overrides is None or row.key not in done]

    def save(record: dict) -> None:
        store(name, args.samples, args.steps, record | {"commit": commit, "load_avg": os.getloadavg()[0]})

    if not args.report:
        run_rows(rows, args.samples, args.steps, args.models_dir, save)
    records = merged([], args.samples, name)
    loads = [r["load_avg"] for r in records if "load_avg" in r]
    load = f"{min(loads):.1f}-{max(loads):.1f} when the rows finished" if loads else "not recorded"
    lines = [
        "## The hard end: W4A4, outlier models, DiT W4A8 (issue 15's targets)",
        "",
        f"Command: `.venv/bin/python bench/hard_end.py` ({args.samples} samples, DDIM {args.steps}, noise seed 0; "
        "every row is a spec quantized through the library API and evaluated as in bench/quality.py; calibration: "
        "256 inputs chosen by density_diversity from 64 FP trajectories). "
        f"Machine: {machine()}.",
        "Outlier models: `bench/outlier_models.py` (FP function identical to the reference's). GBitOps: one denoiser "
        "call at batch 1, MACs x weight bits x input bits (32 for float). Size: all parameters, quantized weights "
        "bit-packed, as a share of FP32. Seconds: wall time of the row (calibration, quantization, fine-tuning, "
        f"sampling) on this machine while other jobs shared it (1-minute load average {load}); the quality columns "
        "do not depend on it. `--groups` reruns some groups; each row is stored as it finishes "
        "(`bench/results/hard_end.json`, with the commit it was measured at).",
        "",
        *table(records, groups),
        "",
        "Targets:",
        "",
        *verdicts(records),
    ]
    if name == "hard_end":
        replace_section("hard_end", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
