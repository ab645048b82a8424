"""Per-layer sensitivity and costs for mixed-precision allocation.

Sensitivity is measured one layer at a time (MixDQ): only that layer's weight (or only its input)
is quantized, inside :func:`quantize_only`, which always restores the layer. Weight and
activation effects are measured separately and added, so a (weight bits, activation bits)
option costs ``noise_w + noise_a`` where ``noise = 10 ** (-SQNR / 10)`` is the denoiser-output
noise power relative to the signal on the calibration set (additive to first order).

An optional content metric (KL divergence of the evaluation classifier's logits between FP and
quantized final samples from the same noise) is measured for layers matching the content globs
(the layers that carry the condition); both metrics are kept in the table.

Costs per (layer, option): packed weight bytes (``ceil(n * bits / 8)`` plus fp32 scales, 4 bytes
per weight in float), BitOps (MACs at the sampler's resolution x weight bits x activation bits,
32 for float) and the average-weight-bits contribution ``bits * n / N``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffquant.metrics import sqnr_db
from diffquant.progress import track
from diffquant.quant.modules import QuantConv2d, QuantLinear
from diffquant.quant.plan import QUANTIZABLE, quantizable_layers, set_module
from diffquant.sampling import Trajectories, denoiser_outputs

FLOAT_BITS = 32
SENSITIVITY_CODE_VERSION = "1"


@contextmanager
def quantize_only(
    model: nn.Module,
    name: str,
    weight_bits: int | None,
    act_bits: int | None,
    calib: Trajectories | None = None,
    conditional: bool = True,
    weight_observer: str = "minmax",
    act_observer: str = "minmax",
) -> Iterator[nn.Module]:
    """Temporarily replace layer ``name`` by a fake-quantized copy; always restores the original.

    Args:
        model: The denoiser (modified in place while the context is open).
        name: Layer FQN.
        weight_bits: Weight bits (None: float weight).
        act_bits: Input bits (None: float input); calibrated on ``calib``.
        calib: Calibration inputs (needed when ``act_bits`` is set).
        conditional: Pass class labels from ``calib``.
        weight_observer: Weight observer.
        act_observer: Activation observer.
    """
    original = model.get_submodule(name)
    if not isinstance(original, QUANTIZABLE) or isinstance(original, (QuantLinear, QuantConv2d)):
        raise ValueError(f"{name!r} is not a float Linear/Conv2d layer")
    cls = QuantLinear if isinstance(original, nn.Linear) else QuantConv2d
    replacement = cls.from_float(original, weight_bits, act_bits, weight_observer, act_observer)
    set_module(model, name, replacement)
    try:
        if act_bits is not None:
            if calib is None:
                raise ValueError("activation sensitivity needs calibration inputs")
            replacement.input_quantizer.start_observing()
            denoiser_outputs(model, calib, conditional)
            replacement.input_quantizer.finish_observing()
        yield replacement
    finally:
        set_module(model, name, original)


def noise_power(sqnr: float) -> float:
    """Relative noise power ``10 ** (-SQNR / 10)`` (0 for a lossless layer)."""
    return 0.0 if math.isinf(sqnr) else 10.0 ** (-sqnr / 10.0)


@dataclass
class SensitivityTable:
    """Rows of (layer, kind, bits, sqnr_db, noise, content); kind is ``weight`` or ``activation``."""

    rows: list[dict[str, float | int | str | None]] = field(default_factory=list)

    def _row(self, layer: str, kind: str, bits: int) -> dict[str, float | int | str | None]:
        index = getattr(self, "_index", None)
        if index is None or len(index) != len(self.rows):
            index = {(r["layer"], r["kind"], r["bits"]): r for r in self.rows}
            self._index = index
        try:
            return index[(layer, kind, bits)]
        except KeyError:
            raise KeyError(f"no sensitivity for {layer} {kind} {bits} bits") from None

    def noise(self, layer: str, kind: str, bits: int | None) -> float:
        """Noise power of quantizing ``kind`` of ``layer`` at ``bits`` (0 for float)."""
        return 0.0 if bits is None else float(self._row(layer, kind, bits)["noise"])

    def content(self, layer: str, kind: str, bits: int | None) -> float:
        """Content-metric value (0 for float or where it was not measured)."""
        if bits is None:
            return 0.0
        value = self._row(layer, kind, bits).get("content")
        return 0.0 if value in (None, "") else float(value)

    def save_csv(self, path: Path) -> Path:
        """Write the table as CSV (atomically)."""
        from diffquant.storage import atomic_path

        with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["layer", "kind", "bits", "sqnr_db", "noise", "content"])
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k) for k in writer.fieldnames})
        return Path(path)

    @classmethod
    def load_csv(cls, path: Path) -> SensitivityTable:
        """Read a table written by :meth:`save_csv`."""
        rows = []
        with Path(path).open(newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append(
                    {
                        "layer": row["layer"],
                        "kind": row["kind"],
                        "bits": int(row["bits"]),
                        "sqnr_db": float(row["sqnr_db"]),
                        "noise": float(row["noise"]),
                        "content": float(row["content"]) if row["content"] else None,
                    }
                )
        return cls(rows)


def measure_sensitivity(
    unet: nn.Module,
    calib: Trajectories,
    conditional: bool,
    weight_bits: Sequence[int],
    act_bits: Sequence[int],
    layers: Sequence[str] | None = None,
    weight_observer: str = "minmax",
    act_observer: str = "minmax",
    content_layers: Sequence[str] = (),
    content_fn: Callable[[nn.Module], float] | None = None,
) -> SensitivityTable:
    """Measure every layer's weight and input sensitivity at each candidate bit-width.

    Args:
        unet: The FP denoiser (restored after every measurement).
        calib: Calibration inputs; SQNR is taken over all of them.
        conditional: Pass class labels.
        weight_bits: Candidate weight bit-widths.
        act_bits: Candidate input bit-widths.
        layers: Layers to measure (default: every Linear/Conv2d).
        weight_observer: Weight observer.
        act_observer: Activation observer.
        content_layers: Layers whose content metric is also measured.
        content_fn: ``model -> content metric`` (e.g. classifier-logit KL of final samples).

    Returns:
        The table, one row per (layer, kind, bits).
    """
    layers = list(layers) if layers is not None else quantizable_layers(unet)
    reference = denoiser_outputs(unet, calib, conditional)
    content_set = set(content_layers)
    table = SensitivityTable()
    total = len(layers) * (len(weight_bits) + len(act_bits))
    with torch.no_grad(), track("Measuring layer sensitivity", total) as bar:
        for name in layers:
            for kind, options in (("weight", weight_bits), ("activation", act_bits)):
                for bits in options:
                    w, a = (bits, None) if kind == "weight" else (None, bits)
                    with quantize_only(unet, name, w, a, calib, conditional, weight_observer, act_observer):
                        sqnr = sqnr_db(reference, denoiser_outputs(unet, calib, conditional))
                        content = content_fn(unet) if content_fn is not None and name in content_set else None
                    table.rows.append(
                        {
                            "layer": name,
                            "kind": kind,
                            "bits": bits,
                            "sqnr_db": sqnr,
                            "noise": noise_power(sqnr),
                            "content": content,
                        }
                    )
                    bar.advance()
    return table


@torch.no_grad()
def layer_macs(unet: nn.Module, sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> dict[str, int]:
    """Multiply-accumulates of every Linear/Conv2d for one denoiser call on ``sample`` (batch 1)."""
    macs: dict[str, int] = {}
    handles = []
    for name, module in unet.named_modules():
        if not isinstance(module, QUANTIZABLE):
            continue

        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, name: str = name) -> None:
            if isinstance(mod, nn.Conv2d):
                per_output = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                macs[name] = macs.get(name, 0) + int(output.numel() // output.shape[0]) * per_output
            else:
                tokens = inputs[0].numel() // inputs[0].shape[0] // mod.in_features
                macs[name] = macs.get(name, 0) + tokens * mod.in_features * mod.out_features

        handles.append(module.register_forward_hook(hook))
    try:
        x, t, y = sample
        unet(x[:1], t[:1], class_labels=None if y is None else y[:1])
    finally:
        for handle in handles:
            handle.remove()
    return macs
