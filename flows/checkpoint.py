"""Compression triggered by a new checkpoint: the event, its emission, and the flow it starts.

A training job (or ``diffquant watch DIR``) emits the Prefect event ``diffquant.checkpoint.landed``
whose resource carries the checkpoint folder's absolute path in the label
``diffquant.checkpoint.path`` (and, from the watcher, its weights' sha256 in
``diffquant.checkpoint.sha256``). The deployment ``compress-on-checkpoint`` (prefect.yaml) has a
trigger on that event which runs :func:`compress_checkpoint_flow` with the path.

The same checkpoint twice registers nothing new. A checkpoint is identified by the sha256 of
its weights (computed here by loading the folder, never taken from the event) and the spec hash
of the spec it is compressed with; before compressing, the flow looks in the registry for a
version with both tags (:func:`diffquant.registry.models.find_compressed`) and, when one exists,
compresses nothing and finishes in a ``Skipped`` state whose message says which version it is.
The deployment runs one flow run at a time (``concurrency_limit: 1``), so a second event
arriving while the first checkpoint is still being compressed waits and then finds its version.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.states import Completed

from diffquant.errors import SpecError, TrackingError
from diffquant.flows.compress import compress_flow
from diffquant.registry.home import diffquant_home, tracking_uri
from diffquant.registry.models import find_compressed, registry_client
from diffquant.spec import CompressionSpec, load_spec, spec_from_dict
from diffquant.tasks.load import load_model_task

logger = logging.getLogger(__name__)

CHECKPOINT_EVENT = "diffquant.checkpoint.landed"
RESOURCE_PREFIX = "diffquant.checkpoint."
PATH_LABEL = "diffquant.checkpoint.path"
SHA_LABEL = "diffquant.checkpoint.sha256"


def checkpoint_path(checkpoint: str | None) -> Path:
    """The checkpoint folder named by an event, which must be a non-empty absolute path.

    Raises:
        SpecError: The event carried no path or a relative one.
    """
    text = (checkpoint or "").strip()
    if not text or text == "None":
        raise SpecError(
            f"the {CHECKPOINT_EVENT} event has no checkpoint path: set the resource label {PATH_LABEL} "
            "to the checkpoint folder's absolute path"
        )
    path = Path(text)
    if not path.is_absolute():
        raise SpecError(f"checkpoint path {text!r} ({PATH_LABEL}) is relative; give the folder's absolute path")
    return path


def checkpoint_spec(spec: dict[str, Any] | None, path: Path) -> CompressionSpec:
    """``spec`` (the built-in default when None) with its model source replaced by ``path``.

    ``model.prompts`` is kept; ``model.name`` is dropped (a spec has one source).

    Raises:
        SpecError: The spec is invalid.
    """
    data = dict(spec) if spec is not None else load_spec().to_dict()
    model = {k: v for k, v in dict(data.get("model") or {}).items() if k not in ("name", "path")}
    data["model"] = {**model, "path": str(path)}
    return spec_from_dict(data)


def checkpoint_resource(path: Path, sha256: str) -> dict[str, str]:
    """The event's resource: id ``diffquant.checkpoint.<sha256, 16 hex>``, the path and sha256 labels."""
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{sha256[:16]}",
        "prefect.resource.name": Path(path).name,
        PATH_LABEL: str(Path(path).resolve()),
        SHA_LABEL: sha256,
    }


def events_api_url() -> str:
    """The Prefect API that checkpoint events go to (``PREFECT_API_URL``), checked to answer.

    Raises:
        TrackingError: ``PREFECT_API_URL`` is not set, is malformed, or does not answer.
    """
    from prefect.settings import PREFECT_API_URL

    from diffquant.registry.preflight import check_prefect_api

    url = PREFECT_API_URL.value()
    if not url:
        raise TrackingError(
            "PREFECT_API_URL is not set: checkpoint events go to the Prefect server whose worker runs "
            "the compress-on-checkpoint deployment; set it to that server's API URL"
        )
    check_prefect_api(url)
    return url


def emit_checkpoint_landed(path: Path, sha256: str) -> str:
    """Send ``diffquant.checkpoint.landed`` for ``path`` to the Prefect server at ``PREFECT_API_URL``.

    The event is sent over the events websocket and this call returns once it is sent (no
    background worker that could drop it when the process exits).

    Returns:
        The event's id.

    Raises:
        TrackingError: ``PREFECT_API_URL`` is not set, or the server does not answer.
    """
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    url = events_api_url()
    event = Event(event=CHECKPOINT_EVENT, resource=checkpoint_resource(path, sha256))

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    try:
        asyncio.run(send())
    except (OSError, TimeoutError) as error:
        raise TrackingError(f"cannot send the event to the Prefect server at {url}: {error}") from None
    logger.info("emitted %s for %s (event %s)", CHECKPOINT_EVENT, path, event.id)
    return str(event.id)


def already_compressed(cfg: CompressionSpec, weights_sha256: str) -> str | None:
    """The version of ``cfg``'s registered model made from these weights with this spec, or None."""
    client = registry_client(tracking_uri(diffquant_home()))
    version = find_compressed(client, cfg.registered_model_name(), weights_sha256, cfg.spec_hash())
    return None if version is None else str(version.version)


def skip_reason(cfg: CompressionSpec, weights_sha256: str, version: str) -> str:
    """The one line a skipped run reports."""
    return (
        f"skipped: {cfg.model.path} (weights sha256 {weights_sha256[:12]}) is already registered as "
        f"version {version} of {cfg.registered_model_name()} with spec {cfg.spec_hash()}"
    )


@flow(name="compress-checkpoint", log_prints=False)
def compress_checkpoint_flow(
    checkpoint: str | None = None, spec: dict[str, Any] | None = None, out_dir: str | None = None
) -> Any:
    """Compress the checkpoint folder an event named, unless it is already registered.

    Args:
        checkpoint: Absolute path of a local diffusers model or pipeline folder (the event's
            ``diffquant.checkpoint.path`` label).
        spec: The compression spec as data; its model source is replaced by the checkpoint
            (the built-in default spec when None).
        out_dir: Output folder of the compress run (default under ``DIFFQUANT_HOME/runs``).

    Returns:
        The compress run's summary with ``status: compressed``; or, when a version from the same
        weights and spec exists, a ``Skipped`` completed state whose message gives the reason and
        whose result is ``{status: skipped, reason, registered, registered_name}``.

    Raises:
        SpecError: No or a relative checkpoint path, or an invalid spec.
        ModelLoadError: The folder is not a diffusers model diffquant can load.
    """
    path = checkpoint_path(checkpoint)
    cfg = checkpoint_spec(spec, path)
    info = load_model_task(cfg.model)
    version = already_compressed(cfg, info.weights_sha256)
    if version is not None:
        reason = skip_reason(cfg, info.weights_sha256, version)
        logger.info(reason)
        result = {
            "status": "skipped",
            "reason": reason,
            "registered": version,
            "registered_name": cfg.registered_model_name(),
        }
        return Completed(name="Skipped", message=reason, data=result)
    summary = compress_flow(spec=cfg.to_dict(), out_dir=out_dir)
    return {**summary, "status": "compressed"}
