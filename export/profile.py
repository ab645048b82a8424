"""Measure each layer's latency per allocation option on the target runtime: the allocator's latency table.

What is measured (onnxruntime, CPU):

- **Inputs**: one traced forward of the float denoiser at the deployment batch size (``batch``,
  default 1: one image per denoiser call, the latency an edge deployment sees; pass the batch
  the engine will run, e.g. ``export.max_batch`` for throughput) records every Linear/Conv2d
  input, so each layer is timed on its real input shape (a layer called ``k`` times in one
  forward is charged ``k`` times its first call).
- **Graphs**: for every layer x option, the layer alone is quantized with the option's config
  (the same :class:`~diffquant.quant.plan.LayerConfig` the allocator would plan, output
  quantizers for the onnxruntime form as :func:`diffquant.ptq.for_target` adds them), its
  activation scales are calibrated on the recorded input, and it is exported by
  :func:`export.onnx.export_module`: the same wrapping and Q/DQ lowering as the full export, so
  the small graph is exactly the layer's part of the exported model, input and output Q/DQ
  included. The float option (``wfpafp``) is always measured too, as the reference.
- **Timing**: one onnxruntime session per graph (``ORT_ENABLE_ALL``, ``intra_op_num_threads``
  threads, default 1 so numbers are stable on a shared 2-core machine); after ``warmup`` calls
  each, ``repeats`` rounds visit every graph once in a fresh random order (round-robin, so load
  from other processes hits every option alike); one sample is the mean of enough consecutive
  calls to last about ``sample_ms``; an entry is the median of its samples.
- **Overhead**: the whole float graph (:func:`export.onnx.export_onnx`) is timed in the same
  rounds; ``overhead_ms`` is its median minus the sum of the layers' float entries. It holds the
  ops outside any layer (GroupNorm, SiLU, attention's softmax and batched MatMuls, adds, the
  time embedding's sinusoid) minus what the per-layer graphs charge that the whole graph does
  not (one ``session.run`` per layer, copying the input and output through Python). The
  allocator charges it once, so ``budget.latency_ms`` is a whole-call latency.
- **Uniform correction** (``uniform_correction``, on by default): the whole model is also timed
  with every layer at each option. What a per-layer graph cannot see shows up there: in the
  whole graph a quantized layer's ``DequantizeLinear -> op -> QuantizeLinear`` runs between other
  quantized tensors, onnxruntime's optimizer fuses and lays out (NCHWc) across layer borders,
  weights of a float layer compete for cache with its neighbours'. The option's residual
  (uniform graph minus ``overhead_ms`` minus its entries) is spread evenly over its layers, so a
  uniform plan is predicted exactly and a mixed plan by interpolation. ``bench/latency_budget.py``
  measures how well that predicts mixed plans (BENCHMARKS.md).

TensorRT per-layer timing needs TensorRT and a CUDA GPU; where either is missing the table's
``tensorrt`` entry records why (:func:`tensorrt_status`) and only onnxruntime is measured.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffquant.calibration.ranges import calibrate_activations
from diffquant.errors import ConfigError
from diffquant.mixed_precision.costs import option_name
from diffquant.mixed_precision.latency import LatencyTable
from diffquant.models.loading import DiffusionModel
from diffquant.ptq import for_target, quantize_model
from diffquant.quant.modules import groups_allowed
from diffquant.quant.plan import (
    QUANTIZABLE,
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    apply_plan,
    quantizable_layers,
)
from diffquant.sampling import Trajectories
from diffquant.spec import CalibrationSpec

from .onnx import DEFAULT_OPSET, export_module, export_onnx
from .parity import import_onnxruntime
from .tensorrt import tensorrt_available

logger = logging.getLogger(__name__)

PROFILE_CODE_VERSION = "1"
"""Bumped when what a profile measures changes (part of the cache key)."""

FLOAT_OPTION = option_name(None, None)
Option = tuple[int | None, int | None, int | None]
"""``(weight bits, group size, activation bits)``; None keeps that part in float."""


@dataclass(frozen=True)
class ProfileSettings:
    """How a latency table is measured.

    Attributes:
        batch: Deployment batch size of the traced forward (the leading dimension of every input).
        target: Export form whose Q/DQ graphs are timed: ``tensorrt`` or ``onnxruntime``.
        threads: onnxruntime ``intra_op_num_threads`` (1: stable on a shared machine).
        warmup: Untimed calls of each graph before the rounds.
        repeats: Timed rounds over all graphs; each entry is the median of this many samples.
        sample_ms: Approximate duration of one sample of a layer graph (consecutive calls
            averaged); 0 (default): one call, so the layers of a round run between two calls of
            one layer and its weights are as cold as inside the whole graph.
        whole_sample_ms: The same for the whole float graph; back-to-back calls, as a sampler
            calls the denoiser (its first call after the layer graphs is averaged away).
        opset: ONNX opset of the graphs.
        seed: Seed of the traced inputs and the round orders.
        uniform_correction: Also time the whole model at each option and correct the option's
            entries by what the per-layer graphs miss (see :func:`profile_onnxruntime`).
        clock: ``thread`` (this thread's CPU time) or ``wall``; ``auto``: ``thread`` with one
            onnxruntime thread (every op then runs on the calling thread, and time spent
            descheduled by other processes on a shared machine is not counted), else ``wall``.
    """

    batch: int = 1
    target: str = "tensorrt"
    threads: int = 1
    warmup: int = 3
    repeats: int = 30
    sample_ms: float = 0.0
    whole_sample_ms: float = 20.0
    opset: int = DEFAULT_OPSET
    seed: int = 0
    clock: str = "auto"
    uniform_correction: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dict(self.__dict__)

    @property
    def timer(self) -> str:
        """The clock the timing uses (``auto`` resolved)."""
        if self.clock == "auto":
            return "thread" if self.threads == 1 else "wall"
        return self.clock


def machine_info() -> dict[str, Any]:
    """Where a table is measured: CPU model, core count, OS, Python, numpy and torch versions."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def machine_fingerprint(info: Mapping[str, Any] | None = None) -> str:
    """A short hash of the hardware a table is valid for (CPU model, cores, architecture, OS kind)."""
    info = info or machine_info()
    raw = "|".join(str(info.get(k)) for k in ("cpu", "cores", "arch")) + "|" + str(info.get("system", "")).split()[0]
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def onnxruntime_info(threads: int) -> dict[str, Any]:
    """The onnxruntime version, provider and session settings the table is measured with."""
    ort = import_onnxruntime()

    return {
        "name": "onnxruntime",
        "version": ort.__version__,
        "provider": "CPUExecutionProvider",
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
    }


def tensorrt_status() -> dict[str, Any]:
    """Whether TensorRT per-layer timing can run here; when not, the skip reason."""
    available, reason = tensorrt_available()
    if not available:
        return {"measured": False, "skip_reason": reason}
    return {
        "measured": False,
        "skip_reason": "TensorRT per-layer timing is not implemented yet; this table is onnxruntime's",
    }


def option_config(option: Option, weight_observer: str = "minmax", act_observer: str = "minmax") -> LayerConfig:
    """The layer config an allocation option plans (before the export target's output quantizers)."""
    w, g, a = option
    weight = None
    if w is not None:
        weight = WeightConfig(w, "per_group" if g else "per_channel", weight_observer, g)
    return LayerConfig(weight, ActivationConfig(a, act_observer) if a is not None else None)


@torch.no_grad()
def traced_inputs(model: DiffusionModel, batch: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Every Linear/Conv2d input of one float forward at ``batch`` (``{layer: [input per call]}``)."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.unet.named_modules():
        if isinstance(module, QUANTIZABLE):

            def hook(_mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                inputs.setdefault(name, []).append(args[0].detach().clone())

            handles.append(module.register_forward_pre_hook(hook))
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((batch, *model.sample_shape), generator=generator)
    timestep = torch.full((batch,), 500, dtype=torch.long)
    condition, _ = model.conditions(batch, "calibration")
    try:
        model.unet(sample, timestep, condition if model.conditional else None)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def full_graph_feeds(model: DiffusionModel, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the whole exported graph at ``batch`` (the traced forward's sample, timestep, condition)."""
    from .onnx import CONDITION_INPUTS

    generator = torch.Generator().manual_seed(seed)
    feeds = {
        "sample": torch.randn((batch, *model.sample_shape), generator=generator).numpy(),
        "timestep": np.full((batch,), 500, dtype=np.int64),
    }
    if model.condition is not None:
        condition, _ = model.conditions(batch, "calibration")
        assert condition is not None
        feeds[CONDITION_INPUTS[model.condition]] = condition.numpy()
    return feeds


class _One(nn.Module):
    """One layer as a module of its own (FQN ``layer``), for a per-layer graph."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def layer_graph(
    model: DiffusionModel, name: str, option: Option, x: torch.Tensor, path: Path, settings: ProfileSettings
) -> Path | None:
    """Export layer ``name`` quantized with ``option`` as a graph of its own; None if it cannot take the option.

    The config is the allocator's (:func:`option_config`), with the export target's output
    quantizer decided for the layer's real name; the activation scales come from ``x``.
    """
    layer = model.unet.get_submodule(name)
    _, g, _ = option
    if g is not None and not groups_allowed(layer, g):
        return None
    cfg = for_target(model.unet, LayerPlan({name: option_config(option)}), settings.target)[name]  # type: ignore[arg-type]
    one = _One(copy.deepcopy(layer)).eval()
    plan = LayerPlan({"layer": cfg})
    apply_plan(one, plan)
    calibrate_activations(one, lambda module: module(x), seed=settings.seed)
    return export_module(one, plan, x, path, settings.opset, settings.target)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Build the graphs on ``count`` torch threads (hundreds of small traces; faster on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _session(path: Path, threads: int) -> Any:
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_medians(
    runs: Mapping[Any, Any],
    warmup: int,
    repeats: int,
    sample_ms: float | Mapping[Any, float],
    seed: int = 0,
    clock: str = "wall",
) -> dict[Any, float]:
    """Median milliseconds per call of each zero-argument callable in ``runs``, timed in interleaved rounds.

    Each callable is first called ``warmup`` times; its calls per sample are chosen so that a
    sample lasts about ``sample_ms`` (0: one call; a mapping gives each key its own); then ``repeats`` rounds time one sample of
    every callable, in a new random order each round. ``clock`` is ``wall`` (``perf_counter``) or
    ``thread`` (this thread's CPU time, ``thread_time``: time the thread was descheduled by other
    processes is not counted; only right when the callable runs on the calling thread).
    """
    now = time.thread_time if clock == "thread" else time.perf_counter
    per_sample: dict[Any, int] = {}
    for key, run in runs.items():
        for _ in range(max(warmup, 1)):
            run()
        start = now()
        run()
        once = (now() - start) * 1000
        wanted = sample_ms.get(key, 0.0) if isinstance(sample_ms, Mapping) else sample_ms
        per_sample[key] = max(1, min(100, math.ceil(wanted / max(once, 1e-3))))
    samples: dict[Any, list[float]] = {key: [] for key in runs}
    order = list(runs)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for key in order:
            run, n = runs[key], per_sample[key]
            start = now()
            for _ in range(n):
                run()
            samples[key].append((now() - start) * 1000 / n)
    return {key: statistics.median(values) for key, values in samples.items()}


def _runner(session: Any, feeds: dict[str, np.ndarray]) -> Any:
    return lambda: session.run(None, feeds)


def _uniform_graph(model: DiffusionModel, option: Option, path: Path, settings: ProfileSettings) -> Path | None:
    """The whole model with every layer that can take ``option`` at it (the rest float), calibrated on the traced sample.

    None when no layer can take the option, or for the float option (the float graph is exported once).
    """
    if option == (None, None, None):
        return None
    _, g, _ = option
    plan = LayerPlan()
    for name in quantizable_layers(model.unet):
        allowed = g is None or groups_allowed(model.unet.get_submodule(name), g)
        plan[name] = option_config(option) if allowed else LayerConfig(None, None)
    if not plan.quantized_layers():
        return None
    plan = for_target(model.unet, plan, settings.target)  # type: ignore[arg-type]
    feeds = full_graph_feeds(model, settings.batch, settings.seed)
    condition = next((torch.from_numpy(v) for k, v in feeds.items() if k not in ("sample", "timestep")), None)
    labels = condition if condition is not None else torch.zeros(settings.batch, dtype=torch.long)
    calib = Trajectories(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]), labels)
    quantized = quantize_model(model, plan, calib, CalibrationSpec(batch_size=settings.batch))
    return export_onnx(quantized, plan, path, settings.opset, target=settings.target).path


def _build(
    model: DiffusionModel, options: Mapping[str, Option], settings: ProfileSettings, folder: Path
) -> tuple[dict[Any, Any], dict[str, list[torch.Tensor]]]:
    """Every timed callable: ``(layer, option)`` graphs, ``("whole", option)`` graphs; and the traced inputs."""
    inputs = traced_inputs(model, settings.batch, settings.seed)
    runs: dict[Any, Any] = {}
    for index, (name, calls) in enumerate(inputs.items()):
        feeds = {"x": calls[0].numpy()}
        for option, value in options.items():
            path = layer_graph(model, name, value, calls[0], folder / f"{index:04d}_{option}.onnx", settings)
            if path is not None:
                runs[(name, option)] = _runner(_session(path, settings.threads), feeds)
    whole_feeds = full_graph_feeds(model, settings.batch, settings.seed)
    whole = export_onnx(model, None, folder / "whole_fp32.onnx", settings.opset).path
    runs[("whole", FLOAT_OPTION)] = _runner(_session(whole, settings.threads), whole_feeds)
    if settings.uniform_correction:
        for option, value in options.items():
            path = _uniform_graph(model, value, folder / f"whole_{option}.onnx", settings)
            if path is not None:
                runs[("whole", option)] = _runner(_session(path, settings.threads), whole_feeds)
    return runs, inputs


def _corrections(layers: dict[str, dict[str, float]], whole: dict[str, float], overhead: float) -> dict[str, float]:
    """Per option, the uniform plan's measured residual spread over the layers that took the option."""
    out = {}
    for option, measured in whole.items():
        if option == FLOAT_OPTION:
            continue
        took = [name for name, row in layers.items() if option in row]
        predicted = overhead + sum(row[option] if option in row else row[FLOAT_OPTION] for row in layers.values())
        out[option] = (measured - predicted) / len(took)
    return out


def profile_onnxruntime(
    model: DiffusionModel,
    options: Mapping[str, Option],
    settings: ProfileSettings | None = None,
    workdir: str | Path | None = None,
) -> LatencyTable:
    """Measure the latency table of ``model``'s layers for ``options`` on onnxruntime (CPU).

    With ``settings.uniform_correction`` (default), the whole model is also exported and timed
    with every layer at each option (a uniform plan); the difference between that graph and the
    per-layer prediction, spread evenly over its layers, is added to each of the option's entries
    (entries stay >= 0). The raw per-layer medians are kept under ``measured_layers``, the
    corrections under ``corrections_ms`` and the uniform graphs' times under ``whole_graph_ms``.

    Args:
        model: The float model.
        options: ``{option name: (weight bits, group size, activation bits)}``, e.g.
            :func:`diffquant.mixed_precision.allocate.candidate_options` of an allocation.
        settings: Batch, export form, threads and timing (default :class:`ProfileSettings`).
        workdir: Folder for the per-layer ONNX files (default: a temporary folder, removed).

    Returns:
        The table: an entry for every layer and option it can take (group-wise options a layer's
        input channels do not allow are left out, as the allocator leaves them out), the
        overhead of the whole graph, and where and how it was measured.

    Raises:
        ConfigError: If the batch, threads or timing settings are not positive.
    """
    settings = settings or ProfileSettings()
    for key in ("batch", "threads", "repeats"):
        if getattr(settings, key) < 1:
            raise ConfigError(key, f"must be at least 1, got {getattr(settings, key)}")
    if settings.clock not in ("auto", "thread", "wall"):
        raise ConfigError("clock", f"must be auto, thread or wall, got {settings.clock!r}")
    all_options = {FLOAT_OPTION: (None, None, None), **options}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffquant-profile-") as tmp, _torch_threads(1):
        folder = Path(workdir) if workdir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        runs, inputs = _build(model, all_options, settings, folder)
        built = time.perf_counter() - start
        logger.info("profile: %d graphs built in %.1f s; timing %d rounds", len(runs), built, settings.repeats)
        sample_ms = {key: settings.whole_sample_ms if key[0] == "whole" else settings.sample_ms for key in runs}
        medians = interleaved_medians(runs, settings.warmup, settings.repeats, sample_ms, settings.seed, settings.timer)
    measured: dict[str, dict[str, float]] = {}
    whole: dict[str, float] = {}
    for (name, option), ms in medians.items():
        if name == "whole":
            whole[option] = ms
        else:
            measured.setdefault(name, {})[option] = ms * len(inputs[name])
    overhead = whole[FLOAT_OPTION] - sum(row[FLOAT_OPTION] for row in measured.values())
    corrections = _corrections(measured, whole, overhead)
    layers = {
        name: {option: max(0.0, ms + corrections.get(option, 0.0)) for option, ms in row.items()}
        for name, row in measured.items()
    }
    meta = {
        "model": {"name": model.name, "weights_sha256": model.weights_sha256},
        "options": list(options),
        "reference_option": FLOAT_OPTION,
        "whole_graph_fp32_ms": whole[FLOAT_OPTION],
        "whole_graph_ms": whole,
        "corrections_ms": corrections,
        "measured_layers": measured,
        "runtime": onnxruntime_info(settings.threads),
        "machine": {**machine_info(), "fingerprint": machine_fingerprint()},
        "settings": {**settings.to_dict(), "clock": settings.timer},
        "calls": {name: len(calls) for name, calls in inputs.items()},
        "load_average": list(os.getloadavg()),
        "tensorrt": tensorrt_status(),
        "seconds": time.perf_counter() - start,
    }
    return LatencyTable(layers, overhead, meta)
