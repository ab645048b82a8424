"""Stage: resolve and load the source model (fails fast on bad sources)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.common import model_from_source


@task(name="load-model")
def load_model_task(source: dict[str, Any]) -> dict[str, Any]:
    """Load the model once to validate it; return its identity.

    Returns:
        ``name``, ``weights_sha256``, ``sample_shape``, ``num_classes`` and ``layers`` (count).
    """
    from diffquant.quant.plan import quantizable_layers

    model = model_from_source(source)
    return {
        "name": model.name,
        "weights_sha256": model.weights_sha256,
        "sample_shape": list(model.sample_shape),
        "num_classes": model.num_classes,
        "layers": len(quantizable_layers(model.unet)),
        "source_dir": str(model.source_dir),
    }
