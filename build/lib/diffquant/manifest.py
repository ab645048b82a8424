"""File manifests: sha256 and size of every file in a folder, and their verification.

Every registered version carries ``manifest.json``; its own sha256 is a version tag, so a
deployment can prove that no artifact was altered between registration and use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffquant.errors import IntegrityError
from diffquant.storage import sha256_file, write_json

MANIFEST = "manifest.json"


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json`` listing every file under ``folder`` with its sha256 and size."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return write_json({"files": files, **(extra or {})}, folder / MANIFEST)


def verify_files(folder: Path, manifest_sha256: str | None = None) -> dict[str, Any]:
    """Check ``folder`` against its manifest (and the manifest against ``manifest_sha256``).

    Returns:
        The manifest.

    Raises:
        IntegrityError: Naming the first file that is missing, unlisted or altered.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{folder} has no {MANIFEST}; refusing unverifiable files")
    if manifest_sha256 is not None and sha256_file(path) != manifest_sha256:
        raise IntegrityError(f"{path} does not match the registered manifest sha256; refusing a tampered bundle")
    manifest = json.loads(path.read_text())
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise IntegrityError(f"{name} is listed in the manifest but missing from {folder}")
        if sha256_file(file) != entry["sha256"]:
            raise IntegrityError(f"{name} does not match its sha256 in the manifest; refusing a tampered artifact")
    listed = set(manifest["files"])
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    unlisted = [name for name in extra if name not in listed]
    if unlisted:
        raise IntegrityError(f"{unlisted[0]} is not listed in the manifest; refusing an altered bundle")
    return manifest
