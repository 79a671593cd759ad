"""The diffusion objective and samplers, separate from the network.

Schedules, respacing and the DDPM step come from diffusers' `DDPMScheduler` / `DDIMScheduler`
(linear and cosine β schedules, trailing timesteps, learned-range variance, x₀ clipping). What
diffusers has no piece for is written here: the training loss (ε- or v-prediction, min-SNR-γ
weighting, and the learned-σ variational bound of improved DDPM / DiT), classifier-free guidance
(over all channels, or the first k as DiT's sampler does), and the DDIM step (η = 0, ε re-derived
from the clipped x₀), whose diffusers version steps between the wrong timesteps (`_ddim_step`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS = ("ddim", "ddpm")


@dataclass
class DiffusionConfig:
    prediction: str = "v"  # "eps" | "v"
    schedule: str = "cosine"  # "linear" (DiT) | "cosine"
    num_timesteps: int = 1000
    min_snr_gamma: float | None = 5.0  # None: plain MSE (DiT)
    clip_x0: float | None = 1.0  # clip predicted x₀ to ±clip_x0 while sampling (None: latents)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        """The config a saved file records; its unknown keys are an error that names them."""
        if not isinstance(d, dict):
            raise ValueError(f"a diffusion config is a mapping of settings, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown diffusion config keys {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"diffusion.prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"diffusion.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}"
            )
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ValueError(
                f"diffusion.num_timesteps = {self.num_timesteps!r} is out of range; allowed: an "
                "integer >= 2"
            )
        for name in ("min_snr_gamma", "clip_x0"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(
                    f"diffusion.{name} = {value!r} is out of range; allowed: a number > 0 or null"
                )

    def schedule_args(self) -> dict:
        """The diffusers scheduler arguments of this noise schedule, for every scheduler built
        from it (training, sampling, an export's record). The linear schedule's ends scale by
        1000 / T as in improved DDPM and DiT, so that any T ends as near pure noise as 1000 does
        (diffusers' fixed 1e-4..0.02 over T = 100 stops at ᾱ = 0.36)."""
        scale = 1000 / self.num_timesteps if self.schedule == "linear" else 1.0
        return {
            "num_train_timesteps": self.num_timesteps,
            "beta_schedule": SCHEDULES[self.schedule],
            "beta_start": 1e-4 * scale,
            "beta_end": 0.02 * scale,
            "prediction_type": PREDICTIONS[self.prediction],
        }

    def sampler_args(self, learn_sigma: bool) -> dict:
        """The diffusers scheduler arguments kind-dit samples with (the schedule, x₀ clipping,
        trailing timesteps so that sampling starts at t = T − 1, and the DDPM variance), for its
        own samplers and for an export's record, so that `DDPMScheduler(**record)` steps through
        the timesteps kind-dit does."""
        return self.schedule_args() | {
            "clip_sample": self.clip_x0 is not None,
            "clip_sample_range": self.clip_x0 or 1.0,
            "timestep_spacing": "trailing",
            "variance_type": "learned_range" if learn_sigma else "fixed_small",
        }


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _discretized_gaussian_nll(x, mean, log_scale):
    """-log p(x) of data quantised to 256 levels in [-1, 1] under N(mean, exp(log_scale)²)."""

    def cdf(v):
        return 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))

    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(
            x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
        ),
    )
    return -log_probs


class Diffusion:
    """Forward process q(x_t | x₀), the training loss, and reverse-process sampling."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.train_scheduler = DDPMScheduler(**config.schedule_args())
        ab = self.train_scheduler.alphas_cumprod.double()
        self.alphas_cumprod = ab.float()
        self.snr = (ab / (1 - ab)).float()
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        betas = 1 - ab / ab_prev
        post_var = betas * (1 - ab_prev) / (1 - ab)
        # coefficients of the true posterior q(x_{t-1} | x_t, x₀) for the variational bound
        self.post_coef_x0 = (betas * ab_prev.sqrt() / (1 - ab)).float()
        self.post_coef_xt = ((1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)).float()
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])).float()
        self.log_betas = torch.log(betas).float()
        self._placed: dict[tuple[str, torch.device], torch.Tensor] = {}  # `_at`'s device copies

    def _at(self, table: str, t: torch.Tensor, ndim: int = 1) -> torch.Tensor:
        """The schedule table named `table` at timesteps t [B], shaped [B, 1, ...] to broadcast
        over `ndim` dims. Each table goes to t's device once: a copy from host memory to a GPU
        waits for the GPU, so copying per call would sync the host in every training step."""
        key = (table, t.device)
        if key not in self._placed:
            self._placed[key] = getattr(self, table).to(t.device)
        return self._placed[key][t].view(-1, *([1] * (ndim - 1)))  # [B, 1, 1, 1]

    def loss(
        self,
        model: Callable,
        x0: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        route: object | None = None,
    ) -> torch.Tensor:
        """Per-sample loss [B] for clean data x0 [B, C, H, W], labels y, timesteps t and noise;
        `route` (a KIND model's, built once for the batch) goes to the model."""
        ab = self._at("alphas_cumprod", t, x0.dim())
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        out = model(xt, t, y) if route is None else model(xt, t, y, route=route)  # [B, C(2C), H, W]
        C = x0.shape[1]
        pred, var_out = out[:, :C], out[:, C:]
        target = (
            noise if self.config.prediction == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        )
        mse = ((pred - target) ** 2).flatten(1).mean(1)  # [B]
        if self.config.min_snr_gamma is not None:
            snr = self._at("snr", t)  # [B]
            denom = snr if self.config.prediction == "eps" else snr + 1
            mse = mse * snr.clamp(max=self.config.min_snr_gamma) / denom
        if var_out.shape[1]:
            mse = mse + self._vb(pred.detach(), var_out, x0, xt, t)
        return mse

    def _predict_x0(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self._at("alphas_cumprod", t, xt.dim())
        if self.config.prediction == "eps":
            return (xt - (1 - ab).sqrt() * pred) / ab.sqrt()
        return ab.sqrt() * xt - (1 - ab).sqrt() * pred

    def _vb(self, pred, var_out, x0, xt, t) -> torch.Tensor:
        """Variational-bound term for the learned variance (improved DDPM's hybrid loss, as in DiT):
        the mean is frozen (pred detached) so the bound trains the variance only. In bits/dim."""
        n = x0.dim()
        x0_hat = self._predict_x0(pred, xt, t)
        mean_true = self._at("post_coef_x0", t, n) * x0 + self._at("post_coef_xt", t, n) * xt
        mean_pred = self._at("post_coef_x0", t, n) * x0_hat + self._at("post_coef_xt", t, n) * xt
        min_log, max_log = self._at("post_logvar", t, n), self._at("log_betas", t, n)
        frac = (var_out + 1) / 2
        logvar_pred = frac * max_log + (1 - frac) * min_log
        kl = _normal_kl(mean_true, min_log, mean_pred, logvar_pred).flatten(1).mean(1)
        nll = _discretized_gaussian_nll(x0, mean_pred, 0.5 * logvar_pred).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def scheduler(self, sampler: str, steps: int, learn_sigma: bool):
        """A diffusers scheduler for `sampler` ("ddim" η=0, or "ddpm" ancestral), respaced to `steps`."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if not 1 <= steps <= self.config.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.config.num_timesteps}, got {steps}")
        args = self.config.sampler_args(learn_sigma)
        if sampler == "ddim":  # η = 0: no variance to choose
            del args["variance_type"]
        sched = (DDIMScheduler if sampler == "ddim" else DDPMScheduler)(**args)
        sched.set_timesteps(steps)
        return sched

    @torch.no_grad()
    def sample(
        self,
        model: Callable,
        y: torch.Tensor,
        shape: tuple[int, ...],
        *,
        null_id: int,
        sampler: str = "ddim",
        steps: int = 50,
        cfg_scale: float = 1.0,
        guided_channels: int | None = None,
        generators: list[torch.Generator] | None = None,
        learn_sigma: bool = False,
        progress: Callable | None = None,
    ) -> torch.Tensor:
        """Draw samples [B, *shape] in the data range for labels y [B].

        `generators` holds one generator per sample, so a sample depends only on its own seed, not on
        the batch it was drawn in. Classifier-free guidance: see `guide`.
        """
        device = y.device
        sched = self.scheduler(sampler, steps, learn_sigma)
        x = randn_tensor((len(y), *shape), generator=generators, device=device)
        C = shape[0]
        if guided_channels is not None and not 1 <= guided_channels <= C:
            raise ValueError(
                f"guided_channels = {guided_channels} is out of range for {C}-channel samples; "
                f"allowed: 1..{C}, or unset for every channel"
            )
        guided = cfg_scale != 1.0
        y_in = torch.cat([y, torch.full_like(y, null_id)]) if guided else y
        timesteps = progress(sched.timesteps) if progress else sched.timesteps
        # a KIND model's route, built once for every step (the labels do not change); a compiled
        # model's is static, its shapes set by the batch size, so one compile serves any classes
        route = (
            model.route(y_in.cpu(), blocked=not compiled(model))
            if hasattr(model, "route")
            else None
        )
        kwargs = {} if route is None else {"route": route}
        after = [int(t) for t in sched.timesteps[1:]] + [-1]  # each step's target; -1: clean
        for t, t_prev in zip(timesteps, after, strict=True):
            x_in = torch.cat([x, x]) if guided else x
            t_in = torch.full((len(y_in),), int(t), device=device, dtype=torch.long)
            out = model(x_in, t_in, y_in, **kwargs)  # [B or 2B, C or 2C, H, W]
            if guided:
                out = guide(*out.chunk(2), cfg_scale, guided_channels or C)
            if sampler == "ddim":
                x = self._ddim_step(out[:, :C], x, t_in[: len(x)], t_prev)
            else:  # the last step lands on the clean data: its mean, no noise (iDDPM, DiT)
                step = sched.step(out, t, x, generator=generators)
                x = step.prev_sample if t_prev >= 0 else step.pred_original_sample
        return x

    def _ddim_step(
        self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_prev: int
    ) -> torch.Tensor:
        """x_t -> x_{t_prev} by DDIM (η = 0) from the model's prediction; t_prev = -1 is the clean
        data (ᾱ = 1). Written here because diffusers' DDIMScheduler steps to t − T // steps,
        which with trailing spacing is not the next timestep unless steps divides T, and for
        some step counts ends short of the clean data."""
        x0 = self._predict_x0(pred, x, t)
        if self.config.clip_x0 is not None:
            x0 = x0.clamp(-self.config.clip_x0, self.config.clip_x0)
        if t_prev < 0:
            return x0
        n = x.dim()
        ab = self._at("alphas_cumprod", t, n)  # [B, 1, 1, 1]
        ab_prev = self._at("alphas_cumprod", torch.full_like(t, t_prev), n)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # the noise the (clipped) x̂₀ implies
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


def compiled(model: Callable) -> bool:
    """Whether `model` runs through torch.compile: wrapped (`torch.compile(model)`) or compiled in
    place (`model.compile()`). torch has no public test for either; a wrapped model is dynamo's
    `OptimizedModule`, and dynamo is loaded once anything has been compiled."""
    dynamo = sys.modules.get("torch._dynamo")
    wrapped = dynamo is not None and isinstance(model, dynamo.OptimizedModule)
    return wrapped or getattr(model, "_compiled_call_impl", None) is not None


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance of a model's output: uncond + s · (cond − uncond) on its first
    `channels` channels, the conditional output on the rest (the other prediction channels and a
    learned variance). DiT's sampler guides 3 of its 4 latent channels (`forward_with_cfg`);
    `channels` = 3 reproduces it for imported DiT weights, every channel is this project's default.
    """
    # cond, uncond: [B, C or 2C, H, W] -> [B, C or 2C, H, W]
    mixed = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mixed, cond[:, channels:]], dim=1)
