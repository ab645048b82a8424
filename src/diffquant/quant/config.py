"""Per-layer quantization formats: one typed object per concept, shared by the spec and the plan.

:class:`WeightConfig` is both the spec's ``quantize.weight`` (the uniform plan) and a plan entry's
weight format; pydantic validates it wherever it comes from (YAML, ``--set``, a plan file, code).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from diffquant.quant.float_formats import FLOAT_FORMATS
from diffquant.quant.formats import MAX_BITS, MIN_BITS

Granularity = Literal["per_channel", "per_tensor", "per_group"]
Observer = Literal["minmax", "percentile", "mse"]
Rounding = Literal["nearest", "gptq"]
WeightFormat = Literal["int", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]
"""``int`` (signed integers of ``bits``) or a floating-point format (:mod:`diffquant.quant.float_formats`)."""
ActivationFormat = Literal["int", "fp8_e4m3", "fp8_e5m2"]
"""Activations take integers or FP8 (ONNX ``QuantizeLinear`` has no FP6/FP4 activation form)."""


def format_problem(fmt: str, bits: int | None) -> str | None:
    """Why ``bits`` does not fit format ``fmt`` (a float format has one width); None when it does."""
    if fmt == "int" or bits is None:
        return None
    width = FLOAT_FORMATS[fmt].bits
    if bits != width:
        return f"format {fmt} stores {width} bits per value; set bits: {width}"
    return None


def format_observer(fmt: str, observer: str) -> str:
    """The weight observer format ``fmt`` takes: ``minmax`` for NVFP4 (its per-block absmax recipe), else ``observer``."""
    return "minmax" if fmt != "int" and FLOAT_FORMATS[fmt].block_size is not None else observer


class WeightConfig(BaseModel):
    """Weight quantization of a layer (signed integers, symmetric).

    ``granularity`` is ``per_channel`` (one scale per output channel), ``per_tensor`` or
    ``per_group`` (one scale per ``group_size`` input channels of each output channel and kernel
    position: ONNX's block-wise layout). In the spec's uniform plan, layers whose input channels
    the group size does not divide (e.g. a 1-channel ``conv_in``) fall back to per-channel.

    ``rounding`` is ``nearest`` (round to nearest) or ``gptq`` (GPTQ's error-compensating
    rounding on the calibration inputs, :mod:`diffquant.quant.gptq`); it is left out of the
    serialized form at its default, so existing spec hashes and plan files do not change.

    ``format`` is ``int`` (signed integers, the default, left out of the serialized form like
    ``rounding``) or a floating-point format whose width ``bits`` must equal: ``fp8_e4m3`` /
    ``fp8_e5m2`` (8), ``fp6_e3m2`` / ``fp6_e2m3`` (6) with float32 scales per channel or per
    tensor, or ``fp4_e2m1`` (4), which is NVFP4's layout: ``per_group`` with ``group_size`` 16,
    FP8 E4M3 block scales and a float32 global scale, min-max ranges. Float formats round to
    nearest (no GPTQ).

    Example:
        >>> WeightConfig(4, "per_group", group_size=32)
        WeightConfig(bits=4, granularity='per_group', observer='minmax', group_size=32, rounding='nearest', format='int')
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=MIN_BITS, le=MAX_BITS)
    granularity: Granularity = "per_channel"
    observer: Observer = "minmax"
    group_size: int | None = Field(None, ge=2)
    rounding: Rounding = "nearest"
    format: WeightFormat = "int"

    def __init__(
        self,
        bits: int | None = None,
        granularity: str = "per_channel",
        observer: str = "minmax",
        group_size: int | None = None,
        **data: Any,
    ) -> None:
        """Positional or keyword construction: ``WeightConfig(4, "per_channel", "mse")``."""
        if bits is not None:
            data["bits"] = bits
        super().__init__(granularity=granularity, observer=observer, group_size=group_size, **data)

    @model_validator(mode="after")
    def _group(self) -> WeightConfig:
        if (self.granularity == "per_group") != (self.group_size is not None):
            raise ValueError("group_size is required with granularity per_group and only with it")
        return self

    @model_validator(mode="after")
    def _float_format(self) -> WeightConfig:
        if self.format == "int":
            return self
        problem = format_problem(self.format, self.bits)
        if problem is not None:
            raise ValueError(problem)
        if self.rounding != "nearest":
            raise ValueError(f"format {self.format} rounds to nearest; rounding gptq takes format int")
        block = FLOAT_FORMATS[self.format].block_size
        if block is not None:
            if self.granularity != "per_group" or self.group_size != block:
                raise ValueError(
                    f"format {self.format} is NVFP4's layout: set granularity per_group and group_size {block}"
                )
            if self.observer != "minmax":
                raise ValueError(f"format {self.format} takes observer minmax (NVFP4's per-block absmax)")
        elif self.granularity == "per_group":
            raise ValueError(f"format {self.format} takes granularity per_channel or per_tensor")
        return self

    @property
    def is_float(self) -> bool:
        """Whether the weight takes a floating-point format."""
        return self.format != "int"

    @model_serializer(mode="wrap")
    def _omit_default_rounding(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.rounding == "nearest":
            data.pop("rounding", None)
        if self.format == "int":
            data.pop("format", None)
        return data


def one_line(error: ValidationError) -> str:
    """A pydantic validation error as one line: ``field: message`` for each problem."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
