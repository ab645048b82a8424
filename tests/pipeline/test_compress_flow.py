import json
from pathlib import Path

import pytest

from diffquant.errors import DataError
from diffquant.spec import load_spec
from tests.pipeline.conftest import SMALL, mlflow_runs


def run_flow(out: Path, extra: list[str] | None = None) -> dict:
    from diffquant.flows.compress import compress_flow

    spec = load_spec(overrides=SMALL + (extra or []))
    return compress_flow(spec=spec.to_dict(), out_dir=str(out))


def test_compress_logs_everything(isolated_home, tmp_path):
    summary = run_flow(tmp_path / "out")
    saved = json.loads(Path(summary["summary_path"]).read_text())
    assert saved["run_id"] == summary["run_id"]
    fp, q = saved["metrics"]["fp"], saved["metrics"]["quantized"]
    assert {"accuracy", "fd_real"} <= fp.keys()
    assert {"accuracy", "fd_real", "fd_fp", "psnr", "ssim", "sqnr_db"} <= q.keys()
    assert q["sqnr_db"] > 10 and q["psnr"] > 30 and q["ssim"] > 0.95  # W8A8 stays close to FP
    assert 0.25 < saved["sizes"]["ratio"] < 0.35  # int8 weights + fp32 scales/biases/norms
    export = saved["export"]
    assert export["status"] == "exported" and export["parity"]["passed"] is True
    assert "TensorRT" in export["engine"]["skip_reason"]  # no TensorRT on these machines: skipped, not failed
    assert abs(export["onnx_weight_bytes"] - saved["sizes"]["packed_bytes"]) < 0.01 * saved["sizes"]["packed_bytes"]
    # deployed: the plan's INT8 weights plus their zero points; the file adds activation scalars and constants
    assert saved["sizes"]["packed_bytes"] < saved["sizes"]["deployed_bytes"] <= export["onnx_weight_bytes"]
    assert export["onnx_metrics"]["onnx.accuracy"] > 0.5
    assert set(saved["timings"]) >= {"collect_trajectories", "quantize", "evaluate_fp", "evaluate_quantized"}
    plan = json.loads(Path(saved["plan"]["path"]).read_text())["layers"]
    from diffquant.models.loading import load_model
    from diffquant.quant.plan import quantizable_layers

    assert list(plan) == quantizable_layers(load_model("digits-unet").unet)
    # the UNet2DModel family keeps conv_in, conv_out and the two time-embedding Linears in float
    kept = {name for name, cfg in plan.items() if cfg["weight"] is None and cfg["activation"] is None}
    assert kept == {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    assert saved["plan"]["quantized_layers"] == len(plan) - 4
    assert saved["model"]["family"] == "unet2d" and saved["plan"]["outlier_tokens"]["count"] == 0
    selection = json.loads(Path(saved["calibration"]["selection_path"]).read_text())
    assert len(selection["indices"]) == 32 and not set(selection["indices"]) & set(selection["sqnr_indices"])

    runs = mlflow_runs(isolated_home)
    parent = next(r for r in runs if r.info.run_id == summary["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["quantize.weight.bits"] == "8"
    assert parent.data.tags["spec_hash"] == saved["spec_hash"]
    assert parent.data.metrics["quantized.accuracy"] == q["accuracy"]
    stages = {r.data.tags.get("stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"collect_trajectories", "quantize", "evaluate_fp", "evaluate_quantized"} <= stages
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    listed = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec", "calibration", "plan", "samples", "report.md", "summary.json"} <= listed
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plan")} >= {"plan/plan.json"}
    assert (Path(saved["samples"]["grid"])).read_bytes()[:4] == b"\x89PNG"
    assert "| accuracy |" in (tmp_path / "out" / "report.md").read_text()
    # registered as version 1 of digits-unet; the first version that passes its gates is champion
    assert saved["model"]["registered"] == "1" and saved["model"]["alias"] == "champion"
    assert saved["model"]["promotion"]["passed"] is True
    version = client.get_model_version("digits-unet", "1")
    assert version.run_id == parent.info.run_id
    assert version.tags["spec_hash"] == saved["spec_hash"] and version.tags["fp_baseline_run"] in {
        r.info.run_id for r in runs
    }
    assert {"plan_sha256", "git_sha", "diffquant_version", "metric.fd_real", "promotion.reasons"} <= version.tags.keys()
    assert version.tags["model.weights_sha256"] == saved["model"]["weights_sha256"]  # what a checkpoint run skips on
    assert version.tags["device_class"] == "orin"  # export.device_class unset: the tensorrt target's default
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "model")} >= {
        "model/plan.json",
        "model/quantizer_scales.safetensors",
        "model/spec.yaml",
        "model/manifest.json",
        "model/onnx",
    }
    assert "Registry: `digits-unet` version 1 (passed its gates)" in (tmp_path / "out" / "report.md").read_text()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["compress-summary"]))
        )
    assert artifacts and "| accuracy |" in artifacts[-1].data


def test_failure_marks_run_failed_and_writes_no_summary(isolated_home, tmp_path, monkeypatch):
    from diffquant.tasks import calibrate

    def broken(*args, **kwargs):
        raise DataError("injected: calibration inputs contain NaN")

    monkeypatch.setattr(calibrate, "quantize", broken)
    with pytest.raises(DataError, match="injected"):
        run_flow(tmp_path / "out")
    runs = mlflow_runs(isolated_home)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_pool_is_cached_across_runs_and_artifacts_logged(isolated_home, tmp_path):
    first = run_flow(tmp_path / "a", ["calibration.strategy=density_diversity"])
    second = run_flow(tmp_path / "b", ["calibration.strategy=uniform_timesteps", "calibration.size=20"])
    assert first["calibration"]["pool_cache_hit"] is False
    assert second["calibration"]["pool_cache_hit"] is True
    assert second["calibration"]["pool_path"] == first["calibration"]["pool_path"]
    selection = json.loads(Path(second["calibration"]["selection_path"]).read_text())
    assert selection["strategy"] == "uniform_timesteps" and len(selection["indices"]) == 20
    assert sum(selection["timestep_histogram"].values()) == 20
    assert max(selection["timestep_histogram"].values()) - min(selection["timestep_histogram"].values()) <= 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=first["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(first["run_id"], "calibration")}
    assert {
        "calibration/selection.json",
        "calibration/timestep_histogram.png",
        "calibration/features_pca.png",
    } <= logged
    # a different pool seed is a different cache entry
    third = run_flow(tmp_path / "c", ["calibration.seed=1"])
    assert third["calibration"]["pool_cache_hit"] is False


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_deleted_or_truncated_cached_pool_is_collected_again(isolated_home, tmp_path, damage):
    """A cached pool whose file is gone or no longer has its recorded sha256 is recomputed, not trusted."""
    first = run_flow(tmp_path / "a")
    pool = Path(first["calibration"]["pool_path"])
    if damage == "delete":
        pool.unlink()
    else:
        pool.write_bytes(pool.read_bytes()[: pool.stat().st_size // 2])
    second = run_flow(tmp_path / "b")
    assert second["calibration"]["pool_cache_hit"] is False
    assert Path(second["calibration"]["pool_path"]).is_file()
    third = run_flow(tmp_path / "c")
    assert third["calibration"]["pool_cache_hit"] is True


def test_mixed_precision_sensitivity_on_dask_then_cached_for_the_default_runner(isolated_home, tmp_path):
    mixed = [
        "allocation={weight_bits: [4, 8], group_sizes: [32], budget: {avg_weight_bits: 6.0}, sensitivity_inputs: 16, "
        "content_samples: 10}"
    ]
    first = run_flow(tmp_path / "a", [*mixed, "runtime={runner: dask, workers: 2, layers_per_task: 16}"])
    second = run_flow(tmp_path / "b", [*mixed, "runtime.layers_per_task=16"])  # same tasks, other runner
    assert first["allocation"]["runner"]["runner"] == "dask"
    assert first["allocation"]["sensitivity_cache_hit"] is False
    assert first["allocation"]["sensitivity_tasks_cached"] == 0
    assert second["allocation"]["sensitivity_cache_hit"] is True
    assert second["allocation"]["sensitivity_tasks"] == first["allocation"]["sensitivity_tasks"] > 1
    # the rows computed in Dask workers equal an in-process measurement of the same layers
    from diffquant.mixed_precision.allocate import measure_allocation_sensitivity
    from diffquant.mixed_precision.sensitivity import SensitivityTable
    from diffquant.models.loading import load_model
    from diffquant.tasks.common import load_trajectories

    table = SensitivityTable.load_csv(Path(first["allocation"]["sensitivity_csv"]))
    spec = load_spec(overrides=SMALL + mixed)
    calib = load_trajectories(tmp_path / "a" / "calibration" / "calibration_set.safetensors")
    layers = ["conv_in", "mid_block.resnets.0.conv1"]
    local = measure_allocation_sensitivity(
        load_model("digits-unet"),
        calib,
        spec.allocation,
        weight_observer=spec.quantize.weight.observer,
        activation_observer=spec.calibration.observer,
        steps=spec.sampler.steps,
        seed=spec.evaluate.seed,
        layers=layers,
    )
    for row in local.rows:
        key = (row["layer"], row["kind"], row["bits"], row["group_size"])
        assert table.noise(*key) == pytest.approx(row["noise"], rel=1e-3, abs=1e-9)
    assert table.has("mid_block.resnets.0.conv1", "weight", 4, 32) and not table.has("conv_in", "weight", 4, 32)
    assert first["allocation"]["usage"]["avg_weight_bits"] <= 6.0 + 1e-6
    plan = json.loads(Path(first["plan"]["path"]).read_text())["layers"]
    # the default device class (orin) runs group-wise weights on Linear layers only: the record says so
    answer = json.loads(Path(first["allocation"]["allocation_path"]).read_text())
    assert answer["device_class"] == "orin" and "not on a conv" in answer["removed_options"]["w4g32a8"]
    assert not any((cfg["weight"] or {}).get("group_size") for name, cfg in plan.items() if "conv" in name)
    assert {cfg["weight"]["bits"] for cfg in plan.values() if cfg["weight"]} == {4, 8}
    family = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}  # pinned to float
    assert {name for name, cfg in plan.items() if cfg["weight"] is None and cfg["activation"] is None} == family
    # the family's content layers (every time_emb_proj) carry a content score of final samples
    assert table.content("mid_block.resnets.0.time_emb_proj", "weight", 4) > 0
    assert "mixed precision" in first["plan"]["description"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=first["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(first["run_id"], "sensitivity")}
    assert logged == {"sensitivity/sensitivity.csv", "sensitivity/sensitivity_heatmap.png"}


def test_finetune_stage_trains_evaluates_and_keeps_the_better_model(isolated_home, tmp_path):
    summary = run_flow(
        tmp_path / "ft",
        [
            "quantize.weight.bits=4",
            "quantize.keep_full_precision=[]",
            "finetune={steps: 30, batch_size: 32, checkpoint_every: 10, trainable: {rule: attention, layers: [conv_out]}}",
        ],
    )
    ft = summary["finetune"]
    assert ft["kept"] in {"finetuned", "ptq"} and ft["steps"] == 30 and ft["trainable_parameters"] > 0
    assert set(summary["metrics"]) == {"fp", "ptq", "quantized"}
    kept = ft["after"] if ft["kept"] == "finetuned" else ft["before"]
    assert summary["metrics"]["quantized"] == kept
    assert ft["after"]["fd_fp"] <= ft["before"]["fd_fp"] or ft["kept"] == "ptq"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    history = client.get_metric_history(summary["run_id"], "finetune.loss")
    assert {m.step for m in history} == set(range(30))  # every step
    assert summary["export"]["parity"]["passed"] is True
    if ft["kept"] == "finetuned":
        files = {a.path for a in client.list_artifacts(summary["run_id"], "model")}
        assert "model/finetuned_denoiser.safetensors" in files


def test_compress_for_onnxruntime_exports_the_integer_form(isolated_home, tmp_path):
    from diffquant.export.onnx import onnx_target
    from diffquant.quant.plan import LayerPlan

    summary = run_flow(tmp_path / "out", ["export.target=onnxruntime"])
    saved = json.loads(Path(summary["summary_path"]).read_text())
    plan_path = Path(saved["plan"]["path"])
    assert json.loads(plan_path.read_text())["version"] == 2
    plan = LayerPlan.load(plan_path)
    outputs = {name for name, cfg in plan.items() if cfg.output is not None}
    assert outputs and "conv_out" not in outputs and all("conv" in name for name in outputs)
    export = saved["export"]
    assert export["status"] == "exported" and export["parity"]["passed"] is True
    assert onnx_target(export["onnx"]) == "onnxruntime"
    assert "onnxruntime form" in export["engine"]["skip_reason"]
    assert export["onnx_metrics"]["onnx.accuracy"] > 0.5


def test_a_broken_export_fails_before_the_evaluation(isolated_home, tmp_path, monkeypatch):
    """The parity pre-check runs right after quantization: a mismatch costs seconds and no evaluation runs."""
    from diffquant.errors import ParityError
    from diffquant.tasks import evaluate, onnx_export

    calls = []
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: calls.append(1))

    def wrong(*args, **kwargs):
        raise ParityError("injected: 3.1e-01 of denoiser output elements differ")

    monkeypatch.setattr(onnx_export, "check_parity", wrong)
    with pytest.raises(ParityError, match="injected"):
        run_flow(tmp_path / "out")
    assert not calls and not (tmp_path / "out" / "summary.json").exists()
    assert not list((tmp_path / "out").glob(".parity-precheck-*"))
    runs = mlflow_runs(isolated_home)
    stages = {r.data.tags.get("stage"): r.info.status for r in runs if "stage" in r.data.tags}
    assert stages["parity_precheck"] == "FAILED" and "evaluate_fp" not in stages
