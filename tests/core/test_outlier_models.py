"""The outlier variants of digits-dit and digits-t2i: the same float function, with real input outliers."""

from __future__ import annotations

import json

import pytest
import torch

from diffquant.data import load_digits_split
from diffquant.evaluation import evaluate_model
from diffquant.models.loading import load_model
from diffquant.models.reference import DIGITS_DIT, load_classifier
from diffquant.storage import sha256_tree
from diffquant.training.outliers import (
    OUTLIER_SCALES,
    VARIANTS,
    choose_outliers,
    denoiser_sites,
    inject_outliers,
    text_sites,
    write_outlier_variant,
)


def _inputs(model, n: int = 6):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, *model.sample_shape, generator=generator)
    t = torch.tensor([999, 800, 500, 250, 50, 1][:n])
    condition, _ = model.conditions(n, "calibration")
    return x, t, condition


def _consumer_inputs(model, layers, inputs):
    seen = {}
    handles = [
        model.unet.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().clone())
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            out = model.unet(*inputs).sample
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_variant_keeps_the_float_function_and_puts_outliers_in_the_consumers_inputs(variant, tmp_path):
    folder = write_outlier_variant(variant, tmp_path)
    reference, changed = load_model(variant.base), load_model(folder)
    record = json.loads((folder / "outliers.json").read_text())
    layers = sorted({name for o in record["outliers"] for name in o["consumers"]})
    inputs = _inputs(reference)
    expected, before = _consumer_inputs(reference, layers, inputs)
    got, after = _consumer_inputs(changed, layers, inputs)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    scaled = {(name, o["channel"]): o["scale"] for o in record["outliers"] for name in o["consumers"]}
    assert len(scaled) >= 8 and set(scaled.values()) <= set(OUTLIER_SCALES)
    for name in layers:
        ratio = torch.ones(before[name].shape[-1])
        for (layer, channel), scale in scaled.items():
            if layer == name:
                ratio[channel] = scale
        assert (after[name] / ratio - before[name]).abs().max() <= 1e-5 * before[name].abs().max()
        assert after[name].abs().amax(dim=tuple(range(after[name].dim() - 1))).max() > 8 * before[name].abs().max()
    # the folder is the reference's model to the loader and the evaluation: same classes, prompts, family
    assert changed.name == variant.name and changed.family == reference.family and changed.digits_compatible
    assert changed.null_class == reference.null_class
    if reference.prompts is not None:
        assert changed.prompts.evaluation == reference.prompts.evaluation
    result = evaluate_model(changed, 10, 2, 0, 10, load_classifier(), load_digits_split().held_out_images[:50])
    assert {"accuracy", "fd_real"} <= result.metrics.keys()


def test_variant_is_deterministic(tmp_path):
    variant = next(v for v in VARIANTS if v.base == DIGITS_DIT)
    first = sha256_tree(write_outlier_variant(variant, tmp_path / "a"))
    assert sha256_tree(write_outlier_variant(variant, tmp_path / "b")) == first
    assert sha256_tree(write_outlier_variant(variant, tmp_path / "c", seed=1)) != first


def test_sites_and_bad_arguments():
    dit = load_model(DIGITS_DIT)
    sites = denoiser_sites(dit)
    assert len(sites) == 12 and all(s.producer.endswith("norm1.linear") for s in sites)
    with pytest.raises(ValueError, match="not a text-conditioned"):
        text_sites(dit)
    with pytest.raises(ValueError, match=r"channels must be in 1\.\.64"):
        choose_outliers(sites[0], 64, 0, 0)
    with pytest.raises(ValueError, match="no transformer block"):
        inject_outliers(load_model("digits-unet"))
