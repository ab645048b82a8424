"""What a compress run will cost, before it runs: denoiser evaluations, wall time and peak memory per stage.

The model is counted, then timed:

- :func:`stage_work` counts, from the spec alone, every denoiser evaluation (one input through the
  denoiser) and forward call of each stage, and which model runs it: the float model, the
  fake-quantized one, the exported graph in onnxruntime, or a fine-tuning step (forward and
  backward). Sampling costs trajectories (or samples) x steps x guidance halves; the feature pass
  the pool size; sensitivity (layers x options x inputs, activation options twice: observe, then
  measure) plus the final-sample probes of content layers; fine-tuning the teacher's pass over the
  pool and steps x batch student steps; parity the calibration set twice and its samples.
- :func:`measure_forward` times each kind of forward on the run's device and dtype: the float
  model, the spec's uniform plan on a copy (ranges from a few random inputs; timing only), the
  exported graph where the caller gives a way to export it (else it is costed as the fake-quant
  forward), and a forward-backward step when the spec fine-tunes. Each is timed at batch 1, then
  at batches growing eightfold up to the largest the run uses while a call stays under an eighth
  of the timing budget; a call of ``n`` inputs then costs ``overhead + n * per_input`` (the line
  through batch 1 and the largest batch timed). It also takes the activation memory per input of
  that largest forward (the CUDA peak on a GPU, the sampled RSS rise on a CPU) and the time of one
  model copy (each stage works on its own).
- :func:`estimate_cost` multiplies them out per stage.

Not estimated: process start-up and the Prefect API, MLflow logging, ONNX tracing and the rules
check, the classifier metrics, observers costlier than min-max. ``diffquant compress --dry-run``
prints the estimate; a real run records it in summary.json and report.md next to the measured times.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from diffquant.memory import PeakMemory, current_rss
from diffquant.models.loading import DiffusionModel
from diffquant.placement import module_placement, place, resolve, to_module
from diffquant.ptq import plan_from_spec, quantize
from diffquant.quant.gptq import hessian_groups, plan_gptq_layers
from diffquant.quant.modules import groups_allowed
from diffquant.quant.plan import quantizable_layers, resolve_globs
from diffquant.sampling import Trajectories, initial_noise, make_scheduler, side_by_side
from diffquant.spec import CompressionSpec

Kind = Literal["fp", "quantized", "onnx", "train"]

TIMING_BUDGET_S = 3.0
"""Seconds :func:`measure_forward` may spend on the timed forward of each kind at the large batch."""


@dataclass(frozen=True)
class Work:
    """Forward calls of one kind of model within a stage."""

    kind: Kind
    inputs: int
    calls: int
    batch: int
    what: str
    batches: int = 1
    """Sampling only: batches of samples, which a CPU runs side by side (:func:`~diffquant.sampling.batch_workers`)."""


@dataclass(frozen=True)
class StageWork:
    """The denoiser work of one stage, what it holds in memory besides the model, and the model copies it makes."""

    stage: str
    parts: list[Work]
    held_bytes: int = 0
    copies: int = 1
    note: str = ""

    @property
    def evaluations(self) -> int:
        """Denoiser evaluations (inputs through any form of the denoiser)."""
        return sum(p.inputs for p in self.parts)

    @property
    def calls(self) -> int:
        """Forward calls."""
        return sum(p.calls for p in self.parts)


@dataclass(frozen=True)
class KindCost:
    """One kind of forward on the run's device: ``overhead_s + inputs * per_input_s``, and activation bytes per input."""

    overhead_s: float
    per_input_s: float
    activation_bytes_per_input: float
    timed_batches: tuple[int, ...]
    single_thread_per_input_s: float | None = None
    """CPU only: the per-input time on one intra-op thread (what each of the side-by-side sampling batches gets)."""

    def seconds(self, calls: int, inputs: int, side_by_side: int = 1) -> float:
        """Wall time of ``calls`` forwards over ``inputs`` inputs in all, ``side_by_side`` batches at a time on one thread each."""
        if side_by_side > 1 and self.single_thread_per_input_s is not None:
            return (calls * self.overhead_s + inputs * self.single_thread_per_input_s) / side_by_side
        return calls * self.overhead_s + inputs * self.per_input_s


@dataclass(frozen=True)
class ForwardCosts:
    """What :func:`measure_forward` measured."""

    device: str
    dtype: str
    kinds: dict[str, KindCost]
    model_bytes: int
    copy_s: float
    base_rss_bytes: int
    measure_s: float
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StageEstimate:
    """One stage of :class:`CostEstimate`."""

    stage: str
    evaluations: int
    calls: int
    seconds: float
    peak_bytes: int
    note: str = ""


@dataclass(frozen=True)
class CostEstimate:
    """Per-stage denoiser evaluations, estimated seconds and peak memory (RSS on a CPU, CUDA allocations on a GPU)."""

    stages: list[StageEstimate]
    costs: ForwardCosts

    @property
    def seconds(self) -> float:
        """Estimated wall time of all stages."""
        return sum(s.seconds for s in self.stages)

    @property
    def evaluations(self) -> int:
        """Denoiser evaluations of all stages."""
        return sum(s.evaluations for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (summary.json)."""
        return {
            "device": self.costs.device,
            "dtype": self.costs.dtype,
            "seconds": self.seconds,
            "evaluations": self.evaluations,
            "stages": {s.stage: {k: v for k, v in asdict(s).items() if k != "stage"} for s in self.stages},
            "costs": asdict(self.costs),
        }


def _steps(spec: CompressionSpec, model: DiffusionModel) -> int:
    """Denoiser steps per sample: the length of the scheduler's timesteps (PNDM runs more than ``steps``)."""
    return len(make_scheduler(model.scheduler_config, spec.sampler.steps, spec.sampler.name).timesteps)


def _sampling(kind: Kind, samples: int, spec: CompressionSpec, steps: int, what: str, parallel: bool = True) -> Work:
    """Sampling ``samples`` with the spec's sampler at the sampling batch.

    ``parallel``: whether a CPU may run the batches side by side (not a recording pass, nor one in a
    worker thread of a parallel stage; see :func:`diffquant.sampling.batch_workers`).
    """
    halves = spec.sampler.halves
    per_call = max(1, spec.sampling_batch // halves) if halves > 1 else spec.sampling_batch
    batches = math.ceil(samples / per_call)
    return Work(
        kind,
        samples * steps * halves,
        batches * steps,
        min(per_call, samples) * halves,
        what,
        batches if parallel else 1,
    )


def _passes(kind: Kind, inputs: int, batch: int, what: str, times: int = 1) -> Work:
    """``times`` passes over ``inputs`` recorded inputs, ``batch`` per forward."""
    return Work(kind, inputs * times, math.ceil(inputs / batch) * times, min(batch, inputs), what)


def _sensitivity(spec: CompressionSpec, model: DiffusionModel, steps: int) -> StageWork:
    """The sensitivity stage as the flow runs it: a task per ``runtime.layers_per_task`` layers.

    Each task makes its own reference pass, and its own FP probe when one of its layers is probed.
    """
    alloc = spec.allocation
    assert alloc is not None
    names = quantizable_layers(model.unet)
    n = min(spec.calibration.size, alloc.sensitivity_inputs)
    batch = spec.forward_batch
    options: dict[str, int] = {}
    weight_runs = activation_runs = 0
    for name in names:
        layer = model.unet.get_submodule(name)
        groups = sum(1 for _ in alloc.group_bits for g in alloc.group_sizes if groups_allowed(layer, g))
        weight_runs += len(alloc.weight_bits) + groups
        activation_runs += len(alloc.activation_bits)
        options[name] = len(alloc.weight_bits) + groups + len(alloc.activation_bits)
    size = spec.runtime.layers_per_task
    chunks = [names[i : i + size] for i in range(0, len(names), size)]
    parts = [
        _passes("fp", n, batch, "reference outputs", len(chunks)),
        _passes("fp", n, batch, "one layer's weight quantized", weight_runs),
        _passes("fp", n, batch, "one layer's input observed, then quantized", 2 * activation_runs),
    ]
    content = set(resolve_globs(names, alloc.content_layers)) if alloc.content_layers else set()
    probed = set(names) if alloc.quality_metric == "psnr" else content
    if probed:
        probe = _sampling("fp", alloc.content_samples, spec, steps, "final-sample probes", parallel=False)
        runs = sum(options[name] for name in probed) + sum(1 for part in chunks if probed & set(part))
        parts.append(Work("fp", probe.inputs * runs, probe.calls * runs, probe.batch, probe.what))
    note = f"{len(names)} layers, {sum(options.values())} (layer, option) measurements in {len(chunks)} tasks"
    return StageWork("sensitivity", parts, copies=len(chunks), note=note)


def stage_work(
    spec: CompressionSpec,
    model: DiffusionModel,
    *,
    pool_cached: bool = False,
    fp_cached: bool = False,
    feature_bytes: int = 0,
) -> list[StageWork]:
    """Every stage's denoiser work, from the spec and the model's shape (see the module docstring).

    Args:
        spec: The run's spec.
        model: The model (its sample shape, layers and scheduler config are read).
        pool_cached: The candidate pool is in the cache (its stage samples nothing).
        fp_cached: The full-precision evaluation is in the cache (only its SQNR reference runs).
        feature_bytes: Bytes of one pool entry's feature (the feature module's output; 0: unknown).
    """
    cal, ev = spec.calibration, spec.evaluate
    steps = _steps(spec, model)
    sample = 4 * math.prod(model.sample_shape)
    pool = cal.trajectories * steps * spec.sampler.halves
    fwd = spec.forward_batch
    sqnr = min(ev.sqnr_inputs, max(pool - cal.size, 0))
    stages = [
        StageWork(
            "collect_trajectories",
            [] if pool_cached else [_sampling("fp", cal.trajectories, spec, steps, "FP trajectories", parallel=False)],
            copies=0 if pool_cached else 1,
            note="cached" if pool_cached else f"pool of {pool} inputs, streamed to disk",
        ),
        StageWork(
            "select_calibration",
            [_passes("fp", pool, fwd, "pool features")],
            held_bytes=pool * (sample + feature_bytes),
            note="the whole pool through the feature module",
        ),
    ]
    if spec.allocation is not None:
        stages += [_sensitivity(spec, model, steps), StageWork("allocate", [], copies=1)]
    gptq = 0
    if spec.allocation is None and spec.quantize.weight is not None and spec.quantize.weight.rounding == "gptq":
        gptq = len(hessian_groups(model.unet, plan_gptq_layers(model.unet, plan_from_spec(model, spec.quantize))))
    quantize = [_passes("fp", cal.size, fwd, "GPTQ Hessians", gptq)] if gptq else []
    stages.append(StageWork("quantize", [*quantize, _passes("fp", cal.size, fwd, "activation calibration")]))
    outputs = [_passes("quantized", cal.size, fwd, "PyTorch outputs"), _passes("onnx", cal.size, fwd, "onnx outputs")]
    if spec.export.onnx:
        stages.append(StageWork("parity_precheck", outputs))
    held = 3 * ev.samples * sample
    fp_parts = [] if fp_cached else [_sampling("fp", ev.samples, spec, steps, "FP samples")]
    stages.append(
        StageWork(
            "evaluate_fp",
            [*fp_parts, _passes("fp", sqnr, fwd, "SQNR reference")],
            held,
            copies=1 if fp_cached else 2,
            note="samples cached" if fp_cached else "",
        )
    )
    quantized_eval = [
        _sampling("quantized", ev.samples, spec, steps, "samples"),
        _passes("quantized", sqnr, fwd, "SQNR"),
    ]
    stages.append(StageWork("evaluate_quantized", quantized_eval, held))
    if spec.finetune is not None:
        ft = spec.finetune
        batch = min(ft.batch_size, pool)
        micro = spec.runtime.batch_size or batch
        train = Work("train", ft.steps * batch, ft.steps * math.ceil(batch / micro), min(micro, batch), "student steps")
        stages.append(StageWork("finetune", [_passes("fp", pool, fwd, "teacher targets"), train], 2 * pool * sample, 2))
        stages.append(StageWork("evaluate_finetuned", quantized_eval, held))
    if spec.export.onnx:
        sampled = [_sampling("onnx", spec.export.parity_samples, spec, steps, "onnx samples")]
        cpu32 = resolve(spec.runtime.device, spec.runtime.dtype) == (torch.device("cpu"), torch.float32)
        if not (cpu32 and ev.samples >= spec.export.parity_samples):
            sampled.append(_sampling("quantized", spec.export.parity_samples, spec, steps, "PyTorch samples"))
        parity = sampled if spec.export.parity_samples else []
        stages.append(StageWork("export", [*outputs, *parity], 2 * spec.export.parity_samples * sample))
    if spec.promote.register_model:
        stages.append(StageWork("register", [], copies=0))
    return stages


def _random_inputs(model: DiffusionModel, n: int) -> Trajectories:
    """``n`` denoiser inputs of the right shapes: noise, spread timesteps, the model's conditions."""
    t_max = int(model.scheduler_config.get("num_train_timesteps", 1000))
    labels, _ = model.conditions(n, "calibration")
    if labels is None:
        labels = torch.zeros(n, dtype=torch.long)
    t = torch.linspace(0, t_max - 1, n).long()
    return Trajectories(initial_noise(n, model.sample_shape, 0), t, labels)


def _time(fn: Any, device: torch.device, repeats: int = 1, long_s: float = math.inf, cold: bool = False) -> float:
    """Seconds of one call of ``fn``: the fastest of ``repeats`` after a warm-up call.

    A warm-up call longer than ``long_s`` is followed by one timed call when ``cold`` (the first
    call of a model pays one-time set-up: kernel selection, allocations; taking it as the cost
    overestimated a 54M-parameter U-Net's run by 1.6x), else it is the answer itself (a slow
    forward is not worth repeating once the model is warm).
    """

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = once()
    if first > long_s:
        return once() if cold else first
    return min(once() for _ in range(repeats))


def _forward(unet: nn.Module, inputs: Trajectories, conditional: bool, train: bool = False) -> Any:
    device, dtype = module_placement(unet)

    def run() -> None:
        x = to_module(inputs.x, device, dtype)
        labels = inputs.labels.to(device) if conditional else None
        if train:
            x.requires_grad_(True)
            unet(x, inputs.t.to(device), labels).sample.float().square().mean().backward()
        else:
            with torch.no_grad():
                unet(x, inputs.t.to(device), labels)

    return run


def _kind_cost(unet: nn.Module, model: DiffusionModel, batch: int, budget_s: float, train: bool = False) -> KindCost:
    """Time ``unet`` at batch 1, then at batches growing 8x up to ``batch`` while a call stays under ``budget_s / 8``.

    The cost line goes through batch 1 and the largest batch timed; activation bytes per input
    are the memory rise of that largest forward divided by its batch.
    """
    device, _ = module_placement(unet)
    one = _time(_forward(unet, _random_inputs(model, 1), model.conditional, train), device, 3, budget_s / 8, cold=True)
    large, seconds, rise = 1, one, 0
    while large < batch and seconds < budget_s / 8:
        large = min(batch, large * 8)
        run = _forward(unet, _random_inputs(model, large), model.conditional, train)
        with PeakMemory(device, interval=0.001) as peak:
            seconds = _time(run, device, 1, budget_s / 8)
        use = peak.result
        assert use is not None
        rise = use.peak_cuda_bytes if use.peak_cuda_bytes is not None else use.peak_rss_bytes - use.start_rss_bytes
    per_input = max((seconds - one) / (large - 1), 0.0) if large > 1 else one
    overhead = max(one - per_input, 0.0) if large > 1 else 0.0
    single = None
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and large > 1 and not train:
        torch.set_num_threads(1)  # the thread each side-by-side sampling batch gets (diffquant.sampling.batch_workers)
        try:
            alone = _time(
                _forward(unet, _random_inputs(model, large), model.conditional, train), device, 1, budget_s / 8
            )
        finally:
            torch.set_num_threads(threads)
        single = max((alone - overhead) / large, 0.0)
    return KindCost(overhead, per_input, max(rise, 0) / large, (1, large), single)


def _quantized_copy(model: DiffusionModel, spec: CompressionSpec) -> DiffusionModel:
    """The spec's uniform plan on a copy of ``model``, ranges from a few random inputs (for timing only)."""
    weight = spec.quantize.weight
    config = spec.quantize
    if weight is not None and weight.rounding != "nearest":
        config = config.model_copy(update={"weight": weight.model_copy(update={"rounding": "nearest"})})
    copied = dataclasses.replace(model, unet=copy.deepcopy(model.unet))
    quantize(
        copied, config, _random_inputs(model, 8), calibration=spec.calibration.model_copy(update={"batch_size": 8})
    )
    return copied


def measure_forward(
    model: DiffusionModel,
    spec: CompressionSpec,
    budget_s: float = TIMING_BUDGET_S,
    exported: Callable[[DiffusionModel], nn.Module] | None = None,
) -> ForwardCosts:
    """Time the forwards a run of ``spec`` makes, on its device and dtype (see the module docstring).

    Args:
        model: The float model (CPU float32, as loaded; copies are placed and timed).
        spec: The run's spec (device, dtype, batches, plan).
        budget_s: Seconds the timed forwards of each kind may take, about (the batch grows 8x while
            a call stays under ``budget_s / 8``).
        exported: Turns the fake-quantized model (CPU, float32) into its exported form behind the
            denoiser call, e.g. :func:`diffquant.export.parity.onnxruntime_denoiser`, to time the
            parity passes; None costs them as the PyTorch fake-quant forward.
    """
    began = time.perf_counter()
    base_rss = current_rss()
    device, dtype = resolve(spec.runtime.device, spec.runtime.dtype)
    fp = dataclasses.replace(model, unet=place(copy.deepcopy(model.unet), device, dtype))
    copy_s = time.perf_counter() - began
    batch = max(spec.forward_batch, spec.sampling_batch)
    kinds = {"fp": _kind_cost(fp.unet, fp, batch, budget_s)}
    model_bytes = sum(p.numel() * p.element_size() for p in fp.unet.parameters())
    del fp
    quantized = _quantized_copy(model, spec)
    onnx = exported(quantized) if exported is not None else None  # traced on the CPU in float32, as parity runs
    if onnx is not None:
        kinds["onnx"] = _kind_cost(onnx, quantized, batch, budget_s)
    quantized = quantized.to(device, dtype)
    kinds["quantized"] = _kind_cost(quantized.unet, quantized, batch, budget_s)
    kinds.setdefault("onnx", kinds["quantized"])
    if spec.finetune is not None:
        micro = min(spec.finetune.batch_size, spec.runtime.batch_size or spec.finetune.batch_size)
        with torch.enable_grad():
            kinds["train"] = _kind_cost(quantized.unet, quantized, micro, budget_s, train=True)
    notes = [] if onnx is not None else ["the onnxruntime passes are costed as the PyTorch fake-quant forward"]
    return ForwardCosts(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        kinds=kinds,
        model_bytes=model_bytes,
        copy_s=copy_s,
        base_rss_bytes=base_rss,
        measure_s=time.perf_counter() - began,
        notes=notes,
    )


def _side_by_side(work: Work, costs: ForwardCosts) -> int:
    """Batches held at once for ``work``: on a CPU, a PyTorch model's sampling batches side by side; else 1."""
    if costs.device.startswith("cuda") or work.kind == "onnx":
        return 1
    return side_by_side(work.batches)


def _peak(stage: StageWork, costs: ForwardCosts) -> int:
    """Estimated peak of a stage: RSS on a CPU (the process so far, the stage's model, activations, arrays), CUDA allocations on a GPU."""
    activations = max(
        (
            costs.kinds[p.kind].activation_bytes_per_input * p.batch * _side_by_side(p, costs)
            for p in stage.parts
            if p.kind in costs.kinds
        ),
        default=0.0,
    )
    models = costs.model_bytes * min(stage.copies, 1)
    if costs.device.startswith("cuda"):
        return int(models + activations)
    return int(costs.base_rss_bytes + models + activations + stage.held_bytes)


def estimate_cost(
    spec: CompressionSpec,
    model: DiffusionModel,
    *,
    costs: ForwardCosts | None = None,
    pool_cached: bool = False,
    fp_cached: bool = False,
    exported: Callable[[DiffusionModel], nn.Module] | None = None,
    budget_s: float = TIMING_BUDGET_S,
) -> CostEstimate:
    """Estimate every stage of a compress run of ``spec``: denoiser evaluations, seconds and peak memory.

    Args:
        spec: The run's spec.
        model: The float model as loaded (CPU float32).
        costs: Forward costs measured before (None: :func:`measure_forward` now).
        pool_cached: The candidate pool is cached (its stage samples nothing).
        fp_cached: The full-precision evaluation is cached.
        exported: The exported form for timing the parity passes (see :func:`measure_forward`).
        budget_s: Timing budget per kind of forward (see :func:`measure_forward`).

    Example:
        >>> estimate = diffquant.estimate_cost(diffquant.CompressionSpec(), diffquant.load_model("digits-unet"))
        >>> estimate.stages[0].stage, estimate.evaluations > 0
        ('collect_trajectories', True)
    """
    costs = costs or measure_forward(model, spec, budget_s, exported)
    feature = _feature_bytes(model, spec)
    estimates = []
    for stage in stage_work(spec, model, pool_cached=pool_cached, fp_cached=fp_cached, feature_bytes=feature):
        seconds = sum(costs.kinds[p.kind].seconds(p.calls, p.inputs, _side_by_side(p, costs)) for p in stage.parts)
        seconds += stage.copies * costs.copy_s
        estimates.append(
            StageEstimate(stage.stage, stage.evaluations, stage.calls, seconds, _peak(stage, costs), stage.note)
        )
    return CostEstimate(estimates, costs)


@torch.no_grad()
def _feature_bytes(model: DiffusionModel, spec: CompressionSpec) -> int:
    """Bytes of one input's pool feature (the feature module's output, float32)."""
    name = spec.calibration.feature_module or model.family_info.feature_module
    try:
        module = model.unet.get_submodule(name)
    except AttributeError:
        return 0
    sizes: list[int] = []
    handle = module.register_forward_hook(
        lambda _m, _i, out: sizes.append((out[0] if isinstance(out, tuple) else out)[0].numel() * 4)
    )
    try:
        _forward(model.unet, _random_inputs(model, 1), model.conditional)()
    finally:
        handle.remove()
    return sizes[0] if sizes else 0
