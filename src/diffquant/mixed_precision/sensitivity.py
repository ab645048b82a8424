"""Per-layer sensitivity and costs for mixed-precision allocation.

Sensitivity is measured one layer at a time (MixDQ): only that layer's weight (or only its input)
is quantized, inside :func:`quantize_only`, which always restores the layer. Weight and
activation effects are measured separately and added, so a (weight bits, activation bits)
option costs ``noise_w + noise_a`` where ``noise = 10 ** (-SQNR / 10)`` is the denoiser-output
noise power relative to the signal on the calibration set (additive to first order).

A content metric of final samples against FP samples from the same noise (1 - SSIM, or the
evaluation classifier's logit KL; :mod:`diffquant.mixed_precision.content`) is measured for the
content layers (the layers that carry the condition); both metrics are kept in the table.

Each layer is measured in the form the final plan gives it (:class:`PlanForm`): with GPTQ-rounded
weights when the plan rounds with GPTQ (one Hessian per layer, shared by every option), and with
the leading outlier tokens served in float where the plan keeps them (MixDQ's BOS-aware handling).

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
from diffquant.outliers.calibrate import set_branch_factors
from diffquant.outliers.low_rank import low_rank_factors
from diffquant.progress import track
from diffquant.quant.config import WeightConfig, format_observer
from diffquant.quant.float_formats import FLOAT_FORMATS
from diffquant.quant.gptq import LayerHessian, column_order, gptq_layer
from diffquant.quant.modules import QuantConv2d, QuantLinear, groups_allowed
from diffquant.quant.plan import QUANTIZABLE, quantizable_layers, set_module
from diffquant.quant.transforms import LowRankBranch, max_rank
from diffquant.sampling import Trajectories, denoiser_outputs

SENSITIVITY_CODE_VERSION = "3"
COLUMNS = ("layer", "kind", "bits", "group_size", "sqnr_db", "noise", "content", "psnr_db", "rank", "format")
OPTIONAL_COLUMNS = frozenset({"rank", "format"})
"""Columns a table written before they existed lacks (read as their defaults: rank 0, format int)."""


@dataclass(frozen=True)
class PlanForm:
    """How the final plan treats layers beyond their bits, so sensitivity measures what it will run.

    Attributes:
        fp_tokens: Layer -> (leading token positions served in float, their FP outputs ``(count,
            out)``): MixDQ's BOS-aware handling (:mod:`diffquant.outlier_tokens`).
        hessians: ``(layer, grouped column order)`` -> input Hessian of the float model on the
            calibration set: that layer's weights are rounded with GPTQ at every option (layers
            without one round to nearest, as GPTQ plans do for convolutions it cannot take).
    """

    fp_tokens: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    hessians: dict[tuple[str, bool], LayerHessian] = field(default_factory=dict)


def _apply_form(
    original: nn.Module,
    replacement: QuantLinear | QuantConv2d,
    name: str,
    weight: WeightConfig | None,
    form: PlanForm,
) -> None:
    """Give ``replacement`` the final plan's GPTQ weight and float leading tokens (``original`` is untouched)."""
    if weight is not None:
        key = (name, column_order(original, weight.granularity == "per_group"))
        if key in form.hessians:
            values, scale = gptq_layer(original, name, form.hessians[key], weight)
            replacement.weight = nn.Parameter(values, requires_grad=False)
            replacement.weight_quantizer.scale.copy_(scale)
    if name in form.fp_tokens:
        count, outputs = form.fp_tokens[name]
        replacement.keep_tokens_in_float(count)
        replacement.fp_token_outputs.copy_(outputs)


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
    group_size: int | None = None,
    form: PlanForm | None = None,
    batch_size: int = 256,
    rank: int = 0,
    weight_format: str = "int",
    act_format: str = "int",
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
        group_size: Group-wise weight scales over this many input channels (None: per channel).
        form: The final plan's GPTQ Hessians and float leading tokens (None: round to nearest, no tokens).
        batch_size: Inputs per forward of the activation calibration pass.
        rank: With a quantized weight, give the layer a float16 low-rank branch of this rank (the
            top singular directions of its weight, :mod:`diffquant.outliers.low_rank`) and quantize
            only the residual ``W - L1 L2``, as a plan with that branch does (0: none).
        weight_format: ``int`` or a float weight format (``weight_bits`` its width; NVFP4 with
            ``group_size`` 16); float weights always round to nearest.
        act_format: ``int`` or an FP8 input format (``act_bits`` 8).

    Raises:
        ConfigError: If a GPTQ layer saw too few calibration rows for its Hessian (``weight.rounding``).
    """
    original = model.get_submodule(name)
    if not isinstance(original, QUANTIZABLE) or isinstance(original, (QuantLinear, QuantConv2d)):
        raise ValueError(f"{name!r} is not a float Linear/Conv2d layer")
    cls = QuantLinear if isinstance(original, nn.Linear) else QuantConv2d
    replacement = cls.from_float(
        original,
        weight_bits,
        act_bits,
        format_observer(weight_format, weight_observer),
        act_observer,
        per_channel=True,
        group_size=group_size,
        weight_format=weight_format,
        act_format=act_format,
    )
    if form is not None:
        granularity = "per_group" if group_size else "per_channel"
        integer = weight_bits and weight_format == "int"
        weight = WeightConfig(weight_bits, granularity, weight_observer, group_size) if integer else None
        _apply_form(original, replacement, name, weight, form)
    if rank and weight_bits is not None:
        _add_branch(original, replacement, rank)
    set_module(model, name, replacement)
    try:
        if act_bits is not None:
            if calib is None:
                raise ValueError("activation sensitivity needs calibration inputs")
            replacement.input_quantizer.start_observing()
            denoiser_outputs(model, calib, conditional, batch_size)
            replacement.input_quantizer.finish_observing()
        yield replacement
    finally:
        set_module(model, name, original)


def _add_branch(original: nn.Module, replacement: QuantLinear | QuantConv2d, rank: int) -> None:
    """Give ``replacement`` a rank-``rank`` float16 branch from ``original``'s weight; requantize the residual."""
    replacement.low_rank = LowRankBranch(original, rank, "float16").to(original.weight.device)
    set_branch_factors(replacement, *low_rank_factors(original.weight, rank, "float16"))


def branch_ranks(layer: nn.Module, ranks: Sequence[int]) -> list[int]:
    """The nonzero ``ranks`` a layer can take a branch of (``rank <= min(out, in)``; no grouped convolutions)."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return []
    return [rank for rank in dict.fromkeys(ranks) if 0 < rank <= max_rank(layer)]


def noise_power(sqnr: float) -> float:
    """Relative noise power ``10 ** (-SQNR / 10)`` (0 for a lossless layer)."""
    return 0.0 if math.isinf(sqnr) else 10.0 ** (-sqnr / 10.0)


Row = dict[str, float | int | str | None]


@dataclass
class SensitivityTable:
    """Rows of (layer, kind, bits, group_size, sqnr_db, noise, content, psnr_db, rank, format).

    ``kind`` is ``weight`` or ``activation``; ``group_size`` is set for group-wise weight rows;
    ``rank`` (weight rows) is the rank of the low-rank branch the weight was measured with (0:
    none); ``format`` is ``int`` or the float format of the row; ``content`` and ``psnr_db`` are
    empty where they were not measured.
    """

    rows: list[Row] = field(default_factory=list)

    def _row(self, layer: str, kind: str, bits: int, group_size: int | None, rank: int = 0, fmt: str = "int") -> Row:
        index = getattr(self, "_index", None)
        if index is None or len(index) != len(self.rows):
            index = {
                (r["layer"], r["kind"], r["bits"], r.get("group_size"), r.get("rank") or 0, r.get("format") or "int"): r
                for r in self.rows
            }
            self._index = index
        try:
            return index[(layer, kind, bits, group_size, rank, fmt)]
        except KeyError:
            group = f" in groups of {group_size}" if group_size else ""
            branch = f" with a rank-{rank} branch" if rank else ""
            what = f"{bits} bits" if fmt == "int" else fmt
            raise KeyError(f"no sensitivity for {layer} {kind} {what}{group}{branch}") from None

    def has(
        self, layer: str, kind: str, bits: int, group_size: int | None = None, rank: int = 0, fmt: str = "int"
    ) -> bool:
        """Whether the table holds a row for this layer and option."""
        try:
            self._row(layer, kind, bits, group_size, rank, fmt)
        except KeyError:
            return False
        return True

    def noise(
        self,
        layer: str,
        kind: str,
        bits: int | None,
        group_size: int | None = None,
        metric: str = "sqnr",
        rank: int = 0,
        fmt: str = "int",
    ) -> float:
        """Relative noise power of quantizing ``kind`` of ``layer`` at ``bits`` (0 for float).

        Args:
            layer: Layer FQN.
            kind: ``weight`` or ``activation``.
            bits: Bit-width, None for float.
            group_size: Group size of a group-wise weight option.
            metric: ``sqnr`` (denoiser output) or ``psnr`` (final samples, where measured).
            rank: Rank of the weight's low-rank branch (0: none).
            fmt: ``int`` or the part's float format.
        """
        if bits is None:
            return 0.0
        row = self._row(layer, kind, bits, group_size, rank, fmt)
        if metric == "psnr":
            if row.get("psnr_db") in (None, ""):
                raise KeyError(f"no final-sample PSNR for {layer} {kind} {bits} bits")
            return noise_power(float(row["psnr_db"]))
        return float(row["noise"])

    def content(
        self,
        layer: str,
        kind: str,
        bits: int | None,
        group_size: int | None = None,
        rank: int = 0,
        fmt: str = "int",
    ) -> float:
        """Content-metric value (0 for float or where it was not measured)."""
        if bits is None:
            return 0.0
        value = self._row(layer, kind, bits, group_size, rank, fmt).get("content")
        return 0.0 if value in (None, "") else float(value)

    def save_csv(self, path: Path) -> Path:
        """Write the table as CSV (atomically)."""
        from diffquant.storage import atomic_path

        with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k) for k in COLUMNS})
        return Path(path)

    @classmethod
    def load_csv(cls, path: Path) -> SensitivityTable:
        """Read a table written by :meth:`save_csv`.

        Raises:
            ValueError: If the file lacks a column of :data:`COLUMNS`.
        """

        def optional(value: str | None, kind: type) -> float | int | None:
            return kind(value) if value not in (None, "") else None

        rows = []
        with Path(path).open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = set(COLUMNS) - OPTIONAL_COLUMNS - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: not a sensitivity table (missing {', '.join(sorted(missing))})")
            for row in reader:
                rows.append(
                    {
                        "layer": row["layer"],
                        "kind": row["kind"],
                        "bits": int(row["bits"]),
                        "group_size": optional(row["group_size"], int),
                        "sqnr_db": float(row["sqnr_db"]),
                        "noise": float(row["noise"]),
                        "content": optional(row["content"], float),
                        "psnr_db": optional(row["psnr_db"], float),
                        "rank": optional(row.get("rank"), int) or 0,
                        "format": row.get("format") or "int",
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
    group_options: Sequence[tuple[int, int]] = (),
    final_fn: Callable[[nn.Module, str], dict[str, float]] | None = None,
    description: str = "Measuring layer sensitivity",
    form: PlanForm | None = None,
    batch_size: int = 256,
    ranks: Sequence[int] = (),
    weight_formats: Sequence[str] = (),
    act_formats: Sequence[str] = (),
) -> SensitivityTable:
    """Measure every layer's weight and input sensitivity at each candidate option.

    Args:
        unet: The FP denoiser (restored after every measurement).
        calib: Calibration inputs; SQNR is taken over all of them.
        conditional: Pass class labels.
        weight_bits: Candidate per-channel weight bit-widths.
        act_bits: Candidate input bit-widths.
        layers: Layers to measure (default: every Linear/Conv2d).
        weight_observer: Weight observer.
        act_observer: Activation observer.
        group_options: ``(bits, group_size)`` group-wise weight candidates, measured on the
            layers that allow them.
        final_fn: ``(model, layer) -> {"content": ..., "psnr_db": ...}`` final-sample metrics
            for this measurement (an empty dict where none are wanted for the layer).
        description: Progress-bar label.
        form: The final plan's GPTQ Hessians and float leading tokens, applied to every row of
            the layers they name (weight and input rows alike).
        batch_size: Inputs per forward pass.
        ranks: Low-rank branch ranks: each per-channel weight candidate is also measured with a
            branch of each nonzero rank the layer takes (:func:`branch_ranks`).
        weight_formats: Float weight formats, each measured at its width (NVFP4 in its blocks, on
            the layers whose input channels they divide).
        act_formats: FP8 input formats, measured at 8 bits.

    Returns:
        The table, one row per (layer, kind, bits, group size, rank, format).
    """
    layers = list(layers) if layers is not None else quantizable_layers(unet)
    reference = denoiser_outputs(unet, calib, conditional, batch_size)
    jobs: list[tuple[str, str, int, int | None, int, str]] = []
    for name in layers:
        module = unet.get_submodule(name)
        jobs += [(name, "weight", bits, None, 0, "int") for bits in weight_bits]
        jobs += [(name, "weight", bits, None, r, "int") for r in branch_ranks(module, ranks) for bits in weight_bits]
        jobs += [(name, "weight", b, g, 0, "int") for b, g in group_options if groups_allowed(module, g)]
        for fmt in weight_formats:
            spec = FLOAT_FORMATS[fmt]
            if spec.block_size is None or groups_allowed(module, spec.block_size):
                jobs.append((name, "weight", spec.bits, spec.block_size, 0, fmt))
        jobs += [(name, "activation", bits, None, 0, "int") for bits in act_bits]
        jobs += [(name, "activation", 8, None, 0, fmt) for fmt in act_formats]
    table = SensitivityTable()
    with torch.no_grad(), track(description, len(jobs)) as bar:
        for name, kind, bits, group, rank, fmt in jobs:
            w, a = (bits, None) if kind == "weight" else (None, bits)
            w_fmt, a_fmt = (fmt, "int") if kind == "weight" else ("int", fmt)
            with quantize_only(
                unet,
                name,
                w,
                a,
                calib,
                conditional,
                weight_observer,
                act_observer,
                group,
                form,
                batch_size,
                rank,
                w_fmt,
                a_fmt,
            ):
                sqnr = sqnr_db(reference, denoiser_outputs(unet, calib, conditional, batch_size))
                extra = final_fn(unet, name) if final_fn is not None else {}
            table.rows.append(
                {
                    "layer": name,
                    "kind": kind,
                    "bits": bits,
                    "group_size": group,
                    "sqnr_db": sqnr,
                    "noise": noise_power(sqnr),
                    "content": extra.get("content"),
                    "psnr_db": extra.get("psnr_db"),
                    "rank": rank,
                    "format": fmt,
                }
            )
            bar.advance()
    return table
