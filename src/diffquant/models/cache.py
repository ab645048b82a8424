"""Each model read from disk once per process: later loads are copies of the first.

A compress run loads its model in the CLI's pre-check and in every stage; reading and checking a
diffusers folder (and hashing its weights) each time is wasted work. :func:`model_copy` keeps the
first load on the CPU in float32 and hands out copies of its denoiser, which stages may change in
place (quantize, fine-tune) and place on their device. An entry is used only while every file of
the model's folder (and the prompts file) keeps its size, modification time and inode; the
weights' sha256 of the entry is the one computed when it was read. At most
:data:`CACHED_MODELS` models are kept (least recently used goes first).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from diffquant.models import loading
from diffquant.models.loading import DiffusionModel
from diffquant.models.reference import DIGITS_UNET, REFERENCE_MODELS, reference_dir

logger = logging.getLogger(__name__)

CACHED_MODELS = 2
"""Models kept in memory at once (a compress run needs one; a sweep over models alternates)."""

_Signature = tuple[tuple[str, int, int, int], ...]
_cache: OrderedDict[tuple[str, str | None, str | None], tuple[_Signature, DiffusionModel]] = OrderedDict()
_lock = threading.Lock()
_reads = 0


def _source(name: str | None, path: str | Path | None) -> Path | None:
    """The folder a model is read from (None when the name is unknown: :func:`load_model` says why)."""
    if path is not None:
        return Path(path).expanduser().resolve()
    chosen = name or DIGITS_UNET
    return reference_dir(chosen) if chosen in REFERENCE_MODELS else None


def _signature(folder: Path, prompts: str | Path | None) -> _Signature:
    """Size, modification time and inode of every file under ``folder`` and of the prompts file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    if prompts is not None:
        files.append(Path(prompts))
    out = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        out.append((str(file), stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(out)


def model_copy(
    name: str | None = None, path: str | Path | None = None, prompts: str | Path | None = None
) -> DiffusionModel:
    """A private copy of a model (CPU, float32), read from disk only the first time in this process.

    Args:
        name: A bundled reference model (the spec's ``model.name``).
        path: A local diffusers folder (the spec's ``model.path``).
        prompts: A prompts file for text models (``model.prompts``).

    Raises:
        ModelLoadError: As :func:`~diffquant.models.loading.load_model` (which reads the model).
    """
    global _reads
    folder = _source(name, path)
    if folder is None:
        return loading.load_model(name=name, path=path, prompts=prompts)
    key = (str(folder), name, str(Path(prompts).resolve()) if prompts is not None else None)
    signature = _signature(folder, prompts)
    with _lock:
        entry = _cache.get(key)
        if entry is None or entry[0] != signature:
            model = loading.load_model(name=name, path=path, prompts=prompts)
            _reads += 1
            _cache[key] = entry = (signature, model)
            while len(_cache) > CACHED_MODELS:
                _cache.popitem(last=False)
        _cache.move_to_end(key)
        cached = entry[1]
        unet = copy.deepcopy(cached.unet)
    return dataclasses.replace(cached, unet=unet, scheduler_config=dict(cached.scheduler_config))


def disk_reads() -> int:
    """How many times :func:`model_copy` has read a model from disk in this process."""
    return _reads


def clear_model_cache() -> None:
    """Forget every cached model (the next :func:`model_copy` reads from disk)."""
    with _lock:
        _cache.clear()
