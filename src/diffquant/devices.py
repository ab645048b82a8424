"""Device classes: what each deployment target can run, as one table (:data:`DEVICE_CLASSES`).

``export.device_class`` names the class a plan is built for: ``orin | ampere | ada | hopper |
blackwell | cpu``. Left unset it follows ``export.target``: ``tensorrt`` -> ``orin`` (the project's
reference edge target, the most restrictive GPU class), ``onnxruntime`` -> ``cpu``. The rules
check (:func:`diffquant.export.rules.check_rules`) refuses a plan the class cannot run, naming the
layer; the allocator (:func:`diffquant.mixed_precision.allocate.allocate_plan`) offers only the
options the class runs; a bundle records the class it was built for and ``deploy`` refuses a
bundle built for another one.

What the table says, and where it comes from:

- **INT8** (weights and activations, per-tensor activations, per-channel weights) runs on every
  class: TensorRT quantizes "activations and weights for INT8, FP8, and FP4" ("Working with
  Quantized Types", TensorRT 10 developer guide, docs.nvidia.com/deeplearning/tensorrt); the
  onnxruntime CPU provider runs the QDQ form (``QLinearConv``, see :mod:`diffquant.export.onnx`).
- **INT4 weights**: "Weight-only quantization is supported for INT4" (same page); the TensorRT
  support matrices list the kernel as "INT4 WoQ GEMM" for compute capability 8.6 and later
  (TensorRT-RTX support matrix); NVIDIA's Model Optimizer lists W4A16 ("block-wise INT4
  weights, GPUs: Ampere and later") and quantizes only Linear (MatMul/Gemm) layers to INT4: its
  maintainers have "no plan for int4 conv support" (NVIDIA/Model-Optimizer issue 178). So on a TensorRT class an INT4 weight is an
  integer kernel only on a GEMM (Linear -> ``MatMul``) layer (:attr:`DeviceClass.int4_gemm`).
  A 2-4-bit weight on a convolution is still written as a per-channel INT4 ``DequantizeLinear``
  (the rules accept it, as before), but TensorRT has no INT4 convolution kernel
  (:attr:`DeviceClass.int4_conv` is False): the weight is dequantized and the convolution runs in
  float, so the bundle is small but the layer is not faster. The allocator says so in its record
  (``notes``). This form has not been built into an engine on a device here (no GPU in CI).
- **Weight storage** (:meth:`DeviceClass.storage_bits`, the one rule the exporter and the
  ``allocation.cost: deployed`` budget both use): 5-8-bit weights are stored as INT8 and 2-4-bit
  ones as INT4 (packed two per byte), except that 2-bit weights are stored as INT2 (four per byte)
  where the runtime dequantizes INT2 (:attr:`DeviceClass.int2_weights`). ONNX has INT2 from opset
  25 (there is no INT3, so 3-bit weights stay INT4). onnxruntime 1.32's CPU provider runs INT2
  ``DequantizeLinear`` per tensor, per channel and block-wise, alone, before a ``Conv`` and fused
  with ``MatMul`` into ``MatMulNBits`` (checked bit-exact against numpy with the accuracy level
  that keeps the float input, as parity uses; its default level 4 quantizes the input to int8
  for INT4 and INT2 alike). TensorRT runs only INT8 and INT4 weights ("Working with Quantized
  Types": INT4 weight-only), so every TensorRT class stores 2-bit weights as INT4.
- **Group-wise (block) weights** are TensorRT's block quantization, which serves INT4 weight-only
  GEMM: group-wise weights are refused on convolutions and above 4 bits on every TensorRT class
  (:attr:`DeviceClass.block_kinds`, :attr:`DeviceClass.block_max_bits`). onnxruntime's CPU
  provider runs block-wise ``DequantizeLinear`` (opset 21) on any layer.
- **Activations** below 8 bits are written as ``Clip`` + INT8 Q/DQ (:mod:`diffquant.export.onnx`),
  which every class runs; INT4 activation Q/DQ is refused by the rules on TensorRT (INT4 is
  weight-only). Float activations run everywhere.
- **FP8** needs compute capability 8.9 (Ada) or later and **FP4** 10.0 (Blackwell) or later:
  "FP8 is only supported for matrix multiplications (GEMM) on Ada and later architectures (compute
  capability 8.9 or later), while FP4 is only supported ... on Blackwell or later (compute
  capability 10.0 or later)" (TensorRT-RTX "Working with Quantized Types"); FP4 needs TensorRT
  10.8 or later ("Added support for the E2M1 FP4 data type ... on NVIDIA Blackwell GPUs",
  TensorRT 10.8 release notes). TensorRT's FP8 type is E4M3 ("FP8E4M3", same guide): E5M2 runs on
  no class. FP6 weights (E3M2, E2M3) are stored as FP8 E4M3 values (every FP6 value is one), so
  they need FP8. FP4 (NVFP4) weights are refused on convolutions (GEMM only; NVIDIA's Model
  Optimizer also leaves convolutions out of NVFP4). An FP8 convolution is accepted, but
  TensorRT-RTX documents FP8 for GEMMs only, so it may run in higher precision (not measured, no
  GPU here). The onnxruntime CPU provider runs FP8 Q/DQ only as float emulation (no FP8 kernels),
  so ``cpu`` takes no float formats.
- **Orin** is sm 8.7 with JetPack 6's TensorRT 10.3: INT8 and INT4 weight-only GEMM, no FP8, no
  FP4 (TensorRT's support matrices list sm 8.7 with INT8 tensor cores; FP8 needs sm 8.9).
- The **output quantizers** of the onnxruntime form (UINT8 activations, INT32 biases) run only on
  ``cpu``; TensorRT takes the TensorRT form only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, get_args

from diffquant.errors import ConfigError, DeviceClassError

if TYPE_CHECKING:
    from diffquant.quant.plan import LayerConfig, LayerPlan

DeviceClassName = Literal["orin", "ampere", "ada", "hopper", "blackwell", "cpu"]
DEVICE_CLASS_NAMES: tuple[str, ...] = get_args(DeviceClassName)
DEFAULT_DEVICE_CLASS = {"tensorrt": "orin", "onnxruntime": "cpu"}
"""The class a target means when ``export.device_class`` is unset."""
DEVICE_CLASS_ENV = "DIFFQUANT_DEVICE_CLASS"
"""Environment variable naming the class of the machine a deploy worker runs on."""
LayerKind = Literal["conv", "linear"]


@dataclass(frozen=True)
class DeviceClass:
    """What one class of deployment machine runs.

    Attributes:
        name: The ``export.device_class`` value.
        hardware: Example devices.
        compute_capability: CUDA compute capability (None for ``cpu``).
        runtime: ``tensorrt`` or ``onnxruntime``; also the export form the class takes.
        runtime_version: The runtime version the entry describes.
        int4_gemm: INT4 weight-only GEMM kernels (Linear layers, 2-4-bit weights stored as INT4).
        int4_conv: INT4 convolution kernels (without them a 2-4-bit convolution weight is
            dequantized and the layer runs in float).
        int2_weights: The runtime dequantizes INT2 weights (ONNX opset 25), so 2-bit weights are
            stored as INT2 instead of INT4 (:meth:`storage_bits`).
        block_kinds: Layer kinds that take group-wise (block) weights.
        block_max_bits: Most bits of a group-wise weight.
        fp8: FP8 (E4M3) weights and activations (and FP6 weights, stored as FP8).
        fp4: FP4 (E2M1, NVFP4) weights on GEMM layers.
        output_quantizers: The onnxruntime form's output Q/DQ and INT32 biases.
    """

    name: str
    hardware: str
    compute_capability: tuple[int, int] | None
    runtime: Literal["tensorrt", "onnxruntime"]
    runtime_version: str
    int4_gemm: bool
    int4_conv: bool
    block_kinds: frozenset[str]
    block_max_bits: int
    fp8: bool
    fp4: bool
    output_quantizers: bool
    int2_weights: bool = False

    def storage_bits(self, bits: int) -> int:
        """Bits of the ONNX integer type that stores a ``bits``-bit weight on this class: 2 (INT2), 4 (INT4) or 8 (INT8).

        INT2 only where the runtime takes it (:attr:`int2_weights`); the exporter writes this type and
        ``allocation.cost: deployed`` counts it.
        """
        if bits <= 2 and self.int2_weights:
            return 2
        return 4 if bits <= 4 else 8

    def weight_problem(self, kind: str, bits: int, group_size: int | None) -> str | None:
        """Why this class cannot run a ``bits``-bit weight (group-wise when ``group_size``) on a ``kind`` layer; None if it can."""
        if group_size is None:
            return None
        if kind not in self.block_kinds:
            return (
                f"group-wise (block) weights run only on Linear layers on {self.name} "
                f"({self.runtime}'s block quantization is INT4 weight-only GEMM), not on a {kind}"
            )
        if bits > self.block_max_bits:
            return (
                f"group-wise weights of {bits} bits: {self.runtime} on {self.name} takes block-wise weights of at "
                f"most {self.block_max_bits} bits"
            )
        return None

    def format_problem(self, kind: str, weight_format: str = "int", act_format: str = "int") -> str | None:
        """Why this class cannot run a ``kind`` layer with these weight and input formats; None if it can.

        ``int`` formats are :meth:`weight_problem`'s business; this checks the float ones.
        """
        formats = {f for f in (weight_format, act_format) if f != "int"}
        if not formats:
            return None
        where = (
            f"{self.name} (sm {'.'.join(map(str, self.compute_capability))})" if self.compute_capability else self.name
        )
        if "fp8_e5m2" in formats:
            return f"FP8 E5M2 runs on no device class ({self.runtime}'s FP8 is E4M3 only); use fp8_e4m3"
        if weight_format == "fp4_e2m1":
            if not self.fp4:
                return f"FP4 (NVFP4) needs compute capability 10.0 (Blackwell) or later; {where} has no FP4"
            if kind == "conv":
                return f"FP4 (NVFP4) weights run only on GEMM (Linear) layers on {self.name}, not on a convolution"
        if not self.fp8:
            return f"FP8 needs compute capability 8.9 (Ada) or later; {where} has no FP8 ({', '.join(sorted(formats))})"
        return None

    def weight_note(self, kind: str, bits: int | None) -> str | None:
        """What happens to a runnable ``bits``-bit weight on a ``kind`` layer when it is not an integer kernel."""
        if bits is None or bits > 4:
            return None
        if kind == "conv" and not self.int4_conv:
            stored = "INT2 or INT4" if self.int2_weights else "INT4"
            return (
                f"{self.runtime} on {self.name} has no INT4 convolution kernel: a 2-4-bit convolution weight is stored "
                f"as {stored} and dequantized, the layer runs in float (smaller bundle, no speed-up)"
            )
        if kind == "linear" and not self.int4_gemm:
            return f"{self.name} has no INT4 GEMM kernel: a 2-4-bit Linear weight is dequantized"
        return None

    def output_problem(self) -> str | None:
        """Why this class cannot run a layer with an output quantizer (the onnxruntime form); None if it can."""
        if self.output_quantizers:
            return None
        return f"output quantizers are the onnxruntime form, which {self.name} ({self.runtime}) does not run"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready entry (for manifests and reports)."""
        return {
            "name": self.name,
            "hardware": self.hardware,
            "compute_capability": list(self.compute_capability) if self.compute_capability else None,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "int4_gemm": self.int4_gemm,
            "int4_conv": self.int4_conv,
            "block_kinds": sorted(self.block_kinds),
            "block_max_bits": self.block_max_bits,
            "fp8": self.fp8,
            "fp4": self.fp4,
            "output_quantizers": self.output_quantizers,
            "int2_weights": self.int2_weights,
        }


def _tensorrt_class(
    name: str, hardware: str, capability: tuple[int, int], version: str, fp8: bool, fp4: bool
) -> DeviceClass:
    return DeviceClass(
        name=name,
        hardware=hardware,
        compute_capability=capability,
        runtime="tensorrt",
        runtime_version=version,
        int4_gemm=True,
        int4_conv=False,
        block_kinds=frozenset({"linear"}),
        block_max_bits=4,
        fp8=fp8,
        fp4=fp4,
        output_quantizers=False,
    )


DEVICE_CLASSES: Mapping[str, DeviceClass] = MappingProxyType(
    {
        "orin": _tensorrt_class("orin", "Jetson AGX Orin / Orin NX (JetPack 6)", (8, 7), "10.3", fp8=False, fp4=False),
        "ampere": _tensorrt_class("ampere", "A100, A10, RTX 30xx", (8, 6), "10.x", fp8=False, fp4=False),
        "ada": _tensorrt_class("ada", "L4, L40S, RTX 40xx", (8, 9), "10.x", fp8=True, fp4=False),
        "hopper": _tensorrt_class("hopper", "H100, H200", (9, 0), "10.x", fp8=True, fp4=False),
        "blackwell": _tensorrt_class("blackwell", "B200, RTX 50xx", (10, 0), "10.8+", fp8=True, fp4=True),
        "cpu": DeviceClass(
            name="cpu",
            hardware="x86-64 / Arm CPUs",
            compute_capability=None,
            runtime="onnxruntime",
            runtime_version="1.20+",
            int4_gemm=True,
            int4_conv=False,
            block_kinds=frozenset({"conv", "linear"}),
            block_max_bits=8,
            fp8=False,
            fp4=False,
            output_quantizers=True,
            int2_weights=True,
        ),
    }
)
"""The capability table: one entry per ``export.device_class`` (see the module docstring for sources)."""


def device_class(name: str | DeviceClass, key: str = "device_class") -> DeviceClass:
    """The table entry of ``name``.

    Raises:
        ConfigError (``key``): Naming the unknown class and the known ones.
    """
    if isinstance(name, DeviceClass):
        return name
    try:
        return DEVICE_CLASSES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            key, f"unknown device class {name!r}; choose one of {', '.join(DEVICE_CLASS_NAMES)}"
        ) from None


def default_device_class(target: str) -> str:
    """The class an export ``target`` means when no class is given (``tensorrt`` -> ``orin``, ``onnxruntime`` -> ``cpu``)."""
    return DEFAULT_DEVICE_CLASS.get(target, "orin")


def resolve_device_class(name: str | DeviceClass | None, target: str = "tensorrt") -> DeviceClass:
    """``name``'s entry, or the default of ``target`` when ``name`` is None.

    Raises:
        ConfigError (``device_class``): Unknown class, or a class whose runtime does not take the
            ``target`` form (``cpu`` with ``tensorrt``, a GPU class with ``onnxruntime``).
    """
    entry = device_class(name if name is not None else default_device_class(target))
    if entry.runtime != target:
        raise ConfigError(
            "device_class",
            f"{entry.name} runs {entry.runtime}, not the {target} form; use export.target {entry.runtime} "
            f"or a device class that runs {target}",
        )
    return entry


def machine_device_class() -> str | None:
    """The class this machine declares through ``DIFFQUANT_DEVICE_CLASS`` (None when unset).

    Raises:
        ConfigError (``DIFFQUANT_DEVICE_CLASS``): Set to an unknown class.
    """
    value = os.environ.get(DEVICE_CLASS_ENV, "").strip()
    if not value:
        return None
    return device_class(value, DEVICE_CLASS_ENV).name


def layer_problem(device: DeviceClass, kind: str, config: LayerConfig) -> str | None:
    """Why ``device`` cannot run one layer's plan entry (a ``kind`` layer); None when it can."""
    weight = config.weight
    problem = device.format_problem(
        kind,
        weight.format if weight is not None else "int",
        config.activation.format if config.activation is not None else "int",
    )
    if problem is not None:
        return problem
    if weight is not None:
        problem = device.weight_problem(kind, weight.bits, weight.group_size)
        if problem is not None:
            return problem
    if config.output is not None:
        return device.output_problem()
    return None


def plan_problems(device: DeviceClass, plan: LayerPlan, kinds: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(layer, reason)`` for every planned layer ``device`` cannot run, in plan order.

    Args:
        device: The class the plan is for.
        plan: The plan.
        kinds: Layer name -> ``conv`` or ``linear`` (layers missing here are skipped).
    """
    problems = []
    for layer, config in plan.items():
        kind = kinds.get(layer)
        problem = layer_problem(device, kind, config) if kind is not None else None
        if problem is not None:
            problems.append((layer, problem))
    return problems


def check_device_match(built: str, machine: str | None, what: str) -> None:
    """Refuse deploying ``what`` (built for class ``built``) to a machine of class ``machine``.

    Args:
        built: The class the version or bundle was built for.
        machine: The deploying machine's class; None accepts any (the machine did not say).
        what: Names the version in the message, e.g. ``digits-unet v3``.

    Raises:
        DeviceClassError: One line naming both classes and what to do.
    """
    if machine is None or built == machine:
        return
    raise DeviceClassError(
        f"{what} was built for device class {built}, but this machine is {machine}; deploy it from a {built} "
        f"worker, or compress again with export.device_class={machine}"
    )
