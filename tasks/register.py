"""Stage: register the compressed model as a version and apply the promotion decision."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from diffquant.registry.models import register_version, registry_client
from diffquant.registry.promotion import Candidate, apply_decision, champion_candidate, decide_promotion
from diffquant.spec import GatesSpec
from diffquant.tasks.artifacts import Registration, TrackingRef


@task(name="register")
def register_task(
    tracking: TrackingRef, name: str, model_dir: str, tags: dict[str, str], candidate: Candidate, gates: GatesSpec
) -> Registration:
    """Register ``model_dir`` under ``name``, decide against the champion, move the aliases.

    Args:
        tracking: The compress run that produced the model.
        name: Registered model name.
        model_dir: Files of the version.
        tags: Version tags (hashes, versions, FP baseline run).
        candidate: The version's metrics and sizes (without version).
        gates: The promotion gates.
    """
    client = registry_client(tracking.uri)
    metric_tags = {
        "metric.fd_real": repr(float(candidate.fd_real)),
        "metric.fp_fd_real": repr(float(candidate.fp_fd_real)),
        "metric.accuracy": repr(candidate.accuracy),
        "metric.size_bytes": str(int(candidate.size_bytes)),
        "metric.fp32_bytes": str(int(candidate.fp32_bytes)),
    }
    version = register_version(client, tracking.run_id, name, Path(model_dir), {**tags, **metric_tags})
    champion = champion_candidate(client, name)
    this = Candidate(**{**candidate.__dict__, "version": version})
    decision = decide_promotion(this, champion, gates)
    after = apply_decision(client, name, version, decision, this.objective, this.size_bytes)
    return Registration(
        name=name,
        version=version,
        passed=decision.passed,
        reasons=decision.reasons,
        champion=after,
        previous_champion=champion.version if champion else None,
    )
