"""The ``deploy`` flow: fetch a registered version, verify it, build for the local GPU, write a bundle.

The version is chosen by alias (default ``champion``) or by the run that produced it. Every
artifact is checked against the version's manifest (whose sha256 is a version tag) before use;
a tampered artifact stops the flow with :class:`diffquant.errors.IntegrityError`. Where an ONNX
export is present and TensorRT and a GPU are available, an engine is built for this device;
otherwise the ONNX is shipped for an on-device build and the reason is recorded.

**Device classes** (:mod:`diffquant.devices`): every version records the class it was built for
(the version tag ``device_class``, from ``export.device_class``), and so does the bundle's
manifest. ``device_class`` is the class of the machine the flow runs on: the parameter, else the
``DIFFQUANT_DEVICE_CLASS`` environment variable of the worker; with neither, the machine does not
say and any version is deployed (its class is still recorded). A version built for another class
is refused with one line (:class:`~diffquant.errors.DeviceClassError`) before anything is
downloaded or written; a version registered before classes existed (no tag) is judged by the
``export`` section of its ``spec.yaml`` after the download, still before anything is written.
Each pool of ``prefect.yaml`` (``edge-orin``, ``gpu-ampere``, ...) has a deploy deployment that
passes its class.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from diffquant.devices import check_device_match, default_device_class, machine_device_class
from diffquant.devices import device_class as class_entry
from diffquant.export.bundle import check_bundle_target, write_bundle
from diffquant.manifest import verify_files
from diffquant.registry.home import diffquant_home, tracking_uri
from diffquant.registry.models import download_version, find_version, registry_client, registry_errors

logger = logging.getLogger(__name__)


def _onnx_form(folder: Path) -> str | None:
    """The Q/DQ form of the version's ONNX export (None without one)."""
    onnx_files = sorted(folder.rglob("*.onnx"))
    if not onnx_files:
        return None
    from diffquant.errors import ExportError
    from diffquant.export.onnx import onnx_target

    try:
        return onnx_target(onnx_files[0])
    except ExportError:
        return "tensorrt"  # unreadable here: TensorRT's parser says why, if it exists


def _engine_for(folder: Path, out: Path) -> tuple[Path | None, str]:
    """Build a TensorRT engine from the version's ONNX when possible; else say why not."""
    form = _onnx_form(folder)
    if form is None:
        return None, "the version has no ONNX export; the bundle ships the plan and scales"
    from diffquant.export.onnx import ONNXRUNTIME_FORM_REASON

    if form == "onnxruntime":
        return None, f"{ONNXRUNTIME_FORM_REASON}; the ONNX is shipped for onnxruntime"
    try:
        from diffquant.export.tensorrt import build_engine, tensorrt_available
    except ImportError:
        return None, "this diffquant has no TensorRT support; the ONNX is shipped for an on-device build"
    ok, reason = tensorrt_available()
    if not ok:
        return None, f"{reason}; the ONNX is shipped for an on-device build"
    onnx_files = sorted(folder.rglob("*.onnx"))
    result = build_engine(onnx_files[0], out / "model.engine")
    if not result.built or result.engine_path is None:
        return None, f"{result.skip_reason}; the ONNX is shipped for an on-device build"
    return Path(result.engine_path), "TensorRT engine built for this GPU"


def version_device_class(folder: Path) -> str:
    """The class a downloaded version without a ``device_class`` tag was built for.

    Its ``spec.yaml``'s ``export`` section (``device_class``, else the target's default), else the
    default of its ONNX form, else ``orin`` (the TensorRT default).
    """
    from diffquant.errors import SpecError
    from diffquant.spec import spec_from_dict

    try:
        data = yaml.safe_load((folder / "spec.yaml").read_text())
        return spec_from_dict(data).export.device.name
    except (OSError, yaml.YAMLError, SpecError):
        return default_device_class(_onnx_form(folder) or "tensorrt")


@flow(name="deploy", log_prints=False)
def deploy_flow(
    model: str,
    target: str,
    alias: str | None = "champion",
    run_id: str | None = None,
    device_class: str | None = None,
) -> dict[str, Any]:
    """Fetch ``model`` @ ``alias`` (or the version of ``run_id``), verify, and write a bundle to ``target``.

    Args:
        model: Registered model name.
        target: Bundle folder to write.
        alias: Alias of the version (ignored with ``run_id``).
        run_id: Deploy the version this run registered instead.
        device_class: Class of this machine (``orin``, ..., ``cpu``); None reads
            ``DIFFQUANT_DEVICE_CLASS``, and with neither any version is deployed.

    Returns:
        ``bundle`` (path), ``version``, ``engine`` (path or None), ``engine_reason`` and
        ``device_class`` (the class the version was built for).

    Raises:
        ConfigError: ``device_class`` (or ``DIFFQUANT_DEVICE_CLASS``) is not a known class.
        DeviceClassError: The version was built for another class than ``device_class``.
        ExportError: ``target`` exists and is not a diffquant bundle (or an empty folder), or cannot
            be written; nothing at ``target`` is changed.
        TrackingError: Unknown model, alias or run, or an unusable registry.
        IntegrityError: An artifact does not match its manifest.
    """
    machine = class_entry(device_class).name if device_class else machine_device_class()
    check_bundle_target(target)  # before any download: refuse early what would be refused at the end
    uri = tracking_uri(diffquant_home())
    with registry_errors(uri):
        client = registry_client(uri)
        version = find_version(client, model, alias, run_id)
    what = f"{model} v{version.version}"
    built = version.tags.get("device_class")
    if built is not None:
        check_device_match(built, machine, what)
    with tempfile.TemporaryDirectory(prefix="diffquant-deploy-") as tmp:
        local = download_version(client, version, Path(tmp))
        verify_files(local, version.tags.get("manifest_sha256") or "missing")
        if built is None:
            built = version_device_class(local)
            check_device_match(built, machine, what)
        engine, reason = _engine_for(local, Path(tmp))
        info = {
            "model": model,
            "version": str(version.version),
            "alias": alias,
            "run_id": version.run_id,
            "source": version.source,
            "engine": reason,
            "device_class": built,
        }
        bundle = write_bundle(local, Path(target), info, engine)
    logger.info("deployed %s to %s for %s (%s)", what, bundle, built, reason)
    return {
        "bundle": str(bundle),
        "version": str(version.version),
        "engine": str(Path(bundle) / "engine" / engine.name) if engine else None,
        "engine_reason": reason,
        "device_class": built,
    }
