"""Calibration data: the candidate pool from FP trajectories, selection, and range calibration.

The pool holds every denoiser input ``(x_t, t, label)`` seen while sampling ``trajectories``
full-precision images. Its noise comes from seed ``POOL_SEED_OFFSET + calibration.seed``, so it
never shares noise with evaluation (seed ``evaluate.seed``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from diffquant.errors import DataError
from diffquant.models.loading import DiffusionModel
from diffquant.quant.plan import activation_quantizers
from diffquant.sampling import Trajectories, ddim_sample, denoiser_outputs, initial_noise
from diffquant.selection import SelectionParams, select_indices

logger = logging.getLogger(__name__)

POOL_SEED_OFFSET = 10_000
POOL_CODE_VERSION = "1"


def read_labels_file(path: Path, num_classes: int | None, condition: str | None = "class") -> torch.Tensor:
    """Read class labels (one integer per line, ``#`` comments allowed) for calibration sampling.

    Args:
        path: The labels file.
        num_classes: The model's number of classes (None: unconditional).
        condition: The model's condition kind; labels files are for ``class`` models only.

    Raises:
        DataError: If the file is missing, unreadable, empty, holds labels out of range, or the
            model is text-conditioned (which takes ``model.prompts`` instead).
    """
    path = Path(path)
    if condition == "text":
        raise DataError(
            f"labels file {path} given, but the model is text-conditioned; set model.prompts to a prompts file"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"labels file {path} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"labels file {path} is empty; put one class label per line")
    try:
        labels = torch.tensor([int(line) for line in lines])
    except ValueError:
        raise DataError(f"labels file {path} must hold one integer class label per line") from None
    if num_classes is None:
        raise DataError(f"labels file {path} given, but the model is unconditional")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise DataError(f"labels file {path} has label {int(bad[0])} outside 0..{num_classes - 1}")
    return labels


def collect_pool(
    model: DiffusionModel, trajectories: int, steps: int, seed: int, labels: torch.Tensor | None = None
) -> Trajectories:
    """Sample ``trajectories`` FP images with DDIM and record every denoiser input.

    Args:
        model: The FP model.
        trajectories: Number of sampling trajectories.
        steps: DDIM steps per trajectory.
        seed: Calibration seed (noise seed is ``POOL_SEED_OFFSET + seed``).
        labels: Class labels to cycle through (class models; default: all classes in turn).
            Text models use their calibration prompts.

    Raises:
        DataError: If any recorded input is NaN or infinite.
    """
    if labels is not None and model.condition == "class":
        labels = labels[torch.arange(trajectories) % labels.numel()]
    else:
        labels, _ = model.conditions(trajectories, "calibration")
    noise = initial_noise(trajectories, model.sample_shape, POOL_SEED_OFFSET + seed)
    _, traj = ddim_sample(
        model.unet,
        model.scheduler_config,
        noise,
        labels,
        steps,
        record=True,
        description="Collecting FP trajectories",
        clamp=not model.latent,
    )
    assert traj is not None
    check_finite(traj)
    return traj


def check_finite(traj: Trajectories) -> None:
    """Raise :class:`DataError` if the trajectories hold NaN or inf."""
    bad = (~torch.isfinite(traj.x)).reshape(len(traj), -1).any(dim=1)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} of {len(traj)} trajectory inputs contain NaN or inf "
            f"(first at index {int(bad.nonzero()[0])}); the full-precision model is unstable"
        )


def select(
    pool: Trajectories,
    strategy: str,
    size: int,
    seed: int,
    features: torch.Tensor | None = None,
    params: SelectionParams | None = None,
) -> torch.Tensor:
    """Choose ``size`` pool indices with ``strategy`` (see :mod:`diffquant.selection`).

    Raises:
        DataError: Unknown strategy or a size larger than the pool.
    """
    return select_indices(pool.t, features, strategy, size, seed, params)


@torch.no_grad()
def pool_features(
    unet: nn.Module, pool: Trajectories, conditional: bool, module: str = "mid_block", batch_size: int = 512
) -> torch.Tensor:
    """Output of ``module`` (default: the mid block) for every pool entry, flattened per entry.

    Raises:
        DataError: If the model has no module of that name.
    """
    try:
        target = unet.get_submodule(module)
    except AttributeError:
        raise DataError(f"calibration.feature_module {module!r} is not a module of the denoiser") from None
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        captured.append(tensor.detach().flatten(1).float())

    handle = target.register_forward_hook(hook)
    try:
        denoiser_outputs(unet, pool, conditional, batch_size, description="Computing pool features")
    finally:
        handle.remove()
    return torch.cat(captured)


def subset(traj: Trajectories, indices: torch.Tensor) -> Trajectories:
    """The trajectories at ``indices``."""
    return Trajectories(traj.x[indices], traj.t[indices], traj.labels[indices])


def held_out_indices(pool_size: int, selected: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Up to ``count`` pool indices not in ``selected`` (for unbiased SQNR), seeded."""
    mask = torch.ones(pool_size, dtype=torch.bool)
    mask[selected] = False
    rest = mask.nonzero().squeeze(1)
    order = torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(seed + 1))
    return rest[order[:count]].sort().values


@torch.no_grad()
def calibrate_activations(
    unet: nn.Module, calib: Trajectories, conditional: bool, batch_size: int = 256, seed: int = 0
) -> int:
    """Run the calibration set through ``unet`` and set every activation quantizer's scale.

    Input and output quantizers observe the same forward passes; all of them observe before any
    quantizes, so each range is that of the float model's activations.

    Returns:
        The number of activation quantizers calibrated.
    """
    quantizers = activation_quantizers(unet)
    for quantizer in quantizers.values():
        quantizer.start_observing(seed)
    denoiser_outputs(unet, calib, conditional, batch_size, description="Calibrating activations")
    for quantizer in quantizers.values():
        quantizer.finish_observing()
    logger.info("calibrated %d activation quantizers on %d inputs", len(quantizers), len(calib))
    return len(quantizers)
