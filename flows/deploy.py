"""The ``deploy`` flow: fetch a registered version, verify it, build for the local GPU, write a bundle.

The version is chosen by alias (default ``champion``) or by the run that produced it. Every
artifact is checked against the version's manifest (whose sha256 is a version tag) before use;
a tampered artifact stops the flow with :class:`diffquant.errors.IntegrityError`. Where an ONNX
export is present and TensorRT and a GPU are available, an engine is built for this device;
otherwise the ONNX is shipped for an on-device build and the reason is recorded.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow

from diffquant.export.bundle import check_bundle_target, write_bundle
from diffquant.manifest import verify_files
from diffquant.registry.home import diffquant_home, tracking_uri
from diffquant.registry.models import download_version, find_version, registry_client, registry_errors

logger = logging.getLogger(__name__)


def _engine_for(folder: Path, out: Path) -> tuple[Path | None, str]:
    """Build a TensorRT engine from the version's ONNX when possible; else say why not."""
    onnx_files = sorted(folder.rglob("*.onnx"))
    if not onnx_files:
        return None, "the version has no ONNX export; the bundle ships the plan and scales"
    from diffquant.errors import ExportError
    from diffquant.export.onnx import ONNXRUNTIME_FORM_REASON, onnx_target

    try:
        form = onnx_target(onnx_files[0])
    except ExportError:
        form = "tensorrt"  # unreadable here: TensorRT's parser says why, if it exists
    if form == "onnxruntime":
        return None, f"{ONNXRUNTIME_FORM_REASON}; the ONNX is shipped for onnxruntime"
    try:
        from diffquant.export.tensorrt import build_engine, tensorrt_available
    except ImportError:
        return None, "this diffquant has no TensorRT support; the ONNX is shipped for an on-device build"
    ok, reason = tensorrt_available()
    if not ok:
        return None, f"{reason}; the ONNX is shipped for an on-device build"
    result = build_engine(onnx_files[0], out / "model.engine")
    if not result.built or result.engine_path is None:
        return None, f"{result.skip_reason}; the ONNX is shipped for an on-device build"
    return Path(result.engine_path), "TensorRT engine built for this GPU"


@flow(name="deploy", log_prints=False)
def deploy_flow(model: str, target: str, alias: str | None = "champion", run_id: str | None = None) -> dict[str, Any]:
    """Fetch ``model`` @ ``alias`` (or the version of ``run_id``), verify, and write a bundle to ``target``.

    Returns:
        ``bundle`` (path), ``version``, ``engine`` (path or None) and ``engine_reason``.

    Raises:
        ExportError: ``target`` exists and is not a diffquant bundle (or an empty folder), or cannot
            be written; nothing at ``target`` is changed.
        TrackingError: Unknown model, alias or run, or an unusable registry.
        IntegrityError: An artifact does not match its manifest.
    """
    check_bundle_target(target)  # before any download: refuse early what would be refused at the end
    uri = tracking_uri(diffquant_home())
    with registry_errors(uri):
        client = registry_client(uri)
        version = find_version(client, model, alias, run_id)
    with tempfile.TemporaryDirectory(prefix="diffquant-deploy-") as tmp:
        local = download_version(client, version, Path(tmp))
        verify_files(local, version.tags.get("manifest_sha256") or "missing")
        engine, reason = _engine_for(local, Path(tmp))
        info = {
            "model": model,
            "version": str(version.version),
            "alias": alias,
            "run_id": version.run_id,
            "source": version.source,
            "engine": reason,
        }
        bundle = write_bundle(local, Path(target), info, engine)
    logger.info("deployed %s v%s to %s (%s)", model, version.version, bundle, reason)
    return {
        "bundle": str(bundle),
        "version": str(version.version),
        "engine": str(Path(bundle) / "engine" / engine.name) if engine else None,
        "engine_reason": reason,
    }
