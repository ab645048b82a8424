"""CPU sampling runs its batches side by side (``diffquant.sampling.batch_workers``) with the serial loop's result."""

from __future__ import annotations

import threading

import pytest
import torch

from diffquant.models.loading import load_model
from diffquant.sampling import batch_workers, initial_noise, map_batches, run_sampler
from diffquant.spec import SamplerSpec


@pytest.fixture(scope="module")
def model():
    return load_model("digits-unet")


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _sample(model, n: int, batch: int, sampler: SamplerSpec) -> torch.Tensor:
    conditions, _ = model.conditions(n, "evaluation")
    noise = initial_noise(n, model.sample_shape, 0)
    images, _ = run_sampler(
        model.unet, model.scheduler_config, noise, conditions, sampler, batch, null=model.null_conditions(n)
    )
    return images


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_side_by_side_batches_give_the_serial_samples(model, two_threads, monkeypatch, guidance):
    sampler = SamplerSpec(steps=4, guidance=guidance)
    parallel = _sample(model, 24, 8, sampler)  # 3 (unguided) or 6 (guided) batches, 2 at a time
    monkeypatch.setattr("diffquant.sampling.batch_workers", lambda *args: 1)
    serial = _sample(model, 24, 8, sampler)
    # one intra-op thread may sum in another order than two: equal to float rounding (bit-equal at
    # batch 256 on this model, 2e-6 apart after 20 steps at batch 8)
    torch.testing.assert_close(parallel, serial, rtol=0, atol=1e-5)
    assert torch.get_num_threads() == 2  # restored


def test_workers_only_for_a_cpu_torch_model_in_the_main_thread(model, two_threads):
    cpu = torch.device("cpu")
    assert batch_workers(model.unet, cpu, 5) == 2
    assert batch_workers(model.unet, cpu, 1) == 1  # one batch: nothing to share
    assert batch_workers(model.unet, torch.device("cuda"), 5) == 1
    assert batch_workers(torch.nn.Identity(), cpu, 5) == 1  # no parameters: an onnxruntime session or alike
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(batch_workers(model.unet, cpu, 5)))
    worker.start()
    worker.join()
    assert seen == [1]  # a worker thread of a parallel stage leaves torch's thread count alone


def test_map_batches_keeps_order_restores_threads_and_grad_mode(two_threads):
    modes: list[bool] = []

    def fn(start: int) -> torch.Tensor:
        modes.append(torch.is_grad_enabled())
        assert torch.get_num_threads() == 1
        return torch.tensor([start])

    with torch.no_grad():
        out = map_batches(fn, range(0, 50, 10), workers=2)
    assert [int(t) for t in out] == [0, 10, 20, 30, 40]
    assert modes == [False] * 5 and torch.get_num_threads() == 2

    def boom(start: int) -> torch.Tensor:
        raise RuntimeError(f"batch {start}")

    with pytest.raises(RuntimeError, match="batch 0"):
        map_batches(boom, range(0, 20, 10), workers=2)
    assert torch.get_num_threads() == 2  # restored after a failure too


def test_a_recording_pass_stays_serial(model, two_threads, monkeypatch):
    calls: list[int] = []
    real = map_batches

    def spy(fn, starts, workers):
        calls.append(workers)
        return real(fn, starts, workers)

    monkeypatch.setattr("diffquant.sampling.map_batches", spy)
    noise = initial_noise(12, model.sample_shape, 0)
    conditions, _ = model.conditions(12, "evaluation")
    _, traj = run_sampler(model.unet, model.scheduler_config, noise, conditions, SamplerSpec(steps=3), 4, record=True)
    assert calls == [1] and traj is not None
    assert traj.x.shape[0] == 36 and traj.t.tolist()[:4] == [traj.t[0].item()] * 4  # batch by batch, step by step


def test_the_cost_estimate_counts_side_by_side_batches(two_threads):
    from diffquant.cost import ForwardCosts, KindCost, StageWork, Work, _peak, _side_by_side

    kind = KindCost(0.01, 0.002, 1000.0, (1, 64), single_thread_per_input_s=0.003)
    assert kind.seconds(10, 1000) == pytest.approx(10 * 0.01 + 1000 * 0.002)
    assert kind.seconds(10, 1000, side_by_side=2) == pytest.approx((10 * 0.01 + 1000 * 0.003) / 2)
    assert KindCost(0.01, 0.002, 1000.0, (1, 64)).seconds(10, 1000, 2) == pytest.approx(2.1)  # not timed: serial

    def costs(device: str) -> ForwardCosts:
        return ForwardCosts(device, "float32", {"quantized": kind}, 0, 0.0, 0, 0.0)

    sampling = Work("quantized", 1000, 40, 256, "samples", batches=4)
    assert _side_by_side(sampling, costs("cpu")) == 2
    assert _side_by_side(sampling, costs("cuda:0")) == 1
    assert _side_by_side(Work("onnx", 1000, 40, 256, "onnx samples", batches=4), costs("cpu")) == 1  # its own threads
    assert _side_by_side(Work("fp", 1000, 40, 256, "recorded", batches=1), costs("cpu")) == 1

    stage = StageWork("evaluate_quantized", [sampling])
    assert _peak(stage, costs("cpu")) == 2 * 256 * 1000  # two batches' activations at once
    assert _peak(stage, costs("cuda:0")) == 256 * 1000
