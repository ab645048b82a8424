"""A new machine: the README's test command installs what the tests need, or they skip saying why.

``bash .ci/test`` (the README's second command, also what ``.ci/run`` ends with) installs Debian's
chromium and postgresql with apt-get when they are missing, then runs pytest with ``-rs``. Where a
package cannot be installed, the tests that need it skip with the reason in pytest's summary
instead of failing because the machine is new.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests import servers

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
INTEGRATION_SQLITE = "tests/integration/test_scheduled_compress.py::test_deployed_compress_registers_and_promotes"


def bare_path(tmp_path: Path, **programs: str) -> str:
    """A PATH with the venv's programs and ``programs`` (name -> bash body) only: no chromium, no apt."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in programs.items():
        script = fake / name
        script.write_text(f"#!/bin/bash\n{body}\n")
        script.chmod(0o755)
    return f"{fake}{os.pathsep}{Path(sys.executable).parent}"


def ci_test(args: list[str], path: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``bash .ci/test ARGS`` from another folder with ``PATH=path``."""
    assert VENV_PYTHON.exists(), f"{VENV_PYTHON} is missing: the README's first command creates it"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DIFFQUANT_SYSTEM"))}
    return subprocess.run(
        ["/bin/bash", str(ROOT / ".ci" / "test"), *args],
        cwd="/",
        env={**clean, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def readme_commands() -> list[str]:
    """The shell commands of the README's "Two commands" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_integration_test_skips_with_its_reason_without_chromium(tmp_path):
    """The sqlite integration test on a machine without chromium: skipped, reason printed, no servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env |= {"PATH": bare_path(tmp_path), "DIFFQUANT_SYSTEM_PACKAGES_FAILURE": "apt-get update failed"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "--setup-show", INTEGRATION_SQLITE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert re.match(r"1 skipped in [\d.]+s$", out.strip().splitlines()[-1]), out[-3000:]
    summary = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(summary) == 1, out[-3000:]
    assert (
        "chromium is not installed (Debian package chromium); could not be installed (apt-get update failed)"
        in (summary[0])
    )
    assert "prefect_api" not in out  # skipped before the Prefect server fixture started


def test_missing_postgres_skips_and_missing_psycopg2_fails(monkeypatch):
    """PostgreSQL's programs are a system package (skip); psycopg2 is a project dependency (fail)."""
    monkeypatch.delenv("DIFFQUANT_SYSTEM_PACKAGES_FAILURE", raising=False)
    monkeypatch.setattr(servers, "pg_bin", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match=r"PostgreSQL .* is not installed \(Debian package postgresql\)"):
        servers.require_postgres()
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # import psycopg2 -> ImportError
    with pytest.raises(pytest.fail.Exception, match="psycopg2 is missing"):
        servers.require_postgres()


def test_ci_run_runs_the_readme_test_command():
    """``.ci/run`` = the README's install steps, then exactly the README's test command (the script)."""
    commands = readme_commands()
    assert len(commands) == 2, commands
    install_and_run, test_command = commands
    assert shlex.split(test_command) == ["bash", ".ci/test"], test_command
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    steps = [s.strip() for s in install_and_run.split("&&")]
    assert steps[-1] == ".venv/bin/diffquant compress"
    assert lines[-4:] == [*steps[:-1], f"exec {test_command}"]
    ci_text = "\n".join(lines)
    assert "pytest" not in ci_text and "apt-get" not in ci_text  # one place installs packages and runs tests


def test_ci_test_reports_a_failed_install_and_counts_no_tests_as_failure(tmp_path):
    """apt-get failing: the script says why once, still runs pytest, and exit status 5 becomes 1."""
    log = tmp_path / "apt.log"
    path = bare_path(tmp_path, **{"apt-get": f'echo "$*" >> {log}; echo "E: no network" >&2; exit 100'})
    result = ci_test(["tests/reliability/test_environment.py", "-k", "no_such_test_here"], path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(
        r"could not install (postgresql )?chromium: (apt-get update failed|not root and no passwordless sudo); "
        r"the tests that need them will be skipped",
        result.stderr,
    ), result.stderr[-2000:]
    assert "pytest collected no tests: treating as a failure" in result.stderr
    if os.geteuid() == 0:
        assert log.read_text().split("\n")[0] == "update -q"


def test_ci_test_installs_a_missing_package_then_runs_pytest(tmp_path):
    """apt-get working: the missing package is installed, timed, and the selected tests run with -rs."""
    log = tmp_path / "apt.log"
    fake = tmp_path / "bin"
    body = (
        f'echo "$*" >> {log}\n'
        f'if [ "$1" = install ]; then printf "#!/bin/bash\\n" > {fake}/chromium; /bin/chmod +x {fake}/chromium; fi'
    )
    path = bare_path(tmp_path, **{"apt-get": body})
    if os.geteuid() != 0:
        pytest.skip("the install path runs apt-get as root; this user is not root")
    selected = "tests/reliability/test_environment.py::test_missing_postgres_skips_and_missing_psycopg2_fails"
    result = ci_test([selected], path)
    calls = log.read_text().splitlines()
    assert calls[0] == "update -q" and calls[1].startswith("install -y -q --no-install-recommends")
    assert calls[1].split()[-1] == "chromium"
    assert re.search(r"installed (postgresql )?chromium in \d+ s", result.stderr), result.stderr[-2000:]
    assert "could not install" not in result.stderr
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-2000:]
