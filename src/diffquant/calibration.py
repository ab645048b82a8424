"""Calibration data: the candidate pool from FP trajectories, selection, and range calibration.

The pool holds every denoiser input ``(x_t, t, label)`` seen while sampling ``trajectories``
full-precision images. Its noise comes from seed ``POOL_SEED_OFFSET + calibration.seed``, so it
never shares noise with evaluation (seed ``evaluate.seed``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from diffquant.errors import DataError
from diffquant.models.loading import DiffusionModel
from diffquant.progress import track
from diffquant.quant.plan import input_quantizers
from diffquant.sampling import Trajectories, class_labels, ddim_sample, initial_noise

logger = logging.getLogger(__name__)

POOL_SEED_OFFSET = 10_000
STRATEGIES = ("random",)


def collect_pool(model: DiffusionModel, trajectories: int, steps: int, seed: int) -> Trajectories:
    """Sample ``trajectories`` FP images with DDIM and record every denoiser input.

    Raises:
        DataError: If any recorded input is NaN or infinite.
    """
    labels = class_labels(trajectories, model.num_classes) if model.conditional else None
    noise = initial_noise(trajectories, model.sample_shape, POOL_SEED_OFFSET + seed)
    _, traj = ddim_sample(
        model.unet, model.scheduler_config, noise, labels, steps, record=True, description="Collecting FP trajectories"
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


def select(pool: Trajectories, strategy: str, size: int, seed: int) -> torch.Tensor:
    """Choose ``size`` pool indices with ``strategy`` (sorted, without replacement).

    Raises:
        DataError: Unknown strategy or a size larger than the pool.
    """
    if strategy not in STRATEGIES:
        raise DataError(f"unknown calibration strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
    if not 0 < size <= len(pool):
        raise DataError(f"calibration size {size} must be between 1 and the pool size {len(pool)}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(len(pool), generator=generator)[:size].sort().values


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
    """Run the calibration set through ``unet`` and set every input quantizer's scale.

    Returns:
        The number of activation quantizers calibrated.
    """
    quantizers = input_quantizers(unet)
    for quantizer in quantizers.values():
        quantizer.start_observing(seed)
    batches = range(0, len(calib), batch_size)
    with track("Calibrating activations", len(batches)) as bar:
        for start in batches:
            sl = slice(start, start + batch_size)
            labels = calib.labels[sl] if conditional else None
            unet(calib.x[sl], calib.t[sl], class_labels=labels)
            bar.advance()
    for quantizer in quantizers.values():
        quantizer.finish_observing()
    logger.info("calibrated %d activation quantizers on %d inputs", len(quantizers), len(calib))
    return len(quantizers)
