"""Gated promotion of registered model versions with MLflow aliases.

Every registered version gets the ``challenger`` alias's history (the alias moves to the newest
version) and a decision; a version whose decision passes may become ``champion``.

The decision (:func:`decide_promotion`) is pure: a candidate passes when it meets every gate
and beats the current champion's objective (FD to real, lower is better) at equal or smaller
size. Applying it (:func:`apply_decision`) writes the decision as version tags and then
*reconciles* the champion alias, lock-free, so that concurrent runs converge:

- contenders are the current champion plus every version whose decision passed, that was not
  rolled back, and that was decided after the last manual action (``promote``/``rollback``
  record an epoch on the registered model);
- the champion is the contender with the lowest objective (then the smaller size, then the
  lower version number);
- after moving the alias the reconciler reads the tags again until the answer is stable, so
  two runs finishing together leave exactly one champion, the better one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient

from diffquant.errors import DiffquantError
from diffquant.registry.models import check_registered_model_name, registry_errors
from diffquant.spec import GatesSpec

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PASSED = "promotion.passed"
TAG_REASONS = "promotion.reasons"
TAG_DECIDED_AT = "promotion.decided_at"
TAG_OBJECTIVE = "promotion.objective"
TAG_SIZE = "promotion.size_bytes"
TAG_ROLLED_BACK = "promotion.rolled_back"
TAG_EPOCH = "promotion.epoch"
_RECONCILE_ROUNDS = 10


class PromotionError(DiffquantError):
    """A promotion or rollback request cannot be carried out (unknown model or version, nothing to roll back)."""


@dataclass(frozen=True)
class Candidate:
    """What a decision needs about a version (or the current champion).

    Attributes:
        fd_real: Quantized FD to real (the objective; lower is better).
        fp_fd_real: The FP model's FD to real from the same run.
        accuracy: Condition accuracy of quantized samples (None when not measured).
        size_bytes: Packed weight bytes.
        fp32_bytes: FP32 bytes of the same model.
        version: Registry version, when registered.
    """

    fd_real: float
    fp_fd_real: float
    accuracy: float | None
    size_bytes: int
    fp32_bytes: int
    version: str | None = None

    @property
    def objective(self) -> float:
        """FD to real (lower is better)."""
        return self.fd_real


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide_promotion`."""

    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for summary.json."""
        return asdict(self)


def decide_promotion(candidate: Candidate, champion: Candidate | None, gates: GatesSpec) -> Decision:
    """Decide whether ``candidate`` may become champion (pure; every reason is listed).

    Args:
        candidate: The new version's metrics.
        champion: The current champion's metrics, or None when there is none.
        gates: The gates.

    Returns:
        ``passed`` and the reasons (one line per gate or comparison, pass or fail).
    """
    reasons: list[str] = []
    ok = True

    def check(passed: bool, text: str) -> None:
        nonlocal ok
        ok = ok and passed
        reasons.append(("pass: " if passed else "fail: ") + text)

    measured = candidate.fd_real < float("inf") and candidate.fp_fd_real < float("inf")
    if gates.max_fd_ratio is not None and not measured:
        check(False, "FD to real was not measured (no evaluation classifier for this model)")
    elif gates.max_fd_ratio is not None:
        ratio = candidate.fd_real / candidate.fp_fd_real if candidate.fp_fd_real > 0 else float("inf")
        check(ratio <= gates.max_fd_ratio, f"FD to real is {ratio:.3f}x FP's (gate <= {gates.max_fd_ratio:g}x)")
    if gates.min_accuracy is not None:
        if candidate.accuracy is None:
            check(False, f"accuracy was not measured (gate >= {gates.min_accuracy:g})")
        else:
            check(
                candidate.accuracy >= gates.min_accuracy,
                f"accuracy {candidate.accuracy:.4f} (gate >= {gates.min_accuracy:g})",
            )
    if gates.max_size_ratio is not None:
        ratio = candidate.size_bytes / candidate.fp32_bytes
        check(ratio <= gates.max_size_ratio, f"size is {ratio:.3f}x FP32 (gate <= {gates.max_size_ratio:g}x)")
    if champion is None:
        reasons.append("pass: no current champion")
    else:
        name = f"champion v{champion.version}" if champion.version else "the champion"
        check(
            candidate.size_bytes <= champion.size_bytes,
            f"size {candidate.size_bytes:,} B vs {name}'s {champion.size_bytes:,} B (must be equal or smaller)",
        )
        check(
            candidate.objective < champion.objective,
            f"FD to real {candidate.objective:.4g} vs {name}'s {champion.objective:.4g} (must be lower)",
        )
    return Decision(ok, reasons)


def _version_tags(client: MlflowClient, name: str) -> dict[str, dict[str, str]]:
    return {str(v.version): dict(v.tags) for v in client.search_model_versions(f"name='{name}'")}


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def champion_candidate(client: MlflowClient, name: str) -> Candidate | None:
    """The current champion's metrics from its version tags, or None when there is no champion."""
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        return None
    return candidate_from_tags(client.get_model_version(name, version).tags, version)


def candidate_from_tags(tags: dict[str, str], version: str) -> Candidate:
    """Rebuild a :class:`Candidate` from the metric tags written at registration."""
    accuracy = tags.get("metric.accuracy")
    return Candidate(
        fd_real=float(tags["metric.fd_real"]),
        fp_fd_real=float(tags["metric.fp_fd_real"]),
        accuracy=float(accuracy) if accuracy not in (None, "", "None") else None,
        size_bytes=int(tags["metric.size_bytes"]),
        fp32_bytes=int(tags["metric.fp32_bytes"]),
        version=version,
    )


def apply_decision(
    client: MlflowClient, name: str, version: str, decision: Decision, objective: float, size: int
) -> str | None:
    """Record ``decision`` on ``version``, move ``challenger`` to it, and reconcile ``champion``.

    Idempotent: applying the same decision again changes nothing.

    Returns:
        The champion version after reconciliation (None when there is none).
    """
    tags = {
        TAG_PASSED: "true" if decision.passed else "false",
        TAG_REASONS: json.dumps(decision.reasons),
        TAG_OBJECTIVE: repr(float(objective)),
        TAG_SIZE: str(int(size)),
    }
    current = client.get_model_version(name, version).tags
    if TAG_DECIDED_AT not in current:
        tags[TAG_DECIDED_AT] = str(time.time_ns())
    for key, value in tags.items():
        if current.get(key) != value:
            client.set_model_version_tag(name, version, key, value)
    latest = max(int(v) for v in _version_tags(client, name))
    client.set_registered_model_alias(name, CHALLENGER, str(latest))
    return reconcile_champion(client, name)


def _best(contenders: dict[str, dict[str, str]]) -> str | None:
    def key(item: tuple[str, dict[str, str]]) -> tuple[float, int, int]:
        version, tags = item
        return float(tags.get(TAG_OBJECTIVE, "inf")), int(tags.get(TAG_SIZE, "0")), int(version)

    return min(contenders.items(), key=key)[0] if contenders else None


def reconcile_champion(client: MlflowClient, name: str) -> str | None:
    """Point ``champion`` at the best contender (see the module docstring); repeat until stable."""
    for _ in range(_RECONCILE_ROUNDS):
        versions = _version_tags(client, name)
        epoch = int(client.get_registered_model(name).tags.get(TAG_EPOCH, "0"))
        current = _alias_version(client, name, CHAMPION)
        contenders = {
            v: tags
            for v, tags in versions.items()
            if tags.get(TAG_PASSED) == "true"
            and TAG_ROLLED_BACK not in tags
            and int(tags.get(TAG_DECIDED_AT, "0")) >= epoch
        }
        if current is not None and current in versions:
            contenders[current] = versions[current]
        best = _best(contenders)
        if best is None or best == current:
            return current
        logger.info("champion of %s: v%s -> v%s", name, current, best)
        client.set_registered_model_alias(name, CHAMPION, best)
    return _alias_version(client, name, CHAMPION)


def promote(client: MlflowClient, name: str, version: str) -> str:
    """A person makes ``version`` champion (bypassing the gates); earlier decisions stop competing.

    Raises:
        PromotionError: If the model or version does not exist.
    """
    _require_version(client, name, version)
    client.set_model_version_tag(name, version, "promotion.manual", str(time.time_ns()))
    if TAG_ROLLED_BACK in client.get_model_version(name, version).tags:
        client.delete_model_version_tag(name, version, TAG_ROLLED_BACK)
    client.set_registered_model_tag(name, TAG_EPOCH, str(time.time_ns()))
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


def rollback(client: MlflowClient, name: str) -> str:
    """Demote the champion (tagged rolled back) and restore the best remaining passed version.

    Returns:
        The new champion version.

    Raises:
        PromotionError: If there is no champion, or no other version ever passed its gates.
    """
    _require_model(client, name)
    current = _alias_version(client, name, CHAMPION)
    if current is None:
        raise PromotionError(f"registered model {name!r} has no champion to roll back")
    versions = _version_tags(client, name)
    others = {
        v: tags
        for v, tags in versions.items()
        if v != current
        and TAG_ROLLED_BACK not in tags
        and (tags.get(TAG_PASSED) == "true" or "promotion.manual" in tags)
    }
    best = _best(others)
    if best is None:
        raise PromotionError(f"registered model {name!r}: no earlier version passed its gates; nothing to roll back to")
    client.set_model_version_tag(name, current, TAG_ROLLED_BACK, str(time.time_ns()))
    client.set_registered_model_tag(name, TAG_EPOCH, str(time.time_ns()))
    client.set_registered_model_alias(name, CHAMPION, best)
    return best


def _require_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    check_registered_model_name(name)
    with registry_errors(client.tracking_uri):
        try:
            client.get_registered_model(name)
        except MlflowException as error:
            if str(error.error_code) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise PromotionError(f"registered model {name!r} does not exist") from None


def _require_version(client: MlflowClient, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    _require_model(client, name)
    if not str(version).isdigit() or int(version) < 1:
        raise PromotionError(f"version {version!r} of {name!r} is not a version number; use e.g. 1, 2, 3")
    with registry_errors(client.tracking_uri):
        try:
            client.get_model_version(name, version)
        except MlflowException as error:
            if str(error.error_code) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            known = [int(v.version) for v in client.search_model_versions(f"name='{name}'")]
            newest = f"the newest is {max(known)}" if known else "it has none yet"
            raise PromotionError(f"registered model {name!r} has no version {version!r} ({newest})") from None
