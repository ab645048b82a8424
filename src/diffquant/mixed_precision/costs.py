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
from diffquant.quant.plan import QUANTIZABLE, stored_weight_bytes

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
    ``rank -> out``, at every output position), charged at ``bits x bits``. A later (bits, rank)
    allocation option adds these to its weight option's costs.
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


def option_name(weight_bits: int | None, act_bits: int | None, group_size: int | None = None) -> str:
    """Name of a (weight, activation) option, e.g. ``w4a8``, ``w4g32a8`` (group-wise) or ``wfpa8``."""
    group = f"g{group_size}" if group_size else ""
    return f"w{weight_bits or 'fp'}{group}a{act_bits or 'fp'}"


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


def build_problem(
    inputs: MixedPrecisionInputs,
    noise: Callable[[str, str, int | None, int | None], float],
    content: Callable[[str, str, int | None, int | None], float],
    weight_options: Sequence[WeightChoice],
    act_bits: Sequence[int | None],
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
        noise: ``(layer, kind, bits, group_size) -> noise power`` (kind ``weight`` or ``activation``).
        content: ``(layer, kind, bits, group_size) -> content metric``.
        weight_options: Candidate ``(bits, group_size)`` weights (``(None, None)``: float). A
            group-wise option costs ``bits + 32 / g`` average bits (its fp32 scales) and is
            unavailable to layers whose ``group_channels`` it does not divide.
        act_bits: Candidate input bits (None: float).
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
            (:func:`diffquant.quant.plan.stored_weight_bytes`). None: the plan's bits.
        float_layers: Layers that may take the float option ``wfpafp`` although it is not a
            candidate (the family's full-precision layers, pinned to it); None: no such option.
    """
    options = [(w, g, a) for w, g in weight_options for a in act_bits]
    if float_layers is not None and (None, None, None) not in options:
        options.append((None, None, None))
    else:
        float_layers = None
    names = [option_name(w, a, g) for w, g, a in options]
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
        for j, (w, g, a) in enumerate(options):
            if not group_fits(channels, g) or names[j] in refused:
                quality[i, j] = semantic[i, j] = np.nan
                continue
            quality[i, j] = noise(layer, "weight", w, g) + noise(layer, "activation", a, None)
            semantic[i, j] = content(layer, "weight", w, g) + content(layer, "activation", a, None)
            bits = w or FLOAT_BITS
            stored = storage_bits(w) if w is not None and storage_bits is not None else bits
            avg_bits[i, j] = (stored + (FLOAT_BITS / g if g else 0.0)) * n / total_weights
            scales = n // g if g else inputs.out_channels[layer]
            if w is None:
                size[i, j] = n * 4
            elif storage_bits is not None:
                size[i, j] = stored_weight_bytes(n, scales, stored)
            else:
                size[i, j] = -(-n * w // 8) + 4 * scales
            bitops[i, j] = inputs.macs.get(layer, 0) * bits * (a or FLOAT_BITS)
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
