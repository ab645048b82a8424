"""Promotion: the pure decision (table-driven) and its application to MLflow on SQLite."""

from __future__ import annotations

import pytest

from diffquant.registry.promotion import Candidate, decide_promotion
from diffquant.spec import GatesSpec


def cand(fd=1.2, fp=1.0, acc=0.98, size=100, fp32=400, version=None):
    return Candidate(fd_real=fd, fp_fd_real=fp, accuracy=acc, size_bytes=size, fp32_bytes=fp32, version=version)


CASES = [
    # (name, candidate, champion, gates, passed, failing fragment)
    ("first version within gates", cand(), None, GatesSpec(), True, None),
    ("FD ratio over the gate", cand(fd=1.6), None, GatesSpec(max_fd_ratio=1.5), False, "FD to real is 1.600x"),
    ("FD ratio exactly at the gate", cand(fd=1.5), None, GatesSpec(max_fd_ratio=1.5), True, None),
    ("gate disabled", cand(fd=9.0), None, GatesSpec(max_fd_ratio=None), True, None),
    ("accuracy under the gate", cand(acc=0.9), None, GatesSpec(min_accuracy=0.95), False, "accuracy 0.9000"),
    ("accuracy not measured", cand(acc=None), None, GatesSpec(min_accuracy=0.5), False, "not measured"),
    ("size over the gate", cand(size=300), None, GatesSpec(max_size_ratio=0.5), False, "size is 0.750x"),
    (
        "FD not measured",
        cand(fd=float("inf"), fp=float("inf")),
        None,
        GatesSpec(),
        False,
        "FD to real was not measured",
    ),
    ("beats champion, same size", cand(fd=1.1), cand(fd=1.2, version="1"), GatesSpec(), True, None),
    ("beats champion, smaller", cand(fd=1.1, size=90), cand(fd=1.2, version="1"), GatesSpec(), True, None),
    (
        "better but larger",
        cand(fd=1.1, size=120),
        cand(fd=1.2, version="1"),
        GatesSpec(),
        False,
        "must be equal or smaller",
    ),
    ("ties champion", cand(fd=1.2), cand(fd=1.2, version="1"), GatesSpec(), False, "must be lower"),
    ("worse than champion", cand(fd=1.3), cand(fd=1.2, version="1"), GatesSpec(), False, "champion v1"),
]


@pytest.mark.parametrize(
    ("name", "candidate", "champion", "gates", "passed", "fragment"), CASES, ids=[c[0] for c in CASES]
)
def test_decide_promotion(name, candidate, champion, gates, passed, fragment):
    decision = decide_promotion(candidate, champion, gates)
    assert decision.passed is passed, decision.reasons
    failures = [r for r in decision.reasons if r.startswith("fail:")]
    assert bool(failures) is (not passed)
    if fragment:
        assert any(fragment in r for r in failures), decision.reasons
    assert decision.to_dict()["reasons"] == decision.reasons


@pytest.fixture
def client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def register(client, tmp_path, fd, size=100, tags=None):
    """Register a version the way the compress flow does, with the given FD to real (and extra version tags)."""
    from diffquant.tasks.artifacts import TrackingRef
    from diffquant.tasks.register import register_task

    experiment = client.get_experiment_by_name("t") or client.get_experiment(
        client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    )
    run = client.create_run(experiment.experiment_id)
    model = tmp_path / f"model-{run.info.run_id}"
    model.mkdir()
    (model / "plan.json").write_text("{}")
    result = register_task.fn(
        TrackingRef(uri=client.tracking_uri, run_id=run.info.run_id),
        "digits-unet",
        str(model),
        {"spec_hash": "x", **(tags or {})},
        Candidate(fd_real=fd, fp_fd_real=1.0, accuracy=0.98, size_bytes=size, fp32_bytes=400),
        GatesSpec(max_fd_ratio=1.5),
    )
    return result.model_dump()


def aliases(client):
    return {k: str(v) for k, v in client.get_registered_model("digits-unet").aliases.items()}


def test_apply_decisions_promote_rollback(client, tmp_path):
    from diffquant.registry.promotion import PromotionError, apply_decision, decide_promotion, promote, rollback

    first = register(client, tmp_path, 1.2)
    assert first["passed"] and first["champion"] == "1"
    worse = register(client, tmp_path, 1.3)
    assert not worse["passed"] and worse["champion"] == "1"
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    failing = register(client, tmp_path, 2.0)
    assert not failing["passed"] and any("FD to real is 2.000x" in r for r in failing["reasons"])
    better = register(client, tmp_path, 1.1)
    assert better["passed"] and better["champion"] == "4" and better["previous_champion"] == "1"
    tags = client.get_model_version("digits-unet", "4").tags
    assert tags["promotion.passed"] == "true" and tags["spec_hash"] == "x" and tags["metric.fd_real"] == "1.1"
    # idempotent: applying the same decision again changes nothing
    before = (aliases(client), client.get_model_version("digits-unet", "4").tags)
    decision = decide_promotion(cand(fd=1.1), cand(fd=1.2, version="1"), GatesSpec())
    apply_decision(client, "digits-unet", "4", decision, 1.1, 100)
    assert (aliases(client), client.get_model_version("digits-unet", "4").tags) == before
    # rollback restores the best remaining version that passed; it cannot go below nothing
    assert rollback(client, "digits-unet") == "1"
    assert "promotion.rolled_back" in client.get_model_version("digits-unet", "4").tags
    with pytest.raises(PromotionError, match="nothing to roll back"):
        rollback(client, "digits-unet")
    # a person promotes a version that failed its gates; later automatic runs must beat it
    promote(client, "digits-unet", "2")
    assert aliases(client)["champion"] == "2"
    assert register(client, tmp_path, 1.35)["champion"] == "2"
    assert register(client, tmp_path, 1.25)["champion"] == "6"
    with pytest.raises(PromotionError, match="no version '99'"):
        promote(client, "digits-unet", "99")
    with pytest.raises(PromotionError, match="does not exist"):
        rollback(client, "other-model")
