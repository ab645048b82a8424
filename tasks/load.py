"""Stage: resolve and load the source model (fails fast on bad sources)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffquant.tasks.common import model_from_source
from prefect import task

from diffquant.storage import sha256_file


@task(name="load-model")
def load_model_task(source: dict[str, Any]) -> dict[str, Any]:
    """Load the model once to validate it; return its identity.

    Returns:
        ``name``, ``family``, ``condition``, ``weights_sha256``, ``prompts_sha256`` (of
        ``model.prompts``, if set), ``sample_shape``, ``num_classes``, ``latent`` (samples are
        latents), ``layers`` (count) and ``layer_names`` (quantizable layers in module order).
    """
    from diffquant.quant.plan import quantizable_layers

    model = model_from_source(source)
    names = quantizable_layers(model.unet)
    prompts = source.get("prompts")
    return {
        "family": model.family,
        "condition": model.condition,
        "prompts_sha256": sha256_file(Path(prompts)) if prompts else None,
        "layer_names": names,
        "name": model.name,
        "weights_sha256": model.weights_sha256,
        "sample_shape": list(model.sample_shape),
        "latent": model.latent,
        "num_classes": model.num_classes,
        "layers": len(names),
        "source_dir": str(model.source_dir),
    }
