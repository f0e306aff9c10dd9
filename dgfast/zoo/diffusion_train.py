"""DiT's training objective, L_hybrid (IDDPM; Nichol & Dhariwal 2021), for the zoo's training script.

DiT trains with `create_diffusion("")`: 1000 linear-beta steps, epsilon prediction, learned-range
variance, loss type MSE. Its `training_losses` is then

    L = mean((eps - eps_theta)^2) + L_vb

where L_vb is the variational bound term of step t for the variance output only: the KL between the
true posterior q(x_{t-1} | x_t, x_0) and p_theta(x_{t-1} | x_t) whose *mean* is built from the
detached eps (stop-gradient), in bits per dimension; at t = 0 it is the discretised Gaussian
decoder NLL of x_0. (IDDPM's lambda = 0.001 on the full-chain L_vlb is this same per-step weight
of 1, since L_vlb sums 1000 such terms.) t is uniform over the 1000 steps.

All tables are float64 numpy (as the schedule in dgfast.schedule) rounded once to float32.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from dgfast.schedule import NUM_TRAIN_STEPS, base_betas


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for x in [-1, 1] quantised to 256 levels (bin width 2/255) under N(means, e^(2 log_scales))."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.dim())))


class TrainDiffusion:
    """q(x_t | x_0), the true posterior and L_hybrid for a learned-range-variance eps model."""

    def __init__(self, num_timesteps: int = NUM_TRAIN_STEPS):
        b = base_betas(num_timesteps)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "sqrt_ac": np.sqrt(ac), "sqrt_1m_ac": np.sqrt(1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac), "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1),
            "coef1": b * np.sqrt(ac_prev) / (1.0 - ac), "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
            "post_logvar": np.log(np.append(post_var[1], post_var[1:])), "log_betas": np.log(b),
        }
        self.num_timesteps = num_timesteps
        self.t = {k: torch.from_numpy(v).float() for k, v in tables.items()}

    def _at(self, name, t, like):
        return self.t[name].to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0, t, noise):
        return self._at("sqrt_ac", t, x0) * x0 + self._at("sqrt_1m_ac", t, x0) * noise

    def q_posterior(self, x0, xt, t):
        mean = self._at("coef1", t, xt) * x0 + self._at("coef2", t, xt) * xt
        return mean, self._at("post_logvar", t, xt)

    def p_mean_logvar(self, eps, v, xt, t):
        """The model's reverse mean and log-variance (DiT's p_mean_variance, no clipping)."""
        frac = (v + 1) / 2
        logvar = frac * self._at("log_betas", t, xt) + (1 - frac) * self._at("post_logvar", t, xt)
        x0 = self._at("sqrt_recip_ac", t, xt) * xt - self._at("sqrt_recipm1_ac", t, xt) * eps
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, logvar

    def vb_bits(self, eps, v, x0, xt, t):
        """Per-sample L_vb term in bits/dim (KL for t > 0, decoder NLL at t = 0)."""
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        mean, logvar = self.p_mean_logvar(eps, v, xt, t)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, y, generator: torch.Generator | None = None):
        """L_hybrid per sample: {"loss", "mse", "vb"}; t uniform in [0, T), eps ~ N(0, I)."""
        n, C = x0.shape[0], x0.shape[1]
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y)
        eps, v = out[:, :C], out[:, C:2 * C]
        mse = _mean_flat((noise - eps) ** 2)
        vb = self.vb_bits(eps.detach(), v, x0, xt, t)  # stop-gradient on the mean: vb trains the variance only
        return {"loss": mse + vb, "mse": mse, "vb": vb}
