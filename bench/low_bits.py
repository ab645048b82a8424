"""Below 4 weight bits on digits-unet, and mixed vs uniform W4A8 at equal bytes on digits-dit and digits-t2i.

The evaluation is bench/quality.py's: DDIM 50, ``--samples`` images (200 per class at 2,000) from noise
seed 0, the default spec's calibration set (256 inputs chosen by density_diversity from 64 FP
trajectories), SQNR on 256 held-out pool inputs, FD on the evaluation classifier's features. Every
quantized row goes through the library API (:func:`diffquant.quantize`, :func:`diffquant.auto_quantize`,
:func:`diffquant.finetune`), which gives the plans ``diffquant compress`` gives for the same spec.

Parts, each run on its own with ``--part`` (``all`` runs them in order); each merges its rows into
``bench/results/low_bits.json`` and rewrites the ``low_bits`` section of BENCHMARKS.md from every row
measured so far, each row naming the command that produced it:

- ``uniform``: uniform W3A8 with every layer quantized (the sweep's baseline), round-to-nearest vs GPTQ.
- ``content``: the content-metric decision on digits-unet: the ``--content-budget`` plan of
  configs/digits-unet-mixed-w2.5a8.yaml with its content layers scored by 1 - SSIM, by the classifier's
  logit KL, or not at all (SQNR only).
- ``mixed``: the allocated plans of configs/digits-unet-mixed-w2.5a8.yaml at each of ``--budgets``.
- ``finetune``: configs/digits-unet-mixed-w2a8.yaml (<= 2.0 bits), before and after its fine-tuning.
- ``zoo``: digits-dit and digits-t2i (``--zoo-models``): uniform W4A8 with the family's float layers, and the mixed W4A8
  plan with the same float layers (family pins) under a bytes budget equal to the uniform plan's bytes,
  its content layers scored by each metric of ``--zoo-content`` (default ``ssim``); ``--zoo-rounding gptq``
  rounds both plans' integer weights with GPTQ and ``--zoo-noise-sum amplitude`` sets the mixed plans'
  ``allocation.noise_sum`` and ``--zoo-quality psnr`` their ``allocation.quality_metric``; ``--zoo-seeds 0,1,2``
  evaluates every plan at each noise seed, paired with FP at that seed (the rows' names say so).

Sensitivity tables (the long part: GPTQ per layer and option, final-sample content probes) are cached
under ``$DIFFQUANT_HOME/cache/bench-low-bits`` (default ``.diffquant``): per layer group, keyed on what
the rows depend on, so the content variants share the rows of the other layers and a rerun reuses them.
FP evaluation samples are cached there too.

Run: ``.venv/bin/python bench/low_bits.py --part PART`` (hours for ``all`` on 2 shared cores).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from common import ROOT, machine, replace_section, write_results

import diffquant
from diffquant.calibration.pool import collect_pool, held_out_indices, subset
from diffquant.calibration.selection import pool_features, select
from diffquant.data import load_digits_split
from diffquant.evaluation import EvalResult, evaluate_model
from diffquant.mixed_precision.allocate import measure_allocation_sensitivity
from diffquant.mixed_precision.content import content_layers, content_metric
from diffquant.mixed_precision.sensitivity import SENSITIVITY_CODE_VERSION, SensitivityTable
from diffquant.models.loading import DiffusionModel
from diffquant.models.reference import load_classifier
from diffquant.ptq import AutoQuantizeResult, plan_from_spec, quantize_model, weight_observer, weight_rounding
from diffquant.quant.plan import packed_weight_bytes, quantizable_layers
from diffquant.sampling import denoiser_outputs
from diffquant.spec import CompressionSpec, load_spec
from diffquant.storage import load_safetensors, save_safetensors

CONFIG_25 = ROOT / "configs" / "digits-unet-mixed-w2.5a8.yaml"
CONFIG_2 = ROOT / "configs" / "digits-unet-mixed-w2a8.yaml"
RESULTS = ROOT / "bench" / "results" / "low_bits.json"
TARGETS = {
    "mixed <= 3.0 bits": "accuracy >= 0.985",
    "mixed <= 2.5 bits": "accuracy >= 0.975, FD to real <= 1.5x FP",
    "mixed <= 2.0 bits, fine-tuned": "accuracy >= 0.95",
}
ZOO_MODELS = "digits-dit,digits-t2i"
ZOO_MIXED = "allocation={{weight_bits: [2, 3, 4, 6, 8], activation_bits: [8], budget: {{bytes: {bytes}}}}}"


def cache_dir() -> Path:
    """Where tables and FP samples are cached."""
    home = Path(os.environ.get("DIFFQUANT_HOME", ROOT / ".diffquant"))
    folder = home / "cache" / "bench-low-bits"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def digest(data: Any) -> str:
    """A short sha256 of JSON-able data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Bench:
    """One model's shared state: calibration set, SQNR inputs, FP result (cached), classifier, real digits."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.args = args
        self.model = diffquant.load_model(name)
        self.classifier = load_classifier()
        self.real = load_digits_split().held_out_images
        cal = load_spec(overrides=[f"model.name={name}"]).calibration
        pool = collect_pool(self.model, cal.trajectories, args.steps, cal.seed)
        features = pool_features(self.model.unet, pool, self.model.conditional, self.model.family_info.feature_module)
        chosen = select(pool, cal.strategy, cal.size, cal.seed, features)
        self.pool = pool
        self.calib = subset(pool, chosen)
        self.sqnr_in = subset(pool, held_out_indices(len(pool), chosen, 256, cal.seed))
        self.fp_out = denoiser_outputs(self.model.unet, self.sqnr_in)
        self.calib_sha = hashlib.sha256(self.calib.x.numpy().tobytes() + self.calib.t.numpy().tobytes()).hexdigest()
        self.fp_bytes = sum(p.numel() * 4 for p in self.model.unet.parameters())
        self._fp: dict[int, EvalResult] = {}

    @property
    def fp(self) -> EvalResult:
        """The FP evaluation at noise seed 0 (computed on first use, cached on disk)."""
        return self.fp_at(0)

    def fp_at(self, seed: int) -> EvalResult:
        """The FP evaluation at noise ``seed`` (computed on first use, cached on disk)."""
        if seed not in self._fp:
            self._fp[seed] = self._fp_result(seed)
        return self._fp[seed]

    def _fp_result(self, seed: int) -> EvalResult:
        a = self.args
        path = cache_dir() / f"fp-{self.model.name}-{a.samples}-{a.steps}-seed{seed}.safetensors"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            tensors = load_safetensors(path)
            return EvalResult(tensors["samples"], tensors.get("labels"), json.loads(meta.read_text()))
        result = self.evaluate(self.model, seed, paired=False)
        save_safetensors({"samples": result.samples, "labels": result.labels}, path)
        meta.write_text(json.dumps(result.metrics))
        return result

    def evaluate(self, model: DiffusionModel, seed: int = 0, paired: bool = True, fp_seed: int = 0) -> EvalResult:
        """Sample ``model`` at noise ``seed`` and score it (paired metrics against FP at ``fp_seed`` when ``paired``)."""
        a = self.args
        return evaluate_model(
            model,
            a.samples,
            a.steps,
            seed,
            1000,
            self.classifier,
            self.real,
            fp=self.fp_at(fp_seed) if paired else None,
            sqnr_inputs=self.sqnr_in if paired else None,
            fp_outputs=self.fp_out if paired else None,
        )

    def sensitivity(self, spec: CompressionSpec) -> SensitivityTable:
        """The spec's sensitivity table, measured per layer group and cached (content layers apart)."""
        alloc = spec.allocation
        assert alloc is not None
        base = {
            "model": self.model.name,
            "calibration": self.calib_sha,
            "sampler": spec.sampler.model_dump(),
            "seed": spec.evaluate.seed,
            "options": alloc.model_dump(
                include={
                    "weight_bits",
                    "activation_bits",
                    "group_bits",
                    "group_sizes",
                    "sensitivity_inputs",
                    "quality_metric",
                }
            ),
            "weight": [weight_observer(spec.quantize), weight_rounding(spec.quantize)],
            "activation": spec.calibration.observer,
            "outlier_tokens": spec.quantize.outlier_tokens,
            "code": SENSITIVITY_CODE_VERSION,
        }
        scored = content_layers(self.model, alloc)
        names = quantizable_layers(self.model.unet)
        groups = [
            ([n for n in names if n not in scored], alloc.model_copy(update={"content_layers": []}), base),
            (
                [n for n in names if n in scored],
                alloc,
                {**base, "content": [content_metric(alloc, self.model, True), alloc.content_samples, sorted(scored)]},
            ),
        ]
        rows = []
        for layers, config, key in groups:
            if not layers:
                continue
            path = cache_dir() / f"sensitivity-{digest([key, layers])}.csv"
            if not path.exists():
                start = time.perf_counter()
                table = measure_allocation_sensitivity(
                    self.model,
                    self.calib,
                    config,
                    weight_observer=weight_observer(spec.quantize),
                    activation_observer=spec.calibration.observer,
                    steps=spec.sampler,
                    seed=spec.evaluate.seed,
                    classifier=self.classifier,
                    layers=layers,
                    weight_rounding=weight_rounding(spec.quantize),
                    outlier_tokens=spec.quantize.outlier_tokens,
                    batch_size=spec.calibration.batch_size,
                )
                table.save_csv(path)
                print(f"sensitivity of {len(layers)} layers: {time.perf_counter() - start:.0f} s -> {path}", flush=True)
            rows += SensitivityTable.load_csv(path).rows
        return SensitivityTable(rows)

    def row(
        self, name: str, part: str, command: str, model: DiffusionModel, plan: Any, extra: dict, seed: int = 0
    ) -> dict:
        """Evaluate a quantized model at noise ``seed`` (paired with FP at that seed) and return its row (also printed).

        The metrics are cached on the plan (formats, roundings, observers), the calibration set and the
        evaluation settings, which fix the quantized model: a plan two parts share is sampled once.
        """
        start = time.perf_counter()
        key = [self.model.name, self.calib_sha, plan.to_json_dict(), self.args.samples, self.args.steps]
        if seed:
            key.append(seed)
        if extra.get("finetune_steps"):
            key.append(
                hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.unet.state_dict().values())).hexdigest()
            )
        path = cache_dir() / f"eval-{digest(key)}.json"
        if path.exists():
            metrics = json.loads(path.read_text())
        else:
            metrics = self.evaluate(model, seed, fp_seed=seed).metrics
            path.write_text(json.dumps(metrics))
        fp = self.fp_at(seed)
        size = packed_weight_bytes(self.model.unet, plan)["packed"]
        row = {
            "name": name,
            "model": self.model.name,
            "part": part,
            "command": command,
            "samples": self.args.samples,
            "bytes": size,
            "size_ratio": size / self.fp_bytes,
            "noise_seed": seed,
            "fp_accuracy": fp.metrics.get("accuracy"),
            "fp_fd_real": fp.metrics.get("fd_real"),
            "eval_seconds": time.perf_counter() - start,
            **extra,
            **metrics,
        }
        if row.get("fd_real") is not None and row["fp_fd_real"]:
            row["fd_ratio"] = row["fd_real"] / row["fp_fd_real"]
        print(
            f"{self.model.name} {name:52s} bits {row.get('avg_weight_bits', float('nan')):.3f} bytes {size:,} "
            f"acc {row.get('accuracy', float('nan')):.4f} fd_real {row.get('fd_real', float('nan')):.2f} "
            f"fd_fp {row.get('fd_fp', float('nan')):.2f}",
            flush=True,
        )
        return row

    def fp_rows(self, part: str, command: str, noise_floor: bool = True, seeds: Sequence[int] = ()) -> list[dict]:
        """FP32 rows: noise seed 0 (the reference), seed 1 paired with seed 0 (``noise_floor``), other ``seeds``.

        Each nonzero seed of ``seeds`` gets a row on its own, the reference of the rows at that seed.
        """
        base = {
            "model": self.model.name,
            "part": part,
            "command": command,
            "samples": self.args.samples,
            "bytes": self.fp_bytes,
            "size_ratio": 1.0,
        }
        rows = [{"name": "FP32", **base, "avg_weight_bits": 32.0, **self.fp.metrics}]
        if noise_floor:
            second = self.evaluate(self.model, seed=1)
            rows.append({"name": "FP32, noise seed 1 (noise floor)", **base, "avg_weight_bits": 32.0, **second.metrics})
        for seed in (s for s in seeds if s):
            name = f"FP32, noise seed {seed}"
            rows.append({"name": name, **base, "avg_weight_bits": 32.0, "noise_seed": seed, **self.fp_at(seed).metrics})
        return rows

    def mixed(self, spec: CompressionSpec) -> tuple[DiffusionModel, AutoQuantizeResult, float]:
        """Allocate and quantize a copy of the model under ``spec`` (sensitivity from the cache)."""
        assert spec.allocation is not None
        table = self.sensitivity(spec)
        start = time.perf_counter()
        student = copy.deepcopy(self.model)
        result = diffquant.auto_quantize(
            student,
            spec.allocation,
            self.calib,
            quantize_config=spec.quantize,
            calibration=spec.calibration,
            steps=spec.sampler,
            seed=spec.evaluate.seed,
            classifier=self.classifier,
            target=spec.export.target,
            sensitivity=table,
        )
        return student, result, time.perf_counter() - start


def allocation_extra(bench: Bench, result: AutoQuantizeResult, spec: CompressionSpec, seconds: float) -> dict:
    """What a mixed row records about its plan."""
    assert spec.allocation is not None
    choice = result.allocation.choice
    return {
        "avg_weight_bits": result.allocation.usage.get("avg_weight_bits"),
        "usage": result.allocation.usage,
        "options": {o: sum(1 for c in choice.values() if c == o) for o in sorted(set(choice.values()))},
        "rounding": weight_rounding(spec.quantize),
        "quantize_family_fp_layers": spec.allocation.quantize_family_fp_layers,
        "noise_sum": spec.allocation.noise_sum,
        "quality_metric": spec.allocation.quality_metric,
        "content_metric": content_metric(spec.allocation, bench.model, True),
        "content_layers": len(content_layers(bench.model, spec.allocation)),
        "quantize_seconds": seconds,
    }


def command(part: str, args: argparse.Namespace) -> str:
    """The command line that reproduces a part's rows."""
    extra = f" --samples {args.samples}" if args.samples != 2000 else ""
    if part == "mixed":
        extra += f" --budgets {args.budgets}"
    if part == "content":
        extra += f" --content-budget {args.content_budget}"
    if part == "zoo" and args.zoo_content != "ssim":
        extra += f" --zoo-content {args.zoo_content}"
    if part == "zoo" and args.zoo_models != ZOO_MODELS:
        extra += f" --zoo-models {args.zoo_models}"
    if part == "zoo" and args.zoo_rounding != "nearest":
        extra += f" --zoo-rounding {args.zoo_rounding}"
    if part == "zoo" and args.zoo_noise_sum != "power":
        extra += f" --zoo-noise-sum {args.zoo_noise_sum}"
    if part == "zoo" and args.zoo_quality != "sqnr":
        extra += f" --zoo-quality {args.zoo_quality}"
    if part == "zoo" and args.zoo_seeds != "0":
        extra += f" --zoo-seeds {args.zoo_seeds}"
    return f".venv/bin/python bench/low_bits.py --part {part}{extra}"


def part_uniform(args: argparse.Namespace) -> Iterator[dict]:
    bench = Bench("digits-unet", args)
    cmd = command("uniform", args)
    yield from bench.fp_rows("uniform", cmd)
    for rounding in ("nearest", "gptq"):
        spec = load_spec(
            overrides=[
                "quantize.weight.bits=3",
                "quantize.weight.observer=mse",
                f"quantize.weight.rounding={rounding}",
                "quantize.keep_full_precision=[]",
            ]
        )
        start = time.perf_counter()
        plan = plan_from_spec(bench.model, spec.quantize, spec.calibration.observer)
        quantized = quantize_model(bench.model, plan, bench.calib, spec.calibration)
        extra = {"avg_weight_bits": 3.0, "rounding": rounding, "quantize_seconds": time.perf_counter() - start}
        yield bench.row(f"uniform W3A8 (every layer), {rounding}", "uniform", cmd, quantized, plan, extra)


def part_content(args: argparse.Namespace) -> Iterator[dict]:
    bench = Bench("digits-unet", args)
    cmd = command("content", args)
    for label, setting in (
        ("SSIM", ["allocation.content_metric=ssim"]),
        ("classifier KL", ["allocation.content_metric=classifier_kl"]),
        ("none (SQNR only)", ["allocation.content_layers=[]"]),
    ):
        spec = load_spec(CONFIG_25, [f"allocation.budget.avg_weight_bits={args.content_budget}", *setting])
        student, result, seconds = bench.mixed(spec)
        extra = allocation_extra(bench, result, spec, seconds)
        name = f"mixed <= {args.content_budget} bits, content score: {label}"
        yield bench.row(name, "content", cmd, student, result.plan, extra)


def part_mixed(args: argparse.Namespace) -> Iterator[dict]:
    bench = Bench("digits-unet", args)
    cmd = command("mixed", args)
    for budget in [float(b) for b in args.budgets.split(",")]:
        spec = load_spec(CONFIG_25, [f"allocation.budget.avg_weight_bits={budget}"])
        student, result, seconds = bench.mixed(spec)
        extra = allocation_extra(bench, result, spec, seconds)
        yield bench.row(f"mixed <= {budget} bits", "mixed", cmd, student, result.plan, extra)


def part_finetune(args: argparse.Namespace) -> Iterator[dict]:
    bench = Bench("digits-unet", args)
    cmd = command("finetune", args)
    spec = load_spec(CONFIG_2)
    assert spec.finetune is not None and spec.allocation is not None
    student, result, seconds = bench.mixed(spec)
    extra = allocation_extra(bench, result, spec, seconds)
    budget = spec.allocation.budget.avg_weight_bits
    yield bench.row(f"mixed <= {budget} bits, PTQ", "finetune", cmd, student, result.plan, extra)
    start = time.perf_counter()
    tuned = diffquant.finetune(student, bench.model, spec.finetune, bench.pool, sensitivity=result.sensitivity)
    extra = {**extra, "finetune_steps": tuned.steps, "finetune_seconds": time.perf_counter() - start}
    yield bench.row(f"mixed <= {budget} bits, fine-tuned", "finetune", cmd, student, result.plan, extra)


def part_zoo(args: argparse.Namespace) -> Iterator[dict]:
    cmd = command("zoo", args)
    for name in args.zoo_models.split(","):
        bench = Bench(name, args)
        seeds = [int(seed) for seed in args.zoo_seeds.split(",")]
        yield from bench.fp_rows("zoo", cmd, noise_floor=False, seeds=seeds)  # the zoo table has the noise floor
        common = [f"model.name={name}", "quantize.weight.observer=mse", f"quantize.weight.rounding={args.zoo_rounding}"]
        suffix = ", GPTQ" if args.zoo_rounding == "gptq" else ""
        spec = load_spec(overrides=[*common, "quantize.weight.bits=4"])
        start = time.perf_counter()
        plan = plan_from_spec(bench.model, spec.quantize, spec.calibration.observer)
        quantized = quantize_model(bench.model, plan, bench.calib, spec.calibration)
        size = packed_weight_bytes(bench.model.unet, plan)["packed"]
        numel = {n: bench.model.unet.get_submodule(n).weight.numel() for n in plan}
        bits = sum((cfg.weight.bits if cfg.weight else 32) * numel[n] for n, cfg in plan.items()) / sum(numel.values())
        extra = {"avg_weight_bits": bits, "quantize_seconds": time.perf_counter() - start}
        for seed in seeds:
            label = f"uniform W4A8 (family float layers){suffix}{seed_label(seed)}"
            yield bench.row(label, "zoo", cmd, quantized, plan, extra, seed)
        for metric in args.zoo_content.split(","):
            content = ["allocation.content_layers=[]"] if metric == "none" else [f"allocation.content_metric={metric}"]
            objective = [f"allocation.noise_sum={args.zoo_noise_sum}", f"allocation.quality_metric={args.zoo_quality}"]
            mixed_spec = load_spec(overrides=[*common, ZOO_MIXED.format(bytes=size), *content, *objective])
            student, result, seconds = bench.mixed(mixed_spec)
            extra = allocation_extra(bench, result, mixed_spec, seconds)
            label = f"mixed W4A8 at the uniform plan's bytes (family pins){suffix}"
            only = " (SQNR only)" if args.zoo_quality == "sqnr" else ""
            label += {"ssim": "", "none": f", content: none{only}"}.get(
                metric, f", content: {metric.replace('_', ' ')}"
            )
            if args.zoo_noise_sum != "power":
                label += f", noise sum: {args.zoo_noise_sum}"
            if args.zoo_quality != "sqnr":
                label += f", quality: {args.zoo_quality}"
            for seed in seeds:
                yield bench.row(label + seed_label(seed), "zoo", cmd, student, result.plan, extra, seed)


def seed_label(seed: int) -> str:
    """What a row's name adds for its noise seed (nothing for seed 0, the other tables' seed)."""
    return f", noise seed {seed}" if seed else ""


PARTS = {
    "uniform": part_uniform,
    "content": part_content,
    "mixed": part_mixed,
    "finetune": part_finetune,
    "zoo": part_zoo,
}


def merge(rows: list[dict]) -> list[dict]:
    """All rows so far: this run's replace earlier rows of the same model and name."""
    old = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    fresh = {(r["model"], r["name"]) for r in rows}
    return [r for r in old if (r["model"], r["name"]) not in fresh] + rows


def fmt(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    return "-" if value is None else spec.format(value)


def table(rows: list[dict]) -> str:
    lines = [
        "## Below 4 weight bits (digits-unet) and mixed vs uniform W4A8 at equal bytes (digits-dit, digits-t2i)",
        "",
        "Rows come from `bench/low_bits.py`, one `--part` at a time (the command of each row is in its last "
        "column); DDIM 50, noise seed 0, the default spec's calibration set, A8 everywhere. Bits: average weight "
        "bits over every Linear/Conv2d, float layers counted as 32. Bytes: all parameters, quantized weights "
        "bit-packed plus fp32 scales. FD ratio: FD to real over FP's FD to real at the same sample count (FD "
        "depends on it: compare rows only at equal samples). Raw rows: "
        "`bench/results/low_bits.json`.",
        "",
        "| model | row | samples | avg weight bits | bytes | accuracy | FD to real | FD ratio | FD to FP "
        "| PSNR vs FP (dB) | SQNR (dB) | target | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['name']} | {r.get('samples', '-')} | {fmt(r, 'avg_weight_bits', '{:.3f}')} | {r['bytes']:,} | "
            f"{fmt(r, 'accuracy', '{:.4f}')} | {fmt(r, 'fd_real', '{:.2f}')} | {fmt(r, 'fd_ratio', '{:.2f}x')} | "
            f"{fmt(r, 'fd_fp', '{:.2f}')} | {fmt(r, 'psnr', '{:.1f}')} | {fmt(r, 'sqnr_db', '{:.1f}')} | "
            f"{TARGETS.get(r['name'], '')} | `{r['command']}` |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], required=True)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budgets", default="3.0,2.5,2.0", help="mixed: average weight bits budgets")
    parser.add_argument("--content-budget", type=float, default=2.5, help="content: the budget compared")
    parser.add_argument("--zoo-models", default=ZOO_MODELS, help="zoo: reference models, comma-separated")
    parser.add_argument(
        "--zoo-content",
        default="ssim",
        help="zoo: content metrics of the mixed rows, comma-separated (ssim, classifier_kl, none: SQNR only)",
    )
    parser.add_argument(
        "--zoo-rounding", choices=["nearest", "gptq"], default="nearest", help="zoo: weight rounding of both plans"
    )
    parser.add_argument(
        "--zoo-noise-sum",
        choices=["power", "amplitude"],
        default="power",
        help="zoo: allocation.noise_sum of the mixed rows",
    )
    parser.add_argument(
        "--zoo-quality",
        choices=["sqnr", "psnr"],
        default="sqnr",
        help="zoo: allocation.quality_metric of the mixed rows",
    )
    parser.add_argument(
        "--zoo-seeds",
        default="0",
        help="zoo: evaluation noise seeds, comma-separated (each row paired with FP at its seed)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in PARTS if args.part == "all" else [args.part]:
        for row in PARTS[name](args):
            save([row])  # row by row: a long part interrupted keeps what it measured
    print(table(merge([])))


def save(rows: list[dict]) -> None:
    """Merge ``rows`` into the results file and rewrite the BENCHMARKS.md section."""
    merged = merge(rows)
    write_results("low_bits", {"machine": machine(), "rows": merged})
    body = table(merged) + f"\n\nMachine: {machine()} (timings under shared load; quality columns do not depend on it)."
    replace_section("low_bits", body)


if __name__ == "__main__":
    main()
