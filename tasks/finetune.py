"""Stage: quantized fine-tuning (QALoRA + LSQ, data-free distillation), checkpointed and resumable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from diffquant.registry.models import registry_client
from diffquant.registry.tracking import RunTracker
from diffquant.tasks.common import load_trajectories, model_from_source
from prefect import task

from diffquant.errors import spec_section
from diffquant.finetune.policy import finetune
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.quant.plan import LayerPlan
from diffquant.quantize import load_quantized, save_quantized
from diffquant.spec import spec_from_dict
from diffquant.storage import save_safetensors, write_json


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

    table = SensitivityTable.load_csv(Path(sensitivity_csv)) if sensitivity_csv else None
    with spec_section("finetune"):
        result = finetune(
            student,
            model,
            ft,
            load_trajectories(pool_path),
            sensitivity=table,
            checkpoint_dir=Path(checkpoint_root) / key,
            on_log=log,
            log_every=1,
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
