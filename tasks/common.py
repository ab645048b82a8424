"""Helpers shared by the stage tasks: rebuilding inputs from paths."""

from __future__ import annotations

from pathlib import Path

from diffquant.errors import spec_section
from diffquant.models.loading import DiffusionModel, load_model
from diffquant.sampling import Trajectories
from diffquant.spec import ModelSource, RuntimeSpec
from diffquant.storage import load_safetensors, save_safetensors


def model_from_source(source: ModelSource, runtime: RuntimeSpec | None = None) -> DiffusionModel:
    """Load the model described by a spec's ``model`` section, placed per ``runtime`` (None: CPU float32)."""
    if runtime is None:
        return load_model(name=source.name, path=source.path, prompts=source.prompts)
    with spec_section("runtime"):
        return load_model(
            name=source.name, path=source.path, prompts=source.prompts, device=runtime.device, dtype=runtime.dtype
        )


def save_trajectories(traj: Trajectories, path: Path) -> Path:
    """Store trajectories as safetensors."""
    return save_safetensors(traj.to_tensors(), path)


def load_trajectories(path: str | Path) -> Trajectories:
    """Read trajectories written by :func:`save_trajectories`."""
    data = load_safetensors(Path(path))
    return Trajectories(data["x"], data["t"], data["labels"])
