"""Sampling: classifier-free guidance over every channel (this project's default) or the first k
(DiT's sampler guides 3 of its 4 latent channels; imported DiT weights sample that way), and the
noise schedule and sampler chains against the improved-DDPM references."""

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


def _exact_eps(diffusion: Diffusion, x0_of, var: float | None = None):
    """The ε-predictor that is exact for data whose x₀ given x_t is `x0_of(x_t, ᾱ_t)`, with a
    learned-variance output of `var` when given."""
    ab = diffusion.alphas_cumprod.double()

    def model(x, t, y):
        a = ab[t].view(-1, 1, 1, 1)
        eps = ((x.double() - a.sqrt() * x0_of(x.double(), a)) / (1 - a).sqrt()).float()
        return eps if var is None else torch.cat([eps, torch.full_like(eps, var)], 1)

    return model


@pytest.mark.parametrize("sampler, steps", [("ddim", 7), ("ddim", 13), ("ddpm", 50)])
def test_a_chain_of_any_length_ends_on_the_clean_data(sampler, steps):
    """All data at one point and an exact predictor: every chain must end there. DDIM stepped to
    t − T // steps (diffusers), which for 7 or 13 steps stops at ᾱ_0 < 1, short of the data; DDPM
    with a learned variance added noise on its last step, which iDDPM does not."""
    diffusion = Diffusion(DiffusionConfig(prediction="eps", clip_x0=None))
    model = _exact_eps(diffusion, lambda x, a: torch.full_like(x, 0.5), var=1.0)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = diffusion.sample(model, torch.zeros(2, dtype=torch.long), (1, 8, 8), null_id=1,
                           sampler=sampler, steps=steps, generators=gens, learn_sigma=True)  # fmt: skip
    torch.testing.assert_close(out, torch.full_like(out, 0.5), rtol=0, atol=1e-5)


def test_ddim_steps_between_the_timesteps_the_model_is_called_at():
    """Gaussian data N(0, ¼) and its exact predictor, against DDIM written out in float64 over the
    same timesteps: 30 steps do not divide 1000, and each step went to t − 33 while the model was
    next called at another t."""
    diffusion = Diffusion(DiffusionConfig(schedule="linear", prediction="eps", clip_x0=None))
    model = _exact_eps(diffusion, lambda x, a: a.sqrt() * 0.25 * x / (a * 0.25 + 1 - a))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = diffusion.sample(model, torch.zeros(2, dtype=torch.long), (1, 16, 16), null_id=1,
                           steps=30, generators=gens)  # fmt: skip
    ab = diffusion.alphas_cumprod.double()
    ts = diffusion.scheduler("ddim", 30, False).timesteps.tolist()
    x = torch.cat([torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(i))
                   for i in range(2)]).double()  # fmt: skip
    for t, t_prev in zip(ts, ts[1:] + [-1], strict=True):
        a, a_prev = ab[t], ab[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = a.sqrt() * 0.25 * x / (a * 0.25 + 1 - a)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * (x - a.sqrt() * x0) / (1 - a).sqrt()
    torch.testing.assert_close(out.double(), x, rtol=0, atol=1e-5)


def test_the_linear_schedule_ends_near_pure_noise_at_any_length():
    """Its ends scale by 1000 / T as in improved DDPM and DiT (diffusers' fixed 1e-4..0.02 over
    T = 100 ended at ᾱ = 0.36, far from the noise sampling starts from); T = 1000 is unchanged."""
    ab = {t: Diffusion(DiffusionConfig(schedule="linear", num_timesteps=t)).alphas_cumprod
          for t in (100, 1000)}  # fmt: skip
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(ab[1000].double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)
    betas = torch.linspace(1e-3, 0.2, 100, dtype=torch.float64)
    torch.testing.assert_close(ab[100].double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)


def test_schedule_tables_go_to_the_device_once(monkeypatch):
    """A copy of a table from host memory to a GPU waits for the GPU: the training loss must
    not copy its tables on every call (one host sync each, several a step)."""
    diffusion = Diffusion(DiffusionConfig(prediction="eps", min_snr_gamma=5.0))
    tables = [diffusion.alphas_cumprod, diffusion.snr, diffusion.post_coef_x0,
              diffusion.post_coef_xt, diffusion.post_logvar, diffusion.log_betas]  # fmt: skip
    moved = []
    to = torch.Tensor.to

    def counting(self, *args, **kwargs):
        if any(self is table for table in tables):
            moved.append(self.shape)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting)
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t, y = torch.tensor([1, 10, 100, 999]), torch.zeros(4, dtype=torch.long)

    def model(xt, t, y):  # ε and a learned variance: every table is read
        return torch.cat([xt, torch.zeros_like(xt)], 1)

    first = diffusion.loss(model, x0, y, t, noise)
    copies = len(moved)
    for _ in range(3):
        assert torch.equal(diffusion.loss(model, x0, y, t, noise), first)
    assert 0 < copies <= len(tables) and len(moved) == copies
