"""The latency table the allocation program reads: measured milliseconds per layer and option.

Two JSON shapes are read:

- the plain shape ``{layer: {option: ms}}`` (written by hand, or by an older diffquant);
- the profiled shape that ``diffquant profile`` writes::

      {"format": "diffquant.latency_table", "version": 1,
       "layers": {layer: {option: ms}},
       "overhead_ms": 0.42,
       "runtime": {...}, "machine": {...}, ...}

  ``overhead_ms`` is what the whole graph costs beyond the sum of its layers (the ops outside any
  Linear/Conv2d, the per-call cost, and what the per-layer graphs charge that the whole graph
  does not): the whole float graph's measured latency minus the sum of its layers' float
  entries. It may be negative. The other keys describe where and how the table was measured;
  they are kept in :attr:`LatencyTable.metadata` and not interpreted here.

With a latency table, ``budget.latency_ms`` bounds ``overhead_ms`` plus the sum of the chosen
options' entries: the predicted latency of one denoiser call. Options missing from the table
cannot be taken by that layer (the allocation record lists them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffquant.errors import ConfigError

TABLE_FORMAT = "diffquant.latency_table"
TABLE_VERSION = 1


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds per layer and option, the whole-graph overhead, and where they were measured.

    Attributes:
        layers: ``{layer FQN: {option name: ms}}`` (option names as
            :func:`diffquant.mixed_precision.costs.option_name` writes them).
        overhead_ms: Whole-graph latency beyond the sum of the layers (0 for a plain table).
        metadata: Everything else the file holds (runtime, machine, batch, settings).
    """

    layers: dict[str, dict[str, float]]
    overhead_ms: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The profiled JSON shape."""
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            **self.metadata,
            "overhead_ms": self.overhead_ms,
            "layers": self.layers,
        }

    def predict(self, choice: dict[str, str]) -> float:
        """Predicted whole-graph milliseconds of a plan given as ``{layer: option}``.

        Raises:
            KeyError: If a chosen (layer, option) is not in the table.
        """
        return self.overhead_ms + sum(self.layers[layer][option] for layer, option in choice.items())


def _entries(data: Any) -> dict[str, dict[str, float]] | None:
    """``{layer: {option: ms}}`` with finite non-negative numbers, or None when ``data`` is not that."""
    if not isinstance(data, dict):
        return None
    out: dict[str, dict[str, float]] = {}
    for layer, options in data.items():
        if not isinstance(options, dict):
            return None
        row: dict[str, float] = {}
        for option, ms in options.items():
            if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms < 0:
                return None
            row[option] = float(ms)
        out[layer] = row
    return out


def parse_latency_table(data: Any, source: str = "the latency table") -> LatencyTable:
    """Read either JSON shape (see the module docstring) from parsed ``data``.

    Raises:
        ConfigError (``latency_table``): If ``data`` is neither shape.
    """
    shape = f"{source} must map layer -> option -> milliseconds (or be a diffquant profile table)"
    if isinstance(data, dict) and data.get("format") == TABLE_FORMAT:
        if data.get("version") != TABLE_VERSION:
            raise ConfigError(
                "latency_table", f"{source} has table version {data.get('version')!r}, not {TABLE_VERSION}"
            )
        layers = _entries(data.get("layers"))
        overhead = data.get("overhead_ms", 0.0)
        if layers is None or isinstance(overhead, bool) or not isinstance(overhead, (int, float)):
            raise ConfigError("latency_table", shape)
        if not math.isfinite(overhead):
            raise ConfigError("latency_table", f"{source}: overhead_ms must be a finite number")
        meta = {k: v for k, v in data.items() if k not in {"format", "version", "layers", "overhead_ms"}}
        return LatencyTable(layers, float(overhead), meta)
    layers = _entries(data)
    if layers is None:
        raise ConfigError("latency_table", shape)
    return LatencyTable(layers)


def read_latency_file(path: str | Path) -> LatencyTable:
    """Read a latency table file (either shape).

    Raises:
        ConfigError (``latency_table``): If the file is missing, not JSON, or of neither shape.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError("latency_table", f"{path} cannot be read as JSON: {error}") from None
    return parse_latency_table(data, str(path))
