"""From sensitivities and costs to a mixed-precision LayerPlan (the core of ``allocation``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from diffquant.allocation import (
    Allocation,
    MixedPrecisionInputs,
    build_problem,
    option_name,
    qkv_groups,
    solve_allocation,
)
from diffquant.errors import SpecError
from diffquant.models.loading import DiffusionModel
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    WeightConfig,
    quantizable_layers,
    resolve_globs,
)
from diffquant.sampling import Trajectories, class_labels, ddim_sample, initial_noise
from diffquant.sensitivity import SensitivityTable, layer_macs, measure_sensitivity
from diffquant.spec import CompressionSpec

logger = logging.getLogger(__name__)


def content_metric(
    model: DiffusionModel, classifier: nn.Module, samples: int, steps: int, seed: int
) -> Callable[[nn.Module], float]:
    """Return ``unet -> mean KL(FP logits || quantized logits)`` on final samples from fixed noise."""
    labels = class_labels(samples, model.num_classes)
    noise = initial_noise(samples, model.sample_shape, seed)
    fp_images, _ = ddim_sample(
        model.unet, model.scheduler_config, noise, labels, steps, description="Content reference"
    )
    with torch.no_grad():
        fp_logp = torch.log_softmax(classifier(fp_images), dim=1)

    def measure(unet: nn.Module) -> float:
        images, _ = ddim_sample(unet, model.scheduler_config, noise, labels, steps, description="Content metric")
        with torch.no_grad():
            logp = torch.log_softmax(classifier(images), dim=1)
        return float((fp_logp.exp() * (fp_logp - logp)).sum(1).mean())

    return measure


def sensitivity_for_spec(
    model: DiffusionModel, calib: Trajectories, spec: CompressionSpec, classifier: nn.Module | None
) -> SensitivityTable:
    """Measure the sensitivity table the spec's allocation needs."""
    alloc = spec.allocation
    if alloc is None:
        raise SpecError("sensitivity needs an 'allocation' section in the spec")
    names = quantizable_layers(model.unet)
    try:
        content_layers = sorted(resolve_globs(names, alloc.content_layers))
    except ValueError as error:
        raise SpecError(f"allocation.content_layers: {error}") from None
    content_fn = None
    if content_layers:
        if classifier is None or not model.digits_compatible:
            raise SpecError("allocation.content_layers needs a model the evaluation classifier can judge")
        content_fn = content_metric(
            model, classifier, alloc.content_samples, spec.sampler.steps, spec.evaluate.seed + 1
        )
    if len(calib) > alloc.sensitivity_inputs:
        pick = torch.linspace(0, len(calib) - 1, alloc.sensitivity_inputs).round().long().unique()
        calib = Trajectories(calib.x[pick], calib.t[pick], calib.labels[pick])
    return measure_sensitivity(
        model.unet,
        calib,
        model.conditional,
        alloc.weight_bits,
        alloc.activation_bits,
        names,
        spec.quantize.weight.observer,
        spec.calibration.observer,
        content_layers,
        content_fn,
    )


def read_latency_table(path: str) -> dict[str, dict[str, float]]:
    """Read ``{layer: {option: ms}}`` measured on a target.

    Raises:
        SpecError: If the file is missing, not JSON, or not of that shape.
    """
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SpecError(f"allocation.latency_table {path} cannot be read as JSON: {error}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and all(isinstance(ms, (int, float)) for ms in v.values()) for v in data.values()
    ):
        raise SpecError(f"allocation.latency_table {path} must map layer -> option -> milliseconds")
    return {layer: {opt: float(ms) for opt, ms in opts.items()} for layer, opts in data.items()}


def allocate(
    model: DiffusionModel, calib: Trajectories, spec: CompressionSpec, table: SensitivityTable
) -> tuple[LayerPlan, Allocation]:
    """Solve the spec's allocation program and turn the answer into a LayerPlan.

    Raises:
        SpecError: Bad pins (unknown glob or option).
        diffquant.allocation.AllocationInfeasibleError: When the budget cannot be met.
    """
    alloc = spec.allocation
    if alloc is None:
        raise SpecError("allocation needs an 'allocation' section in the spec")
    unet = model.unet
    names = quantizable_layers(unet)
    modules = {name: unet.get_submodule(name) for name in names}
    weight_numel = {name: int(m.weight.numel()) for name, m in modules.items()}
    layer_params = sum(p.numel() for m in modules.values() for p in m.parameters())
    other = sum(p.numel() for p in unet.parameters()) - layer_params
    other += sum(int(m.bias.numel()) for m in modules.values() if m.bias is not None)
    inputs = MixedPrecisionInputs(
        layers=names,
        weight_numel=weight_numel,
        out_channels={name: int(m.weight.shape[0]) for name, m in modules.items()},
        macs=layer_macs(unet, (calib.x, calib.t, calib.labels if model.conditional else None)),
        other_params=int(other),
    )
    w_bits: list[int | None] = [*alloc.weight_bits, *([None] if alloc.allow_float_weights else [])]
    a_bits: list[int | None] = [*alloc.activation_bits, *([None] if alloc.allow_float_activations else [])]
    valid = {option_name(w, a) for w in w_bits for a in a_bits}
    pinned: dict[str, str] = {}
    for pattern, option in alloc.pinned.items():
        if option not in valid:
            raise SpecError(f"allocation.pinned: option {option!r} is not a candidate ({', '.join(sorted(valid))})")
        try:
            for name in resolve_globs(names, [pattern]):
                pinned[name] = option
        except ValueError as error:
            raise SpecError(f"allocation.pinned: {error}") from None
    problem = build_problem(
        inputs,
        table.noise,
        table.content,
        w_bits,
        a_bits,
        alloc.budget.as_dict(),
        alloc.objective,
        qkv_groups(names) if alloc.tie_qkv else [],
        pinned,
        read_latency_table(alloc.latency_table) if alloc.latency_table else None,
    )
    result = solve_allocation(problem)
    choices = {option_name(w, a): (w, a) for w in w_bits for a in a_bits}
    w_spec = spec.quantize.weight
    plan = LayerPlan()
    for name in names:
        w, a = choices[result.choice[name]]
        plan[name] = LayerConfig(
            WeightConfig(w, w_spec.granularity, w_spec.observer) if w is not None else None,
            ActivationConfig(a, spec.calibration.observer) if a is not None else None,
        )
    logger.info("allocation: objective %.4g, usage %s", result.objective, result.usage)
    return plan, result
