"""Range observers that turn tensors into quantization scales.

- ``minmax``: the absolute maximum (per channel for weights, per tensor for activations).
- ``percentile``: the ``percentile``-th quantile of ``|x|`` (robust to rare outliers).
- ``mse``: a grid search over clipping ratios of the absolute maximum that minimises the mean
  squared fake-quantization error (per channel for weights).

Activation observers see the calibration batches one at a time; they keep the running maximum
and a bounded, seeded random subsample of ``|x|`` for the percentile and MSE searches.
"""

from __future__ import annotations

from typing import Literal

import torch

from diffquant.quant.formats import QuantFormat, fake_quant, group_view, scale_from_absmax

ObserverName = Literal["minmax", "percentile", "mse"]
OBSERVERS: tuple[str, ...] = ("minmax", "percentile", "mse")
DEFAULT_PERCENTILE = 99.99
MSE_GRID = torch.linspace(0.2, 1.0, 81)
RESERVOIR_SIZE = 1 << 20
"""Activation values an observer keeps (a uniform sample over every batch it saw)."""
_CHUNK = 1 << 22


def _check_name(name: str) -> None:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")


def mse_scale(x: torch.Tensor, fmt: QuantFormat, axis: int | None = None) -> torch.Tensor:
    """Return the MSE-optimal scale of ``x`` over clipping ratios in ``MSE_GRID``.

    Args:
        x: Values to quantize.
        fmt: Target format.
        axis: Channel axis for a per-channel search, None for one per-tensor scale.
    """
    x = x.detach().float()
    if axis is None:
        flat = x.reshape(1, -1)
    else:
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    absmax = flat.abs().amax(dim=1)
    best_err = torch.full_like(absmax, float("inf"))
    best = scale_from_absmax(absmax, fmt)
    for ratio in MSE_GRID:
        scale = scale_from_absmax(absmax * ratio, fmt)
        err = (fake_quant(flat, scale, fmt, axis=0) - flat).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best if axis is not None else best.reshape(())


def weight_scale(
    weight: torch.Tensor,
    fmt: QuantFormat,
    observer: str = "minmax",
    axis: int | None = 0,
    percentile: float = DEFAULT_PERCENTILE,
    group_size: int | None = None,
) -> torch.Tensor:
    """Compute weight scales (per output channel when ``axis`` is 0, per tensor when None).

    Args:
        weight: The weight tensor (output channels on axis 0).
        fmt: Target format.
        observer: ``minmax``, ``percentile`` or ``mse``.
        axis: Channel axis, or None for a single scale (ignored with ``group_size``).
        percentile: Quantile of ``|w|`` in percent for the percentile observer.
        group_size: One scale per group of this many input channels (axis 1) instead.

    Returns:
        Positive scales, shape ``(weight.shape[axis],)``, ``()``, or ``[O, I // g, *k]`` for groups.
    """
    _check_name(observer)
    w = weight.detach().float()
    if group_size is not None:
        grouped = group_view(w, group_size).movedim(2, -1)
        rows = grouped.reshape(-1, group_size)
        return weight_scale(rows, fmt, observer, 0, percentile).reshape(grouped.shape[:-1])
    if observer == "mse":
        return mse_scale(w, fmt, axis)
    flat = w.reshape(1, -1) if axis is None else w.movedim(axis, 0).reshape(w.shape[axis], -1)
    if observer == "minmax":
        absmax = flat.abs().amax(dim=1)
    else:
        absmax = torch.quantile(flat.abs(), percentile / 100.0, dim=1)
    scale = scale_from_absmax(absmax, fmt)
    return scale if axis is not None else scale.reshape(())


class ActivationObserver:
    """Accumulates per-tensor statistics of an activation over calibration batches.

    The percentile and MSE observers keep a uniform random sample (without replacement) of every
    value seen, over all batches alike: each value gets a random key and the ``reservoir`` values
    with the smallest keys are kept (bottom-k sampling), so the sample does not depend on the
    order of the batches, and memory stays bounded (keys are drawn in chunks of 4M values).
    """

    def __init__(
        self,
        observer: str = "minmax",
        percentile: float = DEFAULT_PERCENTILE,
        seed: int = 0,
        reservoir: int = RESERVOIR_SIZE,
    ) -> None:
        """Create an empty observer.

        Args:
            observer: ``minmax``, ``percentile`` or ``mse``.
            percentile: Quantile of ``|x|`` in percent for the percentile observer.
            seed: Seed of the sampling used by the percentile and MSE observers.
            reservoir: Values kept for the percentile and MSE observers.
        """
        _check_name(observer)
        self.observer = observer
        self.percentile = percentile
        self.reservoir = reservoir
        self.absmax = torch.tensor(0.0)
        self._values = torch.empty(0)
        self._keys = torch.empty(0)
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        """Record one batch of activations."""
        x = x.detach().float().reshape(-1)
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite activation seen during calibration")
        self.absmax = torch.maximum(self.absmax, x.abs().max().cpu())  # statistics live on the CPU
        if self.observer == "minmax":
            return
        x = x.cpu()  # sampled with the CPU generator: the same sample on every device
        for chunk in x.split(_CHUNK):
            keys = torch.rand(chunk.numel(), generator=self._generator)
            if self._keys.numel() >= self.reservoir:  # only keys below the current k-th smallest can enter
                below = keys < self._keys.max()
                keys, chunk = keys[below], chunk[below]
            keys, values = torch.cat([self._keys, keys]), torch.cat([self._values, chunk])
            if keys.numel() > self.reservoir:
                keys, order = torch.topk(keys, self.reservoir, largest=False, sorted=False)
                values = values[order]
            self._keys, self._values = keys, values

    def scale(self, fmt: QuantFormat) -> torch.Tensor:
        """Return the per-tensor scale for ``fmt`` from what was observed."""
        if self.observer == "minmax" or not self._values.numel():
            return scale_from_absmax(self.absmax, fmt).reshape(())
        values = torch.cat([self._values, self.absmax.reshape(1)])
        if self.observer == "percentile":
            return scale_from_absmax(torch.quantile(values.abs(), self.percentile / 100.0), fmt).reshape(())
        return mse_scale(values, fmt, axis=None)
