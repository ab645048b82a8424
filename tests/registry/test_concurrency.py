"""Two runs that finish together against one MLflow tracking server leave exactly one champion."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.servers import mlflow_server

SCRIPT = """
import sys, time, json, pathlib
from mlflow.tracking import MlflowClient
from diffquant.registry.promotion import Candidate
from diffquant.spec import GatesSpec
from diffquant.tasks.artifacts import TrackingRef
from diffquant.tasks.register import register_task

uri, fd, start_at, folder = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), pathlib.Path(sys.argv[4])
client = MlflowClient(tracking_uri=uri)
exp = client.get_experiment_by_name("race")
run = client.create_run(exp.experiment_id)
model = folder / run.info.run_id
model.mkdir(parents=True)
(model / "plan.json").write_text("{}")
while time.time() < start_at:
    time.sleep(0.001)
result = register_task.fn(TrackingRef(uri=uri, run_id=run.info.run_id), "digits-unet", str(model),
    {"spec_hash": str(fd)}, Candidate(fd_real=fd, fp_fd_real=1.0, accuracy=0.98, size_bytes=100, fp32_bytes=400),
    GatesSpec(max_fd_ratio=1.5))
print(json.dumps(result.model_dump()))
"""


def test_two_runs_finishing_together_leave_one_champion(tmp_path):
    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[2]
    with mlflow_server(tmp_path / "server") as uri:
        client = MlflowClient(tracking_uri=uri)
        client.create_experiment("race")
        script = tmp_path / "race.py"
        script.write_text(SCRIPT)

        def race(fds: list[float]) -> list[dict]:
            start_at = time.time() + 8  # both processes import mlflow first, then start together
            procs = [
                subprocess.Popen(
                    [sys.executable, str(script), uri, str(fd), str(start_at), str(tmp_path / "models")],
                    cwd=root,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for fd in fds
            ]
            outs = [p.communicate(timeout=120) for p in procs]
            assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
            return [json.loads(o[0].strip().splitlines()[-1]) for o in outs]

        first = race([1.2])
        assert first[0]["champion"] == first[0]["version"]
        for fds in ([1.15, 1.10], [1.05, 1.08]):
            results = race(fds)
            best = min(
                results,
                key=lambda r: float(client.get_model_version("digits-unet", r["version"]).tags["metric.fd_real"]),
            )
            # the better run passes whatever the order; the other passes only if it saw the old champion
            # (a slow start on a loaded machine lets it compare against the better one and fail)
            assert best["passed"], results
            model = client.get_registered_model("digits-unet")
            assert str(model.aliases["champion"]) == best["version"]
            for r in results:
                tags = client.get_model_version("digits-unet", r["version"]).tags
                assert {"promotion.passed", "promotion.reasons", "promotion.decided_at", "spec_hash"} <= tags.keys()
        versions = client.search_model_versions("name='digits-unet'")
        assert len(versions) == 5
