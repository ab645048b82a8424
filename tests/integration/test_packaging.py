"""The wheel installs one namespace: diffquant (with diffquant.flows/tasks/export/registry), nothing top-level else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_has_one_top_level_package_and_no_bare_registry_or_export(tmp_path):
    source = tmp_path / "source"  # build from a copy: setuptools writes build/ into the source folder
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for name in ("src", "flows", "tasks", "export", "registry"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("diffquant-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"diffquant", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    for package in ("flows", "tasks", "export", "registry"):
        assert f"diffquant/{package}/__init__.py" in names
    assert "diffquant/flows/compress.py" in names and "diffquant/models/weights/digits-unet/config.json" in names
    for init in (ROOT / "src").rglob("__init__.py"):  # every subpackage of the core is in the wheel
        assert init.relative_to(ROOT / "src").as_posix() in names, init
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    # from a folder outside the repository, with only the wheel's files ahead of the venv's packages
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    probe = (
        "import importlib.util, sys\n"
        f"sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        "import diffquant.registry.promotion, diffquant.export.onnx, diffquant.flows.compress\n"
        f"assert diffquant.__file__.startswith({str(target)!r}), diffquant.__file__\n"
        "print([importlib.util.find_spec(n) is None for n in ('registry', 'export', 'flows', 'tasks')])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[True, True, True, True]"


def test_onnxruntime_comes_from_exactly_one_extra():
    """The base install names no ONNX runtime; `cpu` brings onnxruntime, `gpu` onnxruntime-gpu, `dev` the CPU one."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [req.split(">")[0].split("=")[0].strip() for req in project["dependencies"]]
    assert not any(name.startswith("onnxruntime") for name in base), base
    extras = project["optional-dependencies"]
    assert [req.split(">")[0] for req in extras["cpu"]] == ["onnxruntime"]
    assert [req.split(">")[0] for req in extras["gpu"]] == ["onnxruntime-gpu"]
    assert "diffquant[cpu]" in extras["dev"]
