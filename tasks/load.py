"""Stage: resolve and load the source model (fails fast on bad sources)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from diffquant.quant.plan import quantizable_layers
from diffquant.spec import ModelSource
from diffquant.storage import sha256_file, sha256_tree
from diffquant.tasks.artifacts import ModelInfo
from diffquant.tasks.common import model_from_source


@task(name="load-model")
def load_model_task(source: ModelSource) -> ModelInfo:
    """Load the model once to validate it; return its identity and quantizable layers."""
    model = model_from_source(source)
    return ModelInfo(
        name=model.name,
        family=model.family,
        condition=model.condition,
        weights_sha256=model.weights_sha256,
        prompts_sha256=sha256_file(Path(source.prompts)) if source.prompts else None,
        sample_shape=list(model.sample_shape),
        num_classes=model.num_classes,
        latent=model.latent,
        layer_names=quantizable_layers(model.unet),
        source_dir=str(model.source_dir),
        decoded=model.vae_dir is not None,
        vae_sha256=sha256_tree(model.vae_dir) if model.vae_dir is not None else None,
    )
