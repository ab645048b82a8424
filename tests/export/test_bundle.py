"""Manifests and bundles: sha256 verification and atomic replacement."""

from __future__ import annotations

import json

import pytest

from diffquant.errors import ExportError, IntegrityError
from diffquant.export.bundle import write_bundle
from diffquant.manifest import MANIFEST, verify_files, write_manifest
from diffquant.storage import sha256_file


def make_version(folder):
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text('{"layers": {}}')
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes(b"\x01\x02")
    return sha256_file(write_manifest(folder))


def test_manifest_round_trip_and_tampering(tmp_path):
    digest = make_version(tmp_path / "v")
    manifest = verify_files(tmp_path / "v", digest)
    assert set(manifest["files"]) == {"plan.json", "sub/w.bin"}
    (tmp_path / "v" / "sub" / "w.bin").write_bytes(b"\x01\x03")
    with pytest.raises(IntegrityError, match=r"sub/w\.bin does not match"):
        verify_files(tmp_path / "v")
    make_version(tmp_path / "u")
    (tmp_path / "u" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"extra\.onnx is not listed"):
        verify_files(tmp_path / "u")
    with pytest.raises(IntegrityError, match="registered manifest sha256"):
        verify_files(tmp_path / "u", "0" * 64)
    (tmp_path / "u" / "extra.onnx").unlink()
    (tmp_path / "u" / "plan.json").unlink()
    with pytest.raises(IntegrityError, match=r"plan\.json is listed"):
        verify_files(tmp_path / "u")
    with pytest.raises(IntegrityError, match=r"no manifest\.json"):
        verify_files(tmp_path)


def test_bundle_replaces_target_atomically(tmp_path):
    make_version(tmp_path / "v")
    make_version(tmp_path / "old")
    (tmp_path / "old" / "stale.txt").write_text("old")
    target = tmp_path / "edge" / "bundle"
    write_bundle(tmp_path / "old", target, {"model": "m", "version": "2"})  # an earlier bundle is replaced
    assert (target / "stale.txt").exists()
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine")
    write_bundle(tmp_path / "v", target, {"model": "m", "version": "3"}, engine)
    manifest = verify_files(target)
    assert manifest["bundle"]["version"] == "3"
    assert set(manifest["files"]) == {"plan.json", "sub/w.bin", "engine/model.engine"}
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["bundle"]  # no staging left behind
    assert json.loads((target / MANIFEST).read_text())["files"]["plan.json"]["bytes"] == len('{"layers": {}}')


def test_failed_bundle_leaves_old_target(tmp_path, monkeypatch):
    import diffquant.export.bundle as bundle

    make_version(tmp_path / "v")
    target = tmp_path / "bundle"
    write_bundle(tmp_path / "v", target, {"version": "1"})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle, "write_manifest", broken)
    with pytest.raises(ExportError, match=f"cannot write the bundle to {target} .disk full"):
        write_bundle(tmp_path / "v", target, {"version": "2"})
    assert verify_files(target)["bundle"]["version"] == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "v"]
