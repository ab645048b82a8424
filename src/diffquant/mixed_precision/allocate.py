"""From sensitivities and costs to a mixed-precision LayerPlan (the core of ``allocation``)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

from diffquant.devices import DeviceClass
from diffquant.devices import device_class as lookup_device_class
from diffquant.errors import ConfigError
from diffquant.mixed_precision.content import content_layers, content_metric, final_sample_probe
from diffquant.mixed_precision.costs import (
    MixedPrecisionInputs,
    Option,
    WeightChoice,
    build_problem,
    cross_attention_blocks,
    grid_options,
    group_fits,
    layer_macs,
    option_name,
    qkv_groups,
)
from diffquant.mixed_precision.latency import LatencyTable, read_latency_file
from diffquant.mixed_precision.sensitivity import PlanForm, SensitivityTable, branch_ranks, measure_sensitivity
from diffquant.mixed_precision.solver import Allocation, AllocationInfeasibleError, solve_allocation
from diffquant.models.families import matching_layers
from diffquant.models.loading import DiffusionModel
from diffquant.outlier_tokens import detect_outlier_tokens, fp_token_outputs
from diffquant.quant.gptq import collect_hessians, gptq_supported, hessian_groups
from diffquant.quant.modules import groups_allowed
from diffquant.quant.plan import (
    ActivationConfig,
    LayerConfig,
    LayerPlan,
    LowRankConfig,
    quantizable_layers,
    resolve_globs,
)
from diffquant.quant.transforms import max_rank
from diffquant.sampling import Trajectories, denoiser_outputs
from diffquant.spec import AllocationSpec, SamplerSpec

logger = logging.getLogger(__name__)

FLOAT_OPTION = option_name(None, None)
"""The option that keeps a layer in float (weights and inputs): what the family's full-precision layers take."""


def plan_fp_tokens(
    model: DiffusionModel, conditions: torch.Tensor | None, mode: str | int
) -> dict[str, tuple[int, torch.Tensor]]:
    """The leading tokens the final plan serves in float, per layer, with their FP outputs.

    The same detection :func:`diffquant.quantize` runs on the calibration conditions (MixDQ's
    BOS-aware handling of the layers that read the text encoder's states); empty for models
    without text conditions, with ``mode`` ``off``, or when no outlier token is found.

    Raises:
        ConfigError (``outlier_tokens``): A forced count larger than the constant leading positions.
    """
    if model.condition != "text" or mode == "off" or conditions is None:
        return {}
    try:
        found = detect_outlier_tokens(model, conditions, mode)
    except ValueError as error:
        raise ConfigError("outlier_tokens", str(error)) from None
    if not found.count:
        return {}
    readers = LayerPlan({name: LayerConfig(None, None, found.count) for name in found.layers})
    outputs = fp_token_outputs(model.unet, readers, conditions)
    return {name: (found.count, outputs[name]) for name in found.layers}


def _gptq_orders(unet: nn.Module, names: list[str], config: AllocationSpec) -> dict[str, set[bool]]:
    """Each GPTQ-able layer's Hessian column orders: plain, and grouped where a group option fits it."""
    orders = {}
    for name in names:
        layer = unet.get_submodule(name)
        if gptq_supported(layer):
            orders[name] = {False} | {
                True for g in config.group_sizes if config.group_bits and groups_allowed(layer, g)
            }
    return orders


def measure_allocation_sensitivity(
    model: DiffusionModel,
    calib: Trajectories,
    config: AllocationSpec,
    *,
    weight_observer: str = "minmax",
    activation_observer: str = "minmax",
    steps: int | SamplerSpec = 50,
    seed: int = 0,
    classifier: nn.Module | None = None,
    layers: list[str] | None = None,
    description: str = "Measuring layer sensitivity",
    weight_rounding: str = "nearest",
    outlier_tokens: str | int = "auto",
    batch_size: int = 256,
    sample_batch_size: int = 1000,
) -> SensitivityTable:
    """Measure the sensitivity table that the allocation ``config`` needs.

    Every layer is measured in the form the final plan gives it: with ``weight_rounding`` ``gptq``
    the weight rows use GPTQ weights from Hessians of the float model on the whole calibration
    set (one Hessian per layer, computed once and shared by every option: the same Hessians and
    rounding :func:`diffquant.quantize` applies), and text models' outlier tokens are served in
    float (``outlier_tokens``, as in the final plan) in the rows of the layers that read them.

    Args:
        model: The FP model.
        calib: Calibration set (SQNR on ``config.sensitivity_inputs`` evenly spaced inputs; GPTQ
            Hessians and outlier-token detection on all of it).
        config: The allocation: its options and metrics.
        weight_observer: Range observer of the weight candidates (``quantize.weight.observer``).
        activation_observer: Range observer of the input candidates (``calibration.observer``).
        steps: Sampler (or DDIM step count) of the final-sample probes (content layers, PSNR).
        seed: Evaluation seed; the probes draw their noise from ``seed + 1``.
        classifier: Evaluation classifier (``content_metric`` ``classifier_kl`` needs it).
        layers: Measure only these layers (default: all), e.g. one chunk of a parallel map.
        description: Progress-bar label.
        weight_rounding: ``nearest`` or ``gptq`` (``quantize.weight.rounding``).
        outlier_tokens: ``quantize.outlier_tokens`` (``auto``, ``off`` or a count).
        batch_size: Calibration inputs per forward (``calibration.batch_size``).
        sample_batch_size: Denoiser inputs per forward of the final-sample probes (``evaluate.batch_size``).

    Raises:
        ConfigError: Content layers that match nothing, ``classifier_kl`` without a classifier
            that can judge the model, a forced outlier-token count the prompts do not allow, or
            too few calibration rows for a GPTQ layer's Hessian (``weight.rounding``).
    """
    alloc = config
    scored = content_layers(model, alloc)
    metric = content_metric(alloc, model, classifier is not None)
    wanted = quantizable_layers(model.unet) if layers is None else list(layers)
    probe = None
    if alloc.quality_metric == "psnr" or scored & set(wanted):
        probe = final_sample_probe(
            model,
            metric,
            classifier,
            alloc.content_samples,
            steps,
            seed + 1,
            scored,
            alloc.quality_metric == "psnr",
            sample_batch_size,
        )
    fp_tokens = plan_fp_tokens(model, calib.labels if model.conditional else None, outlier_tokens)
    inputs = calib
    if len(calib) > alloc.sensitivity_inputs:
        pick = torch.linspace(0, len(calib) - 1, alloc.sensitivity_inputs).round().long().unique()
        inputs = Trajectories(calib.x[pick], calib.t[pick], calib.labels[pick])
    gptq = weight_rounding == "gptq"
    table = SensitivityTable()
    for group in hessian_groups(model.unet, wanted) if gptq else [wanted]:
        hessians = {}
        if gptq:

            def run(module: nn.Module) -> None:
                denoiser_outputs(module, calib, model.conditional, batch_size)

            hessians = collect_hessians(model.unet, _gptq_orders(model.unet, group, alloc), run)
        table.rows += measure_sensitivity(
            model.unet,
            inputs,
            model.conditional,
            alloc.weight_bits,
            alloc.activation_bits,
            group,
            weight_observer,
            activation_observer,
            [(b, g) for b in alloc.group_bits for g in alloc.group_sizes],
            probe,
            description,
            PlanForm({name: fp_tokens[name] for name in group if name in fp_tokens}, hessians),
            batch_size=batch_size,
            ranks=alloc.ranks,
            weight_formats=alloc.weight_formats,
            act_formats=alloc.activation_formats,
        ).rows
    return table


def check_allocation(model: DiffusionModel, config: AllocationSpec, classifier_fits: bool) -> None:
    """Check the allocation's globs and content metric against ``model`` before any work (cheap).

    Args:
        model: The FP model.
        config: The allocation.
        classifier_fits: Whether the evaluation classifier will be given (the run loads it for
            models it can judge).

    Raises:
        ConfigError: A content-layer or pin glob that matches no layer, an unknown pinned
            option, or ``classifier_kl`` without a classifier.
    """
    content_layers(model, config)
    content_metric(config, model, classifier_fits)
    _pins(config, quantizable_layers(model.unet))


def read_latency_table(path: str) -> dict[str, dict[str, float]]:
    """Read ``{layer: {option: ms}}`` measured on a target (either JSON shape of :mod:`.latency`).

    Raises:
        ConfigError (``latency_table``): If the file is missing, not JSON, or not of that shape.
    """
    return read_latency_file(path).layers


def _candidates(config: AllocationSpec) -> tuple[list[WeightChoice], list[int | None]]:
    """The allocation's weight candidates ``(bits, group size)`` and input bits (None: float), in program order."""
    w_opts: list[WeightChoice] = [(b, None) for b in config.weight_bits]
    w_opts += [(b, g) for b in config.group_bits for g in config.group_sizes]
    w_opts += [(None, None)] if config.allow_float_weights else []
    a_bits: list[int | None] = [*config.activation_bits, *([None] if config.allow_float_activations else [])]
    return w_opts, a_bits


def candidate_options(config: AllocationSpec) -> dict[str, tuple[int | None, int | None, int | None]]:
    """The allocation's options by name: ``{option_name: (weight bits, group size, activation bits)}``.

    None bits keep that part in float; the order is the program's column order.
    """
    w_opts, a_bits = _candidates(config)
    return {option_name(w, a, g): (w, g, a) for w, g in w_opts for a in a_bits}


def allocation_options(config: AllocationSpec) -> dict[str, Option]:
    """Every option the allocation offers, by name, in the program's column order (:func:`grid_options`).

    The integer grid of :func:`candidate_options`, each per-channel weight also with a float16
    low-rank branch of every nonzero rank in ``config.ranks`` (``w4a8r16``), then the float weight
    formats of ``config.weight_formats``; every weight candidate pairs with every input candidate:
    the integer ``activation_bits`` and the FP8 ``activation_formats``.
    """
    w_opts, a_bits = _candidates(config)
    options = grid_options(w_opts, a_bits, config.ranks, config.weight_formats, config.activation_formats)
    return {option.name: option for option in options}


def _latency_gaps(
    table: LatencyTable, path: str, allowed: dict[str, list[str]], pinned: dict[str, str]
) -> list[dict[str, str]]:
    """The (layer, option) pairs the latency table lacks, each with why it became unavailable.

    Args:
        table: The latency table.
        path: Its file (for the messages).
        allowed: Each layer's candidate options before the table is consulted (group-wise options
            a layer cannot take are not listed).
        pinned: Layer -> pinned option.

    Raises:
        ConfigError (``latency_table``): If a layer has none of its options in the table, or a
            pinned option is missing.
    """
    gaps: list[dict[str, str]] = []
    for layer, options in allowed.items():
        row = table.layers.get(layer)
        missing = [option for option in options if row is None or option not in row]
        if missing and len(missing) == len(options):
            what = "is not in" if row is None else "has none of its candidate options in"
            raise ConfigError(
                "latency_table",
                f"layer {layer!r} {what} {path}, so no option is left for it; profile the model again "
                "(diffquant profile) with the allocation's options",
            )
        if layer in pinned and pinned[layer] in missing:
            raise ConfigError("latency_table", f"layer {layer!r} is pinned to {pinned[layer]!r}, which {path} lacks")
        reason = f"{'layer' if row is None else 'option'} missing from the latency table {path}"
        gaps += [{"layer": layer, "option": option, "reason": reason} for option in missing]
    if gaps:
        logger.warning("the latency table %s lacks %d (layer, option) pairs: they are unavailable", path, len(gaps))
    return gaps


def _allowed_options(modules: dict[str, nn.Module], choices: Mapping[str, Option]) -> dict[str, list[str]]:
    """Each layer's options before latency is consulted (group sizes must divide its input channels)."""
    allowed = {}
    for name, module in modules.items():
        channels = _group_channels(module)
        allowed[name] = [o for o, option in choices.items() if group_fits(channels, option.group_size)]
    return allowed


def latency_gaps(unet: nn.Module, config: AllocationSpec) -> list[dict[str, str]]:
    """The (layer, option) pairs ``config.latency_table`` lacks for ``unet`` (they become unavailable).

    Cheap (no sensitivity, no solve): the CLI calls it before a run starts.

    Raises:
        ConfigError (``latency_table``): If the table cannot be read, or a layer has none of its options.
    """
    if config.latency_table is None:
        return []
    modules = {name: unet.get_submodule(name) for name in quantizable_layers(unet)}
    table = read_latency_file(config.latency_table)
    grid = {name: Option(*choice) for name, choice in candidate_options(config).items()}
    return _latency_gaps(table, config.latency_table, _allowed_options(modules, grid), {})


def _group_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels if layer.groups == 1 else 0
    return int(getattr(layer, "in_features", 0))


def _layer_kind(layer: nn.Module) -> str:
    return "conv" if isinstance(layer, nn.Conv2d) else "linear"


def _option_problem(device: DeviceClass, kind: str, option: Option) -> str | None:
    """Why ``device`` cannot run ``option`` on a ``kind`` layer (its formats, then its integer weight); None if it can."""
    problem = device.format_problem(kind, option.weight_format, option.act_format)
    if problem is None and option.weight_bits is not None and option.weight_format == "int":
        problem = device.weight_problem(kind, option.weight_bits, option.group_size)
    return problem


def device_filter(
    device: DeviceClass,
    kinds: dict[str, str],
    choices: Mapping[str, Option],
    group_channels: dict[str, int] | None = None,
) -> tuple[dict[str, set[str]], dict[str, str]]:
    """The options each layer's device class cannot run, and why (option -> reason, with a layer count).

    Args:
        device: The class the plan is for.
        kinds: Layer -> ``conv`` or ``linear``.
        choices: Option name -> :class:`~diffquant.mixed_precision.costs.Option`.
        group_channels: Layer -> input channels groups may split; a group-wise option a layer
            cannot take anyway (the size does not divide them) is not counted as removed.

    Returns:
        ``(layer -> option names it loses, option -> one line saying why and for how many layers)``.
    """
    unavailable: dict[str, set[str]] = {}
    why: dict[str, tuple[str, int]] = {}
    for layer, kind in kinds.items():
        channels = (group_channels or {}).get(layer)
        for name, option in choices.items():
            if channels is not None and not group_fits(channels, option.group_size):
                continue
            problem = _option_problem(device, kind, option)
            if problem is not None:
                unavailable.setdefault(layer, set()).add(name)
                count = why.get(name, (problem, 0))[1]
                why[name] = (problem, count + 1)
    total = len(kinds)
    removed = {
        option: f"{reason} (removed for {count} of {total} layers)" for option, (reason, count) in sorted(why.items())
    }
    return unavailable, removed


def _pins(config: AllocationSpec, names: list[str]) -> dict[str, str]:
    """``config.pinned`` resolved: layer -> option (any of :func:`allocation_options`).

    Raises:
        ConfigError (``pinned``): An option that is not a candidate, or a glob that matches no layer.
    """
    pinned: dict[str, str] = {}
    valid = set(allocation_options(config))
    for pattern, option in config.pinned.items():
        if option not in valid:
            raise ConfigError("pinned", f"option {option!r} is not a candidate ({', '.join(sorted(valid))})")
        try:
            for name in resolve_globs(names, [pattern]):
                pinned[name] = option
        except ValueError as error:
            raise ConfigError("pinned", str(error)) from None
    return pinned


def family_float_layers(model: DiffusionModel, config: AllocationSpec, names: list[str]) -> set[str]:
    """The model family's full-precision layers the allocated plan keeps in float.

    Empty with ``quantize_family_fp_layers``; layers ``config.pinned`` names take their pin instead.
    """
    if config.quantize_family_fp_layers:
        return set()
    pinned = set(_pins(config, names))
    return matching_layers(model.family_info.keep_full_precision, names) - pinned


def allocate_plan(
    model: DiffusionModel,
    calib: Trajectories,
    config: AllocationSpec,
    table: SensitivityTable,
    *,
    weight_observer: str = "minmax",
    activation_observer: str = "minmax",
    device_class: str | DeviceClass | None = None,
    weight_rounding: str = "nearest",
) -> tuple[LayerPlan, Allocation]:
    """Solve the allocation program and turn the answer into a LayerPlan.

    The model family's full-precision layers stay in float (pinned to ``wfpafp``, 32 bits toward
    every budget) unless ``config.quantize_family_fp_layers`` or a pin of ``config.pinned``
    names them, so an allocated plan and a uniform plan keep the same layers in float.

    Args:
        model: The FP model.
        calib: Calibration inputs (their shapes give each layer's MACs).
        config: The allocation: candidates, budget, objective, ties and pins.
        table: Its sensitivity table (:func:`measure_allocation_sensitivity`).
        weight_observer: Range observer of the planned weights.
        activation_observer: Range observer of the planned inputs.
        device_class: The device class the plan is for (:mod:`diffquant.devices`): only the options it
            runs are offered to each layer; the answer's ``removed`` says which were taken away and
            why, its ``notes`` how the class runs chosen options that are not integer kernels there.
            With ``config.cost: deployed`` its storage types are what the budget counts. None
            offers every candidate (and cannot count deployed bytes).
        weight_rounding: Rounding of the planned weights (``quantize.weight.rounding``: ``nearest``
            or ``gptq``).

    Raises:
        ConfigError: Bad pins (unknown glob or option, or an option the device class cannot run
            on a pinned layer), ``cost: deployed`` without a device class, an unknown device class, an unreadable latency table, or a layer the
            latency table has none of the options for. Options the table lacks for a layer are
            unavailable to it and listed in the answer's ``unavailable``.
        diffquant.mixed_precision.solver.AllocationInfeasibleError: When the budget cannot be met.
    """
    alloc = config
    if alloc.cost == "deployed" and device_class is None:
        raise ConfigError("cost", "deployed counts what a device class stores; give the plan's device_class")
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
        group_channels={name: _group_channels(m) for name, m in modules.items()},
        max_ranks={name: max(branch_ranks(m, [max_rank(m)]), default=0) for name, m in modules.items()},
    )
    offered = allocation_options(alloc)
    choices = dict(offered)
    keep_float = family_float_layers(model, alloc, names)
    float_only = bool(keep_float) and FLOAT_OPTION not in choices  # an option only the family's layers take
    if keep_float:
        choices[FLOAT_OPTION] = Option(None, None, None)
    kinds = {name: _layer_kind(m) for name, m in modules.items()}
    entry = lookup_device_class(device_class) if device_class is not None else None
    unavailable, removed = (
        device_filter(entry, kinds, choices, inputs.group_channels) if entry is not None else ({}, {})
    )
    pinned = _pins(alloc, names) | dict.fromkeys(keep_float, FLOAT_OPTION)
    for name, option in pinned.items():
        if entry is not None and option in unavailable.get(name, ()):
            reason = _option_problem(entry, kinds[name], choices[option])
            raise ConfigError("pinned", f"{name} is pinned to {option}, which {entry.name} cannot run: {reason}")
    metric = alloc.quality_metric
    amplitude = alloc.noise_sum == "amplitude"

    def noise(layer: str, kind: str, bits: int | None, group: int | None, rank: int = 0, fmt: str = "int") -> float:
        power = table.noise(layer, kind, bits, group, metric, rank, fmt)
        return math.sqrt(power) if amplitude else power

    latency = read_latency_file(alloc.latency_table) if alloc.latency_table else None
    gaps: list[dict[str, str]] = []
    if latency is not None:
        allowed = {
            name: [
                o
                for o in options
                if o not in unavailable.get(name, ())
                and not (float_only and o == FLOAT_OPTION and name not in keep_float)
            ]
            for name, options in _allowed_options(modules, choices).items()
        }
        gaps = _latency_gaps(latency, alloc.latency_table, allowed, pinned)
    problem = build_problem(
        inputs,
        noise,
        table.content,
        list(offered.values()),
        alloc.budget.as_dict(),
        alloc.objective,
        qkv_groups(names, cross_attention_blocks(unet)) if alloc.tie_qkv else [],
        pinned,
        latency.layers if latency is not None else None,
        unavailable,
        latency_overhead=latency.overhead_ms if latency is not None else 0.0,
        storage_bits=entry.storage_bits if entry is not None and alloc.cost == "deployed" else None,
        float_layers=keep_float if float_only else None,
    )
    try:
        result = solve_allocation(problem)
    except AllocationInfeasibleError as error:
        if not removed or entry is None:
            raise
        raise AllocationInfeasibleError(
            f"{error} (device class {entry.name} cannot run {', '.join(removed)} on some layers)", error.minimal
        ) from None
    plan = LayerPlan()
    for name in names:
        option = choices[result.choice[name]]
        a = option.act_bits
        plan[name] = LayerConfig(
            option.weight_config(weight_observer, weight_rounding),
            ActivationConfig(a, activation_observer, option.act_format) if a is not None else None,
            low_rank=LowRankConfig(option.rank) if option.rank else None,
        )
    notes: dict[str, list[str]] = {}
    for name in names if entry is not None else ():
        option = choices[result.choice[name]]
        note = entry.weight_note(kinds[name], option.weight_bits) if option.weight_format == "int" else None
        if note is not None:
            notes.setdefault(note, []).append(name)
    result = dataclasses.replace(result, removed=removed, notes=notes, unavailable=gaps)
    if removed:
        logger.info("allocation for %s: options removed: %s", entry.name if entry else "-", removed)
    logger.info("allocation: objective %.4g, usage %s", result.objective, result.usage)
    return plan, result
