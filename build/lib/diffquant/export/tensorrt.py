"""TensorRT 10 engine build from an exported Q/DQ ONNX model (TensorRT imported lazily).

The network is strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): precisions come
from the graph's Q/DQ nodes and float types, never from builder flags, which is what explicit
quantization needs. One optimization profile spans the batch sizes; a timing cache file is kept
per (GPU, compute capability, CUDA, TensorRT, builder optimization level), since TensorRT's
timings are specific to all of them. A manifest JSON records what the engine is tied to.

TensorRT cannot be installed on every machine: :func:`tensorrt_available` says why not, and
:func:`build_engine` returns a skipped result with that reason instead of raising.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffquant.errors import ConfigError, ExportError
from diffquant.spec import ExportSpec
from diffquant.storage import atomic_path, sha256_file, write_json

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class DeviceInfo:
    """What a TensorRT engine and its timing cache are tied to."""

    gpu_name: str
    compute_capability: tuple[int, int]
    cuda_version: str
    tensorrt_version: str

    def cache_key(self, optimization_level: int) -> str:
        """A file-name-safe key for the timing cache of this device, software and builder level."""
        raw = (
            f"{self.gpu_name}|sm{self.compute_capability[0]}{self.compute_capability[1]}|cuda{self.cuda_version}"
            f"|trt{self.tensorrt_version}|opt{optimization_level}"
        )
        slug = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")
        digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
        return (
            f"{slug}_sm{self.compute_capability[0]}{self.compute_capability[1]}_trt{self.tensorrt_version}"
            f"_opt{optimization_level}_{digest}"
        )


def timing_cache_path(cache_dir: str | Path, device: DeviceInfo, optimization_level: int) -> Path:
    """The timing cache file for ``device`` at ``optimization_level`` under ``cache_dir``."""
    return Path(cache_dir) / f"timing_{device.cache_key(optimization_level)}.cache"


def tensorrt_available() -> tuple[bool, str]:
    """Whether a TensorRT engine can be built here, and if not, why (a skip reason, not an error)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed (pip install tensorrt needs NVIDIA's index and a CUDA machine)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to this process"
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False, "torch is missing, cannot query the GPU"
    try:
        import tensorrt  # noqa: F401
    except Exception as error:  # a broken install (missing libnvinfer) must not crash the flow
        return False, f"TensorRT failed to import: {str(error).splitlines()[0]}"
    return True, ""


def device_info() -> DeviceInfo:
    """Describe the current GPU and the CUDA / TensorRT versions (needs TensorRT and a GPU)."""
    import tensorrt as trt
    import torch

    index = torch.cuda.current_device()
    return DeviceInfo(
        gpu_name=torch.cuda.get_device_name(index),
        compute_capability=tuple(torch.cuda.get_device_capability(index)),  # type: ignore[arg-type]
        cuda_version=str(torch.version.cuda),
        tensorrt_version=str(trt.__version__),
    )


def onnx_input_shapes(onnx_path: str | Path) -> dict[str, list[int | str]]:
    """Input shapes of an ONNX file, symbolic dimensions by name (e.g. ``batch``)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    shapes: dict[str, list[int | str]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]
    return shapes


def profile_shapes(
    input_shapes: dict[str, list[int | str]], min_batch: int, opt_batch: int, max_batch: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes per input: the symbolic leading batch dimension takes each batch size.

    Raises:
        ExportError: If the batch sizes are not ordered or an input has another dynamic dimension.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    out = {}
    for name, dims in input_shapes.items():
        if any(isinstance(d, str) or d <= 0 for d in dims[1:]):
            raise ExportError(f"input {name!r} has a dynamic dimension other than the batch: {dims}")
        rest = tuple(int(d) for d in dims[1:])
        out[name] = tuple((b, *rest) for b in (min_batch, opt_batch, max_batch))
    return out  # type: ignore[return-value]


def graph_precisions(onnx_path: str | Path) -> list[str]:
    """Precisions an explicit-quantization engine runs, read from the graph's Q/DQ types."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {TensorProto.INT8: "int8", TensorProto.INT4: "int4", TensorProto.FLOAT8E4M3FN: "fp8"}
    found = {"fp32"}
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            found.add(names.get(inits.get(node.input[2], -1), "int8"))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            found.add(names.get(inits[node.input[0]], "int8"))
    return sorted(found)


def build_manifest(
    engine_path: Path,
    onnx_path: Path,
    device: DeviceInfo,
    shapes: dict[str, tuple[tuple[int, ...], ...]],
    precisions: list[str],
    optimization_level: int,
    build_seconds: float,
) -> dict[str, Any]:
    """The manifest written beside an engine: what it needs to run and what it was built from."""
    return {
        "version": MANIFEST_VERSION,
        "engine": {"path": Path(engine_path).name, "sha256": sha256_file(engine_path)},
        "onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "tensorrt_version": device.tensorrt_version,
        "cuda_version": device.cuda_version,
        "gpu": device.gpu_name,
        "compute_capability": f"{device.compute_capability[0]}.{device.compute_capability[1]}",
        "precisions": precisions,
        "input_shapes": {name: {"min": s[0], "opt": s[1], "max": s[2]} for name, s in shapes.items()},
        "builder_optimization_level": optimization_level,
        "strongly_typed": True,
        "build_seconds": round(build_seconds, 3),
    }


@dataclass
class EngineResult:
    """A built engine, or why none was built."""

    built: bool
    skip_reason: str = ""
    engine_path: Path | None = None
    manifest_path: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "built": self.built,
            "skip_reason": self.skip_reason,
            "engine_path": str(self.engine_path) if self.engine_path else None,
            "manifest_path": str(self.manifest_path) if self.manifest_path else None,
        }


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    optimization_level: int = 3,
    timing_cache_dir: str | Path | None = None,
    workspace_bytes: int | None = None,
) -> EngineResult:
    """Build a strongly typed TensorRT engine from ``onnx_path`` and write a manifest beside it.

    Args:
        onnx_path: The Q/DQ ONNX export (external data beside it is found by the parser).
        engine_path: Target ``.engine`` file; the manifest is ``<engine_path>.manifest.json``.
        min_batch: Smallest batch of the optimization profile.
        opt_batch: Batch the builder tunes for.
        max_batch: Largest batch of the optimization profile.
        optimization_level: ``IBuilderConfig.builder_optimization_level`` (0-5; TensorRT's default 3).
        timing_cache_dir: Folder of timing cache files keyed by device (None: no cache).
        workspace_bytes: Workspace memory pool limit (None: TensorRT's default).

    Returns:
        The engine and manifest paths, or ``built=False`` with the skip reason when TensorRT or a
        GPU is absent.

    Raises:
        ExportError: If the ONNX parser or the builder fails.
    """
    available, reason = tensorrt_available()
    if not available:
        logger.info("TensorRT engine skipped: %s", reason)
        return EngineResult(False, reason)
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    device = device_info()
    shapes = profile_shapes(onnx_input_shapes(onnx_path), min_batch, opt_batch, max_batch)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_file = None
    cache = None
    if timing_cache_dir is not None:
        cache_file = timing_cache_path(timing_cache_dir, device, optimization_level)
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(cache, False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}; see the TensorRT log above")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache is not None and cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
    manifest = build_manifest(
        engine_path, onnx_path, device, shapes, graph_precisions(onnx_path), optimization_level, seconds
    )
    manifest_path = write_json(manifest, engine_path.with_name(engine_path.name + ".manifest.json"))
    logger.info("built TensorRT engine %s in %.1f s", engine_path, seconds)
    return EngineResult(True, "", engine_path, manifest_path, manifest)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load a manifest written by :func:`build_engine`."""
    return json.loads(Path(path).read_text())


def engine_for_export(onnx_path: str | Path, export: ExportSpec, engine_dir: str | Path) -> dict[str, Any]:
    """Apply the export config's engine rule to an exported model and return the engine result.

    ``tensorrt: off`` never builds; ``auto`` builds where TensorRT and a GPU exist and otherwise
    records why not; ``on`` makes a missing TensorRT an error. The onnxruntime form
    (``target: onnxruntime``) is never built (TensorRT needs INT8 zero points of 0).

    Args:
        onnx_path: The exported model.
        export: The export config.
        engine_dir: Folder of ``model.engine`` and its manifest.

    Returns:
        ``built`` and ``skip_reason`` (plus the engine and manifest paths when built).

    Raises:
        ConfigError: ``tensorrt: on`` where no engine can be built.
    """
    from diffquant.export.onnx import ONNXRUNTIME_FORM_REASON

    if export.target == "onnxruntime":
        return {"built": False, "skip_reason": ONNXRUNTIME_FORM_REASON}
    if export.tensorrt == "off":
        return {"built": False, "skip_reason": "export.tensorrt is off"}
    ok, reason = tensorrt_available()
    if not ok:
        if export.tensorrt == "on":
            raise ConfigError("tensorrt", f"'on' needs a TensorRT engine, which cannot be built here: {reason}")
        return {"built": False, "skip_reason": reason}
    return build_engine(
        onnx_path,
        Path(engine_dir) / "model.engine",
        max_batch=export.max_batch,
        optimization_level=export.optimization_level,
    ).to_dict()
