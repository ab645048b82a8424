import json
import pickle

import pytest
import torch

from diffquant.errors import ModelLoadError
from diffquant.models.loading import load_local_model, load_model
from diffquant.storage import atomic_path, check_safetensors, save_safetensors
from tests.conftest import save_tiny_unet


def test_loads_local_diffusers_dir(tiny_unet_dir):
    model = load_local_model(tiny_unet_dir)
    assert model.sample_shape == (1, 8, 8)
    assert model.num_classes == 11 and model.conditional
    assert len(model.weights_sha256) == 64
    out = model.unet(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).sample
    assert out.shape == (2, 1, 8, 8)


def test_loads_pipeline_layout(tmp_path):
    save_tiny_unet(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "unet" / "scheduler_config.json").rename(
        tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    )
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert load_local_model(tmp_path / "pipe").scheduler_config["num_train_timesteps"] == 1000


def test_unconditional_model(tmp_path):
    model = load_local_model(save_tiny_unet(tmp_path / "u", num_class_embeds=None))
    assert not model.conditional and not model.digits_compatible


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(path=tmp_path / "nope")


def test_not_a_diffusers_dir(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a diffusers model"):
        load_model(path=tmp_path)


def test_unsupported_class(tiny_unet_dir):
    cfg = json.loads((tiny_unet_dir / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"
    (tiny_unet_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="AutoencoderKL"):
        load_model(path=tiny_unet_dir)


def test_pickle_bin_refused(tiny_unet_dir):
    weights = tiny_unet_dir / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({"a": torch.ones(1)}, tiny_unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(path=tiny_unet_dir)


def test_pickle_disguised_as_safetensors_refused(tiny_unet_dir):
    weights = tiny_unet_dir / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(path=tiny_unet_dir)
    torch.save({"a": torch.ones(1)}, weights)  # zip-based torch checkpoint
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(path=tiny_unet_dir)
    weights.write_bytes(b"garbage-garbage")
    with pytest.raises(ModelLoadError, match="not a safetensors"):
        load_model(path=tiny_unet_dir)


def test_missing_scheduler_config(tiny_unet_dir):
    (tiny_unet_dir / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError, match="scheduler"):
        load_model(path=tiny_unet_dir)


def test_unknown_reference_name():
    with pytest.raises(ModelLoadError, match="unknown reference model"):
        load_model(name="sdxl")


def test_safetensors_round_trip_and_atomic_failure(tmp_path):
    path = save_safetensors({"w": torch.arange(3.0)}, tmp_path / "a.safetensors")
    check_safetensors(path)
    target = tmp_path / "b.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == [path]


def test_safetensors_whose_header_length_starts_with_0x80_is_accepted(tmp_path):
    """Regression: a header of 0x..80 bytes made the first byte look like a pickle opcode."""
    import json as _json

    import torch

    from diffquant.storage import load_safetensors

    for pad in range(0, 300):
        tensors = {"x" * (1 + pad): torch.zeros(1)}
        path = save_safetensors(tensors, tmp_path / "t.safetensors")
        if path.read_bytes()[0] == 0x80:
            break
    else:
        raise AssertionError("no header length starting with 0x80 found")
    check_safetensors(path)
    assert torch.equal(next(iter(load_safetensors(path).values())), torch.zeros(1))
    assert _json.loads(path.read_bytes()[8 : 8 + path.read_bytes()[0] + 256 * path.read_bytes()[1]])


def test_text_encoder_load_draws_no_transformers_progress_bar(capfd):
    import transformers

    from diffquant.models.reference import DIGITS_T2I

    assert transformers.utils.logging.is_progress_bar_enabled()
    load_model(DIGITS_T2I)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()
