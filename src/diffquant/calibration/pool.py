"""The calibration candidate pool: every denoiser input of full-precision sampling trajectories.

The pool holds every denoiser input ``(x_t, t, label)`` seen while sampling ``trajectories``
full-precision images. Its noise comes from seed ``POOL_SEED_OFFSET + calibration.seed``, so it
never shares noise with evaluation (seed ``evaluate.seed``).

Given a file, :func:`collect_pool` streams the inputs there as they are made (:class:`PoolWriter`)
and returns the pool memory-mapped from it (:func:`open_pool`): a large pool is never one tensor
in memory, and its readers (features, selection, fine-tuning batches) read the rows they use.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffquant.errors import DataError
from diffquant.models.loading import DiffusionModel
from diffquant.sampling import Trajectories, initial_noise, run_sampler
from diffquant.spec import SamplerSpec
from diffquant.storage import SafetensorsWriter, mapped_safetensors, stream_safetensors

logger = logging.getLogger(__name__)

POOL_SEED_OFFSET = 10_000
POOL_CODE_VERSION = "2"


def collect_pool(
    model: DiffusionModel,
    trajectories: int = 64,
    steps: int | SamplerSpec = 50,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int = 1000,
    out: str | Path | None = None,
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
        batch_size: Most denoiser inputs per forward (a guided step holds both halves of
            ``batch_size // 2`` trajectories).
        out: A safetensors file to stream the pool to as it is sampled (replaced atomically when
            complete); the pool is then returned memory-mapped from it. None keeps it in memory.

    Raises:
        DataError: If any recorded input is NaN or infinite (nothing is written to ``out``).

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

    def sample(record: bool | PoolWriter) -> Trajectories | None:
        _, traj = run_sampler(
            model.unet,
            model.scheduler_config,
            noise,
            labels,
            steps,
            batch_size,
            record=record,
            description="Collecting FP trajectories",
            clamp=not model.latent,
            null=model.null_conditions(trajectories),
        )
        return traj

    if out is None:
        traj = sample(True)
        assert traj is not None
        check_finite(traj)
        return traj
    with stream_safetensors(Path(out)) as stream:
        writer = PoolWriter(stream)
        sample(writer)
        writer.finish()
    return open_pool(out)


class PoolWriter:
    """Streams denoiser inputs into a safetensors pool file as they come (an :class:`~diffquant.sampling.InputRecorder`).

    ``x`` goes to the file at once; ``t`` and ``labels`` (a few bytes per input) are kept and
    written by :meth:`finish`, which refuses a pool with non-finite inputs (counted on the way).
    """

    def __init__(self, stream: SafetensorsWriter) -> None:
        """Write into ``stream`` (from :func:`~diffquant.storage.stream_safetensors`)."""
        self._stream = stream
        self._ts: list[torch.Tensor] = []
        self._ys: list[torch.Tensor] = []
        self._rows = 0
        self._bad = 0
        self._first_bad: int | None = None

    def add(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> None:
        """Write one forward's inputs."""
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1)
        if bad.any():
            self._first_bad = self._first_bad if self._first_bad is not None else self._rows + int(bad.nonzero()[0])
            self._bad += int(bad.sum())
        self._stream.append("x", x.float())
        self._ts.append(t.cpu())
        self._ys.append(labels.cpu())
        self._rows += int(x.shape[0])

    def finish(self) -> int:
        """Write ``t`` and ``labels``; returns the number of inputs.

        Raises:
            DataError: If any input was NaN or infinite.
        """
        if self._bad:
            raise DataError(
                f"{self._bad} of {self._rows} trajectory inputs contain NaN or inf "
                f"(first at index {self._first_bad}); the full-precision model is unstable"
            )
        self._stream.append("t", torch.cat(self._ts))
        self._stream.append("labels", torch.cat(self._ys))
        return self._rows


def open_pool(path: str | Path) -> Trajectories:
    """The pool in ``path`` with its inputs memory-mapped (:func:`~diffquant.storage.mapped_safetensors`)."""
    data = mapped_safetensors(Path(path))
    return Trajectories(data["x"], data["t"], data["labels"])


def check_finite(traj: Trajectories, batch_size: int = 4096) -> None:
    """Raise :class:`DataError` if the trajectories hold NaN or inf (checked ``batch_size`` rows at a time)."""
    if not len(traj):
        return
    bad = torch.cat(
        [
            (~torch.isfinite(traj.x[i : i + batch_size])).reshape(-1, traj.x[0].numel()).any(dim=1)
            for i in range(0, len(traj), batch_size)
        ]
    )
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
