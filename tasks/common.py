"""Helpers shared by the stage tasks: rebuilding inputs from paths."""

from __future__ import annotations

from pathlib import Path

from diffquant.calibration.pool import open_pool
from diffquant.errors import spec_section
from diffquant.models.cache import model_copy
from diffquant.models.loading import DiffusionModel
from diffquant.placement import resolve
from diffquant.sampling import Trajectories
from diffquant.spec import ModelSource, RuntimeSpec
from diffquant.storage import load_safetensors, save_safetensors


def model_from_source(source: ModelSource, runtime: RuntimeSpec | None = None) -> DiffusionModel:
    """A private copy of the spec's ``model``, placed per ``runtime`` (None: CPU float32).

    The model is read from disk once per process (:func:`~diffquant.models.cache.model_copy`);
    the copy is the caller's to change.
    """
    model = model_copy(name=source.name, path=source.path, prompts=source.prompts)
    if runtime is None:
        return model
    with spec_section("runtime"):
        return model.to(*resolve(runtime.device, runtime.dtype))


def save_trajectories(traj: Trajectories, path: Path) -> Path:
    """Store trajectories as safetensors."""
    return save_safetensors(traj.to_tensors(), path)


def load_trajectories(path: str | Path, mapped: bool = False) -> Trajectories:
    """Read trajectories written by :func:`save_trajectories` (or a pool); ``mapped`` memory-maps the inputs."""
    if mapped:
        return open_pool(path)
    data = load_safetensors(Path(path))
    return Trajectories(data["x"], data["t"], data["labels"])
