"""Calibration-set selection strategies: pure functions of (pool, features, size, seed).

- ``random``: uniform over the pool (the baseline).
- ``uniform_timesteps``: the same number of samples at every timestep; when ``size`` is smaller
  than the number of timesteps, ``size`` timesteps evenly spaced over the trajectory (Q-Diffusion).
- ``normal_timesteps``: timesteps drawn from a normal over [0, T] (mean and std as fractions of
  T, default 0.4 and 0.4), truncated to the range, each draw snapped to the nearest sampler
  timestep (PTQ4DM's NDTC).
- ``density_diversity``: EDA-DM's TDAC (official generator, ``scripts/calibration.py``): per-sample
  features of the mid network (by default the input of the mid-block attention) at every
  timestep, the samples of one trajectory paired across timesteps. Density ``D_t`` = number of
  other timesteps ``t'`` whose paired features lie within ``radius`` (mean squared difference over
  samples, channels and positions); diversity ``V_t`` = ``sum over t' != t, samples and positions
  of 1 - cos`` (cosine over channels); both min-max normalised, ``w_t = D_t + lambda * V_t``; each
  timestep gets ``w_t / sum(w) * size`` samples (largest remainders), drawn at random within it.
  The pairwise statistics come from two ``T x T`` Gram matrices accumulated over chunks of
  trajectories, so memory stays ``O(T x chunk x feature)``, never ``N x N x C x H x W``.
- ``density_diversity_kcenter``: the library's selection before issue 16, kept because it measured
  better on digits-unet (BENCHMARKS.md "Calibration-set selection"): the same weight formula on each
  timestep's mean feature (density from squared distances between timestep means, diversity
  ``1 - cos`` between them), then greedy farthest-point (k-center) selection of that many samples
  inside each timestep, from a seeded random start. ``O(N_t^2)`` distances per timestep.

Every strategy returns sorted, unique pool indices. Where a timestep has fewer candidates than
its share, the excess goes to the timesteps nearest to it that still have room.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffquant.calibration.pool import held_out_indices, subset
from diffquant.errors import ConfigError, DataError
from diffquant.sampling import Trajectories, denoiser_outputs
from diffquant.spec import CalibrationSpec

if TYPE_CHECKING:
    from diffquant.models.loading import DiffusionModel

STRATEGIES = ("random", "uniform_timesteps", "normal_timesteps", "density_diversity", "density_diversity_kcenter")
FEATURE_STRATEGIES = frozenset({"density_diversity", "density_diversity_kcenter"})
"""Strategies that read denoiser features of the pool."""


@dataclass(frozen=True)
class SelectionParams:
    """Knobs of the timestep-aware strategies (ignored by the others)."""

    normal_mean: float = 0.4
    normal_std: float = 0.4
    num_train_timesteps: int = 1000
    radius: float | None = None
    diversity_weight: float = 1.2


def _timestep_groups(t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Unique timesteps (ascending) and the pool indices at each."""
    values = torch.unique(t)
    return values, [torch.nonzero(t == v).squeeze(1) for v in values]


def _fit_counts(counts: torch.Tensor, capacity: torch.Tensor, size: int) -> torch.Tensor:
    """Cap ``counts`` (summing to ``size``) at capacity; move each excess to the nearest timesteps with room."""
    if int(capacity.sum()) < size:
        raise DataError(f"calibration size {size} exceeds the pool size {int(capacity.sum())}")
    fitted = torch.minimum(counts, capacity)
    positions = torch.arange(counts.numel())
    for i in torch.nonzero(counts > capacity).squeeze(1).tolist():
        for _ in range(int(counts[i] - capacity[i])):
            distance = (positions - i).abs().float()
            distance[fitted >= capacity] = math.inf
            fitted[int(torch.argmin(distance))] += 1
    return fitted


def _largest_remainder(weights: torch.Tensor, size: int) -> torch.Tensor:
    """Integer counts proportional to ``weights`` that sum to ``size``."""
    share = weights.double() / weights.double().sum() * size
    counts = share.floor().long()
    remainder = size - int(counts.sum())
    order = torch.argsort(share - counts.double(), descending=True, stable=True)
    counts[order[:remainder]] += 1
    return counts


def _random_within(groups: list[torch.Tensor], counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    chosen = []
    for idx, k in zip(groups, counts.tolist(), strict=True):
        if k:
            chosen.append(idx[torch.randperm(idx.numel(), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def select_random(
    t: torch.Tensor, features: torch.Tensor | None, size: int, seed: int, params: SelectionParams
) -> torch.Tensor:
    """Uniformly random pool indices."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(t.numel(), generator=generator)[:size].sort().values


def select_uniform_timesteps(
    t: torch.Tensor, features: torch.Tensor | None, size: int, seed: int, params: SelectionParams
) -> torch.Tensor:
    """Equal counts per timestep (evenly spaced timesteps when ``size`` < timesteps)."""
    _, groups = _timestep_groups(t)
    n = len(groups)
    capacity = torch.tensor([g.numel() for g in groups])
    if size >= n:
        counts = torch.full((n,), size // n)
        counts[torch.linspace(0, n - 1, size % n).round().long()] += 1
    else:
        counts = torch.zeros(n, dtype=torch.long)
        counts[torch.linspace(0, n - 1, size).round().long()] = 1
    counts = _fit_counts(counts, capacity, size)
    return _random_within(groups, counts, torch.Generator().manual_seed(seed))


def select_normal_timesteps(
    t: torch.Tensor, features: torch.Tensor | None, size: int, seed: int, params: SelectionParams
) -> torch.Tensor:
    """Timesteps drawn from a truncated normal over [0, T], snapped to the sampler's timesteps."""
    values, groups = _timestep_groups(t)
    generator = torch.Generator().manual_seed(seed)
    total = params.num_train_timesteps
    draws: list[float] = []
    while len(draws) < size:
        batch = torch.randn(4 * size + 16, generator=generator, dtype=torch.float64)
        batch = (params.normal_mean + params.normal_std * batch) * total
        draws.extend(batch[(batch >= 0) & (batch <= total)].tolist())
    drawn = torch.tensor(draws[:size], dtype=torch.float64)
    nearest = torch.argmin((drawn[:, None] - values.double()[None, :]).abs(), dim=1)
    counts = torch.bincount(nearest, minlength=values.numel())
    counts = _fit_counts(counts, torch.tensor([g.numel() for g in groups]), size)
    return _random_within(groups, counts, generator)


FEATURE_CHUNK_ELEMENTS = 1 << 24
"""Feature elements (all timesteps together) gathered at once for the pairwise statistics."""


def _channels_last(features: torch.Tensor) -> torch.Tensor:
    """Per-entry features as ``(N, positions, channels)``.

    4-D features are ``(N, C, H, W)`` (U-Net maps, channels on axis 1), 3-D ones ``(N, tokens, D)``
    (transformer hidden states, channels last), 2-D ones ``(N, D)`` one position of ``D`` channels.
    """
    if features.dim() == 2:
        return features[:, None, :]
    if features.dim() == 3:
        return features
    return features.flatten(2).transpose(1, 2)


def paired_slots(groups: list[torch.Tensor]) -> torch.Tensor:
    """``(T, m)`` pool indices: the ``k``-th entry of every timestep is one trajectory (``m``: the smallest group).

    The pool records every trajectory at every timestep in the same order (:func:`collect_pool`),
    so rank within a timestep identifies the trajectory (and, with guidance, the half).
    """
    m = min(g.numel() for g in groups)
    return torch.stack([g[:m] for g in groups])


def pair_statistics(
    features: torch.Tensor, slots: torch.Tensor, eps: float = 1e-6, chunk_elements: int = FEATURE_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired mean squared difference and summed channel-cosine distance between every two timesteps.

    Args:
        features: Per-entry features of the pool (see :func:`_channels_last` for the layouts).
        slots: ``(T, m)`` pool indices, one trajectory per column (:func:`paired_slots`).
        eps: Lower bound of each vector norm in the cosine (``nn.CosineSimilarity``'s).
        chunk_elements: Feature elements gathered at once (at least one trajectory at every timestep).

    Returns:
        ``(mse, cosine)``, each ``(T, T)`` float64: ``mse[i, j]`` = mean over trajectories, channels
        and positions of ``(F_i - F_j)**2``; ``cosine[i, j]`` = sum over trajectories and positions of
        ``1 - cos(F_i, F_j)`` over channels.
    """
    n_t, m = slots.shape
    per_entry = features[0].numel()
    gram = torch.zeros(n_t, n_t, dtype=torch.float64)
    unit_gram = torch.zeros(n_t, n_t, dtype=torch.float64)
    norms = torch.zeros(n_t, dtype=torch.float64)
    positions = 0
    step = max(1, chunk_elements // max(1, n_t * per_entry))
    for start in range(0, m, step):
        block = _channels_last(features[slots[:, start : start + step].reshape(-1)].double())
        positions = block.shape[1]
        flat = block.reshape(n_t, -1)
        gram += flat @ flat.T
        norms += flat.pow(2).sum(1)
        unit = (block / block.norm(dim=2, keepdim=True).clamp_min(eps)).reshape(n_t, -1)
        unit_gram += unit @ unit.T
    mse = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0) / (m * per_entry)
    return mse, m * positions - unit_gram


def timestep_weights(t: torch.Tensor, features: torch.Tensor, params: SelectionParams) -> torch.Tensor:
    """EDA-DM's per-timestep weights ``norm(D) + lambda * norm(V)`` (ascending timestep order).

    ``radius`` None takes the median of the off-diagonal paired distances (the official code fixes
    it per dataset: 3.0 for CIFAR-10, 0.3 for LSUN, on its own feature scale).
    """
    _, groups = _timestep_groups(t)
    mse, cosine = pair_statistics(features, paired_slots(groups))
    off = ~torch.eye(len(groups), dtype=torch.bool)
    radius = params.radius if params.radius is not None else float(mse[off].median()) if off.any() else 0.0
    density = ((mse <= radius) & off).sum(1).double()
    diversity = (cosine * off).sum(1)
    return _minmax(density) + params.diversity_weight * _minmax(diversity)


def _weighted_counts(
    weigh: Callable[[torch.Tensor, torch.Tensor, SelectionParams], torch.Tensor],
    t: torch.Tensor,
    features: torch.Tensor,
    size: int,
    params: SelectionParams,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(timestep groups, samples per timestep)`` of a strategy that weighs timesteps by ``weigh``."""
    _, groups = _timestep_groups(t)
    weights = weigh(t, features, params)
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    counts = _fit_counts(_largest_remainder(weights, size), torch.tensor([g.numel() for g in groups]), size)
    return groups, counts


def _require_features(strategy: str, features: torch.Tensor | None) -> torch.Tensor:
    if features is None:
        raise DataError(f"{strategy} needs denoiser features for the pool")
    return features


def select_density_diversity(
    t: torch.Tensor, features: torch.Tensor | None, size: int, seed: int, params: SelectionParams
) -> torch.Tensor:
    """EDA-DM's allocation over timesteps, samples drawn at random within each timestep."""
    features = _require_features("density_diversity", features)
    groups, counts = _weighted_counts(timestep_weights, t, features, size, params)
    return _random_within(groups, counts, torch.Generator().manual_seed(seed))


def _minmax(v: torch.Tensor) -> torch.Tensor:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.ones_like(v)


def mean_feature_weights(t: torch.Tensor, features: torch.Tensor, params: SelectionParams) -> torch.Tensor:
    """``norm(D) + lambda * norm(V)`` per timestep from each timestep's mean feature (``density_diversity_kcenter``)."""
    _, groups = _timestep_groups(t)
    flat = features.reshape(features.shape[0], -1).double()
    means = torch.stack([flat[g].mean(0) for g in groups])
    sq = torch.cdist(means, means).pow(2) / means.shape[1]
    off = ~torch.eye(len(groups), dtype=torch.bool)
    radius = params.radius if params.radius is not None else float(sq[off].median()) if off.any() else 0.0
    density = ((sq <= radius) & off).sum(1).double()
    unit = torch.nn.functional.normalize(means, dim=1)
    diversity = ((1 - unit @ unit.T) * off).sum(1)
    return _minmax(density) + params.diversity_weight * _minmax(diversity)


def farthest_points(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-center: a seeded random start, then each next point farthest from those chosen."""
    n = points.shape[0]
    if k >= n:
        return torch.arange(n)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    distance = torch.cdist(points, points[chosen[-1]][None]).squeeze(1)
    for _ in range(k - 1):
        chosen.append(int(torch.argmax(distance)))
        distance = torch.minimum(distance, torch.cdist(points, points[chosen[-1]][None]).squeeze(1))
    return torch.tensor(chosen)


def select_density_diversity_kcenter(
    t: torch.Tensor, features: torch.Tensor | None, size: int, seed: int, params: SelectionParams
) -> torch.Tensor:
    """Mean-feature timestep weights, then k-center selection within each timestep."""
    features = _require_features("density_diversity_kcenter", features)
    groups, counts = _weighted_counts(mean_feature_weights, t, features, size, params)
    generator = torch.Generator().manual_seed(seed)
    flat = features.reshape(features.shape[0], -1).float()
    chosen = [
        idx[farthest_points(flat[idx], k, generator)] for idx, k in zip(groups, counts.tolist(), strict=True) if k
    ]
    return torch.cat(chosen).sort().values


SELECTORS: dict[str, Callable[..., torch.Tensor]] = {
    "random": select_random,
    "uniform_timesteps": select_uniform_timesteps,
    "normal_timesteps": select_normal_timesteps,
    "density_diversity": select_density_diversity,
    "density_diversity_kcenter": select_density_diversity_kcenter,
}


def select_indices(
    t: torch.Tensor,
    features: torch.Tensor | None,
    strategy: str,
    size: int,
    seed: int,
    params: SelectionParams | None = None,
) -> torch.Tensor:
    """Choose ``size`` pool indices with ``strategy``.

    Args:
        t: Timestep of every pool entry.
        features: Denoiser features of every pool entry (needed by the :data:`FEATURE_STRATEGIES`).
        strategy: One of :data:`STRATEGIES`.
        size: Number of indices.
        seed: Selection seed.
        params: Strategy knobs.

    Raises:
        DataError: Unknown strategy or a size outside 1..pool size.
    """
    if strategy not in SELECTORS:
        raise DataError(f"unknown calibration strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
    if not 0 < size <= t.numel():
        raise DataError(f"calibration size {size} must be between 1 and the pool size {t.numel()}")
    chosen = SELECTORS[strategy](t, features, size, seed, params or SelectionParams())
    if chosen.numel() != size or chosen.unique().numel() != size:
        raise AssertionError(f"{strategy} returned {chosen.numel()} indices for size {size}")
    return chosen


def select(
    pool: Trajectories,
    strategy: str,
    size: int,
    seed: int,
    features: torch.Tensor | None = None,
    params: SelectionParams | None = None,
) -> torch.Tensor:
    """Choose ``size`` pool indices with ``strategy`` (see the strategies above).

    Raises:
        DataError: Unknown strategy or a size larger than the pool.
    """
    return select_indices(pool.t, features, strategy, size, seed, params)


@torch.no_grad()
def pool_features(
    unet: nn.Module, pool: Trajectories, conditional: bool, module: str = "mid_block.resnets.0", batch_size: int = 256
) -> torch.Tensor:
    """Output of ``module`` for every pool entry, in its own layout (``(N, C, H, W)`` or ``(N, tokens, D)``).

    Raises:
        ConfigError: If the model has no module of that name (key ``feature_module``).
    """
    try:
        target = unet.get_submodule(module)
    except AttributeError:
        raise ConfigError("feature_module", f"{module!r} is not a module of the denoiser") from None
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        captured.append(tensor.detach().float().cpu())

    handle = target.register_forward_hook(hook)
    try:
        denoiser_outputs(unet, pool, conditional, batch_size, description="Computing pool features")
    finally:
        handle.remove()
    return torch.cat(captured)


@dataclass
class CalibrationSelection:
    """A calibration set chosen from a pool, and the disjoint inputs held out for SQNR.

    Attributes:
        calibration: The selected denoiser inputs.
        sqnr: Pool inputs not in the selection (unbiased SQNR of the denoiser output).
        indices: Pool indices of ``calibration`` (sorted).
        sqnr_indices: Pool indices of ``sqnr`` (sorted).
        features: Per-input features of the whole pool (None when neither the strategy nor the
            caller needed them).
        params: The strategy's knobs as used.
        seconds: Wall time of features plus selection.
    """

    calibration: Trajectories
    sqnr: Trajectories
    indices: torch.Tensor
    sqnr_indices: torch.Tensor
    features: torch.Tensor | None
    params: SelectionParams
    seconds: float


def select_calibration(
    pool: Trajectories,
    model: DiffusionModel,
    config: CalibrationSpec | None = None,
    *,
    sqnr_inputs: int = 256,
    with_features: bool = False,
    batch_size: int | None = None,
) -> CalibrationSelection:
    """Choose the calibration set from a pool with the config's strategy, and hold out SQNR inputs.

    Args:
        pool: The candidate pool (:func:`diffquant.collect_pool`).
        model: The float model the pool came from (its features drive ``density_diversity``).
        config: Strategy, size, seed and the strategies' knobs (default: density-diversity, 256).
        sqnr_inputs: Pool inputs outside the selection kept for SQNR.
        with_features: Compute the pool features even when the strategy does not need them.
        batch_size: Pool inputs per forward of the feature pass (None: ``config.batch_size``).

    Raises:
        DataError: A size larger than the pool.
        ConfigError: A size that leaves no pool input for SQNR, or a feature module the model lacks.

    Example:
        >>> chosen = diffquant.select_calibration(pool, model, diffquant.CalibrationSpec(size=64))
        >>> len(chosen.calibration)
        64
    """
    cal = config or CalibrationSpec()
    start = time.perf_counter()
    features = None
    if with_features or cal.strategy in FEATURE_STRATEGIES:
        module = cal.feature_module or model.family_info.feature_module
        features = pool_features(model.unet, pool, model.conditional, module, batch_size or cal.batch_size)
    params = SelectionParams(
        normal_mean=cal.normal_mean,
        normal_std=cal.normal_std,
        num_train_timesteps=int(model.scheduler_config.get("num_train_timesteps", 1000)),
        radius=cal.radius,
        diversity_weight=cal.diversity_weight,
    )
    chosen = select(pool, cal.strategy, cal.size, cal.seed, features, params)
    seconds = time.perf_counter() - start
    sqnr = held_out_indices(len(pool), chosen, sqnr_inputs, cal.seed)
    if sqnr_inputs > 0 and not sqnr.numel():
        raise ConfigError(
            "size",
            f"{cal.size} takes the whole candidate pool of {len(pool)} inputs, leaving none for SQNR; "
            "lower it or add trajectories",
        )
    return CalibrationSelection(
        subset(pool, chosen),
        subset(pool, sqnr),
        chosen,
        sqnr,
        features,
        params,
        seconds,
    )
