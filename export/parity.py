"""Parity of an exported ONNX denoiser (onnxruntime, CPU) with the PyTorch fake-quant model.

Two checks:

1. **Denoiser outputs** on calibration inputs. Weights dequantize bit-identically (the export
   stores the fake quant's integers), but float accumulation order differs between PyTorch and
   onnxruntime by a few ulps, and an activation that lies within those ulps of a rounding
   boundary lands on the neighbouring integer: one quantization step of difference that the
   following layers spread and amplify (more activations then sit near other boundaries). The
   fake-quant model does this to itself: on digits-unet W8A8 (512 held-out inputs), PyTorch at
   batch size 7 vs 512 differs by max 0.054, p99.9 0.027, mean 2.5e-4; onnxruntime vs PyTorch
   by max 0.15, p99.9 0.05, mean 9e-4 (W4A8: max 0.087, p99.9 0.037, mean 9e-4). FP exports
   agree to 1e-5. So the check is statistical on unit-scale noise predictions: at most
   ``max_fraction_over`` (1%) of the elements may differ by more than the tolerance and the mean
   absolute difference must stay under ``max_mean_abs`` (5e-3, about 5x what was measured). A
   systematic error (a wrong scale, axis, type or clamp in any layer) moves most elements by far
   more and fails; the report also gives the maximum and the 99.9th percentile.

   The tolerance follows the plan's activation steps. A flip is one step of the quantizer where it
   happens, and a ``b``-bit quantizer's step is ``1/qmax`` of its range (``qmax = 2**(b-1) - 1``),
   so a flip's effect on the output grows with ``127 / qmax`` of the coarsest activation quantizer
   (:func:`activation_step_ratio`: 1 at A8, 4.1 at A6, 18.1 at A4). The per-element tolerance is
   ``tolerance`` (0.05, measured at A8, and the floor) times that ratio: 0.05 at A8, 0.20 at A6,
   0.91 at A4. The mean bound stays absolute: a coarser step makes each flip larger but rarer (an
   activation has to lie within a few ulps of a boundary, a chance proportional to ``1/step``).
   Measured on digits-unet (128 random calibration inputs from 64 trajectories, W8, the family's
   float layers): share of elements over 0.05 / over the derived tolerance / mean:
   A8 1.3e-3 / 1.3e-3 / 7.9e-4; A6 7.4e-3 / 1.2e-4 / 1.3e-3; A4 5.2e-3 / 0 / 7.7e-4; an absolute
   0.05 failed A6 runs at 1.6e-2. Weights need no term: they dequantize bit for bit.
2. **Full DDIM sampling** through onnxruntime from the same noise as PyTorch, with the metrics
   the evaluation uses (condition accuracy, FD to real digits, where a classifier applies) and
   PSNR of ONNX samples against PyTorch samples. Accuracy must agree within ``accuracy_epsilon``
   (absolute, default 0.01) and FD within ``fd_epsilon`` (relative, default 5% of PyTorch's FD
   plus 0.5 absolute: step flips in a 50-step chaotic sampler change a few samples). The PyTorch
   side may be samples drawn before from the same noise, conditions and sampler (the run's
   evaluation of the same model: its first ``samples``): noise and conditions are drawn so that
   the first ``n`` of a larger draw are the ``n`` of a smaller one, so they are the samples this
   check would draw, up to the batch-size rounding flips described above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from diffquant.errors import ExportError, ParityError
from diffquant.evaluation import generate
from diffquant.export.onnx_float import ORT_FP4_NOTE, float4_as_float8, has_float4
from diffquant.metrics import condition_accuracy, frechet_distance, psnr
from diffquant.models.denoisers import DenoiserOutput
from diffquant.models.loading import DiffusionModel
from diffquant.quant.formats import IntFormat
from diffquant.quant.modules import QuantizerMode
from diffquant.quant.plan import activation_quantizers
from diffquant.sampling import Trajectories, as_sampler, denoiser_outputs
from diffquant.spec import SamplerSpec

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.05
DEFAULT_MAX_FRACTION_OVER = 0.01
DEFAULT_MAX_MEAN_ABS = 5e-3
DEFAULT_ACCURACY_EPSILON = 0.01
DEFAULT_FD_RELATIVE_EPSILON = 0.05
DEFAULT_FD_ABSOLUTE_EPSILON = 0.5
# the activation bits the absolute tolerance was measured at
REFERENCE_ACTIVATION_BITS = 8


PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
"""Execution providers parity prefers, best first; the CPU one is always there."""


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, from either distribution (``onnxruntime`` or ``onnxruntime-gpu``).

    Raises:
        ExportError: Neither is installed (the base install has no runtime: the ``cpu`` and
            ``gpu`` extras bring one each, and both install the same module, so only one may be there).
    """
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            "onnxruntime is not installed: pip install 'diffquant[cpu]' (or 'diffquant[gpu]' for "
            "onnxruntime-gpu), or set export.onnx: false"
        ) from None
    return onnxruntime


def parity_providers(available: Sequence[str]) -> list[str]:
    """The providers a parity session asks for: TensorRT's, then CUDA's where installed (onnxruntime-gpu), then the CPU's."""
    return [name for name in PREFERRED_PROVIDERS if name in available or name == "CPUExecutionProvider"]


def ort_session(
    path: str | Path,
    threads: int | None = None,
    optimize: bool = True,
    exact_matmul: bool = True,
    providers: Sequence[str] | None = ("CPUExecutionProvider",),
) -> Any:
    """An onnxruntime session for the ONNX file at ``path`` (the CPU's by default).

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads (None: onnxruntime's default).
        optimize: Enable all graph optimizations (Q/DQ fusion included).
        exact_matmul: Keep float inputs of fused INT4 weight-only MatMuls in float (for parity);
            False lets onnxruntime quantize them to int8 (faster, not what the plan says).
        providers: Execution providers, best first; None: :func:`parity_providers` of what this
            onnxruntime has (``session.get_providers()[0]`` says which one runs).
    """
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if exact_matmul:
        # onnxruntime fuses an INT4 weight DequantizeLinear -> MatMul into MatMulNBits, which by
        # default quantizes the float input to int8 (accuracy level 4); level 1 keeps it float
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    chosen = list(providers) if providers is not None else parity_providers(ort.get_available_providers())
    with onnxruntime_model(path) as runnable:
        return ort.InferenceSession(runnable, options, providers=chosen)


@contextlib.contextmanager
def onnxruntime_model(path: str | Path) -> Iterator[str]:
    """The path of a model onnxruntime can load: ``path`` itself, or a temporary copy with FP4 as FP8.

    onnxruntime (1.32) has no ``FLOAT4E2M1`` kernel, so an export with FP4 weights at opset 23+ is
    run as :func:`~diffquant.export.onnx_float.float4_as_float8` of it (the same values; see
    :data:`~diffquant.export.onnx_float.ORT_FP4_NOTE`).
    """
    if not has_float4(onnx.load(str(path), load_external_data=False)):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix=".ort-fp8-") as tmp:
        copy = float4_as_float8(onnx.load(str(path)))
        target = Path(tmp) / "model.onnx"
        onnx.save_model(copy, str(target), save_as_external_data=copy.ByteSize() > 1 << 30, location="model.onnx.data")
        yield str(target)


class OrtDenoiser(nn.Module):
    """An onnxruntime session behind the denoiser call ``unet(x, t, condition).sample``.

    It lets :func:`diffquant.sampling.ddim_sample` and :func:`denoiser_outputs` run the exported
    model unchanged.
    """

    def __init__(self, session: Any) -> None:
        """Wrap ``session`` (see :func:`ort_session`)."""
        super().__init__()
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        types = {i.name: getattr(i, "type", None) for i in session.get_inputs()}
        self.timestep_dtype = torch.float32 if types.get("timestep") == "tensor(float)" else torch.long
        self.output_name = session.get_outputs()[0].name

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, condition: torch.Tensor | None = None
    ) -> DenoiserOutput:
        """Run the session on one batch and return its noise prediction."""
        batch = sample.shape[0]
        t = torch.as_tensor(timestep).to(self.timestep_dtype).reshape(-1).expand(batch)
        feeds = {"sample": sample.detach().float().contiguous().numpy(), "timestep": t.contiguous().numpy()}
        extra = [name for name in self.input_names if name not in feeds]
        if extra:
            if condition is None:
                raise ValueError(f"the exported model is conditional; pass its {extra[0]}")
            ids = condition.to(torch.long)
            feeds[extra[0]] = (ids if ids.dim() > 1 else ids.reshape(-1)).contiguous().numpy()
        (out,) = self.session.run([self.output_name], feeds)
        return DenoiserOutput(torch.from_numpy(out))


def onnxruntime_denoiser(
    model: DiffusionModel, folder: str | Path, opset: int = 21, target: str | None = None
) -> OrtDenoiser:
    """Export the (fake-quantized) ``model`` to ``folder/model.onnx`` and serve it behind the denoiser call.

    The session is parity's (:func:`ort_session` with the best execution provider installed), so
    timing it (:func:`diffquant.cost.measure_forward`) times what the parity check runs.
    """
    from diffquant.export.onnx import export_onnx

    info = export_onnx(model, None, Path(folder) / "model.onnx", opset=opset, target=target)
    return OrtDenoiser(ort_session(info.path, providers=None))


def activation_step_ratio(unet: nn.Module) -> tuple[float, int | None]:
    """How much coarser, relative to its range, the coarsest activation step of ``unet`` is than 8 bits'.

    Every calibrated activation quantizer (layer inputs, and outputs in the onnxruntime form)
    counts; a float model, or one with weight-only quantization, has ratio 1.

    Returns:
        ``(ratio, bits)``: ``127 / qmax`` of the coarsest activation quantizer (1.0 at 8 bits, 4.1
        at 6, 18.1 at 4), never below 1, and its bits (None when no activation is quantized).
    """
    bits = [q.bits for q in activation_quantizers(unet).values() if q.mode == QuantizerMode.QUANTIZE]
    if not bits:
        return 1.0, None
    coarsest = min(bits)
    return max(1.0, IntFormat(REFERENCE_ACTIVATION_BITS).qmax / IntFormat(coarsest).qmax), coarsest


def step_tolerance(unet: nn.Module, floor: float = DEFAULT_TOLERANCE) -> float:
    """The per-element parity tolerance for ``unet``: ``floor`` times :func:`activation_step_ratio`."""
    return floor * activation_step_ratio(unet)[0]


@dataclass
class OutputParity:
    """Element-wise absolute differences of denoiser outputs, ONNX vs PyTorch.

    ``tolerance`` is the per-element tolerance that was applied: ``tolerance_floor`` times
    ``step_ratio`` (see :func:`activation_step_ratio`; ``coarsest_activation_bits`` is where it
    came from), or ``tolerance_floor`` itself when the tolerance was not derived from the steps.
    """

    inputs: int
    elements: int
    max_abs: float
    p999_abs: float
    mean_abs: float
    fraction_over: float
    tolerance: float
    max_fraction_over: float
    max_mean_abs: float = DEFAULT_MAX_MEAN_ABS
    tolerance_floor: float | None = None
    step_ratio: float = 1.0
    coarsest_activation_bits: int | None = None

    @property
    def passed(self) -> bool:
        """At most ``max_fraction_over`` of the elements beyond ``tolerance``, mean under ``max_mean_abs``."""
        return (
            bool(np.isfinite(self.max_abs))
            and self.fraction_over <= self.max_fraction_over
            and self.mean_abs <= self.max_mean_abs
        )


def output_differences(a: torch.Tensor, b: torch.Tensor, tolerance: float, max_fraction_over: float) -> OutputParity:
    """Compare two batches of denoiser outputs element-wise.

    Args:
        a: Outputs of one model.
        b: Outputs of the other, same shape.
        tolerance: Absolute difference per element counted as a mismatch (already derived).
        max_fraction_over: Largest share of mismatching elements that still passes.
    """
    diff = (a.float() - b.float()).abs().reshape(-1)
    if not torch.isfinite(diff).all():
        return OutputParity(
            int(a.shape[0]), diff.numel(), float("inf"), float("inf"), float("inf"), 1.0, tolerance, max_fraction_over
        )
    d = diff.double()
    return OutputParity(
        inputs=int(a.shape[0]),
        elements=int(diff.numel()),
        max_abs=float(d.max()),
        p999_abs=float(torch.quantile(d, 0.999)) if d.numel() <= 16_000_000 else float(np.quantile(d.numpy(), 0.999)),
        mean_abs=float(d.mean()),
        fraction_over=float((d > tolerance).double().mean()),
        tolerance=tolerance,
        max_fraction_over=max_fraction_over,
    )


def denoiser_parity(
    session: Any,
    model: DiffusionModel,
    inputs: Trajectories,
    tolerance: float = DEFAULT_TOLERANCE,
    max_fraction_over: float = DEFAULT_MAX_FRACTION_OVER,
    batch_size: int = 256,
    *,
    from_steps: bool = True,
) -> OutputParity:
    """Compare ONNX and PyTorch denoiser outputs on ``inputs`` (e.g. the calibration set).

    Args:
        session: An onnxruntime session of the export (:func:`ort_session`).
        model: The PyTorch model that was exported.
        inputs: Denoiser inputs.
        tolerance: Absolute difference per element counted as a mismatch at 8-bit activations,
            and the floor of the derived tolerance.
        max_fraction_over: Largest share of mismatching elements that still passes.
        batch_size: Inputs per forward pass.
        from_steps: Scale ``tolerance`` with the model's coarsest activation step
            (:func:`activation_step_ratio`); False applies ``tolerance`` as it is.
    """
    ratio, bits = activation_step_ratio(model.unet) if from_steps else (1.0, None)
    reference = denoiser_outputs(model.unet, inputs, model.conditional, batch_size)
    exported = denoiser_outputs(OrtDenoiser(session), inputs, model.conditional, batch_size)
    result = output_differences(exported, reference, tolerance * ratio, max_fraction_over)
    return dataclasses.replace(result, tolerance_floor=tolerance, step_ratio=ratio, coarsest_activation_bits=bits)


@dataclass
class SamplingParity:
    """Metrics of samples drawn through onnxruntime vs PyTorch from the same noise."""

    samples: int
    steps: int
    seed: int
    torch_metrics: dict[str, float]
    onnx_metrics: dict[str, float]
    psnr_onnx_vs_torch: float
    accuracy_epsilon: float
    fd_relative_epsilon: float
    fd_absolute_epsilon: float
    failures: list[str] = field(default_factory=list)
    sampler: str = "ddim"
    guidance: float = 1.0
    torch_samples: str = "sampled"
    """Where the PyTorch samples came from: ``sampled`` here, or ``given`` (e.g. the run's evaluation)."""

    @property
    def passed(self) -> bool:
        """Whether every metric agrees within its epsilon."""
        return not self.failures


def sampling_parity(
    session: Any,
    model: DiffusionModel,
    samples: int,
    steps: int | SamplerSpec,
    seed: int = 0,
    classifier: nn.Module | None = None,
    real_images: torch.Tensor | None = None,
    batch_size: int = 500,
    accuracy_epsilon: float = DEFAULT_ACCURACY_EPSILON,
    fd_relative_epsilon: float = DEFAULT_FD_RELATIVE_EPSILON,
    fd_absolute_epsilon: float = DEFAULT_FD_ABSOLUTE_EPSILON,
    torch_samples: torch.Tensor | None = None,
) -> SamplingParity:
    """Sample through PyTorch and through onnxruntime from the same noise and compare their metrics.

    Args:
        session: An onnxruntime session of the export.
        model: The PyTorch model that was exported.
        samples: Number of samples (classes cycle).
        steps: DDIM steps, or the whole sampler (scheduler, steps, guidance).
        seed: Noise seed, shared by both.
        classifier: Digits classifier for accuracy and FD (None: PSNR only).
        real_images: Held-out real images for FD (None: no FD).
        batch_size: Samples per forward pass.
        accuracy_epsilon: Largest absolute accuracy difference that passes.
        fd_relative_epsilon: FD may differ by this share of PyTorch's FD ...
        fd_absolute_epsilon: ... plus this much.
        torch_samples: PyTorch samples of ``model`` drawn before with this seed, sampler and the
            evaluation conditions (at least ``samples``; the first ``samples`` are used), e.g. the
            run's evaluation; None samples them here.
    """
    given = torch_samples is not None and torch_samples.shape[0] >= samples
    if given:
        images_t, labels = torch_samples[:samples], model.conditions(samples, "evaluation")[1]
    else:
        images_t, labels = generate(model, samples, steps, seed, batch_size, "Sampling (PyTorch)")
    ort_model = dataclasses.replace(model, unet=OrtDenoiser(session))
    images_o, _ = generate(ort_model, samples, steps, seed, batch_size, "Sampling (onnxruntime)")
    torch_metrics: dict[str, float] = {}
    onnx_metrics: dict[str, float] = {}
    failures: list[str] = []
    if classifier is not None and model.digits_compatible and labels is not None:
        torch_metrics["accuracy"] = condition_accuracy(classifier, images_t, labels)
        onnx_metrics["accuracy"] = condition_accuracy(classifier, images_o, labels)
        if abs(torch_metrics["accuracy"] - onnx_metrics["accuracy"]) > accuracy_epsilon:
            failures.append(
                f"accuracy {onnx_metrics['accuracy']:.4f} (onnx) vs {torch_metrics['accuracy']:.4f} (torch) "
                f"differs by more than {accuracy_epsilon}"
            )
        if real_images is not None:
            torch_metrics["fd_real"] = frechet_distance(classifier, real_images, images_t)
            onnx_metrics["fd_real"] = frechet_distance(classifier, real_images, images_o)
            allowed = fd_relative_epsilon * torch_metrics["fd_real"] + fd_absolute_epsilon
            if abs(torch_metrics["fd_real"] - onnx_metrics["fd_real"]) > allowed:
                failures.append(
                    f"FD to real {onnx_metrics['fd_real']:.3f} (onnx) vs {torch_metrics['fd_real']:.3f} (torch) "
                    f"differs by more than {allowed:.3f}"
                )
    return SamplingParity(
        samples=samples,
        steps=as_sampler(steps).steps,
        seed=seed,
        torch_metrics=torch_metrics,
        onnx_metrics=onnx_metrics,
        psnr_onnx_vs_torch=psnr(images_t, images_o),
        accuracy_epsilon=accuracy_epsilon,
        fd_relative_epsilon=fd_relative_epsilon,
        fd_absolute_epsilon=fd_absolute_epsilon,
        failures=failures,
        sampler=as_sampler(steps).name,
        guidance=as_sampler(steps).guidance,
        torch_samples="given" if given else "sampled",
    )


def _tolerance_origin(o: OutputParity) -> str:
    if o.tolerance_floor is None or o.step_ratio == 1.0:
        return ""
    return f", {o.tolerance_floor:g} x {o.step_ratio:.3g} for A{o.coarsest_activation_bits} steps,"


@dataclass
class ParityReport:
    """Outcome of :func:`check_parity`."""

    onnx_path: str
    outputs: OutputParity
    sampling: SamplingParity | None
    seconds: float
    provider: str = "CPUExecutionProvider"
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether both checks (the sampling one when run) passed."""
        return self.outputs.passed and (self.sampling is None or self.sampling.passed)

    def failures(self) -> list[str]:
        """One sentence per failed criterion."""
        out = []
        o = self.outputs
        if not o.passed:
            out.append(
                f"{o.fraction_over:.2e} of denoiser output elements differ by more than {o.tolerance:.3g}"
                f"{_tolerance_origin(o)} (allowed {o.max_fraction_over:g}; mean {o.mean_abs:.3g}, allowed {o.max_mean_abs:g}; "
                f"max {o.max_abs:.3g}, p99.9 {o.p999_abs:.3g})"
            )
        if self.sampling is not None:
            out.extend(self.sampling.failures)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report (for summary.json and MLflow)."""
        data: dict[str, Any] = {
            "onnx_path": self.onnx_path,
            "provider": self.provider,
            "passed": self.passed,
            "failures": self.failures(),
            "outputs": dataclasses.asdict(self.outputs) | {"passed": self.outputs.passed},
            "seconds": self.seconds,
        }
        if self.notes:
            data["notes"] = self.notes
        if self.sampling is not None:
            data["sampling"] = dataclasses.asdict(self.sampling) | {"passed": self.sampling.passed}
        return data


@dataclass(frozen=True)
class ParityConfig:
    """How :func:`check_parity` compares an export with its PyTorch model.

    Attributes:
        tolerance: Per-element absolute tolerance of the output check at 8-bit activations, and
            the floor: with ``tolerance_from_steps`` the check applies ``tolerance`` times the
            model's :func:`activation_step_ratio` (0.20 at A6, 0.91 at A4 with the default).
        max_fraction_over: Share of output elements allowed over the tolerance.
        samples: Samples for the sampling check; 0 skips it.
        steps: DDIM steps of the sampling check, or the whole sampler (scheduler, steps, guidance).
        seed: Noise seed of the sampling check.
        accuracy_epsilon: See :func:`sampling_parity`.
        fd_relative_epsilon: See :func:`sampling_parity`.
        fd_absolute_epsilon: See :func:`sampling_parity`.
        enforce: Raise :class:`ParityError` when a check fails.
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        tolerance_from_steps: Derive the tolerance from the activation steps (see ``tolerance``).
        batch_size: Inputs per forward of the output check (``calibration.batch_size``).
        sample_batch_size: Denoiser inputs per forward of the sampling check (a guided step holds
            both halves of ``sample_batch_size // 2`` samples).
    """

    tolerance: float = DEFAULT_TOLERANCE
    max_fraction_over: float = DEFAULT_MAX_FRACTION_OVER
    samples: int = 0
    steps: int | SamplerSpec = 50
    seed: int = 0
    accuracy_epsilon: float = DEFAULT_ACCURACY_EPSILON
    fd_relative_epsilon: float = DEFAULT_FD_RELATIVE_EPSILON
    fd_absolute_epsilon: float = DEFAULT_FD_ABSOLUTE_EPSILON
    enforce: bool = False
    threads: int | None = None
    tolerance_from_steps: bool = True
    batch_size: int = 256
    sample_batch_size: int = 500


def check_parity(
    onnx_path: str | Path,
    model: DiffusionModel,
    inputs: Trajectories,
    config: ParityConfig = ParityConfig(),
    *,
    classifier: nn.Module | None = None,
    real_images: torch.Tensor | None = None,
    torch_samples: torch.Tensor | None = None,
) -> ParityReport:
    """Check an export against the PyTorch model it came from.

    Args:
        onnx_path: The exported ``.onnx`` file.
        model: The PyTorch (fake-quantized) model that was exported.
        inputs: Denoiser inputs for the output check (the calibration set).
        config: Tolerances, the sampling check's size and whether a failure raises.
        classifier: Digits classifier for accuracy / FD of the sampling check.
        real_images: Real images for FD.
        torch_samples: The model's samples from the sampling check's noise, drawn before (see
            :func:`sampling_parity`); None samples them.

    Example:
        >>> report = check_parity("model.onnx", quantized, calibration_set, ParityConfig(samples=100))
        >>> report.passed
        True

    Raises:
        ParityError: With ``enforce``, if parity breaks.
    """
    start = time.perf_counter()
    session = ort_session(onnx_path, config.threads, providers=None)
    outputs = denoiser_parity(
        session,
        model,
        inputs,
        config.tolerance,
        config.max_fraction_over,
        config.batch_size,
        from_steps=config.tolerance_from_steps,
    )
    sampling = None
    if config.samples > 0:
        sampling = sampling_parity(
            session,
            model,
            config.samples,
            config.steps,
            config.seed,
            classifier,
            real_images,
            config.sample_batch_size,
            accuracy_epsilon=config.accuracy_epsilon,
            fd_relative_epsilon=config.fd_relative_epsilon,
            fd_absolute_epsilon=config.fd_absolute_epsilon,
            torch_samples=torch_samples,
        )
    notes = [ORT_FP4_NOTE] if has_float4(onnx.load(str(onnx_path), load_external_data=False)) else []
    report = ParityReport(
        str(onnx_path), outputs, sampling, time.perf_counter() - start, session.get_providers()[0], notes
    )
    logger.info(
        "parity %s: max %.3g, p99.9 %.3g, %.2e over %g",
        "passed" if report.passed else "FAILED",
        outputs.max_abs,
        outputs.p999_abs,
        outputs.fraction_over,
        outputs.tolerance,
    )
    if config.enforce and not report.passed:
        raise ParityError(
            f"the ONNX export {onnx_path} does not match the PyTorch model: {report.failures()[0]}; "
            "re-export, or check the plan and scales"
        )
    return report
