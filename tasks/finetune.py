"""Stage: quantized fine-tuning (QALoRA + LSQ, data-free distillation), checkpointed and resumable."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from diffquant.errors import spec_section
from diffquant.finetuning.distill import TARGETS, teacher_targets
from diffquant.finetuning.policy import finetune
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.ptq import load_quantized, save_quantized
from diffquant.quant.plan import LayerPlan
from diffquant.registry.models import registry_client
from diffquant.registry.tracking import RunTracker
from diffquant.spec import CompressionSpec
from diffquant.storage import save_safetensors, write_json
from diffquant.tasks.artifacts import (
    FileRef,
    FinetuneArtifact,
    FinetuneRequest,
    PoolArtifact,
    QuantizeArtifact,
    SensitivityArtifact,
    TrackingRef,
)
from diffquant.tasks.common import load_trajectories, model_from_source

LOG_BATCH = 50
"""Fine-tuning steps whose loss and learning rate go to MLflow in one request."""


@task(name="finetune")
def finetune_task(
    spec: CompressionSpec,
    request: FinetuneRequest,
    quantized: QuantizeArtifact,
    pool: PoolArtifact,
    out_dir: str,
    checkpoint_root: str,
    tracking: TrackingRef,
    sensitivity: SensitivityArtifact | None = None,
) -> FinetuneArtifact:
    """Fine-tune the PTQ model; every step's loss and learning rate go to the tracker's MLflow run.

    Checkpoints live in ``<checkpoint_root>/<request key>``: the request hashes the fine-tuning
    config, the PTQ plan and scales, the pool and the model weights, so a killed run started
    again with the same inputs resumes. The float teacher computes its predictions on the pool
    first (streamed beside the checkpoints) and is dropped before the student is built: the two
    are never on the device together.
    """
    ft = spec.finetune
    assert ft is not None
    checkpoints = Path(checkpoint_root) / request.key()
    data = load_trajectories(pool.pool.path, mapped=True)
    teacher = model_from_source(spec.model, spec.runtime)
    targets = teacher_targets(teacher.unet, data, teacher.conditional, spec.forward_batch, checkpoints / TARGETS)
    del teacher
    model = model_from_source(spec.model, spec.runtime)
    student = load_quantized(model, Path(quantized.plan.path), Path(quantized.scales.path), inplace=True)
    client = RunTracker(registry_client(tracking.uri), tracking.run_id)
    pending: list[tuple[int, dict[str, float]]] = []

    def log(step: int, loss: float, lr: float) -> None:
        pending.append((step, {"finetune.loss": loss, "finetune.lr": lr}))
        if len(pending) >= LOG_BATCH or step == ft.steps - 1:
            client.log_series(pending)
            pending.clear()

    with spec_section("finetune"):
        result = finetune(
            student,
            None,
            ft,
            data,
            sensitivity=SensitivityTable.load_csv(Path(sensitivity.csv.path)) if sensitivity else None,
            checkpoint_dir=checkpoints,
            on_log=log,
            log_every=1,
            targets=targets,
            batch_size=spec.runtime.batch_size,
        )
    folder = Path(out_dir) / "finetune"
    plan_path, scales_path = save_quantized(student, LayerPlan.load(Path(quantized.plan.path)), folder)
    weights_path = save_safetensors(dict(student.unet.state_dict()), folder / "finetuned_denoiser.safetensors")
    write_json(result.to_dict(), folder / "finetune.json")
    tuned = quantized.model_copy(
        update={"plan": FileRef.of(plan_path), "scales": FileRef.of(scales_path), "weights": FileRef.of(weights_path)}
    )
    return FinetuneArtifact(quantized=tuned, result=result.to_dict())
