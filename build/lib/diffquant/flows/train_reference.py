"""The ``train-reference`` flow: retrain and re-package the bundled reference models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import flow

from diffquant.errors import SpecError
from diffquant.models.reference import DIGITS_DIT, DIGITS_T2I, DIGITS_UNET, REFERENCE_MODELS, weights_root
from diffquant.training.reference import ClassifierTrainConfig, UNetTrainConfig, write_reference_models
from diffquant.training.zoo import DIT_TRAIN, T2I_TRAIN, write_digits_dit, write_digits_t2i


@flow(name="train-reference")
def train_reference_flow(
    out_dir: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    eval_samples: int = 2000,
    models: list[str] | None = None,
) -> dict[str, Any]:
    """Train reference models, then write weights, model cards and metrics.

    ``digits-unet`` is trained together with the evaluation classifier; ``digits-dit`` and
    ``digits-t2i`` are judged by the classifier already in ``out_dir`` (or the bundled one).

    Args:
        out_dir: Destination folder (default: the package's bundled weights folder).
        steps: Training steps of each chosen model (default: each model's shipped run).
        seed: Seed of every training.
        eval_samples: Samples for the model-card metrics.
        models: Which models (default: all of ``digits-unet``, ``digits-dit``, ``digits-t2i``).

    Returns:
        The measured metrics (keys prefixed by model name) and the output folder.

    Raises:
        SpecError: If a model name is unknown.
    """
    chosen = list(models or REFERENCE_MODELS)
    unknown = sorted(set(chosen) - set(REFERENCE_MODELS))
    if unknown:
        raise SpecError(f"unknown reference model {unknown[0]!r}; choose from {', '.join(REFERENCE_MODELS)}")
    target = Path(out_dir) if out_dir else weights_root()

    def config(shipped: UNetTrainConfig) -> UNetTrainConfig:
        return dataclasses.replace(shipped, seed=seed, **({} if steps is None else {"steps": steps}))

    result: dict[str, Any] = {"out_dir": str(target)}
    if DIGITS_UNET in chosen:
        metrics = write_reference_models(
            target, config(UNetTrainConfig()), ClassifierTrainConfig(seed=seed), eval_samples=eval_samples
        )
        result |= {f"{DIGITS_UNET}.{k}": v for k, v in metrics.items()}
    if DIGITS_DIT in chosen:
        metrics = write_digits_dit(target, config(DIT_TRAIN), eval_samples=eval_samples)
        result |= {f"{DIGITS_DIT}.{k}": v for k, v in metrics.items()}
    if DIGITS_T2I in chosen:
        metrics = write_digits_t2i(target, config(T2I_TRAIN), eval_samples=eval_samples)
        result |= {f"{DIGITS_T2I}.{k}": v for k, v in metrics.items()}
    return result
