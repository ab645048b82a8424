"""The calibration candidate pool: every denoiser input of full-precision sampling trajectories.

The pool holds every denoiser input ``(x_t, t, label)`` seen while sampling ``trajectories``
full-precision images. Its noise comes from seed ``POOL_SEED_OFFSET + calibration.seed``, so it
never shares noise with evaluation (seed ``evaluate.seed``).
"""

from __future__ import annotations

import logging

import torch

from diffquant.errors import DataError
from diffquant.models.loading import DiffusionModel
from diffquant.sampling import Trajectories, initial_noise, run_sampler
from diffquant.spec import SamplerSpec

logger = logging.getLogger(__name__)

POOL_SEED_OFFSET = 10_000
POOL_CODE_VERSION = "2"


def collect_pool(
    model: DiffusionModel,
    trajectories: int = 64,
    steps: int | SamplerSpec = 50,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> Trajectories:
    """Sample ``trajectories`` FP images and record every denoiser input (the candidate pool).

    With classifier-free guidance the pool holds both halves of every step (unconditional and
    conditional inputs), as the deployed denoiser sees them.

    Args:
        model: The FP model.
        trajectories: Number of sampling trajectories.
        steps: DDIM steps per trajectory, or the whole sampler (scheduler, steps, guidance).
        seed: Calibration seed (noise seed is ``POOL_SEED_OFFSET + seed``).
        labels: Class labels to cycle through (class models; default: all classes in turn).
            Text models use their calibration prompts.

    Raises:
        DataError: If any recorded input is NaN or infinite.

    Example:
        >>> pool = diffquant.collect_pool(diffquant.load_model("digits-unet"), trajectories=8, steps=50)
        >>> len(pool)
        400
    """
    if labels is not None and model.condition == "class":
        labels = labels[torch.arange(trajectories) % labels.numel()]
    else:
        labels, _ = model.conditions(trajectories, "calibration")
    noise = initial_noise(trajectories, model.sample_shape, POOL_SEED_OFFSET + seed)
    _, traj = run_sampler(
        model.unet,
        model.scheduler_config,
        noise,
        labels,
        steps,
        record=True,
        description="Collecting FP trajectories",
        clamp=not model.latent,
        null=model.null_conditions(trajectories),
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
