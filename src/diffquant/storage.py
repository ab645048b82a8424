"""Safe file handling: safetensors only, atomic writes, sha256 digests."""

from __future__ import annotations

import errno
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

from diffquant.errors import DiskFullError, ModelLoadError

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


_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def _header_shapes(path: Path, header: Any, data_bytes: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a parsed safetensors header, checking it describes exactly the file's data."""
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a safetensors file (its header is not a JSON object)")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(x) for x in entry["shape"])
            width = _DTYPE_BYTES.get(str(entry["dtype"]))
        except (TypeError, KeyError, ValueError):
            raise ModelLoadError(f"{path} is damaged: its header entry for tensor {name!r} is malformed") from None
        count = 1
        for size in shape:
            count *= size
        if not 0 <= start <= stop or (width is not None and stop - start != count * width):
            raise ModelLoadError(
                f"{path} is damaged: tensor {name!r} of shape {list(shape)} does not fit its byte range {start}..{stop}"
            )
        shapes[name] = shape
        end = max(end, stop)
    if end > data_bytes:
        raise ModelLoadError(
            f"{path} is truncated: its header describes {end} bytes of tensors but the file holds {data_bytes}; "
            "copy or save the weights again"
        )
    if end < data_bytes:
        raise ModelLoadError(f"{path} is damaged: it has {data_bytes - end} bytes after its last tensor")
    return shapes


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file holds, read from its header after checking the file.

    The header is parsed and must describe exactly the bytes that follow it, so a truncated copy
    or random bytes are refused here, before any tensor is read.

    Raises:
        ModelLoadError: If the file is missing, a pickle/zip checkpoint, not safetensors, truncated or damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
        # safetensors first: its 8-byte header length may itself begin with 0x80 (e.g. 0x3780 bytes)
        if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
            length = struct.unpack("<Q", head[:8])[0]
            handle.seek(8)
            raw = handle.read(length)
            try:
                header = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ModelLoadError(f"{path} is not a safetensors file (its header is not JSON)") from None
            return _header_shapes(path, header, size - 8 - length)
    if len(head) == 9 and head[8:9] == b"{":
        raise ModelLoadError(f"{path} is truncated: it ends inside its safetensors header; copy or save it again")
    if any(head.startswith(magic) for magic in _PICKLE_MAGIC):
        raise ModelLoadError(
            f"{path} is a pickle checkpoint, which can run arbitrary code; "
            "convert it to safetensors (model.save_pretrained(..., safe_serialization=True))"
        )
    raise ModelLoadError(f"{path} is not a safetensors file")


def check_safetensors(path: Path) -> None:
    """Verify that ``path`` is a whole safetensors file, refusing pickles and anything else.

    Raises:
        ModelLoadError: If the file is missing, a pickle/zip checkpoint, not safetensors, truncated or damaged.
    """
    safetensors_shapes(path)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it is one (never unpickles)."""
    from safetensors.torch import load_file

    check_safetensors(path)
    return load_file(str(path))


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
}  # fmt: skip

HEADER_RESERVE = 4096
"""Bytes :class:`SafetensorsWriter` reserves for the header (a few tensors need a few hundred)."""


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, each in row chunks, never holding a whole tensor.

    Chunks go straight to the file; the header (dtype, shape, offsets) is written last into
    :data:`HEADER_RESERVE` bytes kept free at the start and padded with spaces, which the format
    allows. A tensor's chunks must come together: once another tensor is appended, it is closed.
    Use :func:`stream_safetensors` for an atomic write.
    """

    def __init__(self, handle: Any, reserve: int = HEADER_RESERVE) -> None:
        """Write into the open binary ``handle`` (positioned at 0)."""
        self._handle = handle
        self._reserve = reserve
        self._entries: dict[str, dict[str, Any]] = {}
        self._current: str | None = None
        self._offset = 0
        handle.write(b"\0" * (8 + reserve))

    def append(self, name: str, rows: torch.Tensor) -> None:
        """Append ``rows`` (first dimension) to tensor ``name``; the other dimensions and dtype must match."""
        rows = rows.detach().cpu().contiguous()
        entry = self._entries.get(name)
        if entry is None:
            if rows.dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {rows.dtype} cannot be stored")
            entry = {"dtype": rows.dtype, "rest": tuple(rows.shape[1:]), "rows": 0, "start": self._offset}
            self._entries[name] = entry
            self._current = name
        elif name != self._current:
            raise ValueError(f"tensor {name!r} was closed when another tensor was appended")
        if rows.dtype != entry["dtype"] or tuple(rows.shape[1:]) != entry["rest"]:
            raise ValueError(f"tensor {name!r}: chunk {rows.dtype} {list(rows.shape)} does not match the first")
        data = rows.view(torch.uint8).numpy().tobytes() if rows.numel() else b""
        self._handle.write(data)
        self._offset += len(data)
        entry["rows"] += int(rows.shape[0])

    def close(self) -> None:
        """Write the header into the reserved space.

        Raises:
            ValueError: If the header does not fit the reserved bytes.
        """
        header = {
            name: {
                "dtype": _SAFETENSORS_DTYPES[e["dtype"]],
                "shape": [e["rows"], *e["rest"]],
                "data_offsets": [e["start"], self._entries_end(name)],
            }
            for name, e in self._entries.items()
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > self._reserve:
            raise ValueError(f"safetensors header of {len(raw)} bytes exceeds the {self._reserve} reserved")
        self._handle.seek(0)
        self._handle.write(struct.pack("<Q", self._reserve) + raw + b" " * (self._reserve - len(raw)))

    def _entries_end(self, name: str) -> int:
        names = list(self._entries)
        following = names.index(name) + 1
        return self._entries[names[following]]["start"] if following < len(names) else self._offset


@contextmanager
def stream_safetensors(target: Path) -> Iterator[SafetensorsWriter]:
    """Yield a :class:`SafetensorsWriter` whose file replaces ``target`` atomically when the block ends.

    Raises:
        DiskFullError: If the disk fills up while the file is written.
    """
    with atomic_path(Path(target)) as tmp, tmp.open("r+b") as handle:
        writer = SafetensorsWriter(handle)
        yield writer
        writer.close()


def mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Open a safetensors file with its tensors memory-mapped: pages are read when used, not at once.

    The tensors are copy-on-write maps (writing to them never changes the file). Types numpy
    cannot map (bfloat16, float8) are read into memory instead.

    Raises:
        ModelLoadError: If the file is missing, not safetensors, truncated or damaged.
    """
    import numpy as np

    path = Path(path)
    check_safetensors(path)
    with path.open("rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length).decode("utf-8"))
    out: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] | None = None
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = (int(v) for v in entry["data_offsets"])
        shape = tuple(int(v) for v in entry["shape"])
        numpy_dtype = _NUMPY_DTYPES.get(str(entry["dtype"]))
        if numpy_dtype is None or stop == start:
            loaded = loaded if loaded is not None else load_safetensors(path)
            out[name] = loaded[name]
            continue
        array = np.memmap(path, dtype=numpy_dtype, mode="c", offset=8 + length + start, shape=shape)
        out[name] = torch.from_numpy(array)
    return out


def disk_full_error(folder: Path, what: str | None = None) -> DiskFullError:
    """The one-line error for a full disk under ``folder`` (``what``: the file being written)."""
    writing = f" while writing {what}" if what else ""
    return DiskFullError(
        f"no space left on the disk of {folder}{writing}; free space there or set DIFFQUANT_HOME "
        "(or --out) to a folder on a larger disk"
    )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-space (ENOSPC) or out-of-quota (EDQUOT) error.

    Besides ``OSError``, this recognizes the errors of libraries that report the OS error in their
    message: safetensors (``os error 28``) and SQLite (``database or disk is full``).
    """
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return any(marker in text for marker in ("(os error 28)", "(os error 122)", "database or disk is full"))


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target`` that is renamed onto it on success.

    On an exception the temporary file is removed and ``target`` is left untouched.

    Raises:
        DiskFullError: If the disk fills up while the temporary file is created or written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(target.parent, target.name) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o644)
        tmp_path.replace(target)
    except OSError as error:
        if is_disk_full(error):
            tmp_path.unlink(missing_ok=True)
            raise disk_full_error(target.parent, target.name) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors(tensors: dict[str, torch.Tensor], target: Path) -> Path:
    """Write tensors to ``target`` atomically as safetensors and return the path."""
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        except Exception as error:  # safetensors raises its own error type for I/O failures
            if is_disk_full(error):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
            raise
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
