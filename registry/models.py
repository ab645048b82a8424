"""Model versions: log the compressed model's files to a run and register them.

A version's source is the run's ``model/`` artifact folder: the ONNX export (as an ``mlflow.onnx``
flavor folder when onnxruntime can load it) or, without an export, the plan, the quantizer scales
and the spec, from which :func:`diffquant.ptq.load_quantized` rebuilds the model. Tags carry
the spec hash, LayerPlan hash, git SHA, diffquant version, key metrics and the FP baseline run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from diffquant.errors import TrackingError
from diffquant.manifest import write_manifest
from diffquant.spec import REGISTERED_MODEL_PATTERN
from diffquant.storage import sha256_file

logger = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"
WEIGHTS_TAG = "model.weights_sha256"
"""Version tag: sha256 of the source model's weights (with ``spec_hash``, what a version was made from)."""
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def check_registered_model_name(name: str) -> str:
    """Return ``name`` if it is a valid registered-model name.

    Raises:
        TrackingError: Naming the rule it breaks.
    """
    if not re.match(REGISTERED_MODEL_PATTERN, name or ""):
        raise TrackingError(
            f"registered model name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists (safe when two runs race to create it)."""
    try:
        client.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        client.create_registered_model(name, description="diffquant-compressed versions of this model")
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code) and "already exists" not in str(error):
            raise


def register_version(client: MlflowClient, run_id: str, name: str, model_dir: Path, tags: dict[str, str]) -> str:
    """Log ``model_dir`` as the run's ``model/`` artifacts and register it as a new version.

    A ``manifest.json`` (sha256 of every file) is written into ``model_dir`` first; its own sha256
    becomes the version tag ``manifest_sha256``, so a deployment can verify every artifact.

    Args:
        client: MLflow client.
        run_id: The compress run.
        name: Registered model name.
        model_dir: Folder with the files of the version.
        tags: Version tags (stringified).

    Returns:
        The new version number (as a string).
    """
    check_registered_model_name(name)
    manifest = write_manifest(Path(model_dir))
    tags = {**tags, "manifest_sha256": sha256_file(manifest)}
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)
    ensure_registered_model(client, name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    version = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return str(version.version)


def add_onnx_flavor(onnx_path: Path, folder: Path) -> Path:
    """Save ``onnx_path`` as an ``mlflow.onnx`` model under ``<folder>/onnx`` (loadable by pyfunc).

    Args:
        onnx_path: The exported model (with its external data beside it, if any).
        folder: The version folder.

    Returns:
        The flavor folder.
    """
    import mlflow.onnx
    import onnx

    target = Path(folder) / "onnx"
    mlflow.onnx.save_model(onnx.load(str(onnx_path)), str(target), pip_requirements=["onnxruntime"])
    return target


def registry_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client for ``tracking_uri`` (the one place outside tracking that builds clients)."""
    return MlflowClient(tracking_uri=tracking_uri)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextmanager
def registry_errors(tracking_uri: str) -> Iterator[None]:
    """Turn an MLflow or database failure inside the block into a one-line :class:`TrackingError`.

    Errors diffquant raises itself (:class:`~diffquant.errors.DiffquantError`) pass unchanged.
    """
    try:
        from sqlalchemy.exc import SQLAlchemyError

        failures: tuple[type[BaseException], ...] = (MlflowException, SQLAlchemyError)
    except ImportError:  # an HTTP-only MLflow client has no SQLAlchemy
        failures = (MlflowException,)
    try:
        yield
    except failures as error:
        raise TrackingError(f"MLflow at {tracking_uri} cannot be used: {_first_line(error)}") from None


def _not_found(error: MlflowException) -> bool:
    return str(error.error_code) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def find_version(client: MlflowClient, name: str, alias: str | None, run_id: str | None = None) -> Any:
    """The version of ``name`` with ``alias``, or the one registered from ``run_id``.

    Raises:
        TrackingError: Invalid or unknown model name, unknown alias or run, or an unusable registry.
    """
    wanted = f"cannot find {name!r} @ {alias or run_id}"
    check_registered_model_name(name)
    with registry_errors(client.tracking_uri):
        try:
            registered = client.get_registered_model(name)
        except MlflowException as error:
            if not _not_found(error):
                raise
            raise TrackingError(f"{wanted}: registered model {name!r} does not exist") from None
        if run_id is not None:
            found = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]
            if not found:
                raise TrackingError(f"registered model {name!r} has no version from run {run_id}")
            return found[0]
        if alias not in registered.aliases:
            known = ", ".join(sorted(registered.aliases)) or "none yet"
            raise TrackingError(f"{wanted}: the model has no alias {alias!r} (its aliases: {known})")
        return client.get_model_version_by_alias(name, alias)


def find_compressed(client: MlflowClient, name: str, weights_sha256: str, spec_hash: str) -> Any | None:
    """The newest version of ``name`` compressed from these weights with this spec, or None.

    A version matches when its tags ``model.weights_sha256`` and ``spec_hash`` are both equal;
    versions registered before the weights tag existed never match. A registered model that
    does not exist yet has no such version.

    Raises:
        TrackingError: Invalid model name or an unusable registry.
    """
    check_registered_model_name(name)
    with registry_errors(client.tracking_uri):
        versions = client.search_model_versions(f"name='{name}'")
    same = [v for v in versions if v.tags.get(WEIGHTS_TAG) == weights_sha256 and v.tags.get("spec_hash") == spec_hash]
    return max(same, key=lambda v: int(v.version), default=None)


def download_version(client: MlflowClient, version: Any, dst: Path) -> Path:
    """Download a version's files (its ``model/`` folder) into ``dst``; returns the local folder.

    MLflow's download progress bars are off unless ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` is set.

    Raises:
        TrackingError: If the version's artifacts cannot be fetched (missing from the artifact store).
    """
    import mlflow.artifacts

    saved = os.environ.get(_PROGRESS_BAR)
    os.environ.setdefault(_PROGRESS_BAR, "false")
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=version.source, dst_path=str(dst), tracking_uri=client.tracking_uri
            )
        )
    except (MlflowException, OSError) as error:
        raise TrackingError(
            f"cannot fetch version {version.version} of {version.name!r} from {version.source}: {_first_line(error)}"
        ) from None
    finally:
        if saved is None:
            os.environ.pop(_PROGRESS_BAR, None)
