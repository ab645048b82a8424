"""The unattended loop against real servers: Prefect server + process worker, MLflow tracking server.

With MLflow on SQLite: deploy every deployment of prefect.yaml with ``prefect deploy --all``,
trigger ``compress/compress-nightly`` with a fast spec, let a process worker run it, and check
through the MLflow client that a version was registered and the ``champion`` alias moved to it;
headless Chromium also renders the MLflow run page (screenshot) and the registered-model page
(which must list the version and its aliases). With MLflow on PostgreSQL: ``diffquant compress``
against that tracking server (the deployment path is the SQLite test's; this one is about the
database) registers and promotes the same way.
Everything listens on 127.0.0.1 with free ports and is stopped at the end.

Triggered compression: ``diffquant watch --once`` emits ``diffquant.checkpoint.landed`` for a new
checkpoint folder, the ``compress-on-checkpoint`` trigger starts a flow run that registers a
version; the same event again (``prefect event emit``, the README's one-liner) starts a run that
registers nothing and says why; an event without a path fails its run with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import SMALL
from tests.servers import (
    mlflow_server,
    postgres_server,
    prefect_server,
    require_chromium,
    require_postgres,
    start,
    stop,
)

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 420
PREFECT = [sys.executable, "-m", "prefect"]
"""Prefect's CLI on this interpreter (not the console script, whose shebang may name another venv):
the worker's flow runs then import the diffquant under test."""
DEPLOY_CLASSES = ("ampere", "ada", "hopper", "blackwell", "cpu")  # orin's is deploy-edge


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect")) as url:
        yield url


def client_env(tmp_path: Path, prefect_api: str, mlflow_url: str, **extra: str) -> dict[str, str]:
    """The environment of the Prefect CLI, the worker and diffquant's commands in these tests."""
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "MLFLOW_TRACKING_URI": mlflow_url,
        "DIFFQUANT_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def run_ok(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a command in the repository; fail the test with its output unless it exits 0."""
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def prefect_cli(args: list[str], env: dict[str, str]) -> str:
    return run_ok([*PREFECT, *args], env).stdout


def wait_for_flow_run(api_url: str, flow_run_id, timeout: float):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout} s")


def chromium(args: list[str], profile: Path, program: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
        "--virtual-time-budget=20000",
    ]
    return subprocess.run(
        [program, *flags, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_registered_and_promoted(mlflow_url: str):
    """Version 1 of digits-unet is champion and challenger; its run FINISHED with the artifacts logged. Returns the run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    versions = client.search_model_versions("name='digits-unet'")
    assert [v.version for v in versions] in (["1"], [1])
    model = client.get_registered_model("digits-unet")
    assert str(model.aliases["champion"]) == "1" and str(model.aliases["challenger"]) == "1"
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "plan", "report.md", "model", "summary.json"} <= logged
    return run


def test_compress_registers_and_promotes_on_mlflow_over_postgresql(request, tmp_path):
    require_postgres()  # a machine without it skips (with the reason) before any server starts
    prefect_api = request.getfixturevalue("prefect_api")
    with ExitStack() as stack:
        backend_uri = stack.enter_context(postgres_server(tmp_path / "pg"))
        mlflow_url = stack.enter_context(mlflow_server(tmp_path / "mlflow", backend_uri))
        env = client_env(tmp_path, prefect_api, mlflow_url, PREFECT_LOGGING_LEVEL="WARNING")
        args = [sys.executable, "-m", "diffquant.flows.cli", "compress", "--out", str(tmp_path / "out")]
        run_ok([*args, *(a for item in SMALL for a in ("--set", item))], env, timeout=RUN_TIMEOUT_S)
        _assert_registered_and_promoted(mlflow_url)


def test_deployed_compress_registers_and_promotes(request, tmp_path):
    # system packages first: a machine without them skips (with the reason) before any server starts
    browser = require_chromium()
    prefect_api = request.getfixturevalue("prefect_api")
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from diffquant.spec import load_spec

    with ExitStack() as stack:
        mlflow_url = stack.enter_context(mlflow_server(tmp_path / "mlflow"))
        env = client_env(tmp_path, prefect_api, mlflow_url, PREFECT_LOGGING_LEVEL="WARNING")
        deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        for pool in sorted({d["work_pool"]["name"] for d in deployments}):  # one per device class, and the CPU's
            prefect_cli(["work-pool", "create", pool, "--type", "process", "--overwrite"], env)
        out = prefect_cli(["--no-prompt", "deploy", "--all"], env)
        for name in ("compress-nightly", "sweep-weekly", "deploy-edge", *(f"deploy-{c}" for c in DEPLOY_CLASSES)):
            assert name in out
        spec = load_spec(overrides=SMALL).to_dict()
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            flow_run = run_deployment("compress/compress-nightly", parameters={"spec": spec}, timeout=0)
        worker = start(
            [*PREFECT, "worker", "start", "--pool", "diffquant-cpu", "--type", "process"],
            tmp_path / "worker.log",
            {k: v for k, v in env.items() if k != "PREFECT_LOGGING_LEVEL"},
        )
        try:
            finished = wait_for_flow_run(prefect_api, flow_run.id, RUN_TIMEOUT_S)
        finally:
            stop(worker)
        log = (tmp_path / "worker.log").read_text()[-4000:]
        assert finished.state.is_completed(), f"{finished.state}\n{log}"

        run = _assert_registered_and_promoted(mlflow_url)
        if browser is not None:
            shot = tmp_path / "run-page.png"
            page = f"{mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            result = chromium([f"--screenshot={shot}", page], tmp_path / "chrome-1", browser)
            assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
            if os.environ.get("DIFFQUANT_SCREENSHOT_DIR"):
                shutil.copy(shot, Path(os.environ["DIFFQUANT_SCREENSHOT_DIR"]) / "mlflow-run-page.png")
            dom = chromium(["--dump-dom", f"{mlflow_url}/#/models/digits-unet"], tmp_path / "chrome-2", browser).stdout
            assert "Version 1" in dom and "champion" in dom, dom[-3000:]


CHECKPOINT_RUN_TIMEOUT_S = 300


def flow_runs_of(api_url: str, deployment_id) -> list:
    """The deployment's flow runs, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return sorted(runs, key=lambda run: run.created)


def wait_for_nth_run(api_url: str, deployment_id, n: int, timeout: float):
    """Wait until the deployment has ``n`` flow runs and the n-th is final; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = flow_runs_of(api_url, deployment_id)
        if len(runs) >= n:
            return wait_for_flow_run(api_url, runs[n - 1].id, max(1.0, deadline - time.monotonic()))
        time.sleep(1)
    raise AssertionError(
        f"the trigger started {len(flow_runs_of(api_url, deployment_id))} runs, not {n}, in {timeout} s"
    )


def test_checkpoint_event_compresses_each_checkpoint_once(request, tmp_path):
    prefect_api = request.getfixturevalue("prefect_api")
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from diffquant.models.loading import load_model
    from diffquant.models.reference import reference_dir
    from diffquant.registry.models import WEIGHTS_TAG
    from diffquant.spec import load_spec

    with mlflow_server(tmp_path / "mlflow") as mlflow_url:
        env = client_env(tmp_path, prefect_api, mlflow_url, PREFECT_WORKER_QUERY_SECONDS="2")

        def cli(args: list[str]) -> subprocess.CompletedProcess:
            return run_ok(args, env)

        cli([*PREFECT, "work-pool", "create", "diffquant-cpu", "--type", "process", "--overwrite"])
        deployed = cli([*PREFECT, "--no-prompt", "deploy", "--name", "compress-on-checkpoint"]).stdout
        assert "compress-on-checkpoint" in deployed
        # prefect.yaml's spec is the nightly one (2,000 samples); the test runs the fast one, without
        # the ONNX export (the nightly test above covers it)
        spec = load_spec(overrides=[*SMALL, "export.onnx=false"]).to_dict()
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("compress-checkpoint/compress-on-checkpoint")
            client.update_deployment(deployment.id, DeploymentUpdate(parameters={"spec": spec, "out_dir": None}))
            assert len(client.read_automations_by_name(f"{deployment.name}__automation_1")) == 1

        ckpts = tmp_path / "ckpts"
        ckpt = shutil.copytree(reference_dir("digits-unet"), ckpts / "step-1000")
        (ckpts / "step-2000").mkdir()  # a folder still being written: no config.json yet
        (ckpts / "step-2000" / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
        sha = load_model("digits-unet").weights_sha256
        worker = start(
            [*PREFECT, "worker", "start", "--pool", "diffquant-cpu", "--type", "process"], tmp_path / "worker.log", env
        )
        try:
            watched = cli(
                [sys.executable, "-m", "diffquant.flows.cli", "watch", str(ckpts), "--once", "--interval", "0.5"]
            )
            assert f"for {ckpt}" in watched.stderr and "step-2000" not in watched.stderr, watched.stderr
            # the same checkpoint again at once, the way a training job would announce it: the
            # deployment runs one flow run at a time, so the later run waits for the first and skips
            resource = {
                "prefect.resource.id": f"diffquant.checkpoint.{sha[:16]}",
                "diffquant.checkpoint.path": str(ckpt),
            }
            cli([*PREFECT, "event", "emit", "diffquant.checkpoint.landed", "--resource", json.dumps(resource)])
            runs = [wait_for_nth_run(prefect_api, deployment.id, n, CHECKPOINT_RUN_TIMEOUT_S) for n in (1, 2)]
            log = (tmp_path / "worker.log").read_text()[-4000:]
            states = [run.state for run in runs]
            assert all(s.is_completed() for s in states), f"{states}\n{log}"
            assert all(run.parameters["checkpoint"] == str(ckpt) for run in runs)
            (skipped,) = [s for s in states if s.name == "Skipped"]
            assert "already registered as version 1 of step-1000" in skipped.message

            # an event without a path: the run fails with one line naming the label
            cli([*PREFECT, "event", "emit", "diffquant.checkpoint.landed", "--resource-id", "diffquant.checkpoint.x"])
            third = wait_for_nth_run(prefect_api, deployment.id, 3, CHECKPOINT_RUN_TIMEOUT_S)
            assert third.state.is_failed(), third.state
            assert "has no checkpoint path" in third.state.message and "\n" not in third.state.message
        finally:
            stop(worker)

        versions = MlflowClient(tracking_uri=mlflow_url).search_model_versions("name='step-1000'")
        assert [str(v.version) for v in versions] == ["1"]
        assert versions[0].tags[WEIGHTS_TAG] == sha


def test_servers_are_gone_after_the_test(tmp_path):
    """The helpers leave nothing listening: a stopped server's port refuses connections."""
    import socket

    with mlflow_server(tmp_path / "m") as url:
        port = int(url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
