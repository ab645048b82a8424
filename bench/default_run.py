"""The default ``diffquant compress`` cold (fresh home) and warm (a second run in the same home), repeated.

Each repeat starts a fresh ``DIFFQUANT_HOME`` and runs the default command twice in it: the first
run computes everything (cold), the second reuses the cached pool and full-precision evaluation
(warm). Every run is a separate process, as a user runs it: wall time (start to exit), peak RSS of
the diffquant process (``os.wait4``'s ``ru_maxrss``), CPU seconds, the flow's own time (the CLI's
``total wall time``; the rest is start-up: imports and Prefect's local API) and each stage's time
and peak RSS from ``summary.json``, with the cost estimated before the stages ran. The load
average before and after each run is recorded: timings measured on a busy machine are not those of
an idle one (the metrics are).

Run: ``.venv/bin/python bench/default_run.py [--repeats 2] [--set KEY=VALUE ...]`` (about 4
minutes per repeat on 2 idle cores). Writes ``bench/results/default_run.json`` and the
``default-run`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, machine, replace_section, write_results


def run_compress(home: Path, extra: list[str]) -> dict[str, Any]:
    """One ``diffquant compress`` in its own process; what it took and what its summary says."""
    import json

    env = {**os.environ, "DIFFQUANT_HOME": str(home)}
    command = [sys.executable, "-m", "diffquant.flows.cli", "compress", *[a for s in extra for a in ("--set", s)]]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own resource usage
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise SystemExit(f"diffquant compress failed ({process.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(Path(stdout.strip().splitlines()[-1]).read_text())
    flow = re.search(r"total wall time: ([0-9.]+) s", stderr)
    return {
        "wall_s": wall,
        "flow_s": float(flow.group(1)) if flow else None,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "pool_cache_hit": summary["calibration"]["pool_cache_hit"],
        "fp_cache_hit": (summary.get("evaluation") or {}).get("fp_cache_hit"),
        "timings": summary["timings"],
        "memory": {k: v["peak_rss_bytes"] for k, v in summary.get("memory", {}).items()},
        "estimate": {k: v["seconds"] for k, v in (summary.get("estimate") or {}).get("stages", {}).items()},
        "metrics": summary["metrics"],
        "parity_passed": summary["export"].get("parity", {}).get("passed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="spec override for every run")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        home = Path(tempfile.mkdtemp(prefix="diffquant-default-run-"))
        for kind in ("cold", "warm"):
            record = {"repeat": repeat, "kind": kind, **run_compress(home, args.overrides)}
            runs.append(record)
            print(
                f"{kind} #{repeat}: {record['wall_s']:.1f} s wall, flow {record['flow_s']} s, peak RSS "
                f"{record['peak_rss_bytes'] / 2**30:.2f} GiB, load {record['load_before']:.1f} -> {record['load_after']:.1f}",
                flush=True,
            )
    write_results("default_run", {"machine": machine(), "overrides": args.overrides, "runs": runs})
    replace_section("default-run", _table(runs, args.overrides))
    print(_table(runs, args.overrides))


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _table(runs: list[dict[str, Any]], overrides: list[str]) -> str:
    cold = [r for r in runs if r["kind"] == "cold"]
    warm = [r for r in runs if r["kind"] == "warm"]
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    lines = [
        "## Default run, cold and warm",
        "",
        f"`.venv/bin/python bench/default_run.py --repeats {len(cold)}`"
        + (f" ({', '.join(overrides)})" if overrides else "")
        + f"; {machine()}; load average {min(loads):.1f}-{max(loads):.1f} during the runs"
        # judged before the first run: each later run starts while its predecessor's own load is still
        # in the one-minute average
        + (
            " (a busy machine: wall times are not those of an idle one)"
            if runs[0]["load_before"] > 1.0
            else " (idle before the first run: the rest of the load is the runs' own)"
        )
        + ".",
        "",
        "| run | wall s | flow s | start-up s | CPU s | peak RSS GiB | pool cached | FP evaluation cached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        startup = r["wall_s"] - r["flow_s"] if r["flow_s"] is not None else float("nan")
        lines.append(
            f"| {r['kind']} #{r['repeat']} | {r['wall_s']:.1f} | {r['flow_s']:.1f} | {startup:.1f} | {r['cpu_s']:.0f} "
            f"| {r['peak_rss_bytes'] / 2**30:.2f} | {r['pool_cache_hit']} | {r['fp_cache_hit']} |"
        )
    stages = list(dict.fromkeys(k for r in runs for k in r["timings"]))
    lines += [
        "",
        f"Median over repeats: cold {_median(cold, 'wall_s'):.1f} s, warm {_median(warm, 'wall_s'):.1f} s "
        f"(warm / cold {_median(warm, 'wall_s') / _median(cold, 'wall_s'):.2f}).",
        "",
        "| stage | cold s | warm s | cold estimate s | warm estimate s | cold peak RSS MB | warm peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]

    def med(group: list[dict[str, Any]], field: str, stage: str, scale: float = 1.0) -> str:
        values = [r[field][stage] / scale for r in group if stage in r[field]]
        return f"{statistics.median(values):.1f}" if values else "-"

    for stage in stages:
        lines.append(
            f"| {stage} | {med(cold, 'timings', stage)} | {med(warm, 'timings', stage)} | "
            f"{med(cold, 'estimate', stage)} | {med(warm, 'estimate', stage)} | "
            f"{med(cold, 'memory', stage, 2**20)} | {med(warm, 'memory', stage, 2**20)} |"
        )

    def quality(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {part: {k: v for k, v in m.items() if not k.endswith("_seconds")} for part, m in metrics.items()}

    first = runs[0]["metrics"]
    same = all(quality(r["metrics"]) == quality(first) for r in runs)  # timings left out
    q = first["quantized"]
    lines += [
        "",
        f"Metrics (every run {'the same' if same else 'NOT the same'}): FP accuracy {first['fp'].get('accuracy', 0):.4f}"
        f" / FD to real {first['fp'].get('fd_real', 0):.2f}; quantized accuracy {q.get('accuracy', 0):.4f} / FD to "
        f"real {q.get('fd_real', 0):.2f} / PSNR {q.get('psnr', 0):.1f} dB / SQNR {q.get('sqnr_db', 0):.1f} dB; parity "
        f"{'passed' if all(r['parity_passed'] for r in runs) else 'FAILED'} in every run.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
