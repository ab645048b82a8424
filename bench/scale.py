"""How a compress run's time and memory grow with the model: SD 1.5-layout U-Nets at growing widths on the CPU.

For each width (a fraction of SD 1.5's channel counts, :mod:`sd_layout`; random weights, 32x32
latents, a 1-layer CLIP text encoder, no VAE) the pipeline is written to a temporary folder and
put through ``diffquant compress`` twice, each in its own process with its own fresh
``DIFFQUANT_HOME``, as a user runs it:

1. ``--dry-run``: its printed per-stage estimate (denoiser evaluations, seconds, peak RSS) is
   parsed from the table it prints;
2. the real run with the same settings: ``summary.json``'s ``timings`` (seconds per stage),
   ``memory`` (peak RSS per stage) and ``estimate`` (the same estimate, computed again inside the
   run with the run's shorter timing budget).

The settings are a short run of the shape of an SD run: guidance 7.5 (both halves through the
denoiser), 10 DDIM steps, 4 calibration trajectories (a pool of 80 inputs), 32 calibration inputs
(density-diversity selection), 10 evaluation samples, 32 SQNR inputs, W8A8 uniform, no
fine-tuning, no allocation, no registration, FD gate off (no classifier fits these models).
The ONNX export is off (``export.onnx=false``; ``--export`` turns it on with
``export.enforce_parity=false`` and ``export.parity_samples=0``): tracing is not part of the
estimate, and W8A8 on these random-weight U-Nets fails the default parity tolerance (see
BENCHMARKS.md).

Per width it reports the U-Net's parameters, the GFLOP of one denoiser evaluation (torch's
``FlopCounterMode``, attention through the math kernel so its products count), the denoiser
evaluations per stage, measured seconds and peak RSS per stage, the dry-run estimate per stage and
in total, and the ratio estimate / measured. Growth: seconds per (Mparam x evaluation) and per
(GFLOP x evaluation) of the stages that run the denoiser (roughly constant across widths = linear),
and the exponent ``b`` of ``seconds / evaluation ~ params^b`` fitted over the widths (1 = linear).

Threads: every compress runs with ``--threads`` torch/OpenMP threads (default 1). On this shared
2-core machine, 2 threads were 10-30x slower per forward than 1 whenever other processes were
busy (OpenMP barriers under oversubscription), which would measure the neighbours, not the model.

Run: ``.venv/bin/python bench/scale.py [--widths 0.0625 0.125 0.25] [--threads 1]`` (about 10
minutes on a shared 2-core machine). Rows are written as they finish to
``bench/results/scale.json`` and the ``scale`` section of BENCHMARKS.md; ``--render`` rewrites the
section from the JSON without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, machine, replace_section, write_results
from sd_layout import save_sd_layout, unet_parameters, write_prompts

DENOISER_STAGES = ("collect_trajectories", "select_calibration", "quantize", "evaluate_fp", "evaluate_quantized")
"""Stages that run the denoiser in this bench's settings (export off)."""
EXPORT_STAGES = ("parity_precheck", "export")


def settings(args: argparse.Namespace) -> list[str]:
    """The spec overrides every width runs with (the model path and prompts are added per width)."""
    values = {
        "sampler.guidance": args.guidance,
        "sampler.steps": args.steps,
        "calibration.trajectories": args.trajectories,
        "calibration.size": args.size,
        "calibration.batch_size": args.batch,
        "evaluate.samples": args.samples,
        "evaluate.sqnr_inputs": args.sqnr_inputs,
        "evaluate.batch_size": args.batch,
        "promote.register_model": "false",
        "promote.gates.max_fd_ratio": "null",
        "runtime.device": "cpu",
    }
    if args.export:
        values |= {"export.enforce_parity": "false", "export.parity_samples": 0}
    else:
        values["export.onnx"] = "false"
    return [f"{key}={value}" for key, value in values.items()]


def _environment(home: Path, threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "DIFFQUANT_HOME": str(home),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "COLUMNS": "250",  # rich's table at full width, one line per row
    }


def _run(command: list[str], env: dict[str, str]) -> tuple[str, str, float, Any]:
    """Run ``command``; its stdout, stderr, wall seconds and resource usage (``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command[2:5])} failed ({code}):\n{(stdout + stderr)[-3000:]}")
    return stdout, stderr, wall, usage


def _number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


def parse_dry_run(text: str) -> dict[str, Any]:
    """The stages of ``diffquant compress --dry-run``'s table: evaluations, calls, seconds and peak MB."""
    stages: dict[str, dict[str, float]] = {}
    total = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) < 7 or not cells[1] or not cells[2][:1].isdigit():
            continue
        name = cells[1]
        if name == "total":
            total = {"evaluations": _number(cells[2]), "seconds": _number(cells[4])}
            continue
        stages[name] = {
            "evaluations": _number(cells[2]),
            "calls": _number(cells[3]),
            "seconds": _number(cells[4]),
            "peak_mb": _number(cells[5]),
        }
    kinds = {
        m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+) forward: .*?\+ ([0-9.]+) ms per input", text, re.M)
    }
    measured = re.search(r"Measured in ([0-9.]+) s", text)
    if not stages or total is None:
        raise SystemExit(f"could not read the dry run's table:\n{text[-3000:]}")
    return {
        "stages": stages,
        "total": total,
        "ms_per_input": kinds,
        "measure_s": float(measured.group(1)) if measured else None,
    }


def flops_per_evaluation(folder: Path, prompts: Path) -> float:
    """FLOP of one denoiser evaluation (batch 1, float32): convolutions, linear layers and attention products."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import diffquant

    model = diffquant.load_model(path=folder, prompts=prompts)
    labels, _ = model.conditions(1, "calibration")
    x = torch.randn(1, *model.sample_shape)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.unet(x, torch.tensor([500]), labels)
    return float(counter.get_total_flops())


def measure_width(width: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write the pipeline at ``width``, dry-run it, run it; everything measured for its row."""
    folder = save_sd_layout(work / f"sd-{width:g}", width, sample_size=32, text_layers=1, seed=0)
    prompts = write_prompts(work / "prompts.txt")
    spec = [*settings(args), f"model.path={folder}", f"model.prompts={prompts}"]
    sets = [a for s in spec for a in ("--set", s)]
    base = [sys.executable, "-m", "diffquant.flows.cli", "compress"]
    home = work / f"home-{width:g}"
    load = [os.getloadavg()[0]]
    dry_out, dry_err, dry_wall, _ = _run([*base, "--dry-run", *sets], _environment(home / "dry", args.threads))
    dry = parse_dry_run(dry_out + dry_err)
    load.append(os.getloadavg()[0])
    stdout, stderr, wall, usage = _run([*base, *sets], _environment(home / "run", args.threads))
    load.append(os.getloadavg()[0])
    summary = json.loads(Path(stdout.strip().splitlines()[-1]).read_text())
    flow = re.search(r"total wall time: ([0-9.]+) s", stdout + stderr)
    timings = summary["timings"]
    memory = {stage: m["peak_rss_bytes"] for stage, m in summary.get("memory", {}).items()}
    in_run = summary.get("estimate") or {}
    stages = [s for s in dry["stages"] if s in timings]
    measured = sum(timings[s] for s in stages)
    estimated = sum(dry["stages"][s]["seconds"] for s in stages)
    denoiser = [s for s in stages if s in DENOISER_STAGES]
    row = {
        "width": width,
        "unet_parameters": unet_parameters(width),
        "flops_per_evaluation": flops_per_evaluation(folder, prompts),
        "evaluations": {s: int(dry["stages"][s]["evaluations"]) for s in stages},
        "evaluations_total": int(sum(dry["stages"][s]["evaluations"] for s in stages)),
        "denoiser_evaluations": int(sum(dry["stages"][s]["evaluations"] for s in denoiser)),
        "measured_s": {s: timings[s] for s in stages},
        "measured_total_s": measured,
        "denoiser_stages_s": sum(timings[s] for s in denoiser),
        "other_measured_s": {s: v for s, v in timings.items() if s not in stages},
        "dry_run_estimate_s": {s: dry["stages"][s]["seconds"] for s in stages},
        "dry_run_estimate_total_s": estimated,
        "dry_run_ms_per_input": dry["ms_per_input"],
        "dry_run_measure_s": dry["measure_s"],
        "in_run_estimate_s": {s: v["seconds"] for s, v in in_run.get("stages", {}).items() if s in stages},
        "in_run_ms_per_input": {k: 1e3 * v["per_input_s"] for k, v in in_run.get("costs", {}).get("kinds", {}).items()},
        "peak_rss_mb": {s: memory[s] / 2**20 for s in stages if s in memory},
        "estimated_peak_mb": {s: dry["stages"][s]["peak_mb"] for s in stages},
        "process_peak_rss_mb": usage.ru_maxrss / 1024,
        "dry_run_wall_s": dry_wall,
        "run_wall_s": wall,
        "flow_s": float(flow.group(1)) if flow else None,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "load_average": load,
        "metrics": summary["metrics"]["quantized"],
        "parity": (summary.get("export") or {}).get("parity", {}).get("outputs"),
    }
    row["in_run_estimate_total_s"] = sum(row["in_run_estimate_s"].values())
    row["ratio"] = estimated / measured
    row["in_run_ratio"] = row["in_run_estimate_total_s"] / measured
    row["ms_per_mparam_evaluation"] = (
        1e3 * row["denoiser_stages_s"] / (row["unet_parameters"] / 1e6 * row["denoiser_evaluations"])
    )
    row["ms_per_gflop_evaluation"] = (
        1e3 * row["denoiser_stages_s"] / (row["flops_per_evaluation"] / 1e9 * row["denoiser_evaluations"])
    )
    shutil.rmtree(home, ignore_errors=True)
    return row


def fit_exponent(rows: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares slope of log(seconds per evaluation) against log(``key``) over the rows (None for < 2 rows)."""
    if len(rows) < 2:
        return None
    xs = [math.log(r[key]) for r in rows]
    ys = [math.log(r["denoiser_stages_s"] / r["denoiser_evaluations"]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def table(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, where: str) -> str:
    """The ``scale`` section of BENCHMARKS.md."""
    loads = [v for r in rows for v in r["load_average"]]
    lines = [
        "## Scale: compress time and memory vs model size (SD 1.5 layout, CPU)",
        "",
        f"`{command}`; {where}; every compress with {args.threads} thread(s) (`OMP_NUM_THREADS`), "
        f"load average {min(loads):.1f}-{max(loads):.1f} during the runs (a shared machine: other sessions' "
        "work ran beside these, so the seconds are noisy; evaluation counts are exact).",
        "",
        f"SD 1.5-layout `UNet2DConditionModel`s with random weights at a fraction of SD's channels (`bench/sd_layout.py`), "
        f"32x32 latents, a 1-layer text encoder; guidance {args.guidance:g}, {args.steps} DDIM steps, "
        f"{args.trajectories} calibration trajectories, {args.size} calibration inputs, {args.samples} evaluation samples, "
        f"{args.sqnr_inputs} SQNR inputs, W8A8 uniform, no fine-tuning, "
        + ("export with parity (not enforced)." if args.export else "no ONNX export (`export.onnx=false`).")
        + " Measured = the sum of the stages the estimate covers (`summary.json` `timings`); the dry-run estimate "
        "is parsed from `diffquant compress --dry-run`'s table (its own process, same settings); the in-run estimate "
        "is `summary.json`'s `estimate` (timed with a shorter budget inside the run). CPU s / wall s is the "
        "compress process's CPU time over its wall time: with one torch thread, well below 1 means it waited for "
        "the cores (the measured seconds are then inflated by about its inverse).",
        "",
        "| width | U-Net params | GFLOP / eval | evaluations | measured s | dry-run est. s | est. / measured "
        "| in-run est. s | in-run est. / measured | ms per (Mparam x eval) | ms per (GFLOP x eval) "
        "| peak RSS MB | process wall s | CPU s / wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']:g} | {r['unet_parameters'] / 1e6:.1f}M | {r['flops_per_evaluation'] / 1e9:.2f} "
            f"| {r['evaluations_total']} | {r['measured_total_s']:.1f} | {r['dry_run_estimate_total_s']:.1f} "
            f"| {r['ratio']:.2f} | {r['in_run_estimate_total_s']:.1f} | {r['in_run_ratio']:.2f} "
            f"| {r['ms_per_mparam_evaluation']:.2f} | {r['ms_per_gflop_evaluation']:.1f} "
            f"| {max(r['peak_rss_mb'].values()):.0f} | {r['run_wall_s']:.0f} | {r['cpu_s'] / r['run_wall_s']:.2f} |"
        )
    lines += [
        "",
        "| width | stage | evaluations | measured s | dry-run est. s | est. / measured | peak RSS MB | est. peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for stage, seconds in r["measured_s"].items():
            est = r["dry_run_estimate_s"][stage]
            lines.append(
                f"| {r['width']:g} | {stage} | {r['evaluations'][stage]} | {seconds:.1f} | {est:.1f} "
                f"| {est / seconds:.2f} | {r['peak_rss_mb'].get(stage, float('nan')):.0f} "
                f"| {r['estimated_peak_mb'][stage]:.0f} |"
            )
    lines += ["", reading(rows)]
    return "\n".join(lines)


def reading(rows: list[dict[str, Any]]) -> str:
    """The targets, checked against the rows: linear growth and the estimate within 30%."""
    ratios = [r["ratio"] for r in rows]
    in_run = [r["in_run_ratio"] for r in rows]
    within = all(abs(x - 1) <= 0.3 for x in ratios)
    stage_ratios = [r["dry_run_estimate_s"][s] / v for r in rows for s, v in r["measured_s"].items()]
    memory = [
        r["estimated_peak_mb"][s] / r["peak_rss_mb"][s] for r in rows for s in r["measured_s"] if s in r["peak_rss_mb"]
    ]
    per_param = [r["ms_per_mparam_evaluation"] for r in rows]
    per_flop = [r["ms_per_gflop_evaluation"] for r in rows]
    b_param = fit_exponent(rows, "unet_parameters")
    b_flop = fit_exponent(rows, "flops_per_evaluation")
    text = (
        f"Reading (computed from the rows above). Estimate: the dry run's total is {min(ratios):.2f}-{max(ratios):.2f} "
        f"x the measured stage time ({'within' if within else 'NOT within'} the 30% target"
        + ("" if within else f"; worst off by {max(abs(x - 1) for x in ratios) * 100:.0f}%")
        + f"); single stages range {min(stage_ratios):.2f}-{max(stage_ratios):.2f}; the in-run estimate's total is "
        f"{min(in_run):.2f}-{max(in_run):.2f}"
        + (
            " (the in-run estimate times each kind of forward with a 1 s budget, the dry run with 3 s: a forward "
            "longer than 1/8 of the budget is timed once, at batch 1, and that first call is taken as the cost; "
            "the dry run's per-input float forward was "
            + ", ".join(
                f"{r['dry_run_ms_per_input'].get('fp', float('nan')):.0f} ms at width {r['width']:g}" for r in rows
            )
            + ")"
            if max(in_run) > 1.3
            else ""
        )
        + f". Estimated peak RSS is {min(memory):.2f}-{max(memory):.2f} x the "
        "measured peak per stage. "
    )
    if b_param is not None and b_flop is not None:
        linear = abs(b_param - 1) <= 0.2
        text += (
            f"Growth: seconds per denoiser evaluation grow as params^{b_param:.2f} and as GFLOP^{b_flop:.2f} "
            f"(1.00 = linear); ms per (Mparam x evaluation) goes {' -> '.join(f'{v:.2f}' for v in per_param)} "
            f"and ms per (GFLOP x evaluation) {' -> '.join(f'{v:.1f}' for v in per_flop)} from the narrowest "
            f"to the widest, so 'linear in parameters x evaluations' {'holds' if linear else 'is NOT met'} here. "
            "Within one width, time is evaluations x the cost of one evaluation timed at that width (the "
            "estimate's model; the ratios above test it)."
        )
        if not linear:
            text += (
                " Across widths it is not proportional to parameters: FLOP per parameter falls as the width grows "
                "(at 32x32 latents the attention products grow with the width, the convolutions with its square), "
                "and a small model's fixed per-operation cost does not shrink with it."
            )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=float, nargs="+", default=[0.0625, 0.125, 0.25])
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--trajectories", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="calibration inputs")
    parser.add_argument("--samples", type=int, default=10, help="evaluation samples (the spec's minimum is 10)")
    parser.add_argument("--sqnr-inputs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="calibration.batch_size and evaluate.batch_size")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every compress process")
    parser.add_argument("--export", action="store_true", help="keep the ONNX export (parity not enforced)")
    parser.add_argument("--render", action="store_true", help="only rewrite the section from bench/results/scale.json")
    args = parser.parse_args()
    if args.render:
        record = json.loads((ROOT / "bench" / "results" / "scale.json").read_text())
        args = argparse.Namespace(**{**vars(parser.parse_args([])), **record.get("args", {})})
        body = table(record["rows"], args, record["command"], record["machine"])
        replace_section("scale", body)
        print(body)
        return
    command = "python bench/scale.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python bench/scale.py"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="diffquant-scale-") as work:
        for width in args.widths:
            row = measure_width(width, args, Path(work))
            rows.append(row)
            print(
                f"width {width:g}: {row['unet_parameters'] / 1e6:.1f}M params, {row['evaluations_total']} evaluations, "
                f"measured {row['measured_total_s']:.1f} s, dry-run estimate {row['dry_run_estimate_total_s']:.1f} s "
                f"(ratio {row['ratio']:.2f}), in-run estimate ratio {row['in_run_ratio']:.2f}, "
                f"{row['ms_per_mparam_evaluation']:.2f} ms per Mparam x evaluation, load {row['load_average']}",
                flush=True,
            )
            record = {
                "machine": machine(),
                "command": command,
                "args": vars(args),
                "settings": settings(args),
                "rows": rows,
            }
            write_results("scale", record)
            replace_section("scale", table(rows, args, command, record["machine"]))
    print(table(rows, args, command, machine()))


if __name__ == "__main__":
    main()
