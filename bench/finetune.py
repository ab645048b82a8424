"""Quantized fine-tuning on digits-unet: metrics after PTQ and after fine-tuning, time, trainable size.

Each row is one ``compress`` flow run (embedded Prefect + MLflow in a temporary DIFFQUANT_HOME,
2,000 samples, DDIM 50) with a ``finetune`` section: QALoRA rank 4 on every quantized layer plus
LSQ step sizes, distilled from the FP model on its own sampling trajectories. Rows: uniform W4A8,
mixed W4A8 (allocation at 4.0 average weight bits), W4A4 (``configs/digits-unet-w4a4-finetune.yaml``)
and W8A4; conv_in, conv_out and the time embedding stay at W8A8 in the uniform rows. Writes the
``finetune`` section of BENCHMARKS.md and ``bench/results/finetune.json``.

Run: ``.venv/bin/python bench/finetune.py`` (about 25 minutes on 2 cores; ``--steps`` and
``--w4a4-steps`` shorten it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import ROOT, machine, replace_section, temporary_home

KEEP_8 = "quantize.overrides=[{layers: [conv_in, conv_out, 'time_embedding.*'], weight_bits: 8, activation_bits: 8}]"


def rows(steps: int, w4a4_steps: int) -> list[tuple[str, Path | None, list[str]]]:
    common = ["calibration.observer=mse", "quantize.weight.observer=mse", KEEP_8]
    return [
        ("uniform W4A8", None, [*common, "quantize.weight.bits=4", f"finetune={{steps: {steps}, batch_size: 32}}"]),
        (
            "mixed W4A8 (<= 4.0 avg bits)",
            ROOT / "configs" / "digits-unet-mixed-w4a8.yaml",
            [f"finetune={{steps: {steps}, batch_size: 32}}"],
        ),
        ("W4A4", ROOT / "configs" / "digits-unet-w4a4-finetune.yaml", [f"finetune.steps={w4a4_steps}"]),
        ("W8A4", None, [*common, "quantize.activation.bits=4", f"finetune={{steps: {steps}, batch_size: 32}}"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--w4a4-steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    home = str(temporary_home("diffquant-finetune-"))
    from diffquant.flows.compress import compress_flow
    from diffquant.spec import load_spec

    results = []
    for label, config, overrides in rows(args.steps, args.w4a4_steps):
        extra = [f"evaluate.samples={args.samples}", "export.onnx=false", "promote.register_model=false"]
        spec = load_spec(config, [*overrides, *extra])
        start = time.perf_counter()
        summary = compress_flow(spec=spec.to_dict(), out_dir=os.path.join(home, f"row{len(results)}"))
        ft = summary["finetune"]
        row = {
            "label": label,
            "steps": ft["steps"],
            "ptq": ft["before"],
            "finetuned": ft["after"],
            "kept": ft["kept"],
            "finetune_seconds": ft["seconds"],
            "trainable_parameters": ft["trainable_parameters"],
            "run_seconds": time.perf_counter() - start,
            "fp": summary["metrics"]["fp"],
        }
        results.append(row)
        print(
            f"{label}: PTQ acc {row['ptq']['accuracy']:.4f} FD {row['ptq']['fd_real']:.2f} -> fine-tuned acc "
            f"{row['finetuned']['accuracy']:.4f} FD {row['finetuned']['fd_real']:.2f} ({row['steps']} steps, "
            f"{row['finetune_seconds']:.0f} s, {row['trainable_parameters']:,} trainable, kept {row['kept']})",
            flush=True,
        )
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "finetune.json").write_text(
        json.dumps({"machine": machine(), "rows": results}, indent=2)
    )
    fp = results[0]["fp"]
    lines = [
        "## Quantized fine-tuning (QALoRA + LSQ, data-free distillation)",
        "",
        f"Command: `.venv/bin/python bench/finetune.py` ({args.samples} samples, DDIM 50, batch 32, rank 4, "
        f"{args.steps} steps ({args.w4a4_steps} for W4A4), min-MSE ranges; conv_in, conv_out and the time embedding "
        f"at W8A8 in the uniform rows). Machine: {machine()}.",
        f"FP: accuracy {fp['accuracy']:.4f}, FD to real {fp['fd_real']:.2f}.",
        "",
        "| setting | PTQ accuracy | PTQ FD to real | PTQ FD to FP | fine-tuned accuracy | fine-tuned FD to real "
        "| fine-tuned FD to FP | kept | steps | fine-tuning s | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, f = r["ptq"], r["finetuned"]
        lines.append(
            f"| {r['label']} | {p['accuracy']:.4f} | {p['fd_real']:.2f} | {p['fd_fp']:.2f} | {f['accuracy']:.4f} | "
            f"{f['fd_real']:.2f} | {f['fd_fp']:.2f} | {r['kept']} | {r['steps']} | {r['finetune_seconds']:.0f} | "
            f"{r['trainable_parameters']:,} |"
        )
    replace_section("finetune", "\n".join(lines))


if __name__ == "__main__":
    main()
