"""Deterministic DDIM sampling (eta 0) with optional trajectory recording."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffquant.progress import track


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


def class_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels ``0, 1, ..., num_classes-1, 0, 1, ...`` for ``n`` samples (balanced classes)."""
    return torch.arange(n) % num_classes


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded standard normal noise of shape ``(n, *shape)``."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def make_scheduler(config: dict[str, Any], steps: int):
    """A diffusers ``DDIMScheduler`` from a scheduler config, set to ``steps`` steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def ddim_sample(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    batch_size: int = 1000,
    record: bool = False,
    description: str = "Sampling",
    clamp: bool = True,
) -> tuple[torch.Tensor, Trajectories | None]:
    """Run DDIM (eta 0) from ``noise`` and return final samples.

    Args:
        unet: A denoiser called as ``unet(x, t, condition).sample``.
        scheduler_config: The model's scheduler config.
        noise: Initial noise, (N, C, H, W).
        labels: Conditions (class ids (N,) or token ids (N, L)), or None for an unconditional model.
        steps: Number of DDIM steps.
        batch_size: Samples per forward pass.
        record: Also return every denoiser input as :class:`Trajectories`.
        description: Progress-bar label.
        clamp: Clamp final samples to [-1, 1] (pixel-space models; not for latents).

    Returns:
        Samples (N, C, H, W) and the recorded trajectories (or None).
    """
    scheduler = make_scheduler(scheduler_config, steps)
    outputs, xs, ts, ys = [], [], [], []
    n = noise.shape[0]
    batches = range(0, n, batch_size)
    with track(description, len(batches) * steps) as bar:
        for start in batches:
            x = noise[start : start + batch_size].clone()
            y = None if labels is None else labels[start : start + batch_size]
            for t in scheduler.timesteps:
                t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long)
                if record:
                    xs.append(x.clone())
                    ts.append(t_batch)
                    ys.append(y if y is not None else torch.zeros_like(t_batch))
                eps = unet(x, t_batch, y).sample
                x = scheduler.step(eps, t, x).prev_sample
                bar.advance()
            outputs.append(x.clamp(-1, 1) if clamp else x)
    traj = Trajectories(torch.cat(xs), torch.cat(ts), torch.cat(ys)) if record else None
    return torch.cat(outputs), traj


@torch.no_grad()
def denoiser_outputs(
    unet: nn.Module,
    traj: Trajectories,
    conditional: bool = True,
    batch_size: int = 512,
    description: str | None = None,
) -> torch.Tensor:
    """Evaluate the denoiser on recorded inputs (for SQNR, calibration and feature hooks).

    Args:
        unet: The denoiser.
        traj: Inputs to evaluate.
        conditional: Pass ``traj.labels`` as the condition (False for unconditional models).
        batch_size: Inputs per forward pass.
        description: Progress-bar label; None reports no progress.
    """
    outs = []
    batches = range(0, len(traj), batch_size)
    with ExitStack() as stack:
        bar = stack.enter_context(track(description, len(batches))) if description else None
        for start in batches:
            sl = slice(start, start + batch_size)
            labels = traj.labels[sl] if conditional else None
            outs.append(unet(traj.x[sl], traj.t[sl], labels).sample)
            if bar is not None:
                bar.advance()
    return torch.cat(outs)
