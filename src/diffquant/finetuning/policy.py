"""Fine-tuning as the pipeline runs it: which layers train, the run itself, and whether to keep it.

:func:`finetune` applies the ``trainable`` rule (QuEST's selective training) and runs the
distillation; :func:`keep_finetuned` is the rule that keeps the PTQ model when fine-tuning made
it worse. ``diffquant compress`` calls exactly these.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffquant.errors import ConfigError
from diffquant.finetuning.distill import DistillResult, distill, select_layers
from diffquant.mixed_precision.sensitivity import SensitivityTable
from diffquant.models.loading import DiffusionModel
from diffquant.sampling import Trajectories
from diffquant.spec import FinetuneSpec


def worst_weight_noise(table: SensitivityTable) -> dict[str, float]:
    """Worst weight noise per layer of a sensitivity table (what the ``top_k`` rule ranks by)."""
    worst: dict[str, float] = {}
    for row in table.rows:
        if row["kind"] == "weight":
            worst[str(row["layer"])] = max(worst.get(str(row["layer"]), 0.0), float(row["noise"]))
    return worst


def finetune(
    module: DiffusionModel,
    teacher: DiffusionModel | None,
    config: FinetuneSpec,
    data: Trajectories,
    *,
    sensitivity: SensitivityTable | Mapping[str, float] | None = None,
    checkpoint_dir: Path | None = None,
    on_log: Callable[[int, float, float], None] | None = None,
    log_every: int = 10,
    targets: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> DistillResult:
    """Fine-tune a quantized model against its float teacher (QALoRA + LSQ, data-free distillation).

    Args:
        module: The fake-quantized model (changed in place; adapters merged at the end).
        teacher: The float model it was quantized from (None when ``targets`` are given).
        config: Steps, learning rates, rank and the ``trainable`` layer rule.
        data: Teacher inputs, e.g. the calibration pool (:func:`diffquant.collect_pool`).
        sensitivity: A sensitivity table or layer -> noise, needed by the ``top_k`` rule.
        checkpoint_dir: Where checkpoints go; a run started again with the same folder resumes
            (default: a temporary folder, no resume).
        on_log: ``(step, loss, lr)`` every ``log_every`` steps.
        log_every: Steps between ``on_log`` calls.
        targets: The teacher's predictions on ``data``
            (:func:`~diffquant.finetuning.distill.teacher_targets`), so the teacher need not be
            on the device while the student trains; None computes them from ``teacher``.
        batch_size: Most inputs per forward (the teacher's pass and the student's micro-batches;
            None: ``config.batch_size`` at once).

    Returns:
        What the run did (steps, losses, trainable parameters, seconds).

    Raises:
        ConfigError: The ``trainable`` rule selects nothing, matches an unknown glob, or is
            ``top_k`` without sensitivities.

    Example:
        >>> result = diffquant.finetune(quantized, model, diffquant.FinetuneSpec(steps=200), pool)
        >>> result.last_loss < result.first_loss
        True
    """
    if isinstance(sensitivity, SensitivityTable):
        sensitivity = worst_weight_noise(sensitivity)
    rule = config.trainable
    try:
        layers = select_layers(module.unet, rule.rule, rule.layers, dict(sensitivity or {}) or None, rule.top_k)
    except ValueError as error:
        raise ConfigError("trainable", f"{error} (only quantized layers can be fine-tuned)") from None
    fp = teacher.unet if teacher is not None else None
    extra = {"targets": targets, "batch_size": batch_size}
    if checkpoint_dir is not None:
        return distill(
            module.unet, fp, data, module.conditional, layers, config, Path(checkpoint_dir), on_log, log_every, **extra
        )
    with tempfile.TemporaryDirectory(prefix="diffquant-finetune-") as folder:
        return distill(
            module.unet, fp, data, module.conditional, layers, config, Path(folder), on_log, log_every, **extra
        )


@dataclass(frozen=True)
class FinetuneDecision:
    """Which model a compress run keeps after fine-tuning, and why."""

    kept: Literal["finetuned", "ptq"]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return asdict(self)


def keep_finetuned(before: Mapping[str, float], after: Mapping[str, float]) -> FinetuneDecision:
    """Keep the fine-tuned model unless its FD to the float model's samples got worse.

    Args:
        before: Metrics of the PTQ model (``fd_fp`` read; missing counts as infinite).
        after: Metrics of the fine-tuned model.

    Example:
        >>> diffquant.keep_finetuned({"fd_fp": 0.2}, {"fd_fp": 0.1}).kept
        'finetuned'
    """
    old, new = float(before.get("fd_fp", math.inf)), float(after.get("fd_fp", math.inf))
    kept: Literal["finetuned", "ptq"] = "finetuned" if new <= old else "ptq"
    verdict = "kept the fine-tuned model" if kept == "finetuned" else "fine-tuning made it worse; kept the PTQ model"
    return FinetuneDecision(
        kept,
        f"fine-tuned FD to FP {after.get('fd_fp', float('nan')):.4g} vs PTQ {before.get('fd_fp', float('nan')):.4g}: {verdict}",
    )
