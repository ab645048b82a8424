"""Write the outlier variants of digits-dit and digits-t2i: benchmark models with real activation outliers.

Three model folders (``diffquant.training.outliers``): ``digits-dit-outliers`` and
``digits-t2i-outliers`` (a few channels of the transformer blocks' norm outputs multiplied by 32 or
64, the matching input columns of the attention and feed-forward projections divided by the same
factor) and ``digits-t2i-text-outliers`` (the same on the text encoder's final LayerNorm, read by
the U-Net's cross-attention keys and values). The float function is unchanged; each folder loads
with ``model: {path: DIR}`` and is evaluated like its reference (accuracy, FD). Built from the
bundled weights, deterministically (same files for the same ``--channels`` and ``--seed``), in about
10 s; about 11 MB in all, so they are built, not committed.

Run: ``.venv/bin/python bench/outlier_models.py [--out DIR]`` (default ``$DIFFQUANT_HOME/outlier-models``,
``.diffquant/outlier-models``), then e.g.
``.venv/bin/diffquant compress --set model.path=.diffquant/outlier-models/digits-dit-outliers``.
It prints, per variant, how far the outliers stand out: over 256 calibration inputs, the largest
channel absmax of each consumer's input divided by the median channel absmax, before and after.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from diffquant.calibration.pool import collect_pool, subset
from diffquant.models.loading import DiffusionModel, load_model
from diffquant.sampling import denoiser_outputs
from diffquant.training.outliers import VARIANTS, write_outlier_models


def input_channel_ratios(model: DiffusionModel, layers: list[str], inputs: int = 256) -> dict[str, float]:
    """Per layer: largest per-channel absmax of its input over the median one, on FP trajectory inputs."""
    pool = collect_pool(model, trajectories=8, steps=50, seed=0)
    pool = subset(pool, torch.arange(0, len(pool), max(1, len(pool) // inputs)))
    absmax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            absmax[name] = torch.maximum(absmax[name], x) if name in absmax else x

        return record

    handles = [model.unet.get_submodule(name).register_forward_pre_hook(hook(name)) for name in layers]
    try:
        denoiser_outputs(model.unet, pool, model.conditional)
    finally:
        for handle in handles:
            handle.remove()
    return {name: float(a.max() / a.median()) for name, a in absmax.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    home = Path(os.environ.get("DIFFQUANT_HOME", ".diffquant"))
    parser.add_argument("--out", type=Path, default=home / "outlier-models")
    parser.add_argument("--channels", type=int, default=2, help="outlier channels per producer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ratios", action="store_true", help="skip the input-ratio measurement")
    args = parser.parse_args()
    folders = write_outlier_models(args.out, args.channels, args.seed)
    for variant, folder in zip(VARIANTS, folders, strict=True):
        print(f"{variant.name}: {folder}")
        if args.no_ratios:
            continue
        record = json.loads((folder / "outliers.json").read_text())
        layers = sorted({name for o in record["outliers"] for name in o["consumers"]})
        before = input_channel_ratios(load_model(variant.base), layers)
        after = input_channel_ratios(load_model(folder), layers)
        for name in layers:
            print(f"  {name}: max/median channel absmax {before[name]:.1f} -> {after[name]:.1f}")


if __name__ == "__main__":
    main()
