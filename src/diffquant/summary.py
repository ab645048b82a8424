"""``summary.json``: the typed record of one compress run.

Written from :class:`RunSummary` (``schema_version`` :data:`SCHEMA_VERSION`); summaries written
before the schema was versioned load too (``schema_version`` 0). Sections allow extra keys, so a
reader of an older or newer file keeps what it does not know. Version 2 added ``memory`` (peak
memory per stage), ``estimate`` (the cost estimated before the stages ran, :mod:`diffquant.cost`)
and ``evaluation`` (what each metric was computed on, which were not computed and why, and
whether the full-precision evaluation came from the cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

SCHEMA_VERSION = 2


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelSection(_Section):
    """The source model and what was registered from it."""

    name: str
    family: str | None = None
    condition: str | None = None
    sample_shape: list[int] = Field(default_factory=list)
    latent: bool = False
    weights_sha256: str | None = None
    registered: str | None = None
    registered_reason: str | None = None
    alias: str | None = None


class SizesSection(_Section):
    """Weight bytes: float, packed (plan), deployed (the device class's storage types) and the ONNX initializers."""

    fp32_bytes: int
    packed_bytes: int
    ratio: float
    onnx_weight_bytes: int | None = None
    deployed_bytes: int | None = None

    @model_serializer(mode="wrap")
    def _omit_unknown_deployed(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # summaries from before deployed bytes were counted read back as they were written
        data = handler(self)
        if self.deployed_bytes is None:
            data.pop("deployed_bytes", None)
        return data


class PlanSection(_Section):
    """The applied LayerPlan."""

    path: str
    scales_path: str
    layers: int
    quantized_layers: int
    description: str
    outlier_tokens: dict[str, Any] | None = None


class CalibrationSection(_Section):
    """The calibration set and its pool."""

    strategy: str
    size: int
    pool_size: int
    pool_path: str
    pool_cache_hit: bool
    selection_seconds: float
    selection_path: str
    histogram_png: str
    pca_png: str


class ExportSection(_Section):
    """ONNX export, parity and the engine decision."""

    status: str
    reason: str
    onnx: str | None = None
    engine: dict[str, Any] | None = None


class EvaluationSection(_Section):
    """What the metrics were computed on (:func:`diffquant.report.evaluation_section`).

    ``images``: ``decoded`` (a latent model's samples decoded by its VAE: the grid and
    ``psnr``/``ssim`` are in image space, ``psnr_latent``/``ssim_latent`` in latent space),
    ``latents`` (a latent model without a VAE) or ``pixels``.
    """

    images: str
    metrics: dict[str, str] = Field(default_factory=dict)
    not_computed: dict[str, str] = Field(default_factory=dict)


class RunSummary(_Section):
    """Everything one compress run decided and measured (``summary.json``)."""

    schema_version: int = 0
    run_id: str
    experiment: str
    tracking_uri: str
    spec_hash: str
    model: ModelSection
    metrics: dict[str, dict[str, float]]
    notes: list[str] = Field(default_factory=list)
    finetune: dict[str, Any] | None = None
    sizes: SizesSection
    plan: PlanSection
    calibration: CalibrationSection
    samples: dict[str, str]
    allocation: dict[str, Any] | None = None
    export: ExportSection
    timings: dict[str, float]
    memory: dict[str, dict[str, Any]] = Field(default_factory=dict)
    estimate: dict[str, Any] | None = None
    out_dir: str
    evaluation: EvaluationSection | None = None
    """Absent in summaries written before it existed (and left out of :meth:`to_dict` then); also
    says whether the full-precision evaluation came from the cache (``fp_cache_hit``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data with today's keys; sections a summary was written without stay absent."""
        data = self.model_dump(mode="json")
        for key in ("evaluation", "estimate"):
            if data[key] is None:
                data.pop(key)
        if not data["memory"]:
            data.pop("memory")
        return data

    @classmethod
    def load(cls, path: Path) -> RunSummary:
        """Read a ``summary.json`` (any schema version)."""
        return cls.model_validate_json(Path(path).read_text())
