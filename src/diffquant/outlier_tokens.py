"""Outlier tokens: MixDQ's BOS-aware quantization of cross-attention keys and values.

A causal text encoder (CLIP) gives its first token (BOS) the same hidden state for every prompt,
and in trained encoders that state is an outlier (MixDQ reports about 800 against 10-15 for
the other tokens in SD's CLIP). The cross-attention ``to_k``/``to_v`` layers read those states;
with one per-tensor input scale the outlier stretches the range and crushes every other token.

Here, as in MixDQ: find the leading token positions that are (a) the same for every calibration
prompt (same token ids, identical hidden states) and (b) outliers (largest absolute value above
``threshold`` times the median of the other positions'); then every Linear layer that reads
the encoder states computes those positions from precomputed full-precision outputs (stored
with the quantizer scales and exported as constants) and quantizes only the remaining tokens,
calibrated without the outliers.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from diffquant.models.loading import DiffusionModel
from diffquant.placement import module_placement
from diffquant.quant.modules import QuantLinear
from diffquant.quant.plan import LayerPlan

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 4.0
"""A leading position is an outlier when its absmax exceeds this multiple of the other positions' median."""

CONSTANT_TOLERANCE = 1e-5
"""Relative spread across prompts under which a position's hidden state counts as constant."""


@dataclass
class OutlierTokens:
    """What detection found and which layers it applies to.

    Attributes:
        count: Leading token positions kept in full precision (0: none).
        mode: The spec's setting (``auto``, ``off`` or a forced count).
        position_absmax: Largest absolute hidden-state value per token position.
        ratio: Position 0's absmax over the median absmax of the other positions.
        constant_positions: Leading positions whose hidden state is the same for every prompt.
        layers: Linear layers that read the text-encoder states (cross-attention keys/values).
    """

    count: int
    mode: str
    position_absmax: list[float] = field(default_factory=list)
    ratio: float = 0.0
    constant_positions: int = 0
    layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def encoder_state_readers(
    denoiser: nn.Module, condition: torch.Tensor, sample_shape: tuple[int, int, int]
) -> tuple[list[str], torch.Tensor | None]:
    """Linear layers that take the text encoder's output as input, and that output.

    Runs the denoiser once with hooks: the encoder's output (``encode``) is computed, served
    as a constant, and every Linear whose input equals it is reported.

    Args:
        denoiser: The (wrapped) denoiser.
        condition: Token ids of one or more prompts.
        sample_shape: The model's ``(C, H, W)``.

    Returns:
        Layer names in module order and the captured hidden states (None when the denoiser has
        no ``encode`` method, i.e. is not text-conditioned).
    """
    if not hasattr(denoiser, "encode"):
        return [], None
    with torch.no_grad():
        hidden = denoiser.encode(condition)
    readers: list[str] = []
    handles = []
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear):

            def hook(mod: nn.Module, inputs: tuple[Any, ...], name: str = name) -> None:
                first = inputs[0] if inputs else None
                if torch.is_tensor(first) and first.shape == hidden.shape and torch.equal(first, hidden):
                    readers.append(name)

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            denoiser.encode = _constant(hidden)  # type: ignore[method-assign]
            device, dtype = module_placement(denoiser)
            x = torch.zeros((condition.shape[0], *sample_shape), device=device, dtype=dtype)
            denoiser(x, torch.full((condition.shape[0],), 500, dtype=torch.long, device=device), condition.to(device))
    finally:
        del denoiser.encode
        for handle in handles:
            handle.remove()
    ordered = [name for name, _ in denoiser.named_modules() if name in set(readers)]
    return ordered, hidden


def _constant(hidden: torch.Tensor):
    def encode(input_ids: torch.Tensor) -> torch.Tensor:
        return hidden

    return encode


def detect_outlier_tokens(
    model: DiffusionModel,
    conditions: torch.Tensor,
    mode: str | int = "auto",
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 256,
) -> OutlierTokens:
    """Find the leading constant outlier tokens of a text-conditioned model's encoder states.

    Args:
        model: The FP model.
        conditions: Calibration token ids ``(N, L)`` (distinct prompts give the constancy test power).
        mode: ``auto`` (detect), ``off`` (none) or a count of leading tokens to keep in float.
        threshold: Outlier ratio for ``auto``.
        batch_size: Prompts per text-encoder call.

    Returns:
        The detection result; ``count`` is 0 for class-conditional or unconditional models.

    Raises:
        ValueError: If a forced count exceeds the leading positions that are constant across prompts.
    """
    if model.condition != "text" or mode == "off":
        return OutlierTokens(0, str(mode))
    prompts = torch.unique(conditions, dim=0)
    layers, hidden = encoder_state_readers(model.unet, prompts[:1], model.sample_shape)
    with torch.no_grad():
        hidden = torch.cat([model.unet.encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)])
    absmax = hidden.abs().amax(dim=(0, 2))
    spread = (hidden - hidden[:1]).abs().amax(dim=(0, 2))
    same_ids = (prompts == prompts[:1]).all(dim=0)
    constant = 0
    while (
        constant < hidden.shape[1] - 1
        and same_ids[constant]
        and spread[constant] <= CONSTANT_TOLERANCE * max(float(absmax[constant]), 1.0)
    ):
        constant += 1
    ratio = float(absmax[0] / absmax[1:].median().clamp_min(1e-12))
    if mode == "auto":
        count = 0
        while count < constant and float(absmax[count]) > threshold * float(absmax[count + 1 :].median()):
            count += 1
    else:
        count = int(mode)
        if count > constant:
            raise ValueError(
                f"outlier_tokens={count}, but only {constant} leading token positions are the same for every prompt"
            )
    result = OutlierTokens(count, str(mode), [float(v) for v in absmax], ratio, constant, layers)
    logger.info(
        "outlier tokens: %d kept in float (position 0 absmax %.2f, %.1fx the median of the others) for %d layers",
        count,
        float(absmax[0]),
        ratio,
        len(layers),
    )
    return result


def apply_outlier_tokens(plan: LayerPlan, found: OutlierTokens) -> LayerPlan:
    """Set ``fp_tokens`` on the planned encoder-state readers whose input is quantized."""
    out = LayerPlan(plan)
    if not found.count:
        return out
    for name in found.layers:
        cfg = plan.get(name)
        if cfg is not None and cfg.activation is not None:
            out[name] = replace(cfg, fp_tokens=found.count)
    return out


@torch.no_grad()
def fp_token_outputs(fp_denoiser: nn.Module, plan: LayerPlan, condition: torch.Tensor) -> dict[str, torch.Tensor]:
    """The full-precision outputs of the leading tokens for every planned layer that keeps them in float.

    Computed from the float denoiser *before* the plan is applied: its text encoder's states for
    the leading tokens (the same for every prompt) through each layer's float weight and bias.

    Args:
        fp_denoiser: The float (wrapped) denoiser, with an ``encode`` method.
        plan: The plan, with ``fp_tokens`` set on the layers that keep tokens in float.
        condition: Token ids ``(N, L)`` of any prompt (row 0 is used).

    Returns:
        Layer name -> ``(fp_tokens, out_features)`` outputs; empty when no layer keeps tokens.
    """
    wanted = {name: cfg.fp_tokens for name, cfg in plan.items() if cfg.fp_tokens}
    if not wanted:
        return {}
    hidden = fp_denoiser.encode(condition[:1])
    return {name: fp_denoiser.get_submodule(name)(hidden[:, :count])[0] for name, count in wanted.items()}


@torch.no_grad()
def fill_fp_tokens(quantized: nn.Module, outputs: dict[str, torch.Tensor]) -> int:
    """Copy :func:`fp_token_outputs` into the ``fp_token_outputs`` buffers of the quantized layers.

    Returns:
        The number of layers filled.
    """
    for name, values in outputs.items():
        layer = quantized.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.fp_tokens, name
        layer.fp_token_outputs.copy_(values)
    return len(outputs)
