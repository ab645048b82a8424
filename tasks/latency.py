"""Stage: measure the latency table of a model's layers x allocation options, cached by Prefect.

The cache key is the :class:`ProfileRequest`: model and weights hash, the options, the runtime
and its version, the machine fingerprint and the measurement settings (batch, export form,
threads, repeats), plus the profile code version and the task's source. Another machine or
another onnxruntime version is another table; the same request on the same machine reuses the
file under ``<DIFFQUANT_HOME>/cache/latency``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from prefect import task

from diffquant.errors import spec_section
from diffquant.export.profile import PROFILE_CODE_VERSION, ProfileSettings, profile_onnxruntime
from diffquant.spec import ModelSource
from diffquant.storage import write_json
from diffquant.tasks.artifacts import CacheRequest, FileRef, StageResult, request_cache_policy
from diffquant.tasks.common import model_from_source


class ProfileRequest(CacheRequest):
    """What a latency table depends on: model, options, runtime, machine and how it is measured."""

    code: ClassVar[str] = PROFILE_CODE_VERSION
    model: ModelSource
    weights_sha256: str
    options: dict[str, list[int | None]]
    runtime: str
    runtime_version: str
    machine: str
    settings: dict[str, Any]

    def profile_settings(self) -> ProfileSettings:
        """The measurement settings as the export layer takes them."""
        return ProfileSettings(**self.settings)


class LatencyArtifact(StageResult):
    """A measured latency table and its headline numbers."""

    table: FileRef
    layers: int
    options: int
    overhead_ms: float
    whole_graph_fp32_ms: float
    seconds: float


@task(name="profile-latency", cache_policy=request_cache_policy(), persist_result=True)
def profile_task(request: ProfileRequest, cache_dir: str) -> LatencyArtifact:
    """Measure the table on onnxruntime and store it as ``<cache_dir>/latency-<request key>.json``."""
    model = model_from_source(request.model)
    options = {name: (w, g, a) for name, (w, g, a) in request.options.items()}
    with spec_section("profile"):
        table = profile_onnxruntime(model, options, request.profile_settings())
    path = write_json(table.to_dict(), Path(cache_dir) / f"latency-{request.key()}.json")
    return LatencyArtifact(
        table=FileRef.of(path),
        layers=len(table.layers),
        options=len(options),
        overhead_ms=table.overhead_ms,
        whole_graph_fp32_ms=float(table.metadata["whole_graph_fp32_ms"]),
        seconds=float(table.metadata["seconds"]),
    )
