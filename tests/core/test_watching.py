"""The checkpoint watcher's rules: complete, stable between two scans, announced once, state kept."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from diffquant.errors import DiffquantError, ModelLoadError
from diffquant.models.reference import reference_dir
from diffquant.watching import CheckpointWatcher, WatchState, default_state_path, fingerprint, weights_sha256


def fake_validate(folder: Path) -> str:
    if (folder / "broken").exists():
        raise ModelLoadError(f"{folder} has no diffusion_pytorch_model.safetensors")
    return "ab" * 32


def checkpoint(root: Path, name: str, weights: bytes = b"w") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return folder


def test_a_folder_is_announced_once_it_is_stable_and_only_once(tmp_path):
    root = tmp_path / "ckpts"
    checkpoint(root, "step-100")
    watcher = CheckpointWatcher(root, tmp_path / "state.json", fake_validate)
    assert watcher.scan() == []  # first sight: it may still be written
    (landed,) = watcher.scan()
    assert landed.path == (root / "step-100").resolve() and landed.sha256 == "ab" * 32
    watcher.mark_emitted(landed, "event-1")
    assert watcher.scan() == [] and watcher.scan() == []
    # a restarted watcher reads the state file and announces nothing again
    again = CheckpointWatcher(root, tmp_path / "state.json", fake_validate)
    assert again.scan() == [] and again.scan() == []
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["emitted"]["step-100"]["event_id"] == "event-1"


def test_a_folder_still_being_written_waits(tmp_path):
    root = tmp_path / "ckpts"
    (root / "step-200").mkdir(parents=True)
    (root / "step-200" / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    watcher = CheckpointWatcher(root, tmp_path / "state.json", fake_validate)
    assert watcher.scan() == [] and watcher.scan() == []  # no config.json yet
    (root / "step-200" / "config.json").write_text("{}")
    assert watcher.scan() == []
    weights = root / "step-200" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"partial, then more")  # still growing between two scans
    assert watcher.scan() == []
    (landed,) = watcher.scan()
    assert landed.path.name == "step-200"


def test_a_rewritten_folder_is_a_new_checkpoint(tmp_path):
    root = tmp_path / "ckpts"
    folder = checkpoint(root, "latest")
    watcher = CheckpointWatcher(root, tmp_path / "state.json", fake_validate)
    watcher.scan()
    (first,) = watcher.scan()
    watcher.mark_emitted(first, "event-1")
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"new weights")
    os.utime(weights, ns=(1, 1))
    assert watcher.scan() == []
    (second,) = watcher.scan()
    assert second.fingerprint != first.fingerprint


def test_an_invalid_folder_is_refused_once_and_retried_when_it_changes(tmp_path, caplog):
    root = tmp_path / "ckpts"
    folder = checkpoint(root, "bad")
    (folder / "broken").write_text("")
    watcher = CheckpointWatcher(root, tmp_path / "state.json", fake_validate)
    watcher.scan()
    assert watcher.scan() == []
    assert "not announced" in caplog.text and "has no diffusion_pytorch_model.safetensors" in caplog.text
    assert "bad" in WatchState.load(tmp_path / "state.json", root).rejected
    assert watcher.scan() == []  # not validated again while unchanged
    (folder / "broken").unlink()
    watcher.scan()
    (landed,) = watcher.scan()
    assert landed.path.name == "bad"


def test_hidden_folders_and_plain_files_are_ignored(tmp_path):
    root = tmp_path / "ckpts"
    checkpoint(root, ".tmp-step-1")
    root.joinpath("notes.txt").write_text("x")
    watcher = CheckpointWatcher(root, tmp_path / "state.json", fake_validate)
    assert watcher.scan() == [] and watcher.scan() == []


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_the_watched_folder_must_exist(tmp_path, kind):
    target = tmp_path / "nope"
    if kind == "file":
        target.write_text("")
    with pytest.raises(DiffquantError, match="does not exist" if kind == "missing" else "is not a folder"):
        CheckpointWatcher(target, tmp_path / "state.json", fake_validate)


def test_a_damaged_state_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(DiffquantError, match=r"watch state file .* is unreadable") as info:
        CheckpointWatcher(tmp_path / "ckpts", tmp_path / "state.json", fake_validate)
    assert "\n" not in str(info.value)


def test_default_state_path_is_per_folder(tmp_path):
    a, b = default_state_path(tmp_path / "a", tmp_path / "home"), default_state_path(tmp_path / "b", tmp_path / "home")
    assert a != b and a.parent == tmp_path / "home" / "watch"


def test_fingerprint_sees_size_and_time(tmp_path):
    folder = checkpoint(tmp_path, "c")
    before = fingerprint(folder)
    (folder / "config.json").write_text('{"a": 1}')
    assert fingerprint(folder) != before


def test_real_validation_gives_the_weights_sha256_a_compress_run_records(tmp_path):
    from diffquant.models.loading import load_model

    copy = shutil.copytree(reference_dir("digits-unet"), tmp_path / "ckpt")
    assert weights_sha256(copy) == load_model("digits-unet").weights_sha256
    (copy / "config.json").write_text("[]")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        weights_sha256(copy)
