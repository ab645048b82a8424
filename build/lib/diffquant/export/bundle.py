"""Edge bundles: a registered version's files, verified by sha256, written atomically with a manifest.

Every registered version carries ``manifest.json`` (file name -> sha256 and size) and the
manifest's own sha256 as the version tag ``manifest_sha256``
(:func:`diffquant.manifest.verify_files` refuses a folder that does not match).
:func:`write_bundle` copies verified files (plus an optional TensorRT engine) into a temporary
folder beside the target and renames it into place, so the target never holds a partial bundle.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from diffquant.manifest import MANIFEST, write_manifest

logger = logging.getLogger(__name__)


def write_bundle(source: Path, target: Path, info: dict[str, Any], engine: Path | None = None) -> Path:
    """Copy verified ``source`` files (and ``engine``) to ``target`` atomically with a new manifest.

    Args:
        source: A verified version folder (see :func:`verify_files`).
        target: The bundle folder to create or replace.
        info: Provenance written into the bundle manifest (model, version, alias, run id...).
        engine: A TensorRT engine to include, or None to ship the ONNX for an on-device build.

    Returns:
        ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for file in Path(source).rglob("*"):
            if file.is_file() and file.name != MANIFEST:
                dest = staging / file.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dest)
        if engine is not None:
            (staging / "engine").mkdir()
            shutil.copy2(engine, staging / "engine" / Path(engine).name)
        write_manifest(staging, {"bundle": info})
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("bundle written to %s", target)
    return target
