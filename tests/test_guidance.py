"""Classifier-free guidance over every channel (this project's default) or the first k (DiT's
sampler guides 3 of its 4 latent channels; imported DiT weights sample that way)."""

import pytest
import torch

from kind.core.diffusion import Diffusion, DiffusionConfig, guide
from kind.core.model import DiT, ModelConfig
from kind.training.config import SampleConfig


def test_guide_mixes_the_first_channels_and_keeps_the_conditional_rest():
    cond, uncond = torch.full((2, 8, 3, 3), 2.0), torch.full((2, 8, 3, 3), 1.0)
    every = guide(cond, uncond, 4.0, 4)  # 4 eps channels of a learned-sigma output: all guided
    assert torch.equal(every[:, :4], torch.full((2, 4, 3, 3), 5.0))  # 1 + 4 * (2 - 1)
    assert torch.equal(every[:, 4:], cond[:, 4:])  # the variance is the conditional one
    dit = guide(cond, uncond, 4.0, 3)
    assert torch.equal(dit[:, :3], every[:, :3]) and torch.equal(dit[:, 3:], cond[:, 3:])


def _sample(model, guided_channels):
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return Diffusion(DiffusionConfig()).sample(
        model, torch.tensor([0, 1]), (4, 8, 8), null_id=model.null_id, steps=3, cfg_scale=3.0,
        guided_channels=guided_channels, generators=gens, learn_sigma=True,
    )  # fmt: skip


def test_sampling_guides_every_channel_unless_told_otherwise():
    torch.manual_seed(0)
    model = DiT(ModelConfig(size="tiny/2", kind=False, image_size=8, in_channels=4,
                            learn_sigma=True, class_names=["a", "b"])).eval()  # fmt: skip
    for p in model.parameters():  # adaLN-Zero starts at zero output: make guidance matter
        torch.nn.init.normal_(p, std=0.05)
    every = _sample(model, None)
    assert torch.equal(every, _sample(model, 4))
    assert not torch.allclose(every, _sample(model, 3))
    with pytest.raises(ValueError, match="guided_channels = 5 is out of range"):
        _sample(model, 5)


def test_guided_channels_setting_is_checked():
    assert SampleConfig(guided_channels=3).guided_channels == 3
    with pytest.raises(ValueError, match="sample.guided_channels"):
        SampleConfig(guided_channels=0)
