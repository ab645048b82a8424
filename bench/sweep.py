"""Mixed precision vs uniform precision on digits-unet: the sweep flow at several budgets.

Runs ``diffquant sweep configs/digits-unet-mixed-w4a8.yaml --budgets 3,3.5,4,5,6,8 --baselines
8,4,3`` through the flow (embedded Prefect and MLflow in a temporary DIFFQUANT_HOME, 2,000
samples, DDIM 50) and writes the ``sweep`` table of BENCHMARKS.md and ``bench/results/sweep.json``
(the Pareto plot is copied to ``bench/results/pareto.png``).

Run: ``.venv/bin/python bench/sweep.py`` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from common import ROOT, machine, replace_section, temporary_home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", default="3,3.5,4,5,6,8")
    parser.add_argument("--baselines", default="8,4,3")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    home = str(temporary_home("diffquant-sweep-"))
    from diffquant.flows.sweep import sweep_flow
    from diffquant.spec import load_spec

    spec = load_spec(ROOT / "configs" / "digits-unet-mixed-w4a8.yaml", [f"evaluate.samples={args.samples}"])
    start = time.perf_counter()
    result = sweep_flow(
        spec=spec.to_dict(),
        budgets=[float(b) for b in args.budgets.split(",")],
        baselines=[int(b) for b in args.baselines.split(",")],
        out_dir=os.path.join(home, "sweep"),
    )
    seconds = time.perf_counter() - start
    fp = json.loads(Path(result["points"][0]["summary_path"]).read_text())["metrics"]["fp"]
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "sweep.json").write_text(
        json.dumps(
            {"machine": machine(), "seconds": seconds, "fp": fp, "points": result["points"]}, indent=2, default=str
        )
    )
    shutil.copy(result["pareto_path"], ROOT / "bench" / "results" / "pareto.png")
    lines = [
        "## Mixed precision vs uniform precision (sweep)",
        "",
        f"Command: `.venv/bin/python bench/sweep.py` (the sweep flow on `configs/digits-unet-mixed-w4a8.yaml`, "
        f"{args.samples} samples, DDIM 50, A8 everywhere, MSE weight scales, min-max activation ranges; "
        f"{seconds / 60:.1f} minutes in all). Machine: {machine()}. Plot: `bench/results/pareto.png`.",
        f"FP: accuracy {fp['accuracy']:.4f}, FD to real {fp['fd_real']:.2f}.",
        "",
        "| point | packed bytes | avg weight bits | accuracy | FD to real | FD to FP | PSNR vs FP (dB) | sensitivity cached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['label']} | {p['packed_bytes']:,} | {p['avg_weight_bits']:.2f} | {p['accuracy']:.4f} | "
            f"{p['fd_real']:.2f} | {p['fd_fp']:.2f} | {p['psnr']:.1f} | {p['sensitivity_cache_hit']} |"
        )
    replace_section("sweep", "\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
