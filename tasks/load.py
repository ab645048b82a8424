"""Stage: resolve and load the source model (fails fast on bad sources)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.common import model_from_source


@task(name="load-model")
def load_model_task(source: dict[str, Any]) -> dict[str, Any]:
    """Load the model once to validate it; return its identity.

    Returns:
        ``name``, ``weights_sha256``, ``sample_shape``, ``num_classes``, ``layers`` (count) and
        ``layer_names`` (quantizable layers in module order).
    """
    from diffquant.quant.plan import quantizable_layers

    model = model_from_source(source)
    names = quantizable_layers(model.unet)
    return {
        "layer_names": names,
        "name": model.name,
        "weights_sha256": model.weights_sha256,
        "sample_shape": list(model.sample_shape),
        "num_classes": model.num_classes,
        "layers": len(names),
        "source_dir": str(model.source_dir),
    }
