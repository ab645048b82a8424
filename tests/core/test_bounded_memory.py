"""Bounded memory: streamed and memory-mapped files, batch limits, one disk read per model, peak memory, cost counts."""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from diffquant.calibration.pool import collect_pool, subset
from diffquant.calibration.selection import select
from diffquant.cost import estimate_cost, stage_work
from diffquant.errors import DataError
from diffquant.finetuning.distill import accumulate_gradients, distill, prepare_student, select_layers, teacher_targets
from diffquant.memory import PeakMemory
from diffquant.mixed_precision.allocate import measure_allocation_sensitivity
from diffquant.models.cache import clear_model_cache, disk_reads, model_copy
from diffquant.models.loading import load_local_model
from diffquant.models.reference import load_classifier
from diffquant.placement import place
from diffquant.ptq import quantize_model
from diffquant.quant.plan import ActivationConfig, WeightConfig, quantizable_layers, uniform_plan
from diffquant.spec import CalibrationSpec, FinetuneSpec, SamplerSpec, SpecError, spec_from_dict
from diffquant.storage import check_safetensors, mapped_safetensors, stream_safetensors
from tests.conftest import save_tiny_unet


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(0, 7), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_streamed_safetensors_hold_the_concatenated_chunks(tmp_path_factory, sizes, seed):
    folder = tmp_path_factory.mktemp("stream")
    generator = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(n, 3, 2, generator=generator) for n in sizes]
    labels = torch.randint(0, 9, (sum(sizes), 5), generator=generator)
    target = folder / "pool.safetensors"
    with stream_safetensors(target) as stream:
        for chunk in chunks:
            stream.append("x", chunk)
        stream.append("labels", labels)
    check_safetensors(target)
    loaded, mapped = load_file(str(target)), mapped_safetensors(target)
    assert torch.equal(loaded["x"], torch.cat(chunks)) and torch.equal(loaded["labels"], labels)
    assert torch.equal(mapped["x"], torch.cat(chunks)) and torch.equal(mapped["labels"], labels)


def test_a_failed_stream_leaves_nothing_and_chunks_must_match(tmp_path):
    target = tmp_path / "pool.safetensors"
    with pytest.raises(RuntimeError, match="boom"), stream_safetensors(target) as stream:
        stream.append("x", torch.ones(2, 3))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="does not match"), stream_safetensors(target) as stream:
        stream.append("x", torch.ones(2, 3))
        stream.append("x", torch.ones(2, 4))
    with pytest.raises(ValueError, match="was closed"), stream_safetensors(target) as stream:
        stream.append("x", torch.ones(2, 3))
        stream.append("t", torch.ones(2))
        stream.append("x", torch.ones(2, 3))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_unet(tmp_path_factory.mktemp("m") / "u")
    model = load_local_model(folder)
    model.num_classes, model.null_class = 10, 10
    return folder, model


def _batches(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    handle = module.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    return sizes, handle


def test_a_streamed_pool_equals_the_in_memory_pool_within_the_batch(tiny, tmp_path):
    _, model = tiny
    sampler = SamplerSpec(steps=3, guidance=2.0)
    sizes, handle = _batches(model.unet)
    try:
        memory = collect_pool(model, 5, sampler, seed=1, batch_size=5)
        streamed = collect_pool(model, 5, sampler, seed=1, batch_size=5, out=tmp_path / "pool.safetensors")
    finally:
        handle.remove()
    assert max(sizes) <= 5 and len(memory) == 5 * 3 * 2
    for name in ("x", "t", "labels"):
        assert torch.equal(getattr(memory, name), getattr(streamed, name)), name


def test_a_pool_with_non_finite_inputs_is_refused_and_not_written(tiny, tmp_path):
    _, model = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(DataError, match="NaN or inf"):
        collect_pool(broken, 2, 3, out=tmp_path / "pool.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_model_is_read_once_per_process_and_each_copy_is_private(tiny):
    folder, _ = tiny
    clear_model_cache()
    reads = disk_reads()
    first, second = model_copy(path=folder), model_copy(path=folder)
    assert disk_reads() == reads + 1 and first.weights_sha256 == second.weights_sha256
    with torch.no_grad():
        first.unet.conv_in.weight.add_(1.0)
    third = model_copy(path=folder)
    assert torch.equal(third.unet.conv_in.weight, second.unet.conv_in.weight)
    assert not torch.equal(first.unet.conv_in.weight, second.unet.conv_in.weight)
    weights = folder / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed file is read again
    model_copy(path=folder)
    assert disk_reads() == reads + 2


def test_micro_batches_add_up_to_the_whole_batch_gradient_and_given_targets_train_as_the_teacher(tiny, tmp_path):
    _, model = tiny
    pool = collect_pool(model, trajectories=4, steps=4, seed=0)
    plan = uniform_plan(model.unet, WeightConfig(4), ActivationConfig(8))
    quantized = quantize_model(model, plan, subset(pool, select(pool, "random", 16, 0)), CalibrationSpec())
    cfg = FinetuneSpec(steps=2, batch_size=8, lr=1e-2, rank=2, seed=1)
    layers = select_layers(quantized.unet)
    # float64 keeps batch-size rounding away from the quantizers' rounding boundaries (their grid stays float32)
    student = place(copy.deepcopy(quantized.unet), torch.device("cpu"), torch.float64)
    prepare_student(student, layers, cfg)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)  # every adapter parameter gets a gradient
    targets = teacher_targets(model.unet, pool, True, batch_size=5)
    assert torch.allclose(targets, teacher_targets(model.unet, pool, True), atol=1e-6)
    rows = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:10]

    def gradients(batch_size):
        student.zero_grad(set_to_none=True)
        sizes, handle = _batches(student)
        try:
            loss = accumulate_gradients(student, pool, targets, rows, True, batch_size)
        finally:
            handle.remove()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        return loss, grads, sizes

    whole_loss, whole, whole_sizes = gradients(None)
    split_loss, split, split_sizes = gradients(3)
    assert whole_sizes == [10] and split_sizes == [3, 3, 3, 1] and whole.keys() == split.keys() and whole
    assert float(split_loss) == pytest.approx(float(whole_loss), rel=1e-9)
    assert all(torch.allclose(split[n], whole[n], rtol=1e-5, atol=1e-9) for n in whole)  # scales stay float32

    def train(folder, **extra):
        trained = copy.deepcopy(quantized.unet)
        distill(trained, extra.pop("teacher", model.unet), pool, True, layers, cfg, tmp_path / folder, **extra)
        return trained.state_dict()

    from_teacher, from_targets = (
        train("teacher"),
        train("targets", teacher=None, targets=teacher_targets(model.unet, pool, True)),
    )
    assert all(torch.equal(from_teacher[k], from_targets[k]) for k in from_teacher)


def test_peak_memory_sees_a_short_allocation():
    with PeakMemory(interval=0.002) as peak:
        block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        time.sleep(0.05)
        del block
    use = peak.result
    assert use is not None and use.peak_rss_bytes - use.start_rss_bytes > 200 * 2**20
    assert use.end_rss_bytes < use.peak_rss_bytes and use.peak_cuda_bytes is None


def test_runtime_batch_size_caps_every_pass_and_stays_out_of_the_hash():
    base = spec_from_dict({})
    capped = spec_from_dict({"runtime": {"batch_size": 8}})
    assert "batch_size" not in base.to_dict()["runtime"] and capped.to_dict()["runtime"]["batch_size"] == 8
    assert capped.spec_hash() == base.spec_hash()
    assert (base.forward_batch, base.sampling_batch) == (256, 256)
    assert (capped.forward_batch, capped.sampling_batch) == (8, 8)
    with pytest.raises(SpecError, match=r"runtime\.batch_size 1 cannot hold a guided"):
        spec_from_dict({"runtime": {"batch_size": 1}, "sampler": {"guidance": 2.0}})


def _counting(module: torch.nn.Module) -> tuple[dict[str, int], torch.utils.hooks.RemovableHandle]:
    counts = {"inputs": 0, "calls": 0}

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        counts["inputs"] += int(args[0].shape[0])
        counts["calls"] += 1

    return counts, module.register_forward_pre_hook(hook)


@pytest.mark.parametrize(("layers_per_task", "content"), [(1000, []), (4, ["*attentions.0.to_q"])])
def test_the_sensitivity_count_is_what_the_measurement_runs(tiny, layers_per_task, content):
    """Brute-force oracle: the estimate's sensitivity evaluations and calls are those of hooked measurements,
    one per task of ``runtime.layers_per_task`` layers as the flow runs them (content layers add probes)."""
    _, model = tiny
    spec = spec_from_dict(
        {
            "sampler": {"steps": 2, "guidance": 2.0},
            "calibration": {"trajectories": 4, "size": 6, "batch_size": 4},
            "evaluate": {"batch_size": 6},
            "runtime": {"layers_per_task": layers_per_task},
            "allocation": {
                "weight_bits": [4],
                "group_bits": [4],
                "group_sizes": [8],
                "activation_bits": [8],
                "sensitivity_inputs": 6,
                "content_layers": content,
                "content_samples": 10,
            },
        }
    )
    pool = collect_pool(model, 4, spec.sampler)
    calib = subset(pool, select(pool, "random", spec.calibration.size, 0))
    names = quantizable_layers(model.unet)
    counts, handle = _counting(model.unet)
    try:
        for start in range(0, len(names), layers_per_task):
            measure_allocation_sensitivity(
                model,
                calib,
                spec.allocation,
                steps=spec.sampler,
                classifier=load_classifier(),
                layers=names[start : start + layers_per_task],
                batch_size=spec.forward_batch,
                sample_batch_size=spec.sampling_batch,
            )
    finally:
        handle.remove()
    stage = next(s for s in stage_work(spec, model) if s.stage == "sensitivity")
    assert (stage.evaluations, stage.calls) == (counts["inputs"], counts["calls"])


def test_the_estimate_covers_every_stage_with_measured_costs(tiny):
    _, model = tiny
    spec = spec_from_dict({"sampler": {"steps": 4}, "calibration": {"trajectories": 4, "size": 8}, "finetune": {}})
    estimate = estimate_cost(spec, model)
    names = [s.stage for s in estimate.stages]
    assert names[:2] == ["collect_trajectories", "select_calibration"] and "finetune" in names
    assert {"fp", "quantized", "onnx", "train"} <= estimate.costs.kinds.keys()
    assert all(s.seconds > 0 and s.peak_bytes > 0 for s in estimate.stages if s.evaluations)
    collect = estimate.stages[0]
    assert collect.evaluations == 4 * 4 and collect.calls == 4  # trajectories x steps; one batch per step
    data = estimate.to_dict()
    assert data["evaluations"] == sum(s["evaluations"] for s in data["stages"].values())
    assert math.isclose(data["seconds"], sum(s["seconds"] for s in data["stages"].values()))
    cached = estimate_cost(spec, model, costs=estimate.costs, pool_cached=True, fp_cached=True)
    assert cached.stages[0].evaluations == 0 and cached.evaluations < estimate.evaluations


def test_model_copies_are_independent_of_the_source_path_spelling(tiny):
    folder, _ = tiny
    clear_model_cache()
    reads = disk_reads()
    model_copy(path=folder)
    model_copy(path=Path(str(folder) + "/"))
    assert disk_reads() == reads + 1
