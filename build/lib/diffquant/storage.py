"""Safe file handling: safetensors only, atomic writes, sha256 digests."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from diffquant.errors import ModelLoadError

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: Path) -> str:
    """Return a sha256 over every file below ``path`` (relative names and contents, sorted)."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def check_safetensors(path: Path) -> None:
    """Verify that ``path`` is a safetensors file, refusing pickles and anything else.

    Raises:
        ModelLoadError: If the file is missing, a pickle/zip checkpoint, or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(9)
    # safetensors first: its 8-byte header length may itself begin with 0x80 (e.g. 0x3780 bytes)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
        return
    if any(head.startswith(magic) for magic in _PICKLE_MAGIC):
        raise ModelLoadError(
            f"{path} is a pickle checkpoint, which can run arbitrary code; "
            "convert it to safetensors (model.save_pretrained(..., safe_serialization=True))"
        )
    raise ModelLoadError(f"{path} is not a safetensors file")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it is one (never unpickles)."""
    from safetensors.torch import load_file

    check_safetensors(path)
    return load_file(str(path))


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target`` that is renamed onto it on success.

    On an exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o644)
        tmp_path.replace(target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors(tensors: dict[str, torch.Tensor], target: Path) -> Path:
    """Write tensors to ``target`` atomically as safetensors and return the path."""
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return Path(target)


def write_json(data: Any, target: Path, sort_keys: bool = True) -> Path:
    """Write ``data`` as indented JSON to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
    return Path(target)


def write_text(text: str, target: Path) -> Path:
    """Write ``text`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)
