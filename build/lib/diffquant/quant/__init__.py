"""Quantization core: formats, observers, fake-quantized layers and layer plans."""

from diffquant.quant.formats import IntFormat, dequantize, fake_quant, quantize
from diffquant.quant.modules import FakeQuantizer, QuantConv2d, QuantLinear
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    uniform_plan,
)

__all__ = [
    "ActivationConfig",
    "FakeQuantizer",
    "IntFormat",
    "LayerConfig",
    "LayerPlan",
    "QuantConv2d",
    "QuantLinear",
    "WeightConfig",
    "apply_plan",
    "dequantize",
    "fake_quant",
    "quantize",
    "uniform_plan",
]
