"""Typed stage results and cache requests: what one stage hands the next.

Stage results are small frozen pydantic models of paths, hashes and counts (never tensors or
modules), so Prefect can persist them and a later run can check them. Every file a result names
is a :class:`FileRef` whose sha256 was recorded when it was written: :meth:`StageResult.intact`
tells whether a cached result can still be used (a truncated or deleted file is recomputed).

Cached stages take a *request*: a model of exactly the inputs their result depends on, built from
the spec by ``from_spec``; the Prefect cache key is the request's fields plus the code version
(:meth:`CacheRequest.key`), so a field that changes the result changes the key and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

import diffquant
from diffquant.calibration.pool import POOL_CODE_VERSION
from diffquant.evaluation import EVAL_CODE_VERSION
from diffquant.mixed_precision.sensitivity import SENSITIVITY_CODE_VERSION
from diffquant.placement import resolve_device
from diffquant.ptq import weight_observer, weight_rounding
from diffquant.spec import CompressionSpec, FinetuneSpec, ModelSource, SamplerSpec
from diffquant.storage import sha256_file, sha256_tree


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileRef(_Frozen):
    """A file a stage wrote, with the sha256 recorded at write time."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> FileRef:
        """Reference ``path`` (hashing it now)."""
        return cls(path=str(path), sha256=sha256_file(Path(path)))

    def intact(self) -> bool:
        """True when the file exists and still has its recorded sha256."""
        path = Path(self.path)
        return path.is_file() and sha256_file(path) == self.sha256


class TrackingRef(_Frozen):
    """The MLflow run a task logs into (tracking URI and run id; tasks build their own client)."""

    uri: str
    run_id: str


class StageResult(_Frozen):
    """Base of stage results: every :class:`FileRef` field (nested too) can be checked at once."""

    def files(self) -> list[FileRef]:
        """Every file this result names."""
        found: list[FileRef] = []

        def walk(value: Any) -> None:
            if isinstance(value, FileRef):
                found.append(value)
            elif isinstance(value, BaseModel):
                for name in type(value).model_fields:
                    walk(getattr(value, name))

        walk(self)
        return found

    def intact(self) -> bool:
        """True when every file is present with its recorded sha256."""
        return all(ref.intact() for ref in self.files())


class ModelInfo(StageResult):
    """The source model's identity and shape (loaded once to validate it)."""

    name: str
    family: str
    condition: str | None
    weights_sha256: str
    prompts_sha256: str | None
    sample_shape: list[int]
    num_classes: int | None
    latent: bool
    layer_names: list[str]
    source_dir: str
    decoded: bool = False
    """Samples are decoded by the pipeline's VAE for grids and image metrics."""
    vae_sha256: str | None = None
    """The decoding VAE folder's sha256 (None without a VAE)."""


class PoolArtifact(StageResult):
    """The calibration candidate pool (every denoiser input of the FP trajectories)."""

    pool: FileRef
    size: int


class CalibrationArtifact(StageResult):
    """The selected calibration set, the held-out SQNR inputs and the selection record."""

    calibration: FileRef
    sqnr: FileRef
    selection: FileRef
    histogram_png: str
    pca_png: str
    size: int
    seconds: float


class SensitivityArtifact(StageResult):
    """The merged sensitivity table and how much of it came from the cache."""

    csv: FileRef
    heatmap_png: str
    cache_hit: bool
    tasks: int
    tasks_cached: int


class AllocationArtifact(StageResult):
    """The allocated plan and the integer program's answer."""

    plan: FileRef
    answer: FileRef
    usage: dict[str, float]
    objective: float


class QuantizeArtifact(StageResult):
    """A quantized model as files: plan, scales and (after fine-tuning) the tuned weights."""

    plan: FileRef
    scales: FileRef
    weights: FileRef | None = None
    layers: int
    quantized_layers: int
    fp32_bytes: int
    packed_bytes: int
    outlier_tokens: dict[str, Any] | None = None
    deployed_bytes: int | None = None


class SamplesArtifact(StageResult):
    """Samples of one model variant from the evaluation noise, and the metrics computed on them."""

    metrics: dict[str, float]
    samples: FileRef


class EvalArtifact(StageResult):
    """Samples (and a latent model's decoded images, in the same file), denoiser outputs and metrics of one model variant."""

    metrics: dict[str, float]
    samples: FileRef
    outputs: FileRef


class FinetuneArtifact(StageResult):
    """The fine-tuned model and what the run did."""

    quantized: QuantizeArtifact
    result: dict[str, Any]


class ExportArtifact(StageResult):
    """The exported ONNX model, its checks and the engine decision."""

    onnx: FileRef
    onnx_weight_bytes: int
    export: dict[str, Any]
    parity: dict[str, Any]
    parity_path: str
    engine: dict[str, Any]
    metrics: dict[str, float]


class Registration(StageResult):
    """The registered version and the promotion decision."""

    name: str
    version: str
    passed: bool
    reasons: list[str]
    champion: str | None
    previous_champion: str | None


class CacheRequest(_Frozen):
    """Inputs of a cached stage; :meth:`key` is their hash plus the stage's code version."""

    code: ClassVar[str] = "0"

    def key(self) -> str:
        """Stable identity of the result (names cached files and keys Prefect's cache)."""
        data = json.dumps([self.model_dump(mode="json"), f"{diffquant.__version__}/{self.code}"], sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:20]


class PoolRequest(CacheRequest):
    """What the candidate pool depends on; selection keys (strategy, size) are not part of it."""

    code: ClassVar[str] = POOL_CODE_VERSION
    model: ModelSource
    weights_sha256: str
    sampler: SamplerSpec
    trajectories: int
    seed: int
    labels: list[int] | None
    prompts_sha256: str | None

    @classmethod
    def from_spec(cls, spec: CompressionSpec, model: ModelInfo, labels: list[int] | None) -> PoolRequest:
        """The pool request of a spec (``labels`` read from ``calibration.labels_file``)."""
        return cls(
            model=spec.model,
            weights_sha256=model.weights_sha256,
            sampler=spec.sampler,
            trajectories=spec.calibration.trajectories,
            seed=spec.calibration.seed,
            labels=labels,
            prompts_sha256=model.prompts_sha256,
        )


class FpEvalRequest(CacheRequest):
    """What the full-precision evaluation (samples and their metrics) depends on.

    The model, the sampler and the ``evaluate`` section (all of it but ``sqnr_inputs``, which
    the per-run SQNR reference reads, and ``batch_size``, which enters as ``batch``), and what
    changes its numbers beyond the spec: the device type, the dtype and the sampling batch. The
    FP samples are the reference of the paired metrics (PSNR, SSIM, FD to FP), so a bfloat16 or
    GPU run is compared with FP samples computed the same way, never with another device's. The
    decoding VAE and the CLIP model (``evaluate.clip_model``) enter by the sha256 of their folders.
    """

    code: ClassVar[str] = EVAL_CODE_VERSION
    model: ModelSource
    weights_sha256: str
    prompts_sha256: str | None
    sampler: SamplerSpec
    evaluate: dict[str, Any]
    batch: int
    device: str
    dtype: str
    vae_sha256: str | None = None
    clip_sha256: str | None = None

    @classmethod
    def from_spec(cls, spec: CompressionSpec, model: ModelInfo) -> FpEvalRequest:
        """The full-precision evaluation request of a spec (``runtime.device`` resolved to its type)."""
        return cls(
            model=spec.model,
            weights_sha256=model.weights_sha256,
            prompts_sha256=model.prompts_sha256,
            sampler=spec.sampler,
            evaluate=spec.evaluate.model_dump(mode="json", exclude={"sqnr_inputs", "batch_size"}),
            batch=spec.sampling_batch,
            device=resolve_device(spec.runtime.device).type,
            dtype=spec.runtime.dtype,
            vae_sha256=model.vae_sha256,
            clip_sha256=sha256_tree(Path(spec.evaluate.clip_model)) if spec.evaluate.clip_model else None,
        )


class SensitivityRequest(CacheRequest):
    """What the sensitivity rows of a set of layers depend on (not the budget, pins or objective)."""

    code: ClassVar[str] = SENSITIVITY_CODE_VERSION
    weights_sha256: str
    sampler: SamplerSpec
    weight_bits: list[int]
    activation_bits: list[int]
    group_bits: list[int]
    group_sizes: list[int]
    quality_metric: str
    content_layers: list[str] | None
    content_metric: str
    content_samples: int
    sensitivity_inputs: int
    weight_observer: str
    weight_rounding: str
    outlier_tokens: str | int
    activation_observer: str
    seed: int
    calibration_sha256: str
    ranks: list[int] = [0]
    weight_formats: list[str] = []
    activation_formats: list[str] = []

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # fields added later are left out at their defaults: the keys of tables measured before they existed hold
        data = handler(self)
        if self.ranks == [0]:
            data.pop("ranks", None)
        for key in ("weight_formats", "activation_formats"):
            if not data.get(key):
                data.pop(key, None)
        return data

    @classmethod
    def from_spec(cls, spec: CompressionSpec, model: ModelInfo, calibration: CalibrationArtifact) -> SensitivityRequest:
        """The sensitivity request of a spec with an ``allocation`` section."""
        alloc = spec.allocation
        assert alloc is not None
        return cls(
            weights_sha256=model.weights_sha256,
            sampler=spec.sampler,
            **alloc.model_dump(
                include={
                    "weight_bits",
                    "activation_bits",
                    "group_bits",
                    "group_sizes",
                    "quality_metric",
                    "content_layers",
                    "content_samples",
                    "sensitivity_inputs",
                    "ranks",
                    "weight_formats",
                    "activation_formats",
                }
            ),
            content_metric=alloc.content_metric,  # left out of the serialized spec at its default
            weight_observer=weight_observer(spec.quantize),
            weight_rounding=weight_rounding(spec.quantize),
            outlier_tokens=spec.quantize.outlier_tokens,
            activation_observer=spec.calibration.observer,
            seed=spec.evaluate.seed,
            calibration_sha256=calibration.calibration.sha256,
        )


class FinetuneRequest(CacheRequest):
    """What a fine-tuning run depends on (names its checkpoint folder, so a killed run resumes)."""

    finetune: FinetuneSpec
    plan_sha256: str
    scales_sha256: str
    pool_sha256: str
    weights_sha256: str

    @classmethod
    def from_spec(
        cls, spec: CompressionSpec, model: ModelInfo, quantized: QuantizeArtifact, pool: PoolArtifact
    ) -> FinetuneRequest:
        """The fine-tuning request of a spec with a ``finetune`` section."""
        assert spec.finetune is not None
        return cls(
            finetune=spec.finetune,
            plan_sha256=quantized.plan.sha256,
            scales_sha256=quantized.scales.sha256,
            pool_sha256=pool.pool.sha256,
            weights_sha256=model.weights_sha256,
        )


def request_cache_policy() -> CachePolicy:
    """Prefect cache policy: the task's request, layers, cache folder and own source.

    The key is the ``request`` key, the ``layers`` of mapped tasks, the folder the files are
    cached in (``cache_dir``: another home is another cache) and the task's source. The whole spec, the calibration artifact and other bookkeeping arguments are not part of the key.
    """

    def key(_context: Any, parameters: dict[str, Any]) -> str:
        extra = json.dumps([parameters.get("layers"), parameters.get("cache_dir")])
        return f"{parameters['request'].key()}-{hashlib.sha256(extra.encode()).hexdigest()[:12]}"

    return TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=key)
