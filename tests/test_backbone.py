"""Backbone loading through open_clip: names, local checkpoints, errors."""
import pytest
import torch

from clip.backbone import FrozenCLIP, calibrate_batchnorm, load_open_clip
from utils import RaftError


def test_unknown_backbones_name_the_closest():
    # any open_clip name is a backbone (tests/test_models.py); a name open_clip lacks is one line
    with pytest.raises(RaftError, match=r"unknown backbone 'RN51' \(did you mean RN50"):
        load_open_clip("RN51", "openai")
    with pytest.raises(RaftError, match=r"unknown backbone 'tiny-vt' \(did you mean tiny-vit"):
        load_open_clip("tiny-vt", None)
    with pytest.raises(RaftError, match="weights file not found"):
        load_open_clip("RN50", "/nonexistent/RN50.pt")


def test_random_backbones_are_reproducible_and_frozen(tiny_clip):
    again = FrozenCLIP(load_open_clip("tiny-rn", None), "tiny-rn")
    assert again.fingerprint() == tiny_clip.fingerprint()
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    tiny_clip.train()
    assert not tiny_clip.model.training


@pytest.mark.slow
def test_sizes_are_read_from_the_model_not_hard_coded():
    clip = FrozenCLIP(load_open_clip("RN50", None), "RN50")   # random RN50: sizes only
    assert (clip.feature_channels, clip.embed_dim, clip.grid, clip.image_size) == (2048, 1024, 7, 224)
    assert clip.attnpool.num_heads == 32


@pytest.mark.slow
def test_local_checkpoints_state_dict_and_torchscript(tmp_path, tiny_clip):
    sd = tiny_clip.model.state_dict()
    path = tmp_path / "tiny.pt"
    torch.save(sd, path)
    loaded = load_open_clip("tiny-rn", str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    # OpenAI's own downloads are TorchScript archives: read them without unpickling code
    scripted = tmp_path / "tiny_jit.pt"
    torch.jit.script(tiny_clip.model).save(str(scripted))
    loaded = load_open_clip("tiny-rn", str(scripted))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(RaftError, match="RN101"):
        load_open_clip("RN101", str(scripted))


def test_batchnorm_calibration_makes_random_features_differ(tiny_clip):
    clip = FrozenCLIP(load_open_clip("tiny-rn", None), "tiny-rn")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 96, 96, generator=g) * torch.rand(16, 3, 1, 1, generator=g) * 4 - 2

    def spread():
        v = torch.nn.functional.normalize(clip.encode_image(images)[1], dim=-1)
        return 1 - (v @ v.T).mean().item()

    before, fp = spread(), clip.fingerprint()
    assert calibrate_batchnorm(clip, [images[:8], images[8:]]) == 16
    assert spread() > before and clip.fingerprint() != fp
    assert not clip.model.training
