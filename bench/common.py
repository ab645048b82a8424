"""Shared benchmark plumbing: machine description and BENCHMARKS.md section replacement."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def temporary_home(prefix: str) -> Path:
    """A fresh DIFFQUANT_HOME (embedded Prefect + MLflow) for one benchmark run, set in the environment."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["DIFFQUANT_HOME"] = str(home)
    from diffquant.registry.home import configure_environment

    configure_environment(home)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return home


def machine() -> str:
    """One line describing where the numbers were measured."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def write_results(name: str, record: object) -> Path:
    """Write a benchmark's measured record to ``bench/results/<name>.json`` (indented) and return the path."""
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def replace_section(name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def cell(row: dict, key: str, fmt: str = "{:.3f}") -> str:
    """Format ``row[key]`` for a markdown table, ``-`` when absent."""
    return fmt.format(row[key]) if key in row else "-"
