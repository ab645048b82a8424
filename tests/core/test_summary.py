"""summary.json is written from a typed RunSummary; summaries from before the schema version load too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from diffquant.summary import SCHEMA_VERSION, RunSummary

OLD = Path(__file__).resolve().parents[1] / "data" / "summary_v0.json"


def test_a_summary_written_before_the_schema_version_loads_with_every_key():
    summary = RunSummary.load(OLD)
    assert summary.schema_version == 0
    assert summary.model.name == "digits-unet" and summary.sizes.packed_bytes == 1_217_412
    old = json.loads(OLD.read_text())
    again = summary.to_dict()
    assert set(old) <= set(again)
    for key in old:
        assert again[key] == old[key], key


def test_the_current_schema_round_trips_and_a_missing_section_is_refused():
    data = json.loads(OLD.read_text()) | {"schema_version": SCHEMA_VERSION}
    assert RunSummary.model_validate(data).to_dict() == data
    del data["sizes"]
    with pytest.raises(ValidationError, match="sizes"):
        RunSummary.model_validate(data)
