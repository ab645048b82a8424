"""Per-channel input statistics of planned layers, from one pass of the calibration data.

For each observed layer: the minimum and maximum of every input channel over all calibration
inputs (every timestep) and a bounded random sample of its inputs (for the alpha search). For
every Linear / Conv2d it also records which module's output its input always was (same memory,
channels at the same positions: for folding, :mod:`diffquant.outliers.folding`). The first call of the
denoiser is recorded so that the float function can be checked again later on the same input.

Token positions a layer serves from full-precision outputs (``fp_tokens``) are left out: they
never reach its input quantizer. A zero-padded convolution also sees zeros, so 0 is inside its
range.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffquant.quant.transforms import channel_axis, explicit_padding

SAMPLE_ROWS = 2048
"""Linear inputs kept per layer for the alpha search (rows of ``[*, in]``), at most."""
SAMPLE_ITEMS = 32
"""Conv2d inputs kept per layer for the alpha search (whole ``[C, H, W]`` items), at most."""
SAMPLE_BYTES = 16 << 20
"""Bytes of kept inputs per layer (fewer rows / items for wide layers; at least one)."""
PRODUCER_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.Linear, nn.Conv2d)
PRODUCER_CALLS = 4
"""Denoiser calls whose tensors are traced for producers (the graph is the same on every call)."""


@dataclass
class InputStats:
    """What one layer's inputs looked like over the calibration data (CPU, float32)."""

    lo: torch.Tensor
    hi: torch.Tensor
    samples: torch.Tensor | None = None
    keys: torch.Tensor | None = None

    @property
    def absmax(self) -> torch.Tensor:
        """``max |x|`` per channel."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @property
    def midpoint(self) -> torch.Tensor:
        """The middle of each channel's range: the shift that centers it."""
        return (self.lo + self.hi) / 2


@dataclass
class Observation:
    """Statistics of every observed layer and the first denoiser call (for float-function checks)."""

    stats: dict[str, InputStats] = field(default_factory=dict)
    producers: dict[str, str | None] = field(default_factory=dict)
    """Every Linear / Conv2d seen: the module whose output it always read (None: none, or not always the same)."""
    first_call: tuple[tuple[Any, ...], dict[str, Any]] | None = None


def _to_channels_last(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


class _Recorder:
    """Forward hooks that fill an :class:`Observation`."""

    def __init__(self, unet: nn.Module, names: list[str], skip_tokens: dict[str, int], keep: bool, seed: int) -> None:
        self.unet, self.skip_tokens, self.keep = unet, skip_tokens, keep
        self.observation = Observation()
        self.generator = torch.Generator().manual_seed(seed)
        self.layers = {name: unet.get_submodule(name) for name in names}
        self.outputs: list[tuple[weakref.ref, str, int]] = []
        self.calls = 0

    def first_call(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.outputs.clear()
        self.calls += 1
        if self.observation.first_call is None:
            detach = lambda v: v.detach().clone() if torch.is_tensor(v) else v  # noqa: E731
            self.observation.first_call = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})

    def produced(self, name: str, axis: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if torch.is_tensor(output) and self.calls <= PRODUCER_CALLS:
                self.outputs.append((weakref.ref(output), name, axis))

        return hook

    def producer_of(self, x: torch.Tensor, axis: int) -> str | None:
        """The recorded module whose (still alive) output is ``x``'s memory, channels on the same positions."""
        for ref, name, out_axis in reversed(self.outputs):
            out = ref()
            if out is None or out.numel() != x.numel() or out.device != x.device:
                continue
            same = (
                out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                and out.storage_offset() == x.storage_offset()
                and out.shape[out_axis] == x.shape[axis]
                and out.stride(out_axis) == x.stride(axis)
            )
            if same:
                return name
        return None

    def read(self, name: str, layer: nn.Module) -> Callable[..., None]:
        axis = channel_axis(layer)

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.calls > PRODUCER_CALLS:
                return
            producer = self.producer_of(args[0], axis)
            producers = self.observation.producers
            if name not in producers:
                producers[name] = producer
            elif producers[name] != producer:
                producers[name] = None

        return hook

    def consumed(self, name: str) -> Callable[..., None]:
        layer = self.layers[name]
        axis = channel_axis(layer)
        padding = explicit_padding(layer)
        padded = padding is not None and padding[1] == "constant"  # zero padding: the layer sees zeros
        skip = self.skip_tokens.get(name, 0)

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if skip:
                x = x[:, skip:]
            rows = _to_channels_last(x, axis).float()
            lo, hi = rows.amin(dim=0).cpu(), rows.amax(dim=0).cpu()
            if padded:
                lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            stats = self.observation.stats.get(name)
            if stats is None:
                self.observation.stats[name] = stats = InputStats(lo, hi)
            else:
                stats.lo, stats.hi = torch.minimum(stats.lo, lo), torch.maximum(stats.hi, hi)
            if self.keep:
                self.sample(stats, rows if axis == -1 else x.float())

        return hook

    def sample(self, stats: InputStats, items: torch.Tensor) -> None:
        """Bottom-k sampling over everything seen: the kept set does not depend on batch order."""
        per_item = items[0].numel() * 4
        limit = max(1, min(SAMPLE_ROWS if items.dim() == 2 else SAMPLE_ITEMS, SAMPLE_BYTES // per_item))
        items = items.cpu()
        keys = torch.rand(items.shape[0], generator=self.generator)
        if stats.samples is not None:
            keys, items = torch.cat([stats.keys, keys]), torch.cat([stats.samples, items])
        if keys.numel() > limit:
            keys, order = torch.topk(keys, limit, largest=False)
            items = items[order]
        stats.keys, stats.samples = keys, items


def observe_inputs(
    unet: nn.Module,
    names: list[str],
    run: Callable[[nn.Module], Any],
    skip_tokens: dict[str, int] | None = None,
    keep_samples: bool = False,
    seed: int = 0,
) -> Observation:
    """Run the calibration data through the float ``unet`` once and record the inputs of ``names``.

    Args:
        unet: The float denoiser (not changed).
        names: Layers to observe (Linear / Conv2d FQNs).
        run: Runs the calibration data through a module.
        skip_tokens: Leading token positions to leave out per layer (``fp_tokens``).
        keep_samples: Also keep a seeded random sample of each layer's inputs.
        seed: Seed of that sample.
    """
    recorder = _Recorder(unet, names, skip_tokens or {}, keep_samples, seed)
    handles = [unet.register_forward_pre_hook(recorder.first_call, with_kwargs=True)]
    for name, module in unet.named_modules():
        if isinstance(module, PRODUCER_TYPES) and name:
            axis = -1 if isinstance(module, (nn.LayerNorm, nn.Linear)) else 1
            handles.append(module.register_forward_hook(recorder.produced(name, axis)))
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            handles.append(module.register_forward_pre_hook(recorder.read(name, module)))
    for name, layer in recorder.layers.items():
        handles.append(layer.register_forward_pre_hook(recorder.consumed(name)))
    try:
        with torch.no_grad():
            run(unet)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in recorder.observation.stats]
    if missing:
        raise ValueError(f"layer {missing[0]} saw no calibration input; is it used in forward?")
    return recorder.observation


def replay(unet: nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Tensor:
    """The denoiser's output (its ``sample``) on a recorded call."""
    args, kwargs = call
    with torch.no_grad():
        out = unet(*args, **kwargs)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, tuple):
        out = out[0]
    return out.detach().float()
