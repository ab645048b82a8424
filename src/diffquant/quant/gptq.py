"""GPTQ weight rounding (Frantar et al., 2022): error-compensating rounding on calibration inputs.

GPTQ rounds weights column by column, compensating each column's rounding error on the columns
not yet rounded, weighted by the layer's input Hessian.

For a layer ``y = W x`` with calibration inputs ``X`` (rows: input vectors), GPTQ minimises
``||X W^T - X Q^T||^2`` over grid weights ``Q`` greedily with the Hessian ``H = 2 X^T X``:

1. Hessians: forward hooks on the FLOAT model (before the plan replaces any layer) accumulate
   ``2 X^T X`` per planned layer (float32 per forward call, summed in float64). Linear inputs are
   flattened over batch and tokens; Conv2d inputs are unfolded with the layer's kernel, stride,
   padding and dilation (``groups == 1`` and numeric zero padding only; other convolutions fall
   back to round-to-nearest, with a log line).
2. Damping ``percdamp * mean(diag H)`` (default 0.01) is added to the diagonal. Dead columns (an
   input that is always zero: ``H_jj == 0``) get ``H_jj = 1``; they are decoupled from every other
   column and so round to nearest (the reference code zeroes them instead; keeping the nearest
   value is harmless on the calibration data and safer on other inputs).
3. The upper Cholesky factor of ``H^-1`` drives blockwise column updates (blocks of 128 columns,
   lazy batch updates of the later columns), optionally in act-order (columns by decreasing
   ``diag H``, permuted back at the end).
4. Scales: per-channel and per-tensor scales are the ones round-to-nearest uses (the weight's
   observer on the float weight). Group-wise scales are computed when the group's first column
   (in processing order) is reached, from the group's current, error-updated weights, with the same
   observer and the same ``[O, I // g, *k]`` layout as round-to-nearest, so export is unchanged.
   A Conv2d weight is processed with its columns ordered (kernel position, input channel) when
   grouped, so every group is one contiguous run of ``g`` columns.

The result is stored as the layer's float weight: the dequantized grid values ``q * s`` (float32),
which the fake quantizer maps to themselves bit for bit, and the scales in the weight quantizer.
So :func:`diffquant.quant.plan.quantizer_state`, the ONNX export (which rounds ``w / s``) and the
fake-quant model all see exactly the GPTQ integers. The float weights are changed, so
:func:`diffquant.ptq.save_quantized` also saves ``<layer>.weight`` of GPTQ layers
(:func:`gptq_weight_state`).

Memory: all of a group's Hessians are held at once, in float64 (``8 * columns^2`` bytes per layer).
Layers are taken in module order in groups whose Hessians fit :data:`HESSIAN_BUDGET_BYTES`; each
group runs the calibration data once through the float model. Solutions are kept and installed
after the last group, so every Hessian comes from the float model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from diffquant.errors import ConfigError
from diffquant.quant.formats import IntFormat
from diffquant.quant.observers import weight_scale

logger = logging.getLogger(__name__)

DEFAULT_PERCDAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
DEFAULT_ACT_ORDER = True
MIN_ROWS_PER_COLUMN = 0.25
"""A layer needs at least ``columns / 4`` calibration input rows for its Hessian; fewer is refused."""
HESSIAN_BUDGET_BYTES = 2 << 30
"""Float64 Hessian bytes held at once (layers are grouped in module order to fit; one layer at least)."""


@dataclass(frozen=True)
class GPTQResult:
    """A GPTQ solution of one 2-D weight ``[O, C]``.

    Attributes:
        q: The integers (as float), shape ``[O, C]``.
        scale: Scales: ``()`` per tensor, ``[O]`` per channel, ``[O, C // g]`` per group.
    """

    q: torch.Tensor
    scale: torch.Tensor


def _row_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    return scale.reshape(1).expand(rows) if scale.dim() == 0 else scale


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntFormat,
    observer: str = "minmax",
    granularity: str = "per_channel",
    group_size: int | None = None,
    *,
    act_order: bool = DEFAULT_ACT_ORDER,
    percdamp: float = DEFAULT_PERCDAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> GPTQResult:
    """Run GPTQ on a 2-D weight ``[O, C]`` with Hessian ``[C, C]`` (groups: contiguous ``g`` columns).

    Args:
        weight: The float weight.
        hessian: ``2 X^T X`` of the layer's inputs (any positive multiple gives the same result).
        fmt: Integer format.
        observer: Weight range observer (``minmax``, ``percentile``, ``mse``).
        granularity: ``per_channel``, ``per_tensor`` or ``per_group``.
        group_size: Columns per group (``per_group`` only).
        act_order: Process columns by decreasing ``diag H``.
        percdamp: Damping as a fraction of the mean diagonal.
        block_size: Columns per lazy-update block.

    Raises:
        ConfigError: If the damped Hessian is not positive definite.
    """
    w_float = weight.detach().float()
    rows, cols = w_float.shape
    work = w_float.double().clone()
    hess = hessian.detach().double().clone()
    dead = torch.diag(hess) == 0
    hess[dead, dead] = 1.0
    hess += percdamp * torch.mean(torch.diag(hess)) * torch.eye(cols, dtype=hess.dtype)
    perm = torch.argsort(torch.diag(hess), descending=True, stable=True) if act_order else torch.arange(cols)
    work = work[:, perm]
    hess = hess[perm][:, perm]
    try:
        chol = torch.linalg.cholesky(hess)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    except torch.linalg.LinAlgError:
        raise ConfigError(
            "weight.rounding", "the layer's input Hessian is not positive definite; use more calibration inputs"
        ) from None
    grouped = granularity == "per_group"
    if grouped:
        assert group_size is not None and cols % group_size == 0
        group_scales = torch.zeros(rows, cols // group_size)
        started = torch.zeros(cols // group_size, dtype=torch.bool)
        position = torch.empty(cols, dtype=torch.long)
        position[perm] = torch.arange(cols)  # processing position of each original column
    else:
        fixed = weight_scale(w_float, fmt, observer, 0 if granularity == "per_channel" else None)
        fixed_rows = _row_scale(fixed, rows).double()
    ints = torch.zeros_like(work)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = work[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped:
                g = int(perm[col]) // group_size
                if not started[g]:
                    members = position[g * group_size : (g + 1) * group_size]  # all at or after ``col``
                    current = torch.empty(rows, group_size, dtype=work.dtype)
                    inside = members < i2
                    current[:, inside] = block[:, members[inside] - i1]
                    outside = members[~inside]
                    current[:, ~inside] = work[:, outside] - errors[:, :i] @ hinv[i1 : i1 + i][:, outside]
                    group_scales[:, g] = weight_scale(current.float(), fmt, observer, 0)
                    started[g] = True
                s = group_scales[:, g].double()
            else:
                s = fixed_rows
            w = block[:, i]
            q = torch.clamp(torch.round(w / s), fmt.qmin, fmt.qmax)
            ints[:, col] = q
            err = (w - q * s) / hinv_block[i, i]
            block[:, i:] -= err.unsqueeze(1) @ hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        work[:, i2:] -= errors @ hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    scale = group_scales if grouped else fixed
    return GPTQResult(ints[:, inverse].float(), scale)


def dequantized(result: GPTQResult, group_size: int | None = None) -> torch.Tensor:
    """``q * s`` in float32 (2-D), computed as the fake quantizer does, so it is on the grid exactly."""
    q, s = result.q, result.scale
    if s.dim() == 0:
        return q * s
    if s.dim() == 1:
        return q * s.unsqueeze(1)
    assert group_size is not None
    return (q.reshape(q.shape[0], -1, group_size) * s.unsqueeze(2)).reshape(q.shape)


def _conv_supported(layer: nn.Conv2d) -> bool:
    return layer.groups == 1 and not isinstance(layer.padding, str) and layer.padding_mode == "zeros"


def layer_columns(layer: nn.Module, x: torch.Tensor, grouped: bool = False) -> torch.Tensor:
    """The rows ``X`` of a layer's input as GPTQ sees them: ``[rows, columns]`` (float32).

    Linear: flattened over every leading dimension. Conv2d: unfolded patches in PyTorch's
    ``(channel, ky, kx)`` column order, or ``(ky, kx, channel)`` when ``grouped``.
    """
    x = x.detach()
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [N, C*kh*kw, L]
        if grouped:
            n, _, length = cols.shape
            kk = layer.kernel_size[0] * layer.kernel_size[1]
            cols = cols.reshape(n, layer.in_channels, kk, length).transpose(1, 2).reshape(n, -1, length)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).float()
    return x.reshape(-1, x.shape[-1]).float()


def weight_2d(layer: nn.Module, grouped: bool = False) -> torch.Tensor:
    """The layer's weight as ``[O, columns]`` in :func:`layer_columns`' column order."""
    w = layer.weight.detach().float()
    if w.dim() == 4 and grouped:
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w.reshape(w.shape[0], -1)


def _unflatten(
    layer: nn.Module, w2d: torch.Tensor, scale: torch.Tensor, grouped: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back to the layer's weight shape, and the scale in the quantizer's layout."""
    shape = tuple(layer.weight.shape)
    if len(shape) == 4 and grouped:
        o, c, kh, kw = shape
        weight = w2d.reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
        scale = scale.reshape(o, kh, kw, -1).permute(0, 3, 1, 2).contiguous()
        return weight, scale
    return w2d.reshape(shape).contiguous(), scale


class _HessianHook:
    """Accumulates ``2 X^T X`` and the row count of a layer's inputs.

    Each forward call's ``X^T X`` is a float32 product (float64 is several times slower on CPU for
    the many rows of unfolded convolution inputs), summed over calls in float64.
    """

    def __init__(self, layer: nn.Module, grouped: bool) -> None:
        self.layer, self.grouped = layer, grouped
        columns = layer.weight[0].numel()
        self.sum = torch.zeros(columns, columns, dtype=torch.float64)
        self.rows = 0

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        x = layer_columns(self.layer, args[0], self.grouped)
        if self.sum.device != x.device:  # the Hessian lives where the layer runs
            self.sum = self.sum.to(x.device)
        self.sum += 2.0 * (x.t() @ x).double()
        self.rows += x.shape[0]


@dataclass(frozen=True)
class LayerHessian:
    """A layer's input Hessian for GPTQ.

    Attributes:
        hessian: ``2 X^T X / rows`` (float64) in :func:`layer_columns`' column order.
        rows: Calibration input rows it was accumulated from.
    """

    hessian: torch.Tensor
    rows: int


def column_order(layer: nn.Module, grouped: bool) -> bool:
    """Whether ``layer``'s GPTQ columns are in the grouped ``(ky, kx, channel)`` order (grouped convolutions only)."""
    return grouped and isinstance(layer, nn.Conv2d)


def gptq_supported(layer: nn.Module) -> bool:
    """Whether GPTQ can round ``layer`` (Linear, or a Conv2d with ``groups == 1`` and numeric zero padding)."""
    if isinstance(layer, nn.Conv2d):
        return _conv_supported(layer)
    return isinstance(layer, nn.Linear)


def hessian_groups(unet: nn.Module, names: list[str]) -> list[list[str]]:
    """``names`` in module order, split into groups whose float64 Hessians fit :data:`HESSIAN_BUDGET_BYTES`."""
    groups: list[list[str]] = []
    used = HESSIAN_BUDGET_BYTES + 1
    for name in names:
        size = 8 * unet.get_submodule(name).weight[0].numel() ** 2
        if used + size > HESSIAN_BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def collect_hessians(
    unet: nn.Module, wanted: dict[str, set[bool]], run: Callable[[nn.Module], Any]
) -> dict[tuple[str, bool], LayerHessian]:
    """The input Hessians of some layers of the FLOAT ``unet`` from one pass of ``run``.

    Args:
        unet: The float denoiser (not changed).
        wanted: Layer -> the column orders it needs (``True``: grouped); both orders of one
            layer come from the same pass.
        run: Runs the calibration data through a module.

    Returns:
        ``{(layer, grouped order): LayerHessian}``; a Linear layer's grouped order is its plain one.
    """
    hooks: dict[tuple[str, bool], _HessianHook] = {}
    handles = []
    for name, orders in wanted.items():
        layer = unet.get_submodule(name)
        for grouped in {column_order(layer, g) for g in orders}:
            hooks[(name, grouped)] = hook = _HessianHook(layer, grouped)
            handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run(unet)
    finally:
        for handle in handles:
            handle.remove()
    return {key: LayerHessian(hook.sum / max(hook.rows, 1), hook.rows) for key, hook in hooks.items()}


def gptq_layer(
    layer: nn.Module,
    name: str,
    hessian: LayerHessian,
    cfg: Any,
    *,
    act_order: bool = DEFAULT_ACT_ORDER,
    percdamp: float = DEFAULT_PERCDAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ weight (on the grid, the layer's shape and dtype) and scale (the quantizer's layout) of one layer.

    Args:
        layer: The float Linear/Conv2d.
        name: Its name (for the error message).
        hessian: Its input Hessian in the column order ``cfg``'s granularity needs.
        cfg: The layer's :class:`~diffquant.quant.config.WeightConfig`.
        act_order: Process columns by decreasing ``diag H``.
        percdamp: Damping as a fraction of the mean Hessian diagonal.
        block_size: Columns per lazy-update block.

    Raises:
        ConfigError: If the layer saw too few calibration input rows for its Hessian.
    """
    columns = hessian.hessian.shape[0]
    if hessian.rows < MIN_ROWS_PER_COLUMN * columns:
        raise ConfigError(
            "weight.rounding",
            f"GPTQ needs at least {int(MIN_ROWS_PER_COLUMN * columns + 0.999)} calibration input rows for "
            f"layer {name} ({columns} input columns) and saw {hessian.rows}; use more calibration data or "
            "rounding nearest",
        )
    grouped = cfg.granularity == "per_group"
    result = gptq_quantize(
        weight_2d(layer, grouped),
        hessian.hessian,
        IntFormat(cfg.bits),
        cfg.observer,
        cfg.granularity,
        cfg.group_size,
        act_order=act_order,
        percdamp=percdamp,
        block_size=block_size,
    )
    weight, scale = _unflatten(layer, dequantized(result, cfg.group_size), result.scale, grouped)
    return weight.to(layer.weight.dtype), scale


def gptq_layers(plan: Any) -> list[str]:
    """Names of the plan's layers whose weight rounding is GPTQ."""
    return [name for name, cfg in plan.items() if cfg.weight is not None and cfg.weight.rounding == "gptq"]


def plan_gptq_layers(unet: nn.Module, plan: Any) -> list[str]:
    """The plan's GPTQ layers that GPTQ can round (the others round to nearest), in plan order."""
    names = []
    for name in gptq_layers(plan):
        if not gptq_supported(unet.get_submodule(name)):
            logger.info("GPTQ skips %s (grouped or non-zero-padded convolution): round-to-nearest", name)
            continue
        names.append(name)
    return names


def gptq_solve(
    unet: nn.Module,
    plan: Any,
    run: Callable[[nn.Module], Any],
    *,
    act_order: bool = DEFAULT_ACT_ORDER,
    percdamp: float = DEFAULT_PERCDAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ weights and scales of the plan's GPTQ layers, from the FLOAT ``unet`` (not changed).

    Args:
        unet: The float denoiser (before :func:`diffquant.quant.plan.apply_plan`).
        plan: The layer plan.
        run: Runs the calibration data through a module (called once per group of layers).
        act_order: Process columns by decreasing ``diag H``.
        percdamp: Damping as a fraction of the mean Hessian diagonal.
        block_size: Columns per lazy-update block.

    Returns:
        ``{layer: (weight on the grid, scale in the quantizer's layout)}``.

    Raises:
        ConfigError: If a layer sees too few calibration input rows for its Hessian.
    """
    groups = hessian_groups(unet, plan_gptq_layers(unet, plan))
    solutions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for group in groups:
        wanted = {name: {plan[name].weight.granularity == "per_group"} for name in group}
        hessians = collect_hessians(unet, wanted, run)
        for name in group:
            layer, cfg = unet.get_submodule(name), plan[name].weight
            key = (name, column_order(layer, cfg.granularity == "per_group"))
            solutions[name] = gptq_layer(
                layer, name, hessians.pop(key), cfg, act_order=act_order, percdamp=percdamp, block_size=block_size
            )
    logger.info("GPTQ rounded %d layers (%d calibration passes)", len(solutions), len(groups))
    return solutions


def install_gptq(unet: nn.Module, solutions: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set the quantized layers' weights and weight scales to their GPTQ solutions (after ``apply_plan``)."""
    with torch.no_grad():
        for name, (weight, scale) in solutions.items():
            layer = unet.get_submodule(name)
            layer.weight.copy_(weight)
            layer.weight_quantizer.scale.copy_(scale)


def gptq_weight_state(unet: nn.Module, plan: Any) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": weight}`` of the plan's GPTQ layers (their float weights were replaced)."""
    return {f"{name}.weight": unet.get_submodule(name).weight.detach().clone() for name in gptq_layers(plan)}


def load_gptq_weight_state(unet: nn.Module, plan: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Restore the GPTQ layers' weights from ``state``; return the rest of ``state`` (the scales).

    Raises:
        ValueError: If a GPTQ layer's weight is missing from ``state``.
    """
    wanted = {f"{name}.weight" for name in gptq_layers(plan)}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"saved scales lack the GPTQ weights of {missing[:3]}")
    with torch.no_grad():
        for key in wanted:
            unet.get_submodule(key.rsplit(".", 1)[0]).weight.copy_(state[key])
    return {k: v for k, v in state.items() if k not in wanted}
