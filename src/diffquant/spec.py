"""CompressionSpec: the typed, validated description of one compression run.

Specs are read from YAML presets (``configs/``), overridden with ``section.key=value`` pairs,
and round-trip to YAML/JSON. Unknown keys and impossible values are rejected with a
:class:`~diffquant.errors.SpecError` whose message names the key.

Input is bounded before it is expanded or used: a config file is a regular UTF-8 file of at most
:data:`MAX_SPEC_BYTES`; a key given twice in one mapping, aliases expanding past
:data:`MAX_YAML_NODES` values, alias cycles and values JSON cannot hold (dates, ``!!binary``) are
refused; floats must be finite, booleans are not numbers, counts have maxima, and
:func:`check_memory` compares the arrays the counts imply with the memory available.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from diffquant.devices import (
    DEFAULT_DEVICE_CLASS,
    DEVICE_CLASSES,
    DeviceClass,
    DeviceClassName,
    resolve_device_class,
)
from diffquant.errors import ConfigError, SpecError
from diffquant.quant.config import ActivationFormat, WeightConfig, format_problem
from diffquant.quant.formats import MAX_BITS, MIN_BITS

MAX_SPEC_BYTES = 1_000_000
"""Largest config file read (a spec is a few KB of YAML)."""
MAX_YAML_NODES = 100_000
"""Most YAML nodes a config file or ``--set`` value may expand to, aliases included (billion laughs)."""
MAX_SEED = 2**32 - 1
MAX_COUNT = 1_000_000
"""Upper bound of sample, input and step counts; memory is checked per model by :func:`check_memory`."""
MAX_BATCH = 65_536
MAX_TRAJECTORIES = 100_000


_NUMBER_TYPES = (int, float, int | None, float | None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode turns True/False into 1/0; YAML reads yes/no/on/off as booleans
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in _NUMBER_TYPES:
            raise ValueError(f"takes a number, not the boolean {str(value).lower()} (YAML reads yes/no/on/off so)")
        return value


class ModelSource(_Strict):
    """Where the model comes from: a bundled reference ``name`` or a local diffusers ``path``.

    ``prompts`` is a text file with one prompt per line for text-conditioned models (used for
    calibration trajectories and evaluation samples); bundled text models carry their own.
    """

    name: str | None = None
    path: str | None = None
    prompts: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of model.name or model.path")
        return self


class SamplerSpec(_Strict):
    """Sampler used for trajectories, calibration, sensitivity, evaluation and parity.

    ``name`` picks a diffusers scheduler built from the model's own scheduler config: ``ddim``
    (eta 0), ``euler`` (``EulerDiscreteScheduler``), ``dpm_solver`` (DPM-Solver++,
    ``DPMSolverMultistepScheduler``) or ``from_model`` (the class the model's
    ``scheduler_config.json`` names, e.g. SD 1.5's PNDM). ``guidance`` above 1 is classifier-free
    guidance as in diffusers' pipelines (the unconditional and conditional halves run in one batch);
    1 or less samples the conditional model alone (SDXL-Turbo's 0 included). Guidance needs a null
    condition: a null class (``null_class`` in ``diffquant.json``, or a class embedding beyond the
    classes) or, for text models, the empty prompt.

    ``clip_sample`` sets the x0 clipping of schedulers that have it (DDIM, DDPM): ``auto`` (the
    default, left out of the serialized spec so existing hashes hold) keeps the scheduler config's
    value without guidance and turns clipping off with guidance, because DDIM clips each step's x0
    prediction but keeps the unclipped guided noise prediction, which washes samples out
    (bench/guidance.py); ``true`` / ``false`` force it either way.
    """

    name: Literal["ddim", "euler", "dpm_solver", "from_model"] = "ddim"
    steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(1.0, ge=0.0, le=50.0)
    clip_sample: bool | Literal["auto"] = "auto"

    @model_serializer(mode="wrap")
    def _omit_default_clip(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.clip_sample == "auto":
            data.pop("clip_sample", None)
        return data

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (``guidance`` above 1, as in diffusers' pipelines)."""
        return self.guidance > 1.0

    @property
    def halves(self) -> int:
        """Denoiser inputs per sample and step: 2 with guidance (unconditional and conditional), else 1."""
        return 2 if self.guided else 1


class CalibrationSpec(_Strict):
    """Calibration pool, selection strategy and activation observer.

    The pool is every denoiser input of ``trajectories`` FP sampling runs; ``labels_file`` (one
    class label per line) sets their conditions for user models, else classes cycle.
    """

    strategy: Literal[
        "random", "uniform_timesteps", "normal_timesteps", "density_diversity", "density_diversity_kcenter"
    ] = "density_diversity"
    size: int = Field(256, ge=1, le=MAX_COUNT)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    trajectories: int = Field(
        64, ge=1, le=MAX_TRAJECTORIES, description="FP sampling trajectories in the candidate pool"
    )
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    labels_file: str | None = None
    normal_mean: float = Field(0.4, ge=0.0, le=1.0, description="normal_timesteps: mean as a fraction of T")
    normal_std: float = Field(0.4, gt=0.0, description="normal_timesteps: std as a fraction of T")
    radius: float | None = Field(None, gt=0.0, description="density_diversity radius; None = median distance")
    diversity_weight: float = Field(1.2, ge=0.0, description="density_diversity lambda")
    feature_module: str | None = Field(
        None, description="denoiser module whose output gives pool features; None: the model family's default"
    )


class ActivationQuantSpec(_Strict):
    """Activation (layer input) format of the uniform plan; per-tensor, None keeps float.

    ``format`` is ``int`` (signed integers of ``bits``; the default) or ``fp8_e4m3`` / ``fp8_e5m2``
    with ``bits: 8``. ``shift`` ``channel`` subtracts a per-input-channel offset (the midpoint of
    each channel's calibration range) before the symmetric input quantizer and adds it back through
    the bias (``b + W c``), so zero points stay 0 (:mod:`diffquant.quant.transforms`). Both are left
    out of the serialized spec at their defaults (``int``, ``none``), so existing spec hashes do not
    change.
    """

    bits: int | None = Field(8, ge=MIN_BITS, le=MAX_BITS)
    format: ActivationFormat = "int"
    shift: Literal["none", "channel"] = "none"

    @model_validator(mode="after")
    def _format_fits_bits(self) -> ActivationQuantSpec:
        if self.format != "int" and self.bits is None:
            raise ValueError(f"format {self.format} quantizes activations; set bits: 8 or format: int")
        problem = format_problem(self.format, self.bits)
        if problem is not None:
            raise ValueError(problem)
        return self

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.format == "int":
            data.pop("format", None)
        if self.shift == "none":
            data.pop("shift", None)
        return data


class SmoothSpec(_Strict):
    """SmoothQuant channel balancing of layer inputs (:mod:`diffquant.outliers.smoothing`).

    Per input channel ``s = max|X|^alpha / max|W|^(1 - alpha)`` (``X`` over every calibration
    input, all timesteps); the layer computes ``(X / s) (s W)``. ``1 / s`` is folded into the
    preceding norm's affine or the previous Linear where the graph allows it (checked on the float
    model), else the layer multiplies its input by ``1 / s`` before its input quantizer; the plan
    records which (``smooth.into``). ``search`` picks alpha per layer (per fold group) from
    ``{0, 1/grid, ..., 1}``, or no smoothing, by the layer's output error on calibration inputs.
    """

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength in [0, 1]")
    layers: list[str] | None = Field(
        None, description="globs of layers to smooth; None: every layer with a quantized input"
    )
    search: bool = Field(False, description="grid-search alpha per layer against the layer's output error")
    grid: int = Field(20, ge=1, le=1000, description="search: alpha steps of 1/grid")
    fold: bool = Field(True, description="fold 1/s into the preceding norm or Linear where possible")


class LowRankSpec(_Strict):
    """SVDQuant's low-rank branch (:mod:`diffquant.outliers.low_rank`).

    After smoothing, ``W = L1 L2 + R`` with ``L1 L2`` the top ``rank`` singular directions, kept
    unquantized in ``dtype`` beside the quantized GEMM of ``R``.
    """

    rank: int = Field(32, ge=1, le=65_536)
    layers: list[str] | None = Field(
        None, description="globs of layers with a branch; None: every Linear/Conv2d with a quantized weight"
    )
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="values of L1 and L2 (stored in this type; computed in the model's dtype)"
    )


class LayerOverride(_Strict):
    """Give the layers matching ``layers`` (globs) these bit-widths (None keeps that part float)."""

    layers: list[str] = Field(min_length=1)
    weight_bits: int | None = Field(8, ge=MIN_BITS, le=MAX_BITS)
    activation_bits: int | None = Field(8, ge=MIN_BITS, le=MAX_BITS)


class QuantizeSpec(_Strict):
    """The uniform plan used when allocation is off.

    Every quantizable layer gets ``weight`` and ``activation``; then each entry of ``overrides``
    (in order, later wins) sets the bits of the layers it matches; ``keep_full_precision`` is
    applied last and keeps its layers entirely in float. Left unset (None), it is the model
    family's default (first/last layers, time embedding, position/context embedders; see
    :mod:`diffquant.models.families`); ``[]`` quantizes every layer.

    The outlier methods are off by default and apply to the quantized layers of the plan, uniform
    or allocated: ``activation.shift`` (per-channel input offset), ``smooth`` (SmoothQuant) and
    ``low_rank`` (SVDQuant's branch), in that order (:mod:`diffquant.outliers`).
    """

    weight: WeightConfig | None = WeightConfig(bits=8)
    activation: ActivationQuantSpec = ActivationQuantSpec(bits=8)
    overrides: list[LayerOverride] = Field(default_factory=list)
    keep_full_precision: list[str] | None = None
    outlier_tokens: Literal["auto", "off"] | int = Field(
        "auto",
        description="text models: leading tokens whose cross-attention keys/values stay in float "
        "(MixDQ's BOS-aware quantization); auto detects them, off disables, N forces N; "
        "applies to allocated plans too",
    )
    smooth: SmoothSpec | None = Field(
        None, description="SmoothQuant channel balancing (None: off); applies to allocated plans too"
    )
    low_rank: LowRankSpec | None = Field(
        None, description="SVDQuant low-rank branch (None: off); applies to allocated plans too"
    )

    @field_validator("weight", mode="before")
    @classmethod
    def _float_weights(cls, value: Any) -> Any:
        # ``weight: {bits: null}`` (the older form) keeps weights in float, like ``weight: null``
        if isinstance(value, dict) and "bits" in value and value["bits"] is None:
            return None
        return value

    @field_validator("outlier_tokens", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare ``off`` / ``on`` as a boolean
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value

    @model_validator(mode="after")
    def _outlier_tokens(self) -> QuantizeSpec:
        if isinstance(self.outlier_tokens, int) and not 0 <= self.outlier_tokens <= 4096:
            raise ValueError("outlier_tokens must be auto, off or a count from 0 to 4096")
        return self

    @model_serializer(mode="wrap")
    def _omit_off_methods(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # off (None) is the default and is left out: existing spec hashes do not change
        data = handler(self)
        for key in ("smooth", "low_rank"):
            if getattr(self, key) is None:
                data.pop(key, None)
        return data


class BudgetSpec(_Strict):
    """Upper bounds for allocation; set at least one."""

    avg_weight_bits: float | None = Field(None, gt=0)
    bytes: float | None = Field(None, gt=0, description="all parameters, quantized weights bit-packed")
    bitops: float | None = Field(None, gt=0, description="MACs x weight bits x activation bits, one call")
    latency_ms: float | None = Field(
        None, gt=0, description="predicted ms of one call: the latency table's overhead_ms plus its chosen entries"
    )

    def as_dict(self) -> dict[str, float]:
        """The budgets that are set."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AllocationSpec(_Strict):
    """Mixed precision: per-layer options chosen by an integer program under a budget.

    Weight candidates are ``weight_bits`` per output channel plus ``group_bits`` x ``group_sizes``
    group-wise (option names like ``w4g32a8``; only for layers whose input channels the group size
    divides). Options are every (weight candidate, activation bits) pair; the objective
    is ``quality * noise + content * content_metric`` (each normalised to [0, 1]).

    ``cost`` says what the ``avg_weight_bits`` and ``bytes`` budgets count: ``plan`` (default)
    each weight at its bits, bit-packed, with its fp32 scales; ``deployed`` what the export for
    ``export.device_class`` stores (:meth:`diffquant.devices.DeviceClass.storage_bits`): 3-bit
    weights as INT4, 2-bit weights as INT2 on ``cpu`` and INT4 on the TensorRT classes, plus
    each weight's zero points. ``bitops`` and ``latency_ms`` are unchanged by it. The default is
    left out of the serialized spec, so existing specs keep their hash.

    Content layers (``content_layers``; None: the model family's, MixDQ's cross-attention and
    feed-forward layers or their class-conditional counterparts) are also scored on final samples
    against FP samples from the same noise: ``ssim`` (1 - SSIM, any model) or ``classifier_kl``
    (the evaluation classifier's logits, digits models only); ``auto`` takes
    :data:`diffquant.mixed_precision.content.REFERENCE_CONTENT_METRIC` where the classifier can
    judge the model, else ``ssim``. The model family's full-precision layers stay in float unless
    ``quantize_family_fp_layers`` (they count 32 bits toward the budget). ``content_metric`` and
    ``quantize_family_fp_layers`` are left out of the serialized spec at their defaults.

    ``weight_formats`` and ``activation_formats`` offer floating-point formats as options beside
    the integer bits (issue 15): ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3`` weights
    per output channel and ``fp4_e2m1`` as NVFP4 (blocks of 16 input channels, FP8 block scales;
    only layers whose input channels 16 divides), FP8 inputs per tensor; each is measured like
    the integer options and costs its exact bytes (option names ``wfp8e4m3a8``,
    ``w4afp8e4m3``). ``export.device_class`` must run each of them on some layer kind; layers it
    cannot run them on (FP4 convolutions) lose those options. Empty (the default, left out of the
    serialized spec): integer options only.

    ``noise_sum`` says how the quality term adds the layers' noise: ``power`` (the default, left
    out of the serialized spec) sums each part's relative noise power, the model of independent
    errors, which predicts the one-step denoiser-output SQNR; ``amplitude`` sums its square root,
    the triangle inequality's bound for errors that add coherently, which predicts the final
    samples better where errors accumulate along the trajectory (BENCHMARKS.md "How layer noise
    adds up"). It changes the solve only, not the sensitivity measurement.

    ``ranks`` offers SVDQuant low-rank branches as options (issue 15): every quantized weight
    candidate is also offered with a float16 branch of each nonzero rank (``w4a8r16``), its
    sensitivity measured with the branch (only the residual ``W - L1 L2`` quantized) and its
    bytes, average bits and BitOps counting the branch, so the solver buys a branch where it is
    cheaper than more bits. ``[0]`` (the default, left out of the serialized spec) offers none.
    A branch is taken only by a layer with ``min(out, in)`` at least its rank. It excludes
    ``quantize.low_rank`` (one place sets the branches) and GPTQ rounding (not combined with
    branches yet).
    """

    weight_bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 6, 8], min_length=1)
    group_bits: list[int] = Field(default_factory=lambda: [4], description="bits of the group-wise weight options")
    group_sizes: list[int] = Field(
        default_factory=lambda: [32, 64], description="group sizes of group-wise options (layers that allow them)"
    )
    activation_bits: list[int] = Field(default_factory=lambda: [8], min_length=1)
    allow_float_weights: bool = False
    allow_float_activations: bool = False
    budget: BudgetSpec = BudgetSpec(avg_weight_bits=4.0)
    objective: dict[Literal["quality", "content"], float] = Field(
        default_factory=lambda: {"quality": 1.0, "content": 1.0}
    )
    quality_metric: Literal["sqnr", "psnr"] = Field(
        "sqnr",
        description="sqnr: denoiser output on calibration inputs (cheap); psnr: final samples vs FP "
        "(content_samples DDIM runs per option and layer)",
    )
    noise_sum: Literal["power", "amplitude"] = Field(
        "power",
        description="how layers' noise adds up in the objective: power (independent errors) or amplitude "
        "(errors that add coherently along the sampling trajectory: the sum of sqrt(noise power))",
    )
    content_layers: list[str] | None = Field(
        None, description="globs scored by the content metric too; None: the model family's, [] none"
    )
    content_metric: Literal["auto", "ssim", "classifier_kl"] = Field(
        "auto", description="content score of final samples vs FP: 1 - SSIM, or the classifier's logit KL"
    )
    quantize_family_fp_layers: bool = Field(
        False, description="let the solver quantize the family's full-precision layers (else they stay float)"
    )
    content_samples: int = Field(100, ge=10, le=MAX_COUNT)
    sensitivity_inputs: int = Field(
        128, ge=1, le=MAX_COUNT, description="calibration inputs (evenly spaced) used for SQNR"
    )
    tie_qkv: bool = True
    latency_table: str | None = Field(
        None,
        description="JSON {layer: {option: ms}}, or the table diffquant profile writes; needed for budget.latency_ms",
    )
    pinned: dict[str, str] = Field(default_factory=dict, description="glob -> option name, e.g. conv_out: w8a8")
    weight_formats: list[Literal["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]] = Field(
        default_factory=list,
        description="float weight formats offered beside the integer bits (each at its own width; fp4_e2m1: NVFP4)",
    )
    activation_formats: list[Literal["fp8_e4m3", "fp8_e5m2"]] = Field(
        default_factory=list, description="FP8 input formats offered beside activation_bits"
    )
    ranks: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="low-rank branch ranks offered with each weight candidate (0: no branch)",
    )
    cost: Literal["plan", "deployed"] = Field(
        "plan",
        description="what avg_weight_bits and bytes count: plan = the plan's bits; deployed = the export's "
        "storage types on export.device_class (INT2/INT4/INT8 plus zero points)",
    )

    @model_validator(mode="after")
    def _valid(self) -> AllocationSpec:
        if any(size < 2 for size in self.group_sizes):
            raise ValueError("group sizes must be at least 2")
        if any(rank < 0 or rank > 65_536 for rank in self.ranks):
            raise ValueError("ranks must be from 0 (no branch) to 65536")
        for bits in [*self.weight_bits, *self.group_bits, *self.activation_bits]:
            if not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(f"candidate bits {bits} outside {MIN_BITS}-{MAX_BITS}")
        if not self.budget.as_dict():
            raise ValueError("allocation.budget needs at least one of avg_weight_bits, bytes, bitops, latency_ms")
        if self.budget.latency_ms is not None and self.latency_table is None:
            raise ValueError("budget.latency_ms needs allocation.latency_table (JSON: layer -> option -> ms)")
        if self.cost == "deployed" and self.budget.avg_weight_bits is None and self.budget.bytes is None:
            raise ValueError(
                "cost: deployed counts stored bytes, which only budget.avg_weight_bits and budget.bytes measure; "
                "set one of them or leave cost at plan"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.cost == "plan":
            data.pop("cost", None)
        if self.noise_sum == "power":
            data.pop("noise_sum", None)
        if self.ranks == [0]:
            data.pop("ranks", None)
        for key in ("weight_formats", "activation_formats"):
            if not getattr(self, key):
                data.pop(key, None)
        if self.content_metric == "auto":
            data.pop("content_metric", None)
        if not self.quantize_family_fp_layers:
            data.pop("quantize_family_fp_layers", None)
        return data


class TrainableSpec(_Strict):
    """Which quantized layers fine-tuning trains (QuEST): a rule plus extra globs."""

    rule: Literal["all", "time_embedding", "attention", "top_k"] = "all"
    layers: list[str] = Field(default_factory=list, description="extra layer globs")
    top_k: int = Field(8, ge=1, le=MAX_COUNT, description="rule top_k: the most sensitive layers (needs allocation)")


class FinetuneSpec(_Strict):
    """Quantized fine-tuning: QALoRA adapters + LSQ step sizes, distilled from the FP teacher without data.

    ``timestep_groups`` above 1 (one activation scale per group of timesteps) is refused: every
    group would need its own engine (or a per-step scale input TensorRT cannot fuse) at deployment.
    """

    steps: int = Field(2000, ge=1, le=MAX_COUNT)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    lr: float = Field(1e-3, gt=0, description="adapter learning rate (cosine decay to 5%)")
    scale_lr: float = Field(1e-4, gt=0, description="LSQ step-size learning rate")
    rank: int = Field(4, ge=1, le=4096)
    alpha: float | None = Field(None, gt=0, description="adapter scale alpha / rank (default alpha = rank)")
    learn_weight_scales: bool = True
    learn_activation_scales: bool = True
    trainable: TrainableSpec = TrainableSpec()
    timestep_groups: int = Field(1, ge=1, le=1000)
    checkpoint_every: int = Field(200, ge=1, le=MAX_COUNT)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _deployable(self) -> FinetuneSpec:
        if self.timestep_groups > 1:
            raise ValueError(
                "timestep_groups > 1 is not available: per-group activation scales would need one engine per "
                "timestep group at deployment; use 1 (one learned scale per tensor)"
            )
        return self


class ExportSpec(_Strict):
    """ONNX export (Q/DQ), its rules check and parity, and the engine.

    ``target`` picks the Q/DQ form: ``tensorrt`` (default) is TensorRT's explicit quantization
    (INT8 symmetric activations on layer inputs, weight DequantizeLinear); ``onnxruntime`` adds
    output quantizers to the Conv2d layers that can fuse and writes UINT8 activations (zero point
    128), int32 biases and output Q/DQ so that onnxruntime's CPU optimizer turns them into
    ``QLinearConv``. The field is left out of the serialized spec (so of the spec hash and the
    MLflow params) at its default, so existing specs keep their hash.

    ``tensorrt: auto`` builds an engine where TensorRT and a GPU exist and otherwise records why
    not; ``on`` makes a missing TensorRT an error; ``off`` never builds. Parity compares
    onnxruntime with the PyTorch model on the calibration inputs and, with ``parity_samples`` > 0,
    on final samples from the same noise; a failed check fails the run when ``enforce_parity``.

    ``device_class`` (``orin | ampere | ada | hopper | blackwell | cpu``, :mod:`diffquant.devices`)
    is the class of machine the plan is for: the allocator offers only what it runs, the rules
    check refuses what it cannot run, and the bundle records it. Unset, it is the target's default
    (``tensorrt`` -> ``orin``, ``onnxruntime`` -> ``cpu``); the default is left out of the
    serialized spec (written or not), so existing specs keep their hash. ``cpu`` takes the
    onnxruntime form and the GPU classes the TensorRT form.
    """

    onnx: bool = True
    target: Literal["tensorrt", "onnxruntime"] = "tensorrt"
    device_class: DeviceClassName | None = None
    tensorrt: Literal["auto", "on", "off"] = "auto"
    opset: int = Field(21, ge=13, le=23)
    # 200, not 500: onnxruntime's integer kernels sample at 1.3-2.6 ms per sample and step on 2
    # cores (2-4x PyTorch's fake quant), so 500 samples took 16-33 s of the default run; on paired
    # noise the two agree to 54 dB PSNR and identical accuracy, and 200 samples still resolve the
    # 0.01 accuracy tolerance (2 samples)
    parity_samples: int = Field(
        200, ge=0, le=MAX_COUNT, description="samples for the sampling parity check (0: outputs only)"
    )
    enforce_parity: bool = True
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization level")
    max_batch: int = Field(32, ge=1, le=MAX_BATCH, description="largest batch of the TensorRT optimization profile")

    @field_validator("tensorrt", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare ``on`` / ``off`` (also yes/no) as a boolean
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_device_class(cls, data: Any) -> Any:
        # the target's own class, written out, is the same spec as leaving it unset
        if isinstance(data, dict) and data.get("device_class") is not None:
            target = data.get("target", "tensorrt")
            if isinstance(target, str) and DEFAULT_DEVICE_CLASS.get(target) == data["device_class"]:
                data = {k: v for k, v in data.items() if k != "device_class"}
        return data

    @model_validator(mode="after")
    def _device_class_takes_target(self) -> ExportSpec:
        try:
            resolve_device_class(self.device_class, self.target)
        except ConfigError as error:
            raise ValueError(f"export.device_class {self.device_class}: {error.message}") from None
        return self

    @property
    def device(self) -> DeviceClass:
        """The device class the plan is for: ``device_class``, else the target's default."""
        return resolve_device_class(self.device_class, self.target)

    @model_validator(mode="after")
    def _engine_needs_tensorrt_form(self) -> ExportSpec:
        if self.target == "onnxruntime" and self.tensorrt == "on":
            raise ValueError(
                "export.tensorrt 'on' needs export.target 'tensorrt' (TensorRT does not take the onnxruntime form)"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_default_target(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.target == "tensorrt":
            data.pop("target", None)
        if self.device_class is None:
            data.pop("device_class", None)
        return data


class EvaluateSpec(_Strict):
    """Evaluation: number of samples (classes cycle 0-9), the noise seed and optional metric models.

    ``clip_model`` is a local folder with a transformers CLIP model (never downloaded) for the CLIP
    score of a text-conditioned model's images against their prompts (:mod:`diffquant.clip_score`).
    Unset, it is left out of the serialized spec, so existing specs keep their hash.
    """

    samples: int = Field(2000, ge=10, le=MAX_COUNT)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # 256, not 1000: the same samples (noise is drawn for all samples first), 4-15% faster on 2 CPU
    # cores (bench: 2,000 samples, DDIM 50); a GPU preset sets its own
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    sqnr_inputs: int = Field(256, ge=1, le=MAX_COUNT, description="pool inputs (not in the calibration set) for SQNR")
    clip_model: str | None = Field(None, min_length=1, description="local CLIP model folder for the CLIP score")

    @model_serializer(mode="wrap")
    def _omit_unset_clip_model(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.clip_model is None:
            data.pop("clip_model", None)
        return data


REGISTERED_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class GatesSpec(_Strict):
    """What a registered version must meet to become ``champion`` (None: no such gate)."""

    max_fd_ratio: float | None = Field(1.5, gt=0, description="quantized FD to real / FP's FD to real")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="condition accuracy of quantized samples")
    max_size_ratio: float | None = Field(None, gt=0, description="packed weight bytes / FP32 bytes")


class PromoteSpec(_Strict):
    """Registration in the MLflow model registry and gated promotion (the ``champion`` alias).

    ``registered_model`` defaults to the source model's name (``digits-unet``); letters, digits,
    ``.``, ``_`` and ``-`` only, so the name is also a valid path and URI segment.
    """

    register_model: bool = True
    registered_model: str | None = Field(None, pattern=REGISTERED_MODEL_PATTERN)
    gates: GatesSpec = GatesSpec()


class RuntimeSpec(_Strict):
    """Where the stages run: the Prefect task runner, and the torch device and dtype of every PyTorch pass.

    ``default`` runs mapped tasks on Prefect's thread pool (``workers`` threads); ``dask`` on
    prefect-dask's DaskTaskRunner over a local cluster of ``workers`` processes, one thread each.

    ``device`` (``auto``: the first GPU torch sees, else the CPU) and ``dtype`` (of the
    full-precision model and the non-quantized parts; quantizer scales, observers and the integer
    grid stay in float32, and sampling keeps its latents in float32) place every PyTorch pass:
    trajectories, features, calibration, sensitivity, fine-tuning and evaluation. Noise is drawn
    on the CPU generator, so a seed gives the same noise on every device. The ONNX export traces
    and its parity check runs on the CPU in float32 (what onnxruntime computes). The section stays
    out of the spec hash; cached pools and sensitivity tables are shared between devices (they
    agree up to float rounding on float32); the cached full-precision evaluation is not (it is the
    reference of the paired metrics, so its key holds the device type, dtype and sampling batch).

    ``batch_size`` bounds every PyTorch pass: no forward of the denoiser takes more inputs (a
    guided sampling step holds both halves of ``batch_size // 2`` samples; fine-tuning splits a
    larger ``finetune.batch_size`` into micro-batches and accumulates their gradients). Unset,
    the passes over recorded inputs (pool features, activation calibration, GPTQ, sensitivity,
    SQNR, parity outputs, fine-tuning targets) take ``calibration.batch_size`` and the sampling
    passes (pool trajectories, evaluation, content probes, parity sampling) ``evaluate.batch_size``.
    It is left out of the serialized spec at its default.
    """

    runner: Literal["default", "dask"] = "default"
    workers: int = Field(1, ge=1, le=64)
    layers_per_task: int = Field(4, ge=1, le=MAX_COUNT, description="layers measured by one sensitivity task")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d{1,2})$", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="most denoiser inputs in one forward of any pass (None: the spec's own)"
    )

    def batch(self, own: int) -> int:
        """The batch a pass whose own batch size is ``own`` runs at: ``own``, at most ``batch_size``."""
        return own if self.batch_size is None else min(own, self.batch_size)

    @model_serializer(mode="wrap")
    def _omit_default_batch(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.batch_size is None:
            data.pop("batch_size", None)
        return data


def _device_class_hint(w_format: str, a_format: str) -> str:
    """``; set export.device_class to ...``: the classes that run these formats on Linear layers (empty if none)."""
    runs = [
        name for name, entry in DEVICE_CLASSES.items() if entry.format_problem("linear", w_format, a_format) is None
    ]
    if not runs:
        return ""
    names = runs[0] if len(runs) == 1 else f"{', '.join(runs[:-1])} or {runs[-1]}"
    return f"; set export.device_class to {names}"


class CompressionSpec(_Strict):
    """Everything one ``diffquant compress`` run needs."""

    model: ModelSource = ModelSource(name="digits-unet")
    sampler: SamplerSpec = SamplerSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    allocation: AllocationSpec | None = None
    finetune: FinetuneSpec | None = None
    export: ExportSpec = ExportSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    promote: PromoteSpec = PromoteSpec()
    runtime: RuntimeSpec = RuntimeSpec()

    @model_validator(mode="after")
    def _calibration_fits_pool(self) -> CompressionSpec:
        pool = self.calibration.trajectories * self.sampler.steps * self.sampler.halves
        if self.calibration.size > pool:
            guided = " x 2 guidance halves" if self.sampler.guided else ""
            raise ValueError(
                f"calibration.size {self.calibration.size} exceeds the candidate pool of {pool} "
                f"(calibration.trajectories {self.calibration.trajectories} x sampler.steps "
                f"{self.sampler.steps}{guided}); lower the size or add trajectories"
            )
        return self

    @model_validator(mode="after")
    def _format_options_run_on_the_device(self) -> CompressionSpec:
        if self.allocation is None:
            return self
        device = self.export.device
        offered = [("weight", f, f, "int") for f in self.allocation.weight_formats]
        offered += [("activation", f, "int", f) for f in self.allocation.activation_formats]
        for part, fmt, w_format, a_format in offered:
            problems = [device.format_problem(kind, w_format, a_format) for kind in ("linear", "conv")]
            if all(problem is not None for problem in problems):
                raise ValueError(
                    f"allocation.{part}_formats {fmt} cannot run on device class {device.name}: {problems[0]}"
                    f"{_device_class_hint(w_format, a_format)}"
                )
        return self

    @model_validator(mode="after")
    def _branch_options(self) -> CompressionSpec:
        if self.allocation is None or not any(self.allocation.ranks):
            return self
        if self.quantize.low_rank is not None:
            raise ValueError(
                "allocation.ranks offers low-rank branches per layer, quantize.low_rank gives every layer one; "
                "set one of them"
            )
        weight = self.quantize.weight
        if weight is not None and weight.rounding == "gptq":
            raise ValueError(
                "allocation.ranks: low-rank branches are not combined with gptq rounding yet; "
                "set quantize.weight.rounding to nearest or ranks to [0]"
            )
        return self

    @model_validator(mode="after")
    def _float_formats(self) -> CompressionSpec:
        weight = self.quantize.weight
        w_format = weight.format if weight is not None else "int"
        a_format = self.quantize.activation.format if self.quantize.activation.bits is not None else "int"
        if w_format == "int" and a_format == "int":
            return self
        key = "quantize.weight.format" if w_format != "int" else "quantize.activation.format"
        fmt = w_format if w_format != "int" else a_format
        if self.allocation is not None:
            where = "allocation.weight_formats" if w_format != "int" else "allocation.activation_formats"
            raise ValueError(
                f"{key} {fmt}: with mixed precision (allocation) the options choose each layer's format; "
                f"offer {fmt} in {where} and leave the format at int"
            )
        if self.finetune is not None and self.finetune.learn_weight_scales and w_format == "fp4_e2m1":
            raise ValueError(
                "finetune.learn_weight_scales: NVFP4 (fp4_e2m1) block scales are FP8 codes and are not learned; "
                "set it to false"
            )
        device = self.export.device
        problem = device.format_problem("linear", w_format, a_format)
        if problem is not None:
            raise ValueError(
                f"{key} {fmt} cannot run on device class {device.name}: {problem}{_device_class_hint(w_format, a_format)}"
            )
        return self

    @model_validator(mode="after")
    def _guided_batch_holds_both_halves(self) -> CompressionSpec:
        if self.sampler.guided and self.runtime.batch_size == 1:
            raise ValueError(
                "runtime.batch_size 1 cannot hold a guided sampling step (its unconditional and conditional "
                "halves run in one forward); use 2 or more"
            )
        return self

    @property
    def forward_batch(self) -> int:
        """Inputs per forward of the passes over recorded inputs: ``calibration.batch_size``, at most ``runtime.batch_size``.

        Pool features, activation calibration, GPTQ, sensitivity, SQNR, parity outputs and the
        fine-tuning targets and micro-batches.
        """
        return self.runtime.batch(self.calibration.batch_size)

    @property
    def sampling_batch(self) -> int:
        """Inputs per forward of the sampling passes: ``evaluate.batch_size``, at most ``runtime.batch_size``.

        Pool trajectories, evaluation, the sensitivity's final-sample probes and parity sampling.
        """
        return self.runtime.batch(self.evaluate.batch_size)

    def registered_model_name(self) -> str:
        """Registry name of the versions: ``promote.registered_model``, else ``model.name``, else the folder name of ``model.path``."""
        return self.promote.registered_model or self.model.name or Path(str(self.model.path)).name

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as plain JSON-compatible data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """Return the spec as YAML text that :func:`load_spec` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def spec_hash(self) -> str:
        """Return a sha256 of the canonical JSON form (first 16 hex digits).

        ``runtime`` is left out: where stages run does not change what they compute.
        """
        data = {k: v for k, v in self.to_dict().items() if k != "runtime"}
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def flat_params(self) -> dict[str, str]:
        """Return ``section.key -> value`` strings (MLflow params)."""
        return {
            key: json.dumps(value) if not isinstance(value, str) else value
            for key, value in flatten(self.to_dict()).items()
        }


_PARAM_KEY = re.compile(r"^[A-Za-z0-9_\-. /]+$")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (lists and scalars are leaves).

    A dict whose keys are not valid MLflow parameter names (globs such as ``allocation.pinned``'s
    ``unet.time_embedding.*``) stays one leaf.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(_PARAM_KEY.match(str(k)) for k in value):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<spec>"
    if first["type"] == "extra_forbidden":
        return f"unknown spec key {key!r}"
    if first["type"] in {"model_type", "model_attributes_type", "dict_type"}:
        shown = repr(first.get("input"))
        shown = shown if len(shown) <= 40 else f"{shown[:37]}..."
        return (
            f"invalid spec value at {key!r}: it is a section, so it takes a mapping of keys "
            f"(e.g. --set {key}.<key>=value), not {shown}"
        )
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid spec value at {key!r}: {message}"


def spec_from_dict(data: dict[str, Any]) -> CompressionSpec:
    """Validate plain data into a spec.

    Raises:
        SpecError: Naming the first offending key.
    """
    if not isinstance(data, dict):
        raise SpecError("a spec must be a mapping of sections (model, sampler, quantize, ...)")
    try:
        return CompressionSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_format_error(error)) from None


class _RefusedError(Exception):
    """YAML that parses but is refused (duplicate keys, alias expansion, nesting); the message is the reason."""


class _SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: the base class raises its own error
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _RefusedError(f"key {key!r} appears twice (lines {first} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Count the nodes of ``root`` with every alias expanded, stopping past ``limit`` (no recursion)."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if done:
            entered.discard(id(node))
            sizes[id(node)] = total = 1 + sum(sizes[id(child)] for child in children)
            if total > limit:
                raise _RefusedError(
                    f"it expands to more than {limit:,} values through aliases (*name); write the values out"
                )
            continue
        if id(node) in sizes:
            continue
        entered.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in entered:
                raise _RefusedError("an alias (*name) refers to a mapping or list that contains it; remove the cycle")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _load_yaml(text: str) -> Any:
    """Parse one YAML document safely: duplicate keys, alias bombs and cycles are refused.

    Raises:
        yaml.YAMLError: Not valid YAML.
        _RefusedError: Valid YAML this loader will not construct, or values JSON cannot hold.
    """
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, MAX_YAML_NODES)
        data = loader.construct_document(node)
        _check_plain(data)
        return data
    except RecursionError:
        raise _RefusedError("it is nested too deeply; a spec has a few levels of sections") from None
    finally:
        loader.dispose()


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, key: str = "") -> None:
    """Refuse YAML values JSON cannot hold (dates, ``!!binary``, ``!!set``), naming their key."""
    if isinstance(value, dict):
        for child_key, child in value.items():
            if not isinstance(child_key, _PLAIN):
                where = repr(key) if key else "the top level"
                raise _RefusedError(f"a key under {where} is a YAML {type(child_key).__name__}; write plain keys")
            _check_plain(child, f"{key}.{child_key}" if key else str(child_key))
    elif isinstance(value, list):
        for child in value:
            _check_plain(child, key)
    elif not isinstance(value, _PLAIN):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else f"{shown[:37]}..."
        where = repr(key) if key else "the value"
        raise _RefusedError(
            f"{where} is a YAML {type(value).__name__} ({shown}), which a spec cannot hold; "
            "write a plain number or string (quote it)"
        )


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: where and what, with a hint for tab indentation."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = " ".join(str(problem).split())
    if "'\\t'" in problem:
        problem = "a tab character cannot indent YAML; indent with spaces"
    return f"{where}: {problem}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into the key path and a YAML-parsed value.

    A value that is not valid YAML is kept as the raw string.

    Raises:
        SpecError: If the item has no ``=``, an empty key or key part, or a refused YAML value
            (duplicate keys, alias expansion).
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"override {item!r} must look like section.key=value")
    path = [part.strip() for part in key.strip().split(".")]
    if not all(path):
        raise SpecError(f"override {item!r} has an empty key part; write section.key=value")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except _RefusedError as reason:
        raise SpecError(f"override {item!r} is refused: {reason}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``section.key=value`` override applied."""
    result = json.loads(json.dumps(data))
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return result


def read_spec_file(path: Path) -> dict[str, Any]:
    """Read a spec YAML file into plain data, refusing anything that is not a small spec file.

    Raises:
        SpecError: Missing, a directory or special file, too large, not UTF-8, empty, invalid or
            refused YAML (duplicate keys, alias bombs), or not a mapping.
    """
    path = Path(path)
    if not path.exists():
        raise SpecError(f"config file {path} does not exist")
    if path.is_dir():
        raise SpecError(
            f"config file {path} is a directory; give a YAML spec file such as configs/digits-unet-w8a8.yaml"
        )
    if not path.is_file():
        raise SpecError(f"config file {path} is not a regular file; give a YAML spec file")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as error:
        raise SpecError(f"config file {path} cannot be read ({error.strerror or error})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"config file {path} is larger than {MAX_SPEC_BYTES:,} bytes; a spec is a small YAML file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SpecError(
            f"config file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start + len(raw) - len(error.object)}); "
            "save it as UTF-8"
        ) from None
    try:
        loaded = _load_yaml(text)
    except yaml.YAMLError as error:
        raise SpecError(f"config file {path} is not valid YAML{_yaml_problem(error)}") from None
    except _RefusedError as reason:
        raise SpecError(f"config file {path} is refused: {reason}") from None
    if loaded is None:
        raise SpecError(
            f"config file {path} is empty; write a spec in it (see configs/) or leave CONFIG out for the defaults"
        )
    if not isinstance(loaded, dict):
        raise SpecError(
            f"config file {path} must hold a mapping of sections (model, sampler, ...), not a {type(loaded).__name__}"
        )
    return loaded


def load_spec(path: Path | None = None, overrides: list[str] | None = None) -> CompressionSpec:
    """Read a spec from YAML (defaults when ``path`` is None) and apply overrides.

    ``model`` is a one-of: overriding ``model.path`` drops the default or file's
    ``model.name`` (and the reverse), unless both are overridden.

    Args:
        path: A YAML file; None means the built-in default (the W8A8 preset).
        overrides: ``section.key=value`` strings, applied in order.

    Raises:
        SpecError: Missing or unreadable file, bad YAML, unknown keys or invalid values.
    """
    data: dict[str, Any] = read_spec_file(Path(path)) if path is not None else {}
    base = CompressionSpec().to_dict()
    merged = _deep_merge(base, data)
    overrides = overrides or []
    paths = [parse_override(item)[0] for item in overrides]
    touched = {p[1] for p in paths if p[0] == "model" and len(p) == 2}
    if touched & {"name", "path"} and isinstance(merged.get("model"), dict):
        merged["model"] = {k: v for k, v in merged["model"].items() if k not in {"name", "path"} or k in touched}
    return spec_from_dict(apply_overrides(merged, overrides))


def available_memory() -> int | None:
    """Bytes of memory this process can still take (None when unknown).

    The smaller of the system's available memory and the headroom under a cgroup v2 limit.
    """
    candidates: list[int] = []
    try:
        import psutil

        candidates.append(int(psutil.virtual_memory().available))
    except ImportError:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            candidates.append(max(int(limit) - int(used), 0))
    except OSError:
        pass
    return min(candidates) if candidates else None


def memory_needs(spec: CompressionSpec, sample_shape: tuple[int, ...]) -> dict[str, int]:
    """Estimated bytes of the largest arrays each count key makes the run hold at once (float32).

    The calibration pool holds every denoiser input of every trajectory (inputs and features);
    evaluation, parity and content scoring hold noise, FP and quantized samples.
    """
    sample = 4 * math.prod(sample_shape)
    needs = {
        "calibration.trajectories": 2
        * spec.calibration.trajectories
        * spec.sampler.steps
        * spec.sampler.halves
        * sample,
        "evaluate.samples": 3 * spec.evaluate.samples * sample,
        "export.parity_samples": 3 * spec.export.parity_samples * sample,
    }
    if spec.allocation is not None:
        needs["allocation.content_samples"] = 3 * spec.allocation.content_samples * sample
    return needs


def check_memory(spec: CompressionSpec, sample_shape: tuple[int, ...], available: int | None = None) -> None:
    """Refuse counts whose arrays cannot fit in memory, before any work starts.

    Args:
        spec: The validated spec.
        sample_shape: ``(channels, height, width)`` of one model sample (or latent).
        available: Bytes available; None measures them (:func:`available_memory`).

    Raises:
        SpecError: Naming the key, the estimate and the memory available.
    """
    available = available_memory() if available is None else available
    if available is None:
        return
    shape = "x".join(str(d) for d in sample_shape)
    for key, need in memory_needs(spec, sample_shape).items():
        if need > available:
            section, name = key.split(".")
            value = getattr(getattr(spec, section), name)
            raise SpecError(
                f"{key} {value} needs about {need / 2**30:.1f} GiB for its {shape} float32 samples, more than "
                f"the {available / 2**30:.1f} GiB of memory available; lower {key}"
            )


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    if isinstance(update.get("model"), dict) and update["model"]:
        out["model"] = dict(update["model"])
    return out
