"""Stage: register the compressed model as a version and apply the promotion decision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffquant.registry.models import register_version, registry_client
from diffquant.registry.promotion import Candidate, apply_decision, champion_candidate, decide_promotion
from diffquant.spec import GatesSpec
from prefect import task


@task(name="register")
def register_task(
    tracking_uri: str,
    run_id: str,
    name: str,
    model_dir: str,
    tags: dict[str, str],
    candidate: dict[str, Any],
    gates: dict[str, Any],
) -> dict[str, Any]:
    """Register ``model_dir`` under ``name``, decide against the champion, move the aliases.

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: The compress run that produced the model.
        name: Registered model name.
        model_dir: Files of the version.
        tags: Version tags (hashes, versions, FP baseline run).
        candidate: :class:`registry.promotion.Candidate` fields (without version).
        gates: :class:`diffquant.spec.GatesSpec` fields.

    Returns:
        ``name``, ``version``, ``passed``, ``reasons``, ``champion`` (after reconciliation) and
        ``previous_champion``.
    """
    client = registry_client(tracking_uri)
    metric_tags = {
        "metric.fd_real": repr(float(candidate["fd_real"])),
        "metric.fp_fd_real": repr(float(candidate["fp_fd_real"])),
        "metric.accuracy": repr(candidate["accuracy"]),
        "metric.size_bytes": str(int(candidate["size_bytes"])),
        "metric.fp32_bytes": str(int(candidate["fp32_bytes"])),
    }
    version = register_version(client, run_id, name, Path(model_dir), {**tags, **metric_tags})
    champion = champion_candidate(client, name)
    this = Candidate(**candidate, version=version)
    decision = decide_promotion(this, champion, GatesSpec(**gates))
    after = apply_decision(client, name, version, decision, this.objective, this.size_bytes)
    return {
        "name": name,
        "version": version,
        "passed": decision.passed,
        "reasons": decision.reasons,
        "champion": after,
        "previous_champion": champion.version if champion else None,
    }
