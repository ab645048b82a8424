"""LayerPlan: the per-layer precision decision, and its application to a model by layer name.

A plan maps every quantizable layer's fully qualified name (FQN) to
``{"weight": {...} | None, "activation": {...} | None}``; ``None`` means full precision.
Conv2d layers may also carry ``"output": {...}``: a per-tensor quantizer on the layer's output,
used by the onnxruntime export form (:func:`with_output_quantizers`). Plans with output
quantizers are saved as version 2; plans without are saved as version 1, as before.
A layer may also carry the outlier methods of :mod:`diffquant.quant.transforms`:
``"shift": "channel"``, ``"smooth": {"alpha": 0.5, "into": <norm or Linear FQN> | null}`` and
``"low_rank": {"rank": 32, "dtype": "float16"}``; a plan with any of them is saved as version 3
(their tensors are saved with the quantizer scales).
Full-precision globs are resolved once, when the plan is built, so the JSON artifact is the
single source of truth for quantize, export and the report.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import torch
from pydantic import ValidationError
from torch import nn

from diffquant.quant.config import ActivationFormat, WeightConfig, format_problem, one_line
from diffquant.quant.formats import MAX_BITS, MIN_BITS
from diffquant.quant.modules import FakeQuantizer, QuantConv2d, QuantLinear, groups_allowed
from diffquant.quant.transforms import (
    LOW_RANK_DTYPES,
    LowRankBranch,
    fan_in,
    input_channels,
    make_input_transform,
    max_rank,
)

if TYPE_CHECKING:
    from diffquant.devices import DeviceClass

QUANTIZABLE = (nn.Linear, nn.Conv2d)
ACTIVATION_FORMATS: tuple[str, ...] = get_args(ActivationFormat)
PLAN_VERSION = 1
PLAN_VERSION_OUTPUTS = 2
PLAN_VERSION_TRANSFORMS = 3
SUPPORTED_PLAN_VERSIONS = (PLAN_VERSION, PLAN_VERSION_OUTPUTS, PLAN_VERSION_TRANSFORMS)


@dataclass(frozen=True)
class ActivationConfig:
    """Activation quantization of one layer's input or output (per tensor).

    ``format`` is ``int`` or an FP8 format (``fp8_e4m3``, ``fp8_e5m2``; ``bits`` 8).
    """

    bits: int
    observer: str = "minmax"
    format: str = "int"

    @property
    def is_float(self) -> bool:
        """Whether the activation takes a floating-point format."""
        return self.format != "int"


@dataclass(frozen=True)
class SmoothConfig:
    """SmoothQuant on one layer's input: its migration strength and where ``1 / s`` went.

    ``into`` is the FQN of the norm (its affine) or Linear (its output rows) that ``1 / s`` was
    folded into; None: the layer multiplies its input by ``1 / s`` before its input quantizer.
    """

    alpha: float
    into: str | None = None


@dataclass(frozen=True)
class LowRankConfig:
    """SVDQuant's low-rank branch of one layer: ``rank`` and the value type of its factors."""

    rank: int
    dtype: str = "float16"


@dataclass(frozen=True)
class LayerConfig:
    """Precision of one layer; None parts stay in float.

    ``fp_tokens`` (Linear layers over text-encoder states only) is the number of leading token
    positions whose outputs are precomputed in full precision instead of quantized (MixDQ's
    BOS-aware quantization; see :mod:`diffquant.outlier_tokens`). ``output`` (Conv2d layers
    only) quantizes the layer's output per tensor, for the onnxruntime export form.

    ``shift``, ``smooth`` and ``low_rank`` are the outlier methods of
    :mod:`diffquant.quant.transforms` (a per-channel input shift, SmoothQuant scales, a low-rank
    branch); the first two need a quantized input, the branch a quantized weight.
    """

    weight: WeightConfig | None
    activation: ActivationConfig | None
    fp_tokens: int = 0
    output: ActivationConfig | None = None
    shift: bool = False
    smooth: SmoothConfig | None = None
    low_rank: LowRankConfig | None = None

    @property
    def is_full_precision(self) -> bool:
        """True when neither weight nor input is quantized."""
        return self.weight is None and self.activation is None

    @property
    def has_transforms(self) -> bool:
        """True when the layer carries a shift, smoothing or a low-rank branch."""
        return self.shift or self.smooth is not None or self.low_rank is not None


class LayerPlan(dict[str, LayerConfig]):
    """Mapping of layer FQN to :class:`LayerConfig`, with JSON round-trip."""

    def to_json_dict(self) -> dict[str, Any]:
        """Return ``{fqn: {"weight": ..., "activation": ...}}`` in layer order."""

        def part(cfg: WeightConfig | ActivationConfig | None) -> dict[str, Any] | None:
            if cfg is None:
                return None
            data = dict(cfg.__dict__)
            if data.get("group_size", 0) is None:
                del data["group_size"]
            for key, default in (("rounding", "nearest"), ("format", "int")):
                if data.get(key) == default:  # defaults are left out: plan files stay as before
                    del data[key]
            return data

        def layer(cfg: LayerConfig) -> dict[str, Any]:
            data: dict[str, Any] = {"weight": part(cfg.weight), "activation": part(cfg.activation)}
            if cfg.fp_tokens:
                data["fp_tokens"] = cfg.fp_tokens
            if cfg.output is not None:
                data["output"] = part(cfg.output)
            if cfg.shift:
                data["shift"] = "channel"
            if cfg.smooth is not None:
                data["smooth"] = {"alpha": cfg.smooth.alpha, "into": cfg.smooth.into}
            if cfg.low_rank is not None:
                data["low_rank"] = {"rank": cfg.low_rank.rank, "dtype": cfg.low_rank.dtype}
            return data

        return {name: layer(c) for name, c in self.items()}

    @property
    def has_outputs(self) -> bool:
        """True when any layer quantizes its output (the onnxruntime export form)."""
        return any(cfg.output is not None for cfg in self.values())

    @property
    def has_transforms(self) -> bool:
        """True when any layer carries a shift, smoothing or a low-rank branch."""
        return any(cfg.has_transforms for cfg in self.values())

    @property
    def version(self) -> int:
        """JSON format version: 3 with outlier transforms, 2 with output quantizers, else 1."""
        if self.has_transforms:
            return PLAN_VERSION_TRANSFORMS
        return PLAN_VERSION_OUTPUTS if self.has_outputs else PLAN_VERSION

    def save(self, path: Path) -> Path:
        """Write the plan as JSON (atomically), at the lowest version that holds it."""
        from diffquant.storage import write_json

        return write_json({"version": self.version, "layers": self.to_json_dict()}, path, sort_keys=False)

    @classmethod
    def from_json_dict(cls, layers: dict[str, Any]) -> LayerPlan:
        """Parse the ``layers`` mapping of a saved plan, validating bit-widths."""
        plan = cls()
        for name, cfg in layers.items():
            try:
                for part in ("weight", "activation", "output"):
                    bits = (cfg.get(part) or {}).get("bits")
                    if isinstance(bits, int) and not MIN_BITS <= bits <= MAX_BITS:
                        raise ValueError(f"bits {bits} outside {MIN_BITS}-{MAX_BITS}")
                weight = WeightConfig(**cfg["weight"]) if cfg.get("weight") else None
                act = _activation(cfg.get("activation"))
                output = _activation(cfg.get("output"))
            except ValidationError as error:
                raise ValueError(f"layer {name!r}: {one_line(error)}") from None
            except (TypeError, ValueError) as error:
                raise ValueError(f"layer {name!r}: {error}") from None
            for part in (weight, act, output):
                if part is not None and not MIN_BITS <= part.bits <= MAX_BITS:
                    raise ValueError(f"layer {name!r}: bits {part.bits} outside {MIN_BITS}-{MAX_BITS}")
            fp_tokens = int(cfg.get("fp_tokens", 0))
            if fp_tokens < 0:
                raise ValueError(f"layer {name!r}: fp_tokens must be >= 0, got {fp_tokens}")
            try:
                shift, smooth, low_rank = _parse_transforms(cfg)
            except (TypeError, ValueError) as error:
                raise ValueError(f"layer {name!r}: {error}") from None
            plan[name] = LayerConfig(weight, act, fp_tokens, output, shift, smooth, low_rank)
        return plan

    @classmethod
    def load(cls, path: Path) -> LayerPlan:
        """Read a plan written by :meth:`save` (version 1, or 2 with output quantizers)."""
        data = json.loads(Path(path).read_text())
        version = data.get("version")
        if version not in SUPPORTED_PLAN_VERSIONS:
            raise ValueError(f"{path}: unsupported plan version {version!r}")
        plan = cls.from_json_dict(data["layers"])
        if version == PLAN_VERSION and plan.has_outputs:
            raise ValueError(f"{path}: a version 1 plan cannot hold output quantizers; save it as version 2")
        if version != PLAN_VERSION_TRANSFORMS and plan.has_transforms:
            raise ValueError(
                f"{path}: a version {version} plan cannot hold shift, smooth or low_rank; save it as version 3"
            )
        return plan

    def quantized_layers(self) -> list[str]:
        """Names of layers with any quantized part."""
        return [name for name, cfg in self.items() if not cfg.is_full_precision]


def _parse_transforms(cfg: dict[str, Any]) -> tuple[bool, SmoothConfig | None, LowRankConfig | None]:
    """The ``shift``, ``smooth`` and ``low_rank`` entries of one saved layer (absent: off)."""
    shift = cfg.get("shift")
    if shift not in (None, "channel"):
        raise ValueError(f"shift must be 'channel' or absent, got {shift!r}")
    smooth = None
    if cfg.get("smooth") is not None:
        entry = dict(cfg["smooth"])
        alpha = float(entry.pop("alpha"))
        into = entry.pop("into", None)
        if entry or not 0.0 <= alpha <= 1.0 or not (into is None or isinstance(into, str)):
            raise ValueError(f"smooth must be {{alpha in [0, 1], into: name or null}}, got {cfg['smooth']!r}")
        smooth = SmoothConfig(alpha, into)
    low_rank = None
    if cfg.get("low_rank") is not None:
        entry = dict(cfg["low_rank"])
        rank, dtype = entry.pop("rank"), entry.pop("dtype", "float16")
        if entry or not isinstance(rank, int) or rank < 1 or dtype not in LOW_RANK_DTYPES:
            raise ValueError(f"low_rank must be {{rank >= 1, dtype float16 | float32}}, got {cfg['low_rank']!r}")
        low_rank = LowRankConfig(rank, dtype)
    return shift is not None, smooth, low_rank


def _activation(data: dict[str, Any] | None) -> ActivationConfig | None:
    """An activation entry of a plan file, its format checked (unknown formats and widths are refused)."""
    if not data:
        return None
    act = ActivationConfig(**data)
    if act.format not in ACTIVATION_FORMATS:
        raise ValueError(f"unknown activation format {act.format!r}; choose one of {', '.join(ACTIVATION_FORMATS)}")
    problem = format_problem(act.format, act.bits)
    if problem is not None:
        raise ValueError(problem)
    return act


def quantizable_layers(model: nn.Module) -> list[str]:
    """FQNs of the Linear / Conv2d layers of ``model``, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, QUANTIZABLE)]


def resolve_globs(names: Iterable[str], patterns: Iterable[str]) -> set[str]:
    """Return the names matched by any glob in ``patterns``.

    Raises:
        ValueError: If a pattern matches no name (almost always a typo).
    """
    names = list(names)
    matched: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ValueError(f"pattern {pattern!r} matches no quantizable layer")
        matched |= hits
    return matched


def uniform_plan(
    model: nn.Module,
    weight: WeightConfig | None,
    activation: ActivationConfig | None,
    keep_full_precision: Iterable[str] = (),
) -> LayerPlan:
    """Build a plan giving every quantizable layer the same format, except the FP globs.

    Args:
        model: The model whose layers are planned.
        weight: Weight format for quantized layers (None: float weights).
        activation: Input format for quantized layers (None: float inputs).
        keep_full_precision: Globs over layer FQNs kept fully in float.
    """
    names = quantizable_layers(model)
    keep = resolve_globs(names, keep_full_precision)
    plan = LayerPlan()
    for name in names:
        plan[name] = LayerConfig(None, None) if name in keep else LayerConfig(weight, activation)
    return plan


def output_quantizer_allowed(name: str, layer: nn.Module, cfg: LayerConfig) -> bool:
    """Whether the onnxruntime form gives layer ``name`` an output quantizer.

    Only a Conv2d whose input is quantized and whose weight is quantized at 5-8 bits per channel
    or per tensor can become an integer ``QLinearConv`` in onnxruntime (INT8 weights; block-wise,
    INT4 and floating-point weights or inputs do not fuse), and the network's output convolution (``conv_out``) is left
    alone: quantizing the noise prediction itself only costs accuracy.
    """
    if not isinstance(layer, nn.Conv2d) or name.rsplit(".", 1)[-1] == "conv_out":
        return False
    weight = cfg.weight
    return (
        cfg.activation is not None
        and not cfg.activation.is_float
        and weight is not None
        and not weight.is_float
        and weight.bits > 4
        and weight.granularity in ("per_channel", "per_tensor")
    )


def with_output_quantizers(model: nn.Module, plan: LayerPlan) -> LayerPlan:
    """A copy of ``plan`` with output quantizers on the Conv2d layers that can fuse in onnxruntime.

    Each output quantizer takes the bits and observer of the layer's input quantizer (see
    :func:`output_quantizer_allowed` for which layers qualify).

    Args:
        model: The float denoiser the plan is for.
        plan: The plan (weights and inputs already decided).
    """
    out = LayerPlan()
    for name, cfg in plan.items():
        layer = model.get_submodule(name)
        if cfg.output is None and output_quantizer_allowed(name, layer, cfg):
            assert cfg.activation is not None
            cfg = replace(cfg, output=ActivationConfig(cfg.activation.bits, cfg.activation.observer))
        out[name] = cfg
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at FQN ``name`` with ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: LayerPlan) -> nn.Module:
    """Replace the planned layers of ``model`` in place with fake-quantized versions.

    Weight scales are computed immediately; input quantizers are left for calibration.

    Raises:
        ValueError: If the plan names a layer the model lacks or that is not Linear / Conv2d.
    """
    for name, cfg in plan.items():
        if cfg.is_full_precision:
            continue
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan names layer {name!r}, which the model does not have") from None
        if isinstance(layer, (QuantLinear, QuantConv2d)):
            raise ValueError(f"layer {name!r} is already quantized")
        if not isinstance(layer, QUANTIZABLE):
            raise ValueError(f"plan layer {name!r} is a {type(layer).__name__}, not Linear/Conv2d")
        cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
        if cfg.fp_tokens and cls is not QuantLinear:
            raise ValueError(f"layer {name!r}: fp_tokens applies to Linear layers over token sequences only")
        if cfg.output is not None and cls is not QuantConv2d:
            raise ValueError(f"layer {name!r}: output quantizers apply to Conv2d layers only")
        w = cfg.weight
        if w is not None and w.group_size is not None and not groups_allowed(layer, w.group_size):
            raise ValueError(f"layer {name!r} cannot take weight groups of {w.group_size} input channels")
        new = cls.from_float(
            layer,
            weight_bits=w.bits if w else None,
            act_bits=cfg.activation.bits if cfg.activation else None,
            weight_observer=w.observer if w else "minmax",
            act_observer=cfg.activation.observer if cfg.activation else "minmax",
            per_channel=(w.granularity != "per_tensor") if w else True,
            group_size=w.group_size if w else None,
            weight_format=w.format if w else "int",
            act_format=cfg.activation.format if cfg.activation else "int",
            **({"out_bits": cfg.output.bits, "out_observer": cfg.output.observer} if cfg.output is not None else {}),
        )
        if cfg.fp_tokens:
            new.keep_tokens_in_float(cfg.fp_tokens)
        attach_transforms(new, name, cfg)
        new.to(layer.weight.device)  # quantizer state joins the layer's device and stays float32
        set_module(model, name, new)
    return model


def transform_problem(layer: nn.Module, cfg: LayerConfig) -> str | None:
    """Why ``layer`` cannot take ``cfg``'s shift / smoothing / low-rank branch (None: it can)."""
    if (cfg.shift or cfg.smooth is not None) and cfg.activation is None:
        return "shift and smoothing need a quantized input"
    if cfg.low_rank is None:
        return None
    if cfg.weight is None:
        return "a low-rank branch needs a quantized weight"
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return "a low-rank branch needs a convolution with groups == 1"
    if cfg.low_rank.rank > max_rank(layer):
        return f"rank {cfg.low_rank.rank} is larger than min(out, in) = {max_rank(layer)} of its weight"
    if cfg.output is not None:
        return "a layer with a low-rank branch takes no output quantizer"
    return None


def attach_transforms(layer: QuantLinear | QuantConv2d, name: str, cfg: LayerConfig) -> None:
    """Give a quantized layer the (identity) input transform and low-rank branch its plan entry asks for.

    Their values come from calibration (:mod:`diffquant.outliers`) or a saved quantizer state.

    Raises:
        ValueError: If the layer cannot take them (:func:`transform_problem`).
    """
    problem = transform_problem(layer, cfg)
    if problem is not None:
        raise ValueError(f"layer {name!r}: {problem}")
    if cfg.shift or cfg.smooth is not None:
        multiply = cfg.smooth is not None and cfg.smooth.into is None
        layer.input_transform = make_input_transform(layer, cfg.shift, cfg.smooth is not None, multiply)
        if cfg.smooth is not None:
            layer.input_transform.alpha, layer.input_transform.into = cfg.smooth.alpha, cfg.smooth.into
    if cfg.low_rank is not None:
        layer.low_rank = LowRankBranch(layer, cfg.low_rank.rank, cfg.low_rank.dtype)


def input_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Return ``{layer_fqn: input quantizer}`` for every quantized layer that has one."""
    return {
        name: module.input_quantizer
        for name, module in model.named_modules()
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.input_quantizer is not None
    }


def activation_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every activation quantizer: ``{"<fqn>.input": ..., "<fqn>.output": ...}`` (input and output)."""
    found: dict[str, FakeQuantizer] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLinear, QuantConv2d)):
            continue
        if module.input_quantizer is not None:
            found[f"{name}.input"] = module.input_quantizer
        if module.output_quantizer is not None:
            found[f"{name}.output"] = module.output_quantizer
    return found


QUANTIZER_STATE_SUFFIXES = (
    "_quantizer.scale",
    "_quantizer.global_scale",
    ".fp_token_outputs",
    ".input_transform.smooth",
    ".input_transform.shift",
    ".low_rank.up",
    ".low_rank.down",
)


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Quantizer scales, precomputed full-precision token outputs and outlier-transform tensors of ``model``.

    Keys are ``<layer>.<weight|input|output>_quantizer.scale`` (NVFP4 weights also
    ``<layer>.weight_quantizer.global_scale``), ``<layer>.fp_token_outputs``,
    ``<layer>.input_transform.<smooth|shift>`` and ``<layer>.low_rank.<up|down>``.
    """
    return {k: v for k, v in model.state_dict().items() if k.endswith(QUANTIZER_STATE_SUFFIXES)}


def load_quantizer_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load scales saved by :func:`quantizer_state` and switch every quantizer to quantize mode.

    Raises:
        ValueError: If the saved scales and the model's quantizers do not match one to one.
    """
    from diffquant.quant.modules import QuantizerMode

    own = quantizer_state(model)
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"quantizer state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in state.items():
        owner, attribute = key.rsplit(".", 1)
        module = model.get_submodule(owner)
        getattr(module, attribute).copy_(value)
        if isinstance(module, FakeQuantizer):
            module.mode = QuantizerMode.QUANTIZE


def weight_scale_count(shape: tuple[int, ...], weight: WeightConfig) -> int:
    """Number of scales a weight of ``shape`` stores under ``weight``'s granularity."""
    if weight.granularity == "per_channel":
        return shape[0]
    if weight.granularity == "per_group":
        return math.prod(shape) // int(weight.group_size or 1)
    return 1


def quantized_weight_bytes(shape: tuple[int, ...], weight: WeightConfig) -> int:
    """Bytes a weight of ``shape`` takes quantized under ``weight``: bit-packed values plus scales.

    Values take ``ceil(numel * bits / 8)`` bytes (FP6 6 bits, FP4 4 bits per value), scales 4
    bytes (float32) each, except NVFP4 (``fp4_e2m1``): one FP8 byte per block of 16 plus one
    float32 global scale.
    """
    numel = math.prod(shape)
    values = -(-numel * weight.bits // 8)
    scales = weight_scale_count(shape, weight)
    if weight.is_float and weight.group_size is not None:  # NVFP4: FP8 block codes + a float32 global scale
        return values + scales + 4
    return values + 4 * scales


def packed_weight_bytes(model: nn.Module, plan: LayerPlan) -> dict[str, int]:
    """Bytes of all parameters once quantized weights are bit-packed.

    Quantized weights count :func:`quantized_weight_bytes` (``ceil(numel * bits / 8)`` plus one fp32
    scale per channel, per tensor or per group; NVFP4: one FP8 code per block of 16 and one fp32
    global scale); every other parameter (biases, norms, embeddings, FP layers) counts 4 bytes
    each, and precomputed full-precision token outputs 4 bytes per value. Outlier transforms add
    what the export stores (:func:`transform_bytes`).

    Returns:
        ``{"fp32": ..., "packed": ...}`` in bytes.
    """
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    packed = _plan_bytes(model, plan, lambda weight, cfg: quantized_weight_bytes(tuple(weight.shape), cfg))
    return {"fp32": int(fp32), "packed": int(packed)}


def _plan_bytes(model: nn.Module, plan: LayerPlan, weight_bytes: Callable[[torch.Tensor, WeightConfig], int]) -> int:
    """Bytes of all parameters, each quantized weight counted by ``weight_bytes(weight, config)``.

    Other parameters count 4 bytes each; precomputed full-precision token outputs 4 bytes per
    value; outlier transforms what the export stores (:func:`transform_bytes`).
    """
    total = sum(p.numel() * 4 for p in model.parameters())
    for name, cfg in plan.items():
        if cfg.fp_tokens:
            total += 4 * cfg.fp_tokens * model.get_submodule(name).weight.shape[0]
        if cfg.weight is None:
            continue
        layer = model.get_submodule(name)
        total += weight_bytes(layer.weight, cfg.weight) - layer.weight.numel() * 4 + transform_bytes(layer, cfg)
    return int(total)


def transform_bytes(layer: nn.Module, cfg: LayerConfig) -> int:
    """Bytes the export adds for a layer's outlier transforms.

    A shift stores its offsets (4 bytes per input channel) and, for a layer without a bias, a
    float32 bias; an unfolded smoothing its ``1 / s`` (4 bytes per input channel; a folded one
    changes existing parameters only); a low-rank branch ``rank * (fan_in + out)`` values of its
    dtype (2 bytes for float16).
    """
    total = 0
    channels = input_channels(layer)
    if cfg.shift:
        total += 4 * channels
        if getattr(layer, "bias", None) is None:
            total += 4 * int(layer.weight.shape[0])
    if cfg.smooth is not None and cfg.smooth.into is None:
        total += 4 * channels
    if cfg.low_rank is not None:
        size = LOW_RANK_DTYPES[cfg.low_rank.dtype].itemsize
        total += size * cfg.low_rank.rank * (fan_in(layer) + int(layer.weight.shape[0]))
    return total


def stored_weight_bytes(numel: int, scales: int, storage_bits: int) -> int:
    """Bytes of one quantized weight as the export stores it: integers, fp32 scales and zero points.

    ``numel`` integers of the storage type (``storage_bits`` 2, 4 or 8: INT2, INT4, INT8, packed
    ``8 / storage_bits`` per byte), one float32 scale and one zero point of the storage type per
    scale (:meth:`diffquant.devices.DeviceClass.storage_bits` says which type a weight gets).
    """
    return -(-numel * storage_bits // 8) + 4 * scales + -(-scales * storage_bits // 8)


def deployed_weight_bytes(model: nn.Module, plan: LayerPlan, device: DeviceClass) -> int:
    """Bytes of all parameters as ``device``'s export stores them (``allocation.cost: deployed``).

    Like :func:`packed_weight_bytes`, with each quantized weight at its storage type instead of
    its bits, plus its zero points (:func:`stored_weight_bytes`): a 3-bit weight counts 4 bits, a
    2-bit one 2 bits where the class stores INT2 and 4 bits elsewhere. The ONNX file also holds
    each activation quantizer's scale, zero point and clip bounds, the onnxruntime form's bias
    scales and the tracer's shape constants, which this does not count.
    """

    def stored(weight: torch.Tensor, cfg: WeightConfig) -> int:
        if cfg.is_float:  # float formats are stored in their own 8- or 4-bit types, as planned
            return quantized_weight_bytes(tuple(weight.shape), cfg)
        scales = weight_scale_count(tuple(weight.shape), cfg)
        return stored_weight_bytes(weight.numel(), scales, device.storage_bits(cfg.bits))

    return _plan_bytes(model, plan, stored)
