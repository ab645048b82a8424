"""Watching a folder for new diffusers checkpoints (the core of ``diffquant watch``).

A training job saves each checkpoint as a subfolder of one folder (``save_pretrained`` output of
a model or a pipeline). :class:`CheckpointWatcher` scans that folder and reports a subfolder
once it is *complete* and *stable*:

- complete: it holds ``model_index.json`` (a pipeline) or ``config.json`` (a bare model), and
  :func:`diffquant.models.loading.load_local_model` accepts it (every JSON file, weights header
  and shape checked; safetensors only). That validation also gives the checkpoint's identity,
  the sha256 of its weights, the same hash a compress run records;
- stable: the fingerprint of its files (relative path, size and modification time of each)
  is the same at two consecutive scans, so a folder still being written is left for later.

What was announced is recorded in a small JSON state file (one per watched folder), so a
restarted watcher does not announce a checkpoint again. A folder rewritten afterwards (a new
fingerprint) is a new checkpoint and is announced again once stable; a folder that fails
validation is remembered with its reason and retried only when its files change. Emitting the
event is the caller's part (Prefect is not imported here).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffquant.errors import DiffquantError, ModelLoadError
from diffquant.storage import write_json

logger = logging.getLogger(__name__)

STATE_VERSION = 1
MARKERS = ("model_index.json", "config.json")
"""A checkpoint folder holds one of these: a pipeline's index or a bare model's config."""

Validate = Callable[[Path], str]
"""Validates a checkpoint folder and returns the sha256 of its weights (raises ModelLoadError)."""


def weights_sha256(folder: Path) -> str:
    """Validate ``folder`` as a local diffusers model or pipeline; return its weights' sha256.

    Raises:
        ModelLoadError: The folder is not a model diffquant can load (the reason in one line).
    """
    from diffquant.models.loading import load_local_model

    return load_local_model(Path(folder)).weights_sha256


def fingerprint(folder: Path) -> str:
    """A sha256 over every file's relative path, size and modification time under ``folder``."""
    entries = []
    for path in sorted(Path(folder).rglob("*")):
        try:
            info = path.stat()
        except FileNotFoundError:  # removed while scanning: the next scan sees a new fingerprint
            continue
        if path.is_file():
            entries.append([str(path.relative_to(folder)), info.st_size, info.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


@dataclass(frozen=True)
class Landed:
    """A checkpoint folder that is complete and stable, not announced before."""

    path: Path
    sha256: str
    fingerprint: str


@dataclass
class WatchState:
    """What a watcher announced (``emitted``) and refused (``rejected``), by subfolder name."""

    path: Path
    folder: str
    emitted: dict[str, dict[str, Any]]
    rejected: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, path: Path, folder: Path) -> WatchState:
        """Read the state file ``path`` (an empty state when it does not exist).

        Raises:
            DiffquantError: The file exists but is not a state file of this watcher.
        """
        path = Path(path)
        if not path.exists():
            return cls(path, str(folder), {}, {})
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DiffquantError(
                f"watch state file {path} is unreadable ({error}); delete it to announce every checkpoint again"
            ) from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise DiffquantError(f"{path} is not a diffquant watch state file (version {STATE_VERSION})")
        return cls(path, str(folder), dict(data.get("emitted", {})), dict(data.get("rejected", {})))

    def save(self) -> None:
        """Write the state file atomically."""
        data = {"version": STATE_VERSION, "folder": self.folder, "emitted": self.emitted, "rejected": self.rejected}
        write_json(data, self.path)

    def known(self, name: str, print_: str) -> bool:
        """Whether subfolder ``name`` with fingerprint ``print_`` was already announced or refused."""
        return any(entry.get(name, {}).get("fingerprint") == print_ for entry in (self.emitted, self.rejected))


def default_state_path(folder: Path, home: Path) -> Path:
    """``<home>/watch/<sha256 of the folder's absolute path, 16 hex>.json``."""
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return Path(home) / "watch" / f"{key}.json"


class CheckpointWatcher:
    """Reports each complete, stable, new checkpoint subfolder of ``folder`` once."""

    def __init__(self, folder: Path, state_path: Path, validate: Validate = weights_sha256) -> None:
        """Watch ``folder``, recording what was announced in ``state_path``.

        Args:
            folder: The folder whose subfolders are checkpoints.
            state_path: The JSON state file (created on the first announcement).
            validate: Validates a folder and returns its weights' sha256.

        Raises:
            DiffquantError: ``folder`` is not an existing folder, or the state file is damaged.
        """
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise DiffquantError(f"watch folder {folder} {what}; give the folder a training job saves checkpoints to")
        self.state = WatchState.load(state_path, self.folder)
        self.validate = validate
        self._previous: dict[str, str] = {}

    def scan(self) -> list[Landed]:
        """Look at every subfolder once; return the checkpoints to announce now.

        A subfolder is returned when it has a marker file, its fingerprint equals the one of the
        previous scan, it was not announced or refused with that fingerprint, and it validates.
        """
        landed: list[Landed] = []
        current: dict[str, str] = {}
        for sub in sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not any((sub / marker).is_file() for marker in MARKERS):
                logger.debug("%s: no %s yet", sub, " or ".join(MARKERS))
                continue
            print_ = fingerprint(sub)
            if self.state.known(sub.name, print_):
                continue
            current[sub.name] = print_
            if self._previous.get(sub.name) != print_:
                logger.debug("%s: new or still changing, checked again at the next scan", sub)
                continue
            try:
                sha = self.validate(sub)
            except ModelLoadError as error:
                logger.warning("not announced: %s", error)
                self.state.rejected[sub.name] = {"fingerprint": print_, "reason": str(error), "at": _now()}
                self.state.save()
                continue
            landed.append(Landed(sub, sha, print_))
        self._previous = current
        return landed

    def mark_emitted(self, landed: Landed, event_id: str) -> None:
        """Record that ``landed`` was announced (event ``event_id``), so it is not announced again."""
        self.state.emitted[landed.path.name] = {
            "fingerprint": landed.fingerprint,
            "sha256": landed.sha256,
            "path": str(landed.path),
            "event_id": event_id,
            "at": _now(),
        }
        self.state.rejected.pop(landed.path.name, None)
        self.state.save()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
