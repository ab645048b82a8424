"""A compress run killed during sensitivity resumes from the persisted stages and registers once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.pipeline.conftest import SMALL

ROOT = Path(__file__).resolve().parents[2]
MIXED = [
    *SMALL,
    "allocation={weight_bits: [4, 8], group_sizes: [], budget: {avg_weight_bits: 6.0}, sensitivity_inputs: 16, "
    "content_samples: 10}",
    "runtime.layers_per_task=4",
]


def compress(home: Path, out: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "diffquant.flows.cli", "compress", "--out", str(out)]
    for item in MIXED:
        args += ["--set", item]
    env = {**os.environ, "DIFFQUANT_HOME": str(home)}
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def test_killed_run_resumes_and_registers_one_version(tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    first = compress(home, tmp_path / "a")
    deadline = time.monotonic() + 300
    done: list[Path] = []
    while time.monotonic() < deadline and first.poll() is None:
        done = list((home / "cache" / "sensitivity").glob("*/layers/*.csv"))
        if len(done) >= 4:  # a task writes its table before Prefect persists its result: the last may be unsaved
            break
        time.sleep(0.2)
    assert first.poll() is None, first.stdout.read()[-3000:]
    assert len(done) >= 4, "sensitivity never started"
    os.killpg(first.pid, signal.SIGKILL)  # the whole process group, ephemeral Prefect server included
    first.wait(timeout=30)
    assert not (tmp_path / "a" / "summary.json").exists()

    second = compress(home, tmp_path / "b")
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["calibration"]["pool_cache_hit"] is True
    alloc = summary["allocation"]
    assert 3 <= alloc["sensitivity_tasks_cached"] < alloc["sensitivity_tasks"]
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions("name='digits-unet'")
    assert len(versions) == 1 and versions[0].run_id == summary["run_id"]
