"""Bad input and faults around the registry commands (deploy, promote, rollback): one line, exit 2, nothing lost.

Every case asserts what the user sees (exactly one ``error:`` line on stderr, nothing else, exit 2,
no traceback) and what is left behind (the user's files byte-identical, no bundle or staging
folder written, the MLflow database untouched).
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffquant.flows.cli import app
from tests.pipeline.conftest import isolated_home, prefect_api  # noqa: F401  (fixtures: a Prefect API, a home)
from tests.pipeline.test_cli import assert_clean_failure
from tests.registry.test_promotion import register
from tests.servers import free_port

runner = CliRunner()
MODEL = "digits-unet"


def invoke(*args: str):
    return runner.invoke(app, list(args))


def refused(result, fragment: str, home: Path | None = None) -> str:
    """Exit 2 with exactly one ``error:`` line on stderr and nothing else (no bars, no blank lines).

    ``home`` is also checked by :func:`assert_clean_failure` (every MLflow run there FAILED); None
    where the test registered versions from runs of its own (left running on purpose, as
    ``tests/registry`` does) or where the database itself is the fault.
    """
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    if home is not None:
        assert_clean_failure(result, fragment, home)
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), and the folders as empty entries."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables created, once per module (creating them takes seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def client(isolated_home, empty_mlflow_db):  # noqa: F811
    import shutil

    from mlflow.tracking import MlflowClient

    isolated_home.mkdir(parents=True, exist_ok=True)
    shutil.copy2(empty_mlflow_db, isolated_home / "mlflow.db")
    return MlflowClient(tracking_uri=f"sqlite:///{isolated_home / 'mlflow.db'}")


@pytest.fixture
def registered(client, tmp_path) -> dict:
    """``digits-unet`` version 1, champion (registered the way the compress flow does, without a run)."""
    first = register(client, tmp_path, 1.2)
    assert first["champion"] == "1"
    return first


# --- deploy targets: never delete what diffquant did not write ---------------------------------


def test_deploy_to_an_existing_file_keeps_it(registered, isolated_home, tmp_path):  # noqa: F811
    target = tmp_path / "edge" / "notes.txt"
    target.parent.mkdir()
    target.write_bytes(b"my precious notes\n\x00\x01")
    before = snapshot(target.parent)
    refused(invoke("deploy", MODEL, "--target", str(target)), "exists and is not a folder")
    assert snapshot(target.parent) == before  # byte-identical, no staging folder left beside it


def test_deploy_to_a_foreign_folder_keeps_it(registered, isolated_home, tmp_path):  # noqa: F811
    target = tmp_path / "edge" / "photos"
    (target / "2025").mkdir(parents=True)
    (target / "2025" / "a.jpg").write_bytes(b"\xff\xd8 jpeg")
    (target / "manifest.json").write_text('{"files": {}}')  # a manifest, but not a diffquant bundle's
    before = snapshot(target.parent)
    refused(invoke("deploy", MODEL, "--target", str(target)), "not a diffquant bundle")
    assert snapshot(target.parent) == before


def test_deploy_replaces_an_earlier_bundle_and_fills_an_empty_folder(registered, client, tmp_path):
    from diffquant.manifest import verify_files

    target = tmp_path / "edge" / "digits"
    target.mkdir(parents=True)  # empty: nothing to lose, accepted
    result = invoke("deploy", MODEL, "--target", str(target))
    assert result.exit_code == 0, result.output
    assert verify_files(target)["bundle"]["version"] == "1"
    assert verify_files(target)["kind"] == "diffquant-bundle"
    better = register(client, tmp_path, 1.1)
    assert better["champion"] == "2"
    result = invoke("deploy", MODEL, "--target", str(target))
    assert result.exit_code == 0, result.output
    assert verify_files(target)["bundle"]["version"] == "2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["digits"]  # no staging or old copy left


def test_deploy_refuses_a_bundle_holding_a_file_it_does_not_list(registered, isolated_home, tmp_path):  # noqa: F811
    from diffquant.manifest import verify_files

    target = tmp_path / "edge" / "digits"
    assert invoke("deploy", MODEL, "--target", str(target)).exit_code == 0
    (target / "my-notes.txt").write_text("added by hand")
    before = snapshot(target.parent)
    refused(invoke("deploy", MODEL, "--target", str(target)), "my-notes.txt, which its manifest does not list")
    assert snapshot(target.parent) == before
    (target / "my-notes.txt").unlink()
    assert verify_files(target)["bundle"]["version"] == "1"


def test_deploy_to_a_symbolic_link_keeps_it_and_what_it_points_to(registered, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("keep")
    link = tmp_path / "edge"
    link.symlink_to(elsewhere)
    before = snapshot(tmp_path)
    refused(invoke("deploy", MODEL, "--target", str(link)), "is a symbolic link")
    assert snapshot(tmp_path) == before and link.is_symlink()


def test_deploy_with_an_empty_target(registered, isolated_home, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    refused(invoke("deploy", MODEL, "--target", ""), "the deploy target is empty")
    assert snapshot(tmp_path) == before


def test_deploy_under_a_parent_that_is_a_file(registered, isolated_home, tmp_path):  # noqa: F811
    blocker = tmp_path / "edge"
    blocker.write_text("a file where a folder should be")
    refused(
        invoke("deploy", MODEL, "--target", str(blocker / "sub" / "digits")),
        f"cannot be created: {blocker} is not a folder",
    )
    assert blocker.read_text() == "a file where a folder should be"


def test_deploy_succeeds_without_download_bars(registered, tmp_path):
    result = invoke("deploy", MODEL, "--target", str(tmp_path / "edge" / "digits"))
    assert result.exit_code == 0, result.output
    assert "Downloading artifacts" not in result.output and "%|" not in result.output
    assert [line for line in result.stderr.splitlines() if not line.strip()] == []  # no blank lines


# --- tampered or missing artifacts in the registry --------------------------------------------


def _source(client) -> Path:
    return Path(client.get_model_version(MODEL, "1").source.removeprefix("file://"))


def test_deploy_of_a_tampered_artifact(registered, client, isolated_home, tmp_path):  # noqa: F811
    (_source(client) / "plan.json").write_text('{"evil": true}')
    target = tmp_path / "edge" / "digits"
    refused(invoke("deploy", MODEL, "--target", str(target)), "plan.json does not match its sha256")
    assert not target.exists() and not (tmp_path / "edge").exists()


def test_deploy_of_a_tampered_manifest(registered, client, isolated_home, tmp_path):  # noqa: F811
    manifest = _source(client) / "manifest.json"
    manifest.write_text(manifest.read_text().replace("plan.json", "plan.json "))
    target = tmp_path / "edge" / "digits"
    refused(invoke("deploy", MODEL, "--target", str(target)), "does not match the registered manifest")
    assert not target.exists()


def test_deploy_when_the_artifacts_are_gone(registered, client, isolated_home, tmp_path):  # noqa: F811
    import shutil

    shutil.rmtree(_source(client))
    target = tmp_path / "edge" / "digits"
    refused(invoke("deploy", MODEL, "--target", str(target)), "cannot fetch version 1 of 'digits-unet'")
    assert not target.exists()


# --- device classes: a version built for another class is refused before any download -----------


def test_deploy_refuses_a_version_built_for_another_class(client, isolated_home, tmp_path, monkeypatch):  # noqa: F811
    import diffquant.flows.deploy as deploy
    from diffquant.manifest import verify_files

    register(client, tmp_path, 1.2, tags={"device_class": "ada"})
    target = tmp_path / "edge" / "digits"
    real_download = deploy.download_version
    monkeypatch.setattr(deploy, "download_version", lambda *a: pytest.fail("downloaded before the class check"))
    line = refused(
        invoke("deploy", MODEL, "--target", str(target), "--device-class", "orin"), "built for device class ada"
    )
    assert "this machine is orin" in line and "export.device_class=orin" in line
    monkeypatch.setenv("DIFFQUANT_DEVICE_CLASS", "hopper")  # a worker's own class, from its environment
    refused(invoke("deploy", MODEL, "--target", str(target)), "built for device class ada, but this machine is hopper")
    assert not target.exists() and not (tmp_path / "edge").exists()
    monkeypatch.setattr(deploy, "download_version", real_download)
    monkeypatch.setenv("DIFFQUANT_DEVICE_CLASS", "ada")
    result = invoke("deploy", MODEL, "--target", str(target))
    assert result.exit_code == 0, result.output
    assert "(ada)" in result.stdout + result.stderr
    assert verify_files(target)["bundle"]["device_class"] == "ada"
    monkeypatch.delenv("DIFFQUANT_DEVICE_CLASS")  # the machine does not say: deployed, its class recorded
    assert invoke("deploy", MODEL, "--target", str(target)).exit_code == 0


def test_deploy_judges_an_untagged_version_by_its_spec(registered, client, isolated_home, tmp_path):  # noqa: F811
    """A version registered before device classes (no tag, no spec.yaml) is an Orin one (the TensorRT default)."""
    target = tmp_path / "edge" / "digits"
    refused(invoke("deploy", MODEL, "--target", str(target), "--device-class", "cpu"), "built for device class orin")
    assert not target.exists()
    result = invoke("deploy", MODEL, "--target", str(target), "--device-class", "orin")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--device-class", "tpu"], None, "--device-class: unknown device class 'tpu'; choose one of orin, ampere"),
        ([], "h100", "DIFFQUANT_DEVICE_CLASS: unknown device class 'h100'"),
    ],
    ids=["option", "environment"],
)
def test_deploy_with_an_unknown_device_class(registered, tmp_path, monkeypatch, args, env, fragment):
    if env is not None:
        monkeypatch.setenv("DIFFQUANT_DEVICE_CLASS", env)
    target = tmp_path / "edge" / "digits"
    refused(invoke("deploy", MODEL, "--target", str(target), *args), fragment)
    assert not target.exists()


# --- unknown model, version, alias; nothing to roll back ---------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["promote", "nope", "1"], "registered model 'nope' does not exist"),
        (["promote", MODEL, "7"], "has no version '7' (the newest is 1)"),
        (["promote", MODEL, "abc"], "version 'abc' of 'digits-unet' is not a version number"),
        (["promote", "bad name!", "1"], "registered model name 'bad name!' is invalid"),
        (["rollback", "nope"], "registered model 'nope' does not exist"),
        (["deploy", "nope", "--target", "T"], "cannot find 'nope' @ champion: registered model 'nope' does not exist"),
        (
            ["deploy", MODEL, "--alias", "prod", "--target", "T"],
            "has no alias 'prod' (its aliases: challenger, champion)",
        ),
        (["deploy", MODEL, "--run-id", "deadbeef", "--target", "T"], "has no version from run deadbeef"),
    ],
    ids=[
        "promote-model",
        "promote-version",
        "promote-not-a-number",
        "promote-bad-name",
        "rollback-model",
        "deploy-model",
        "deploy-alias",
        "deploy-run",
    ],
)
def test_unknown_names(registered, client, isolated_home, tmp_path, args, fragment):  # noqa: F811
    args = [str(tmp_path / "edge") if a == "T" else a for a in args]
    before = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
    refused(invoke(*args), fragment)
    assert {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()} == before
    assert not (tmp_path / "edge").exists()


def test_rollback_without_a_champion(client, isolated_home, tmp_path):  # noqa: F811
    failing = register(client, tmp_path, 2.0)  # over the FD gate: registered, never champion
    assert failing["champion"] is None
    refused(invoke("rollback", MODEL), "has no champion to roll back")


# --- a corrupt MLflow database -----------------------------------------------------------------


def _random_bytes(db: Path) -> None:
    db.write_bytes(os.urandom(8192))


def _truncated(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def _header_only(db: Path) -> None:
    db.write_bytes(db.read_bytes()[:40])


@pytest.mark.parametrize("corrupt", [_random_bytes, _truncated, _header_only], ids=["random", "truncated", "header"])
@pytest.mark.parametrize(
    "args",
    [["promote", MODEL, "1"], ["rollback", MODEL], ["deploy", MODEL, "--target", "T"], ["compress"]],
    ids=lambda a: a[0],
)
def test_corrupt_mlflow_db(registered, isolated_home, tmp_path, corrupt, args):  # noqa: F811
    db = isolated_home / "mlflow.db"
    corrupt(db)
    before = db.read_bytes()
    line = refused(invoke(*[str(tmp_path / "edge") if a == "T" else a for a in args]), "cannot be used", None)
    assert "not an SQLite database" in line or "truncated" in line, line
    assert str(db) in line
    assert db.read_bytes() == before  # diffquant reads it, never "repairs" it
    assert not (tmp_path / "edge").exists()


def test_mlflow_db_that_is_a_folder(isolated_home):  # noqa: F811
    (isolated_home / "mlflow.db").mkdir(parents=True)
    refused(invoke("promote", MODEL, "1"), "it is a folder, not a database file", None)


# --- malformed or unreachable tracking / Prefect URLs ------------------------------------------


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("http://127.0.0.1:99999", "port 99999 is out of range 1-65535"),
        ("http://127.0.0.1:http", "port 'http' is not a number"),
        ("http://bad host", "it contains a space"),
        ("ftp://x", "scheme 'ftp' is not supported"),
        ("http://:5000", "it has no host name"),
    ],
)
@pytest.mark.parametrize(
    "args", [["promote", MODEL, "1"], ["rollback", MODEL], ["deploy", MODEL, "--target", "T"]], ids=lambda a: a[0]
)
def test_malformed_tracking_uri(isolated_home, tmp_path, monkeypatch, uri, fragment, args):  # noqa: F811
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = refused(invoke(*[str(tmp_path / "edge") if a == "T" else a for a in args]), fragment, isolated_home)
    assert f"MLflow tracking URI {uri!r} is malformed" in line
    assert not (tmp_path / "edge").exists()


def test_unreachable_tracking_server(isolated_home, monkeypatch):  # noqa: F811
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = refused(invoke("promote", MODEL, "1"), f"MLflow tracking server {uri} is unreachable", isolated_home)
    assert "connection refused" in line and "HTTP" not in line


@pytest.fixture
def not_mlflow() -> Iterator[str]:
    """A web server on 127.0.0.1 that answers 404 to everything (something that is not MLflow)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_tracking_uri_of_a_server_that_is_not_mlflow(isolated_home, monkeypatch, not_mlflow):  # noqa: F811
    monkeypatch.setenv("MLFLOW_TRACKING_URI", not_mlflow)
    refused(
        invoke("rollback", MODEL), f"{not_mlflow} answers HTTP 404 on /health, so it is not a working", isolated_home
    )


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("not-a-url", "it has no scheme"),
        ("http://127.0.0.1:70000/api", "port 70000 is out of range"),
        ("ftp://127.0.0.1/api", "scheme 'ftp' is not supported"),
    ],
)
def test_deploy_with_a_malformed_prefect_api_url(registered, isolated_home, tmp_path, url, fragment):  # noqa: F811
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        line = refused(invoke("deploy", MODEL, "--target", str(tmp_path / "edge")), fragment)
    assert f"Prefect API URL {url!r} is malformed" in line
    assert not (tmp_path / "edge").exists()


def test_deploy_with_a_prefect_api_that_does_not_answer(registered, isolated_home, tmp_path):  # noqa: F811
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        refused(invoke("deploy", MODEL, "--target", str(tmp_path / "edge")), f"Prefect API {url} does not answer")
    assert not (tmp_path / "edge").exists()


def test_write_bundle_refuses_what_it_did_not_write(tmp_path):
    """The library call (not only the CLI) refuses a file or a foreign folder and leaves both as they were."""
    from diffquant.errors import ExportError
    from diffquant.export.bundle import write_bundle
    from diffquant.manifest import write_manifest

    version = tmp_path / "v"
    version.mkdir()
    (version / "plan.json").write_text("{}")
    write_manifest(version)
    file = tmp_path / "t" / "file.bin"
    file.parent.mkdir()
    file.write_bytes(b"\x00keep")
    folder = tmp_path / "t" / "folder"
    folder.mkdir()
    (folder / "x").write_text("keep")
    before = snapshot(tmp_path / "t")
    for target, fragment in ((file, "is not a folder"), (folder, "not a diffquant bundle")):
        with pytest.raises(ExportError, match=fragment):
            write_bundle(version, target, {"version": "1"})
    assert snapshot(tmp_path / "t") == before
