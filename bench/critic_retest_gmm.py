"""The MNIST-sized analytic control of `critic_retest.py`: two critics against the exact log p_t/q_t at d = 784.

p and q are isotropic Gaussian mixtures in 784 dimensions (MNIST's), so every noisy marginal, hence the exact logit
l*_t = log p_t - log q_t, is known in closed form (`calibration.exact_log_ratio`). The critic (psi + head) is
`calibration.Critic`: the engine's losses, draws and optimiser on an MLP fitted to p (an analytic teacher has no
network to copy), trained with the same config as the MNIST critics (the `mnist` preset + the sweep's RECIPE), so
the test-retest delta of two seeds can be set beside the true error of each, where both are known.

`IsotropicMixture` is `GaussianMixture` with every component's covariance s^2 I: the same maths without the
[K, d, d] eigenbasis, which at d = 784 would cost O(d^2) per sample and component (minutes per critic).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from dibregman.calibration import Critic, exact_log_ratio
from dibregman.config import override
from dibregman.draws import generator_for
from dibregman.teachers.gmm import GaussianMixture

DIM = 784  # MNIST's 28 x 28
NUM_MODES = 10  # one per digit
MEAN_STD = 0.45  # component means ~ N(0, 0.45^2 I): sigma_data ~ 0.49, as MNIST scaled to [-1, 1] (~0.5)
MODE_STD = 0.2  # isotropic std of each component
Q_WEIGHTS = (1.5, 0.5)  # q's mode weights fall linearly from 1.5 to 0.5 (p: uniform): |l*| <= log 2 at low sigma


class IsotropicMixture(GaussianMixture):
    """sum_k pi_k N(mu_k, s^2 I) with `GaussianMixture`'s interface (log_prob, denoiser, sample), O(K d) per
    sample: C_k = (s^2 + sigma^2) I needs no eigendecomposition."""

    sigma_min = 0.002  # the MNIST teacher's range, so that both settings share their sigma bins
    sigma_max = 80.0

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        nn.Module.__init__(self)
        means = torch.as_tensor(means, dtype=torch.float64)
        num_modes, d = means.shape
        w = torch.ones(num_modes, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        if w.shape != (num_modes,) or (w < 0).any() or w.sum() <= 0 or std <= 0:
            raise ValueError(f"need {num_modes} non-negative weights and std > 0, got {w.tolist()}, {std}")
        self.register_buffer("means", means)  # [K, d]
        self.register_buffer("weights", w / w.sum())  # [K]
        self.var = float(std) ** 2  # s^2 of every component
        mean = self.weights @ means
        spread = (self.weights[:, None] * (means - mean).square()).sum(0).mean()  # per-coordinate variance
        self.sigma_data = float((spread + self.var).sqrt())
        self.shape = (d,)
        self.num_modes = num_modes

    def _terms(self, x: torch.Tensor, sigma, cond=None):
        x = x.to(torch.float64).reshape(x.shape[0], -1)  # [N, d]
        var = self.var + self._sigma(sigma, x).square()  # [N]
        diff = x[:, None] - self.means[None]  # [N, K, d]
        a = diff / var[:, None, None]  # C_k^{-1} (x - mu_k)
        d = x.shape[1]
        log_pdf = -0.5 * ((diff * a).sum(-1) + d * (var.log() + math.log(2 * math.pi))[:, None])  # [N, K]
        log_joint = log_pdf + self.weights.log()[None]
        if cond is not None:
            mask = torch.nn.functional.one_hot(torch.as_tensor(cond, device=x.device).long(), self.num_modes)
            log_joint = log_joint.masked_fill(mask == 0, -math.inf)
        return x, a, log_joint

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """Exact denoiser: sum_k gamma_k (mu_k + s^2 C_k^{-1} (x - mu_k))."""
        x64, a, log_joint = self._terms(x, sigma, cond)
        x0 = torch.einsum("nk,nkd->nd", log_joint.softmax(dim=1), self.means[None] + self.var * a)
        return x0.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def sample(self, n: int, sigma: float = 0.0, generator: torch.Generator | None = None, return_labels=False):
        dev = generator.device if generator is not None else self.means.device
        labels = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.shape[0], generator=generator, device=dev, dtype=torch.float64)
        noise = torch.randn(n, self.shape[0], generator=generator, device=dev, dtype=torch.float64)
        labels, eps, noise = labels.to(self.means.device), eps.to(self.means.device), noise.to(self.means.device)
        x = (self.means[labels] + math.sqrt(self.var) * eps + sigma * noise).float()
        return (x, labels) if return_labels else x


def pair(seed: int = 0) -> tuple[IsotropicMixture, IsotropicMixture, str]:
    """(p, q, description): the same 10 modes, p uniform, q with linearly falling weights (the `unequal` pair of
    `ratio_calibration` at MNIST's dimension)."""
    g = generator_for(seed, "critic_retest_gmm_means")
    means = MEAN_STD * torch.randn(NUM_MODES, DIM, generator=g, dtype=torch.float64)
    w_q = torch.linspace(Q_WEIGHTS[0], Q_WEIGHTS[1], NUM_MODES, dtype=torch.float64)
    desc = (
        f"{NUM_MODES} modes in {DIM}-D, means ~ N(0, {MEAN_STD}^2 I), std {MODE_STD}; p uniform, q weights "
        f"linear {Q_WEIGHTS[0]:g} -> {Q_WEIGHTS[1]:g}"
    )
    return IsotropicMixture(means, MODE_STD), IsotropicMixture(means, MODE_STD, w_q), desc


def eval_set(p, q, bins: list[dict], sigma_of_t, n: int, seed: int) -> list[dict]:
    """Per bin: n fresh q samples (the generator side, where the weights are read) noised at sigma = sigma_of_t(t),
    t ~ U(bin), and their exact logit (float64, [n])."""
    g = generator_for(seed, "critic_retest_gmm_eval")
    out = []
    for b in bins:
        t_lo, t_hi = b["t"]
        sigma = sigma_of_t(t_lo + (t_hi - t_lo) * torch.rand(n, generator=g, dtype=torch.float64))
        x = q.sample(n, generator=g).double() + sigma[:, None] * torch.randn(n, DIM, generator=g, dtype=torch.float64)
        out.append({"x": x.float(), "sigma": sigma.float(), "exact": exact_log_ratio(p, q, x, sigma)})
    return out


@torch.no_grad()
def logits(disc, items: list[dict], batch: int = 1024) -> list[torch.Tensor]:
    return [
        torch.cat(
            [disc(it["x"][i : i + batch], it["sigma"][i : i + batch]).double() for i in range(0, len(it["x"]), batch)]
        )
        for it in items
    ]


def critic_config(cfg, init_steps: int, hidden: int, depth: int):
    """The MNIST critic's config with the MLP of the analytic setting (psi = a copy of it, fitted to p)."""
    return override(cfg, {"model.init_steps": init_steps, "model.mlp_hidden": hidden, "model.mlp_depth": depth})


def train_pair(cfg, p, q, init, points: list[int], total: int, items: list[dict]) -> list[list[list[torch.Tensor]]]:
    """One critic of `cfg` trained to each of `points` (steps) against fixed q; the logits on `items` at each
    point, [point][bin] -> [n], and the per-step training log."""
    critic, out, log, done = Critic(cfg, p, init=init), [], [], 0
    for stop in points:
        log += critic.train(q, stop - done, total=total)
        done = stop
        out.append(logits(partial(critic.critic, logit=True), items))
    return out, log


def curve(log: list[dict], sizes: dict) -> list[dict]:
    """The per-step training log averaged over chunks of log_every_kimg (as the Trainer's log.jsonl)."""
    every = max(1, round(sizes["log_every_kimg"] * 1000 / sizes["batch"]))
    out = []
    for i in range(0, len(log), every):
        chunk = log[i : i + every]
        mean = {k: sum(r[k] for r in chunk) / len(chunk) for k in ("bce", "acc", "dsm")}
        out.append({"kimg": (i + len(chunk)) * sizes["batch"] / 1000, **mean})
    return out
