"""Edge bundles: a registered version's files, verified by sha256, written atomically with a manifest.

Every registered version carries ``manifest.json`` (file name -> sha256 and size) and the
manifest's own sha256 as the version tag ``manifest_sha256``
(:func:`diffquant.manifest.verify_files` refuses a folder that does not match).
:func:`write_bundle` copies verified files (plus an optional TensorRT engine) into a temporary
folder beside the target and renames it into place, so the target never holds a partial bundle.

A bundle's ``manifest.json`` carries ``"kind": "diffquant-bundle"`` (bundles written before the
marker existed are recognised by their ``bundle`` provenance section). Only a missing target, an
empty folder or such a bundle is ever replaced; anything else at the target (a file, a folder of
someone else's files, a bundle holding files its manifest does not list) is refused, so diffquant
never deletes what it did not write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from diffquant.errors import ExportError
from diffquant.manifest import MANIFEST, write_manifest

logger = logging.getLogger(__name__)

BUNDLE_KIND = "diffquant-bundle"


def _bundle_manifest(folder: Path) -> dict[str, Any] | None:
    """The parsed manifest when ``folder`` is a diffquant bundle, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    if manifest.get("kind") == BUNDLE_KIND or isinstance(manifest.get("bundle"), dict):
        return manifest
    return None


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is a bundle written by :func:`write_bundle` (judged by its manifest)."""
    folder = Path(folder)
    return folder.is_dir() and _bundle_manifest(folder) is not None


def check_bundle_target(target: str | Path) -> Path:
    """Refuse a bundle target that cannot be written or holds anything diffquant did not write.

    Accepted: a path that does not exist (under a folder that exists or can be created), an empty
    folder, or a bundle whose files are all listed in its manifest.

    Args:
        target: The bundle folder to create or replace.

    Returns:
        ``target`` as an absolute :class:`~pathlib.Path`.

    Raises:
        ExportError: Naming the target and why it is refused.
    """
    if not str(target).strip():
        raise ExportError("the deploy target is empty; pass --target with the bundle folder to write")
    target = Path(os.path.abspath(target))  # '.', '..' and 'a/../b' name the folder they mean
    if target == target.parent:
        raise ExportError(f"deploy target {target} is a file-system root; choose a folder to write the bundle to")
    if target.is_symlink():
        raise ExportError(
            f"deploy target {target} is a symbolic link; refusing to replace it, pass the folder itself or another --target"
        )
    if target.exists() and not target.is_dir():
        raise ExportError(
            f"deploy target {target} exists and is not a folder; refusing to replace it, choose another --target"
        )
    if target.is_dir():
        try:
            entries = list(target.iterdir())
        except OSError as error:
            raise ExportError(f"deploy target {target} cannot be read ({error.strerror or error})") from None
        if entries:
            manifest = _bundle_manifest(target)
            if manifest is None:
                raise ExportError(
                    f"deploy target {target} is a non-empty folder that is not a diffquant bundle; "
                    "refusing to replace it, choose another --target"
                )
            listed = set(manifest["files"]) | {MANIFEST}
            names = (p.relative_to(target).as_posix() for p in target.rglob("*") if not p.is_dir())
            foreign = sorted(name for name in names if name not in listed)
            if foreign:
                raise ExportError(
                    f"deploy target {target} is a bundle holding {foreign[0]}, which its manifest does not list; "
                    "move that file away or choose another --target"
                )
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"deploy target {target} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"deploy target {target} cannot be created: {existing} is not writable")
    return target


def write_bundle(source: Path, target: Path, info: dict[str, Any], engine: Path | None = None) -> Path:
    """Copy verified ``source`` files (and ``engine``) to ``target`` atomically with a new manifest.

    Args:
        source: A verified version folder (see :func:`verify_files`).
        target: The bundle folder to create or replace (see :func:`check_bundle_target`).
        info: Provenance written into the bundle manifest (model, version, alias, run id...).
        engine: A TensorRT engine to include, or None to ship the ONNX for an on-device build.

    Returns:
        ``target`` (absolute).

    Raises:
        ExportError: If ``target`` is refused by :func:`check_bundle_target` or cannot be written;
            an existing bundle at ``target`` is then left as it was.
    """
    target = check_bundle_target(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as error:
        raise ExportError(f"cannot write the bundle to {target} ({error.strerror or error})") from None
    try:
        for file in Path(source).rglob("*"):
            if file.is_file() and file.name != MANIFEST:
                dest = staging / file.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dest)
        if engine is not None:
            (staging / "engine").mkdir()
            shutil.copy2(engine, staging / "engine" / Path(engine).name)
        write_manifest(staging, {"kind": BUNDLE_KIND, "bundle": info})
        # the target may have changed since the first check (another deploy, a user): check again
        check_bundle_target(target)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            if old is not None:
                old.rename(target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise ExportError(f"cannot write the bundle to {target} ({error.strerror or error})") from None
        raise
    logger.info("bundle written to %s", target)
    return target
