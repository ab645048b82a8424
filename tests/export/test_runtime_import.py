"""Without an ONNX runtime installed (the base install), parity fails in one line naming the extras."""

from __future__ import annotations

import sys

import pytest

from diffquant.errors import ExportError
from diffquant.export.parity import import_onnxruntime, ort_session


def test_missing_onnxruntime_is_one_line_naming_both_extras(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when it is absent
    with pytest.raises(ExportError) as caught:
        ort_session(tmp_path / "model.onnx")
    message = str(caught.value)
    assert "\n" not in message
    assert "diffquant[cpu]" in message and "diffquant[gpu]" in message


def test_installed_onnxruntime_is_returned():
    import onnxruntime

    assert import_onnxruntime() is onnxruntime
