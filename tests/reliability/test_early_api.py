"""The Prefect API launched ahead (``flows/cli.py``: ``_early_prefect_api``): adopted when the flow runs, else killed.

Each test runs a short script in a fresh interpreter against a fresh ``DIFFQUANT_HOME`` (Prefect's
settings are read from the environment when Prefect is first imported, so an in-process test
would see the test session's Prefect instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import fcntl, json, os, sys
from pathlib import Path
from diffquant.flows import cli
from diffquant.registry.home import locks_dir
home = cli._setup(False)
lock_path = locks_dir(home) / "prefect-api.lock"
lock_path.parent.mkdir(parents=True, exist_ok=True)

def lock_free():
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
"""


def run_script(home: Path, body: str) -> dict:
    """Run PRELUDE + ``body`` with ``home`` as DIFFQUANT_HOME; the JSON its last line prints."""
    env = {**os.environ, "DIFFQUANT_HOME": str(home)}
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + body], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_server_launched_ahead_is_killed_when_the_command_fails_before_the_flow(tmp_path):
    out = run_script(
        tmp_path / "home",
        """
process = None
try:
    with cli._early_prefect_api(home):
        process = cli._EARLY["server"].launched
        running = process.poll() is None
        held = not lock_free()
        raise ValueError("a spec error")
except ValueError:
    pass
print(json.dumps({"running": running, "held": held, "exit": process.poll(), "free": lock_free(),
                  "early": sorted(cli._EARLY)}))
""",
    )
    assert out["running"] and out["held"], out  # launched and holding the start-up lock inside the block
    assert out["exit"] is not None, out  # killed (and reaped) on the way out
    assert out["free"] and out["early"] == [], out


def test_the_flow_adopts_the_server_launched_ahead(tmp_path):
    out = run_script(
        tmp_path / "home",
        """
import httpx
with cli._early_prefect_api(home):
    launched = cli._EARLY["server"].launched.pid
    cli._start_prefect_api(home)
    from prefect.server.api.server import SubprocessASGIServer
    server = SubprocessASGIServer._instances[None]
    health = httpx.get(f"{server.api_url}/health").status_code
    adopted = server.server_process.pid
print(json.dumps({"launched": launched, "adopted": adopted, "health": health, "starts": server.starts,
                  "alive_after_block": server.server_process.poll() is None, "free": lock_free()}))
""",
    )
    assert out["adopted"] == out["launched"], out  # no second server
    assert out["health"] == 200 and out["starts"] == 1, out
    assert out["alive_after_block"] and out["free"], out  # the adopted server outlives the block; lock released


def test_a_dry_run_launches_no_server(tmp_path):
    out = run_script(
        tmp_path / "home",
        """
with cli._early_prefect_api(home, enabled=False):
    early = sorted(cli._EARLY)
print(json.dumps({"early": early, "free": lock_free()}))
""",
    )
    assert out == {"early": [], "free": True}
