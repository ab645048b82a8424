"""Stage: quantized fine-tuning (QALoRA + LSQ, data-free distillation), checkpointed and resumable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task

from diffquant.errors import SpecError
from diffquant.finetune.distill import DistillConfig, distill, select_layers
from diffquant.quant.plan import LayerPlan
from diffquant.quantize import load_quantized, save_quantized
from diffquant.sensitivity import SensitivityTable
from diffquant.spec import spec_from_dict
from diffquant.storage import save_safetensors, write_json
from registry.models import registry_client
from registry.tracking import RunTracker
from tasks.common import load_trajectories, model_from_source


def _sensitivity_by_layer(csv_path: str | None) -> dict[str, float] | None:
    """Worst weight noise per layer (for the ``top_k`` rule)."""
    if csv_path is None:
        return None
    worst: dict[str, float] = {}
    for row in SensitivityTable.load_csv(Path(csv_path)).rows:
        if row["kind"] == "weight":
            worst[str(row["layer"])] = max(worst.get(str(row["layer"]), 0.0), float(row["noise"]))
    return worst


@task(name="finetune")
def finetune_task(
    spec: dict[str, Any],
    quantized: dict[str, Any],
    pool_path: str,
    out_dir: str,
    checkpoint_root: str,
    tracking_uri: str,
    run_id: str,
    sensitivity_csv: str | None = None,
) -> dict[str, Any]:
    """Fine-tune the PTQ model; loss and learning rate go to the MLflow run ``run_id``.

    Checkpoints live in ``<checkpoint_root>/<key>`` where the key hashes the spec, the PTQ plan and
    scales and the pool, so a killed run started again with the same inputs resumes.

    Returns:
        ``plan_path``, ``scales_path``, ``weights_path`` (the fine-tuned model) and ``result``.
    """
    from diffquant.storage import sha256_file

    cfg = spec_from_dict(spec)
    ft = cfg.finetune
    assert ft is not None
    model = model_from_source(cfg.model.model_dump())
    student = load_quantized(model, Path(quantized["plan_path"]), Path(quantized["scales_path"]))
    try:
        layers = select_layers(
            student.unet,
            ft.trainable.rule,
            ft.trainable.layers,
            _sensitivity_by_layer(sensitivity_csv),
            ft.trainable.top_k,
        )
    except ValueError as error:
        raise SpecError(f"finetune.trainable: {error} (only quantized layers can be fine-tuned)") from None
    key = hashlib.sha256(
        json.dumps(
            [
                ft.model_dump(),
                sha256_file(Path(quantized["plan_path"])),
                sha256_file(Path(quantized["scales_path"])),
                sha256_file(Path(pool_path)),
                model.weights_sha256,
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    tracker = RunTracker(registry_client(tracking_uri), run_id)
    pending: list[tuple[int, dict[str, float]]] = []

    def log(step: int, loss: float, lr: float) -> None:
        """Every step's loss and learning rate, sent to MLflow 50 steps at a time."""
        pending.append((step, {"finetune.loss": loss, "finetune.lr": lr}))
        if len(pending) >= 50 or step == ft.steps - 1:
            tracker.log_series(pending)
            pending.clear()

    config = DistillConfig(**ft.model_dump(exclude={"trainable", "timestep_groups"}), log_every=1)
    result = distill(
        student.unet,
        model.unet,
        load_trajectories(pool_path),
        model.conditional,
        layers,
        config,
        Path(checkpoint_root) / key,
        on_log=log,
    )
    folder = Path(out_dir) / "finetune"
    plan_path, scales_path = save_quantized(student, LayerPlan.load(Path(quantized["plan_path"])), folder)
    weights_path = save_safetensors(dict(student.unet.state_dict()), folder / "finetuned_denoiser.safetensors")
    write_json(result.to_dict(), folder / "finetune.json")
    return {
        "plan_path": str(plan_path),
        "scales_path": str(scales_path),
        "weights_path": str(weights_path),
        "fp32_bytes": quantized["fp32_bytes"],
        "packed_bytes": quantized["packed_bytes"],
        "layers": quantized["layers"],
        "quantized_layers": quantized["quantized_layers"],
        "outlier_tokens": quantized.get("outlier_tokens"),
        "result": result.to_dict(),
    }
