"""Sampling with diffusers' own schedulers, classifier-free guidance, and optional trajectory recording.

Schedulers: DDIM, Euler, DPM-Solver++ or the model's own (see :data:`SCHEDULERS`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from diffquant.errors import ConfigError
from diffquant.placement import module_placement, to_module, to_storage
from diffquant.progress import track
from diffquant.spec import SamplerSpec

logger = logging.getLogger(__name__)

_WARNED_CLIPPED: set[float] = set()
"""Guidance scales already warned about DDIM's x0 clipping in this process."""


@dataclass(frozen=True)
class Trajectories:
    """Denoiser inputs seen during sampling: ``x`` (N*steps, C, H, W), ``t`` and ``labels``.

    ``labels`` holds each input's condition: class ids ``(M,)`` or token ids ``(M, L)``
    (zeros for unconditional models).
    """

    x: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        """Number of (x_t, t, label) triples."""
        return int(self.t.shape[0])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for safetensors storage."""
        return {"x": self.x, "t": self.t, "labels": self.labels}


class InputRecorder(Protocol):
    """Receives every denoiser input of a sampling run as it is made (see :func:`run_sampler`)."""

    def add(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one forward's inputs: ``x`` (B, C, H, W) on the CPU in float32, ``t`` (B,), ``labels`` (B, ...)."""


class MemoryRecorder:
    """Keeps every recorded input in memory; :meth:`trajectories` joins them."""

    def __init__(self) -> None:
        """No inputs yet."""
        self.xs: list[torch.Tensor] = []
        self.ts: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep one forward's inputs."""
        self.xs.append(x.clone())
        self.ts.append(t)
        self.ys.append(labels)

    def trajectories(self) -> Trajectories:
        """Every input recorded so far, in order."""
        return Trajectories(torch.cat(self.xs), torch.cat(self.ts), torch.cat(self.ys))


def class_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels ``0, 1, ..., num_classes-1, 0, 1, ...`` for ``n`` samples (balanced classes)."""
    return torch.arange(n) % num_classes


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded standard normal noise of shape ``(n, *shape)``."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
}
"""``sampler.name`` -> the diffusers scheduler class it uses (``from_model``: the model's own)."""


def as_sampler(sampler: SamplerSpec | int) -> SamplerSpec:
    """``sampler`` itself, or unguided DDIM with that many steps for a bare step count."""
    return sampler if isinstance(sampler, SamplerSpec) else SamplerSpec(steps=int(sampler))


def scheduler_class(name: str, config: dict[str, Any]) -> type:
    """The diffusers scheduler class for ``sampler.name`` (``from_model``: ``config["_class_name"]``).

    Raises:
        ConfigError (``name``): ``from_model`` with a config that names no diffusers scheduler.
    """
    import diffusers

    if name in SCHEDULERS:
        return getattr(diffusers, SCHEDULERS[name])
    if name != "from_model":
        raise ConfigError("name", f"unknown sampler {name!r}; use one of {', '.join([*SCHEDULERS, 'from_model'])}")
    class_name = config.get("_class_name")
    found = getattr(diffusers, str(class_name), None) if isinstance(class_name, str) else None
    if not (isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin)):
        raise ConfigError(
            "name",
            f"from_model: the model's scheduler config names {class_name!r}, which is not a diffusers "
            f"scheduler; set sampler.name to one of {', '.join(SCHEDULERS)}",
        )
    return found


def make_scheduler(config: dict[str, Any], steps: int, name: str = "ddim", device: torch.device | None = None) -> Any:
    """A diffusers scheduler (``sampler.name``) built from the model's scheduler config, set to ``steps`` steps."""
    scheduler = scheduler_class(name, config).from_config(config)
    if device is None or device.type == "cpu":
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(steps, device=device)
    return scheduler


def sampling_scheduler_config(sampler: SamplerSpec, scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config sampling uses: the model's, with x0 clipping set by ``sampler.clip_sample``.

    ``auto`` keeps the model's ``clip_sample`` without guidance and turns it off with guidance (a
    clipped x0 beside an unclipped guided noise prediction washes samples out); ``true`` / ``false``
    force it. Configs without ``clip_sample`` (schedulers without clipping) are left alone under ``auto``.
    """
    if sampler.clip_sample == "auto":
        if sampler.guided and scheduler_config.get("clip_sample"):
            return {**scheduler_config, "clip_sample": False}
        return scheduler_config
    return {**scheduler_config, "clip_sample": bool(sampler.clip_sample)}


def check_sampler(sampler: SamplerSpec, scheduler_config: dict[str, Any], null: torch.Tensor | None) -> None:
    """Refuse a sampler the model cannot run before any work: unknown scheduler class, guidance without a null condition.

    Args:
        sampler: The sampler.
        scheduler_config: The model's scheduler config.
        null: The model's null conditions for one sample (``DiffusionModel.null_conditions(1)``).

    Raises:
        ConfigError (``name`` or ``guidance``).
    """
    cls = scheduler_class(sampler.name, scheduler_config)
    effective = sampling_scheduler_config(sampler, scheduler_config)
    clipped = cls.__name__ == "DDIMScheduler" and bool(effective.get("clip_sample"))
    if sampler.guided and clipped and sampler.guidance not in _WARNED_CLIPPED:
        _WARNED_CLIPPED.add(sampler.guidance)
        logger.warning(
            "guidance %g with DDIM and sampler.clip_sample true: DDIM clips each step's x0 prediction but "
            "keeps the unclipped noise, which washes out guided samples (bench/guidance.py, digits-unet: "
            "accuracy 0.746 at guidance 2 and 0.236 at 4 with clipping, 0.998 and 1.000 without); "
            "leave sampler.clip_sample at auto",
            sampler.guidance,
        )
    if sampler.guided and null is None:
        raise ConfigError(
            "guidance",
            f"{sampler.guidance:g} needs a model with a null condition (a null class: null_class in "
            "diffquant.json or a class embedding beyond the classes; or a text encoder's empty prompt); "
            "this model has none, so use 1.0",
        )


def batch_workers(unet: nn.Module, device: torch.device, batches: int) -> int:
    """How many batches of a CPU sampling pass run at once (one per torch thread; 1 elsewhere).

    On a CPU, ``k`` batches side by side on one intra-op thread each sample faster than one batch
    on ``k`` threads: the U-Net's many small operations (group norms, activations on 8x8 to 64x64
    maps) do not scale across threads (82% efficiency on 2 cores, measured on digits-unet; batch
    parallelism gave 5-16% less wall time with identical samples). Only for a PyTorch denoiser with
    parameters on the CPU (not an onnxruntime session, which has its own threads), only from the
    main thread (torch's thread count is process-wide: a pass in a worker thread of a parallel
    stage must not change it under its neighbours), and never for a recording pass (inputs are
    recorded in order). A GPU runs one batch at a time. Peak activation memory grows with the
    batches held at once; :func:`diffquant.cost.estimate_cost` counts them.
    """
    if device.type != "cpu" or batches < 2 or next(unet.parameters(), None) is None:
        return 1
    if threading.current_thread() is not threading.main_thread():
        return 1
    return side_by_side(batches)


def side_by_side(batches: int) -> int:
    """Batches a CPU sampling pass holds at once where it may run them side by side: one per torch thread."""
    return max(1, min(torch.get_num_threads(), batches))


def map_batches(fn: Callable[[int], torch.Tensor], starts: range, workers: int) -> list[torch.Tensor]:
    """``[fn(s) for s in starts]``, with ``workers`` > 1 run on that many threads of one torch thread each.

    The results keep the order of ``starts``; torch's thread count is restored afterwards. The
    batches are independent, so the samples are the serial loop's up to the summation order of
    kernels whose result depends on their thread count (digits-unet: bit-equal at batch 256, 2e-6
    apart after 20 steps at batch 8; tested). A run is reproducible for a given thread count.
    """
    if workers <= 1:
        return [fn(start) for start in starts]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="diffquant-batch") as pool:
            return list(pool.map(_same_grad_mode(fn), starts))
    finally:
        torch.set_num_threads(threads)


def _same_grad_mode(fn: Callable[[int], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """``fn`` under the caller's autograd mode (grad mode is per thread in torch)."""
    enabled = torch.is_grad_enabled()

    def call(start: int) -> torch.Tensor:
        with torch.set_grad_enabled(enabled):
            return fn(start)

    return call


@torch.no_grad()
def run_sampler(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    sampler: SamplerSpec | int,
    batch_size: int = 1000,
    record: bool | InputRecorder = False,
    description: str = "Sampling",
    clamp: bool = True,
    null: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Trajectories | None]:
    """Sample from ``noise`` with the diffusers scheduler of ``sampler`` and return final samples.

    The loop is the one of diffusers' pipelines: the noise is scaled by the scheduler's
    ``init_noise_sigma``, every denoiser input goes through ``scale_model_input``, and with
    classifier-free guidance (``sampler.guidance`` > 1) each step runs the unconditional and the
    conditional half in one batch (unconditional first) and combines them as
    ``eps_u + guidance * (eps_c - eps_u)``. A fresh scheduler serves every batch (multistep
    schedulers keep state between steps).

    Args:
        unet: A denoiser called as ``unet(x, t, condition).sample``.
        scheduler_config: The model's scheduler config.
        noise: Initial noise, (N, C, H, W).
        labels: Conditions (class ids (N,) or token ids (N, L)), or None for an unconditional model.
        sampler: The sampler (scheduler, steps, guidance), or a step count for unguided DDIM.
        batch_size: Denoiser inputs per forward pass (a guided pass holds ``batch_size // 2``
            samples, both halves).
        record: True: also return every denoiser input as :class:`Trajectories` (both halves when
            guided); an :class:`InputRecorder`: hand it every input as it is made (none returned).
        description: Progress-bar label.
        clamp: Clamp final samples to [-1, 1] (pixel-space models; not for latents).
        null: The null conditions (same shape as ``labels``) that guidance needs.

    Returns:
        Samples (N, C, H, W) and the recorded trajectories (None unless ``record`` is True).

    Raises:
        ConfigError (``guidance``): Guidance without conditions or without null conditions.
    """
    sampler = as_sampler(sampler)
    guided = sampler.guided
    check_sampler(sampler, scheduler_config, None if labels is None else null)
    config = sampling_scheduler_config(sampler, scheduler_config)
    per_batch = max(1, batch_size // 2) if guided else batch_size
    device, dtype = module_placement(unet)
    recorder = MemoryRecorder() if record is True else record or None
    n = noise.shape[0]
    batches = range(0, n, per_batch)
    with track(description, len(batches) * sampler.steps) as bar:

        def sample_batch(start: int) -> torch.Tensor:
            scheduler = make_scheduler(config, sampler.steps, sampler.name, device)
            x = noise[start : start + per_batch].to(device, torch.float32) * scheduler.init_noise_sigma
            y = None if labels is None else labels[start : start + per_batch]
            if guided:
                assert y is not None and null is not None
                y = torch.cat([null[start : start + per_batch], y])
            y_device = None if y is None else y.to(device)
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
                t_batch = torch.full((model_input.shape[0],), t.item(), dtype=scheduler.timesteps.dtype)  # CPU
                if recorder is not None:
                    labels_batch = y if y is not None else torch.zeros(t_batch.shape, dtype=torch.long)
                    recorder.add(to_storage(model_input), t_batch, labels_batch)
                eps = unet(to_module(model_input, device, dtype), t_batch.to(device), y_device).sample.float()
                if guided:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + sampler.guidance * (cond - uncond)
                x = scheduler.step(eps, t, x).prev_sample
                bar.advance()
            return to_storage(x.clamp(-1, 1) if clamp else x)

        workers = batch_workers(unet, device, len(batches)) if recorder is None else 1
        outputs = map_batches(sample_batch, batches, workers)
    traj = recorder.trajectories() if isinstance(recorder, MemoryRecorder) and record is True else None
    return torch.cat(outputs), traj


@torch.no_grad()
def denoiser_outputs(
    unet: nn.Module,
    traj: Trajectories,
    conditional: bool = True,
    batch_size: int = 256,
    description: str | None = None,
) -> torch.Tensor:
    """Evaluate the denoiser on recorded inputs (for SQNR, calibration and feature hooks).

    Args:
        unet: The denoiser.
        traj: Inputs to evaluate.
        conditional: Pass ``traj.labels`` as the condition (False for unconditional models).
        batch_size: Inputs per forward pass (the default is ``calibration.batch_size``'s).
        description: Progress-bar label; None reports no progress.
    """
    outs = []
    device, dtype = module_placement(unet)
    batches = range(0, len(traj), batch_size)
    with ExitStack() as stack:
        bar = stack.enter_context(track(description, len(batches))) if description else None
        for start in batches:
            sl = slice(start, start + batch_size)
            labels = traj.labels[sl].to(device) if conditional else None
            out = unet(to_module(traj.x[sl], device, dtype), traj.t[sl].to(device), labels).sample
            outs.append(to_storage(out))
            if bar is not None:
                bar.advance()
    return torch.cat(outs)
