"""The cost model of mixed precision: per-layer MACs, bytes, average bits and BitOps, and the program they build."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from diffquant.mixed_precision.solver import AllocationProblem
from diffquant.placement import module_placement, to_module
from diffquant.quant.config import WeightConfig, format_observer
from diffquant.quant.float_formats import FLOAT_FORMATS
from diffquant.quant.plan import QUANTIZABLE, quantized_weight_bytes, stored_weight_bytes

FLOAT_BITS = 32
"""Bits charged for a weight or input kept in float32."""

WeightChoice = tuple[int | None, int | None]
"""A weight candidate: ``(bits, group_size)``; ``(None, None)`` keeps float."""


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
        device, dtype = module_placement(unet)
        unet(to_module(x[:1], device, dtype), t[:1].to(device), None if y is None else y[:1].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return macs


LOW_RANK_BITS = 16
"""Bits of a low-rank branch's weights and inputs: it runs in 16-bit float beside the quantized GEMM."""


def low_rank_costs(fan_in: int, out: int, macs: int, rank: int, bits: int = LOW_RANK_BITS) -> tuple[int, float]:
    """``(bytes, BitOps)`` a rank-``rank`` branch adds to a layer with ``macs`` multiply-accumulates per call.

    The branch stores ``rank * (fan_in + out)`` values of ``bits`` bits and computes
    ``macs * rank * (fan_in + out) / (fan_in * out)`` MACs (``L2``: ``fan_in -> rank``, ``L1``:
    ``rank -> out``, at every output position), charged at ``bits x bits``. A (bits, rank)
    allocation option (``allocation.ranks``) adds these to its weight option's costs.
    """
    values = rank * (fan_in + out)
    branch_macs = macs * values / (fan_in * out)
    return -(-values * bits // 8), branch_macs * bits * bits


def plan_bitops(unet: nn.Module, plan: Mapping[str, Any], macs: Mapping[str, int]) -> float:
    """BitOps of one call under ``plan``: MACs x weight bits x input bits per layer (32 for float), plus low-rank branches.

    Args:
        unet: The denoiser (float or quantized; only layer shapes are read).
        plan: Layer -> :class:`~diffquant.quant.plan.LayerConfig`; layers not in it count as float.
        macs: MACs per layer and call (:func:`layer_macs`).
    """
    total = 0.0
    for name, count in macs.items():
        cfg = plan.get(name)
        w_bits = cfg.weight.bits if cfg is not None and cfg.weight is not None else FLOAT_BITS
        a_bits = cfg.activation.bits if cfg is not None and cfg.activation is not None else FLOAT_BITS
        total += count * w_bits * a_bits
        low_rank = getattr(cfg, "low_rank", None)
        if low_rank is not None:
            layer = unet.get_submodule(name)
            bits = 32 if low_rank.dtype == "float32" else LOW_RANK_BITS
            total += low_rank_costs(layer.weight[0].numel(), layer.weight.shape[0], count, low_rank.rank, bits)[1]
    return total


def _short(fmt: str) -> str:
    return fmt.replace("_", "")


def option_name(
    weight_bits: int | None,
    act_bits: int | None,
    group_size: int | None = None,
    rank: int = 0,
    weight_format: str = "int",
    act_format: str = "int",
) -> str:
    """Name of an option, e.g. ``w4a8``, ``w4g32a8`` (group-wise), ``wfpa8``, ``w4a8r16``, ``wfp8e4m3afp8e4m3``.

    ``rank`` > 0 adds an SVDQuant low-rank branch of that rank beside the quantized weight (``r16``);
    a float format replaces the bits of its part by the format (``fp8e4m3``, ``fp6e3m2``,
    ``fp4e2m1``: NVFP4, whose blocks of 16 the name leaves implicit).
    """
    if weight_format != "int":
        weight = _short(weight_format)
    else:
        weight = f"{weight_bits or 'fp'}{f'g{group_size}' if group_size else ''}"
    act = _short(act_format) if act_format != "int" else f"{act_bits or 'fp'}"
    branch = f"r{rank}" if rank else ""
    return f"w{weight}a{act}{branch}"


@dataclass(frozen=True)
class Option:
    """One precision option of a layer in the allocation program.

    Attributes:
        weight_bits: Weight bits (None: float weight); a float format's own width.
        group_size: Weight scales per this many input channels (None: per output channel).
        act_bits: Input bits (None: float input).
        rank: Rank of a float16 low-rank branch beside the quantized weight (0: none).
        weight_format: ``int`` or a float weight format (:mod:`diffquant.quant.float_formats`).
        act_format: ``int`` or an FP8 input format.
    """

    weight_bits: int | None
    group_size: int | None
    act_bits: int | None
    rank: int = 0
    weight_format: str = "int"
    act_format: str = "int"

    @property
    def name(self) -> str:
        """The option's name (:func:`option_name`)."""
        return option_name(
            self.weight_bits, self.act_bits, self.group_size, self.rank, self.weight_format, self.act_format
        )

    def weight_config(self, observer: str = "minmax", rounding: str = "nearest") -> WeightConfig | None:
        """The plan's weight entry for this option.

        Float formats always round to nearest, and NVFP4 takes its own per-block absmax recipe
        (observer ``minmax``) whatever the plan's integer weights use.
        """
        if self.weight_bits is None:
            return None
        granularity = "per_group" if self.group_size is not None else "per_channel"
        return WeightConfig(
            self.weight_bits,
            granularity,
            format_observer(self.weight_format, observer),
            self.group_size,
            rounding=rounding if self.weight_format == "int" else "nearest",
            format=self.weight_format,
        )


def grid_options(
    weight_options: Sequence[WeightChoice],
    act_bits: Sequence[int | None],
    ranks: Sequence[int] = (0,),
    weight_formats: Sequence[str] = (),
    act_formats: Sequence[str] = (),
) -> list[Option]:
    """Every (weight, input) candidate pair, in program order.

    Weights: the integer ``(bits, group size)`` candidates, each per-channel one also with a branch
    of every nonzero rank in ``ranks``, then the float ``weight_formats`` at their own widths (NVFP4
    in its blocks of 16). Inputs: the integer ``act_bits``, then the FP8 ``act_formats`` (8 bits).
    """
    ranks = list(dict.fromkeys(ranks)) or [0]
    weights = [(w, g, r, "int") for w, g in weight_options for r in (ranks if w is not None and g is None else [0])]
    weights += [(FLOAT_FORMATS[f].bits, FLOAT_FORMATS[f].block_size, 0, f) for f in weight_formats]
    acts: list[tuple[int | None, str]] = [(a, "int") for a in act_bits]
    acts += [(8, f) for f in act_formats]
    return [Option(w, g, a, r, wf, af) for w, g, r, wf in weights for a, af in acts]


def qkv_groups(layers: Sequence[str], cross_attention: Collection[str] = ()) -> list[list[str]]:
    """Tie the projections of each attention block that read the same input.

    Self-attention's ``to_q``/``to_k``/``to_v`` all read the hidden states; in a cross-attention block
    (``cross_attention``: the blocks' names) only ``to_k``/``to_v`` read the same tensor (the encoder
    states), and ``to_q`` reads the hidden states, so it stays free.
    """
    cross = set(cross_attention)
    by_parent: dict[str, list[str]] = {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        if leaf in {"to_q", "to_k", "to_v"} and not (leaf == "to_q" and parent in cross):
            by_parent.setdefault(parent, []).append(name)
    return [group for group in by_parent.values() if len(group) > 1]


def cross_attention_blocks(model: nn.Module) -> set[str]:
    """Names of the attention blocks whose keys and values read another tensor than their queries."""
    return {name for name, module in model.named_modules() if getattr(module, "is_cross_attention", False)}


def group_fits(channels: int, group_size: int | None) -> bool:
    """Whether a layer with ``channels`` groupable input channels (0: none) takes groups of ``group_size`` (None: no groups)."""
    return group_size is None or (channels > 0 and channels % group_size == 0)


@dataclass
class MixedPrecisionInputs:
    """What :func:`build_problem` needs about the model."""

    layers: list[str]
    weight_numel: dict[str, int]
    out_channels: dict[str, int]
    macs: dict[str, int]
    other_params: int
    group_channels: dict[str, int] = field(default_factory=dict)
    """Input channels that weight groups may split (0 or absent: the layer takes no groups)."""
    max_ranks: dict[str, int] = field(default_factory=dict)
    """Largest low-rank branch each layer takes, ``min(out, fan_in)`` (0 or absent: none, e.g. grouped convolutions)."""


def build_problem(
    inputs: MixedPrecisionInputs,
    noise: Callable[..., float],
    content: Callable[..., float],
    options: Sequence[Option],
    budgets: Mapping[str, float],
    objective_weights: Mapping[str, float],
    groups: Sequence[Sequence[str]] = (),
    pinned: Mapping[str, str] | None = None,
    latency: Mapping[str, Mapping[str, float]] | None = None,
    unavailable: Mapping[str, Collection[str]] | None = None,
    latency_overhead: float = 0.0,
    storage_bits: Callable[[int], int] | None = None,
    float_layers: Collection[str] | None = None,
) -> AllocationProblem:
    """Assemble the allocation program from sensitivities and costs.

    Args:
        inputs: Layers, weight sizes, MACs and the parameter count outside the layers.
        noise: ``(layer, kind, bits, group_size, rank, format) -> noise power`` (kind ``weight``
            or ``activation``; ``rank`` 0 and ``format`` ``int`` for plain integer parts).
        content: The content metric, same arguments.
        options: The candidate options (:func:`grid_options` for the integer grid, plus float
            formats). A group-wise integer option costs ``bits + 32 / g`` average bits (its fp32
            scales) and is unavailable to layers whose ``group_channels`` it does not divide; a
            float format counts its width (NVFP4 ``4 + 8 / 16``: its FP8 block scales) and its
            exact bytes (:func:`diffquant.quant.plan.quantized_weight_bytes`). A branch option
            (``w4a8r16``) is unavailable to layers whose ``max_ranks`` is below its rank and adds
            its float16 values to ``avg_weight_bits`` and ``bytes`` and its MACs at 16 x 16 bits
            to ``bitops`` (:func:`low_rank_costs`).
        budgets: Any of ``avg_weight_bits``, ``bytes`` (all parameters), ``bitops``.
        objective_weights: ``quality`` and ``content`` weights of the normalised metrics.
        groups: Tied layer groups.
        pinned: Layer -> option name.
        latency: Optional lookup ``layer -> option name -> ms``; options missing from it cannot
            be taken by that layer.
        unavailable: Layer -> option names it cannot take (e.g. what its device class cannot run).
        latency_overhead: Milliseconds of the whole graph beyond its layers (a profiled table's
            ``overhead_ms``), charged once, so ``latency_ms`` is the predicted latency of a call.
        storage_bits: ``allocation.cost: deployed``: weight bits -> bits of the type the export
            stores them in (:meth:`diffquant.devices.DeviceClass.storage_bits`); ``avg_weight_bits``
            then counts the stored bits and ``bytes`` the stored integers, scales and zero points
            (:func:`diffquant.quant.plan.stored_weight_bytes`); float formats are stored as
            planned. None: the plan's bits.
        float_layers: Layers that may take the float option ``wfpafp`` although it is not a
            candidate (the family's full-precision layers, pinned to it); None: no such option.
    """
    options = list(options)
    float_option = Option(None, None, None)
    if float_layers is not None and float_option not in options:
        options.append(float_option)
    else:
        float_layers = None
    names = [option.name for option in options]
    n_l, n_o = len(inputs.layers), len(options)
    quality = np.zeros((n_l, n_o))
    semantic = np.zeros((n_l, n_o))
    avg_bits = np.zeros((n_l, n_o))
    size = np.zeros((n_l, n_o))
    bitops = np.zeros((n_l, n_o))
    total_weights = sum(inputs.weight_numel.values())
    for i, layer in enumerate(inputs.layers):
        n = inputs.weight_numel[layer]
        channels = inputs.group_channels.get(layer, 0)
        refused = set((unavailable or {}).get(layer, ()))
        if float_layers is not None and layer not in float_layers:
            refused.add(names[-1])
        for j, option in enumerate(options):
            w, g, r, a = option.weight_bits, option.group_size, option.rank, option.act_bits
            if not group_fits(channels, g) or names[j] in refused or r > inputs.max_ranks.get(layer, 0):
                quality[i, j] = semantic[i, j] = np.nan
                continue
            weight_part = (layer, "weight", w, g, r, option.weight_format)
            act_part = (layer, "activation", a, None, 0, option.act_format)
            quality[i, j] = noise(*weight_part) + noise(*act_part)
            semantic[i, j] = content(*weight_part) + content(*act_part)
            out = inputs.out_channels[layer]
            if w is None:
                avg_bits[i, j] = FLOAT_BITS * n / total_weights
                size[i, j] = n * 4
            elif option.weight_format != "int":
                config = option.weight_config()
                assert config is not None
                per_value = w + (8 / g if g else 0.0)  # NVFP4: one FP8 block scale per g values
                avg_bits[i, j] = per_value * n / total_weights
                size[i, j] = quantized_weight_bytes((out, n // out), config)
            else:
                stored = storage_bits(w) if storage_bits is not None else w
                avg_bits[i, j] = (stored + (FLOAT_BITS / g if g else 0.0)) * n / total_weights
                scales = n // g if g else out
                if storage_bits is not None:
                    size[i, j] = stored_weight_bytes(n, scales, stored)
                else:
                    size[i, j] = -(-n * w // 8) + 4 * scales
            bitops[i, j] = inputs.macs.get(layer, 0) * (w or FLOAT_BITS) * (a or FLOAT_BITS)
            if r:
                branch_bytes, branch_bitops = low_rank_costs(n // out, out, inputs.macs.get(layer, 0), r)
                avg_bits[i, j] += branch_bytes * 8 / total_weights
                size[i, j] += branch_bytes
                bitops[i, j] += branch_bitops
    size[0, :] += inputs.other_params * 4

    def normalised(matrix: np.ndarray) -> np.ndarray:
        top = float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 0.0
        return matrix / top if top > 0 else matrix

    cost = objective_weights.get("quality", 1.0) * normalised(quality)
    cost = cost + objective_weights.get("content", 1.0) * normalised(semantic)
    resources = {"avg_weight_bits": avg_bits, "bytes": size, "bitops": bitops}
    if latency is not None:
        table = np.full((n_l, n_o), np.nan)
        for i, layer in enumerate(inputs.layers):
            for j, name in enumerate(names):
                table[i, j] = latency.get(layer, {}).get(name, np.nan)
        cost = np.where(np.isfinite(table), cost, np.nan)
        resources["latency_ms"] = np.nan_to_num(table, nan=0.0)
        resources["latency_ms"][0, :] += latency_overhead
    return AllocationProblem(inputs.layers, names, cost, resources, dict(budgets), groups, dict(pinned or {}))
