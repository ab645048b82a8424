"""The compress flow on the bundled DiT and text-to-image reference models, through export."""

from __future__ import annotations

import json
from pathlib import Path

from diffquant.spec import load_spec
from tests.pipeline.conftest import SMALL


def run(out: Path, config: str, extra: list[str] | None = None) -> dict:
    from diffquant.flows.compress import compress_flow

    root = Path(__file__).resolve().parents[2]
    spec = load_spec(root / "configs" / config, [*SMALL, "promote.register_model=false", *(extra or [])])
    summary = compress_flow(spec=spec.to_dict(), out_dir=str(out))
    return json.loads(Path(summary["summary_path"]).read_text())


def test_digits_dit_compresses_and_exports(isolated_home, tmp_path):
    saved = run(tmp_path / "out", "digits-dit-w8a8.yaml")
    assert saved["model"]["family"] == "dit" and saved["model"]["condition"] == "class"
    q = saved["metrics"]["quantized"]
    assert {"accuracy", "fd_real", "fd_fp", "psnr", "sqnr_db"} <= q.keys()
    plan = json.loads(Path(saved["plan"]["path"]).read_text())["layers"]
    kept = {name for name, cfg in plan.items() if cfg["weight"] is None}
    assert "pos_embed.proj" in kept and "proj_out_2" in kept
    assert any(name.endswith("norm1.emb.timestep_embedder.linear_1") for name in kept)
    assert plan["transformer_blocks.0.attn1.to_q"]["weight"]["bits"] == 8
    export = saved["export"]
    assert export["status"] == "exported" and export["parity"]["passed"] is True


def test_digits_t2i_quantizes_its_text_encoder_and_exports(isolated_home, tmp_path):
    saved = run(tmp_path / "out", "digits-t2i-w8a8.yaml", ["quantize.outlier_tokens=1"])
    assert saved["model"]["family"] == "text-unet" and saved["model"]["condition"] == "text"
    plan = json.loads(Path(saved["plan"]["path"]).read_text())["layers"]
    assert plan["text_encoder.encoder.layers.0.self_attn.q_proj"]["weight"]["bits"] == 8
    kv = [name for name in plan if name.endswith(("attn2.to_k", "attn2.to_v"))]
    assert kv and all(plan[name].get("fp_tokens") == 1 for name in kv)
    outliers = saved["plan"]["outlier_tokens"]
    assert outliers["count"] == 1 and outliers["mode"] == "1" and sorted(outliers["layers"]) == sorted(kv)
    assert "accuracy" in saved["metrics"]["quantized"]  # held-out phrasings name the digit
    export = saved["export"]
    assert export["status"] == "exported" and export["parity"]["passed"] is True
