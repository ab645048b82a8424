import pytest
import torch

from diffquant.calibration.pool import check_finite, collect_pool, held_out_indices, subset
from diffquant.calibration.ranges import calibrate_activations
from diffquant.calibration.selection import select
from diffquant.errors import DataError
from diffquant.evaluation import evaluate_model
from diffquant.models.loading import load_model
from diffquant.models.reference import load_classifier
from diffquant.quant.plan import ActivationConfig, WeightConfig, apply_plan, input_quantizers, uniform_plan
from diffquant.sampling import Trajectories


@pytest.fixture(scope="module")
def model():
    return load_model("digits-unet")


@pytest.fixture(scope="module")
def pool(model):
    return collect_pool(model, trajectories=4, steps=5, seed=0)


def test_pool_records_every_step(pool):
    assert len(pool) == 20 and pool.x.shape == (20, 1, 8, 8)
    assert pool.t.unique().numel() == 5
    assert pool.labels.tolist()[:4] == [0, 1, 2, 3]


def test_pool_is_deterministic(model, pool):
    again = collect_pool(model, trajectories=4, steps=5, seed=0)
    assert torch.equal(again.x, pool.x)
    other = collect_pool(model, trajectories=4, steps=5, seed=1)
    assert not torch.equal(other.x, pool.x)


def test_select_random(pool):
    a = select(pool, "random", 8, seed=3)
    assert a.numel() == 8 and a.unique().numel() == 8
    assert torch.equal(a, select(pool, "random", 8, seed=3))
    assert not torch.equal(a, select(pool, "random", 8, seed=4))
    rest = held_out_indices(len(pool), a, 100, seed=3)
    assert rest.numel() == 12 and not set(rest.tolist()) & set(a.tolist())


def test_select_errors(pool):
    with pytest.raises(DataError, match="pool size"):
        select(pool, "random", 21, seed=0)
    with pytest.raises(DataError, match="unknown calibration strategy"):
        select(pool, "fancy", 4, seed=0)


def test_nan_in_trajectories_is_an_error(pool):
    x = pool.x.clone()
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        check_finite(Trajectories(x, pool.t, pool.labels))


def test_calibration_sets_every_input_scale(model, pool):
    import copy

    unet = copy.deepcopy(model.unet)
    apply_plan(unet, uniform_plan(unet, WeightConfig(8), ActivationConfig(8)))
    count = calibrate_activations(unet, subset(pool, torch.arange(10)), conditional=True, batch_size=4)
    scales = [q.scale for q in input_quantizers(unet).values()]
    assert count == len(scales) > 50
    assert all(float(s) > 0 and float(s) != 1.0 for s in scales)


def test_evaluation_is_deterministic(model):
    classifier = load_classifier()
    a = evaluate_model(model, 20, 5, seed=0, batch_size=10, classifier=classifier, real_images=None)
    b = evaluate_model(model, 20, 5, seed=0, batch_size=20, classifier=classifier, real_images=None)
    assert torch.allclose(a.samples, b.samples, atol=1e-5)
    assert a.metrics["accuracy"] == b.metrics["accuracy"]
