"""Reward-tilted distillation (Appendix G: `dibregman.rewards`, `distill.target_ratio_loss`): Eq. 14 against
finite differences of D_h(r_t || r*_t), the exact tilted mixture, the engine's plumbing (R = const is plain
Di-Bregman bit for bit, resume stays exact) and clear errors for bad rewards.

1-D problem of the Eq. 14 test (as tests/test_theorem1.py): teacher p = N(0, s^2), generator G(eps) =
theta + eps, reward R(x0) = exp(alpha x0), so p* = p R / Z = N(alpha s^2, s^2) with Z = exp(alpha^2 s^2 / 2);
at noise level sigma, p_t = N(0, a^2), p*_t = N(alpha s^2, a^2) (a^2 = s^2 + sigma^2), q_t = N(theta, b^2)
(b^2 = 1 + sigma^2), and R_t(x) = E[R(x0) | x_t = x] = exp(alpha m + alpha^2 v / 2) with posterior mean
m = s^2 x / a^2 and variance v = s^2 sigma^2 / a^2.
"""

import math

import pytest
import torch

from dibregman import distill
from dibregman import divergences as dv
from dibregman import rewards as rw
from dibregman.config import RewardConfig, override, validate
from dibregman.loop import Trainer
from dibregman.presets import get_preset
from dibregman.teachers.gmm import ring_mixture, tilted_mixture
from test_distill import GMM_SMALL

S2, ALPHA = 1.5, 0.6  # teacher variance s^2, tilt exponent alpha
X = torch.linspace(-40.0, 40.0, 4001, dtype=torch.float64)  # quadrature grid (trapezoid)
DELTA = 1e-4  # central finite-difference step in theta
LOG_Z = ALPHA**2 * S2 / 2


def _log_normal(x, mean, var):
    return -((x - mean) ** 2) / (2 * var) - 0.5 * math.log(2 * math.pi * var)


def _tilt_reward() -> rw.Reward:
    def log_fn(x, sigma, cond):  # log E[exp(alpha x0) | x_t = x], exact for the Gaussian teacher
        a2 = S2 + sigma.square()
        return ALPHA * S2 * x.reshape(-1) / a2 + ALPHA**2 * S2 * sigma.square() / (2 * a2)

    return rw.Reward("tilt", log_fn, sigma_aware=True, floor=1e-300)


def _logs(theta, sigma):
    a2, b2 = S2 + sigma**2, 1 + sigma**2
    return _log_normal(X, 0.0, a2), _log_normal(X, theta, b2), _log_normal(X, ALPHA * S2, a2)


def bregman_to_target(div, theta, sigma):
    """D_h(r_t || r*_t) = int p_t [h(r) - h(r*) - h'(r*)(r - r*)] by quadrature (h' by autograd)."""
    log_p, log_q, log_ps = _logs(theta, sigma)
    r = torch.exp(log_q - log_p)
    rs = torch.exp(log_ps - log_p).requires_grad_(True)
    h_rs = div.fn(rs)
    (dh_rs,) = torch.autograd.grad(h_rs.sum(), rs)
    integrand = torch.exp(log_p) * (div.fn(r) - h_rs.detach() - dh_rs * (r - rs.detach()))
    return float(torch.trapezoid(integrand, X))


def eq14_gradient(div, theta, sigma, extra_sign=1.0):
    """-E_{q_t}[w(r)(s_p - s_q) + h''(r*) d r*/dx] dG/dtheta, the extra term from `rewards.target_term`."""
    a2, b2 = S2 + sigma**2, 1 + sigma**2
    log_p, log_q, _ = _logs(theta, sigma)
    main = torch.exp(log_q + div.log_weight(log_p - log_q)) * (-X / a2 + (X - theta) / b2)
    s = torch.full_like(X, sigma)
    g, log_w = rw.target_term(_tilt_reward(), X[:, None], s, log_z=LOG_Z, div=div, target="sigma")
    extra = torch.exp(log_q + log_w) * g[:, 0]
    return -float(torch.trapezoid(main + extra_sign * extra, X))


CASES = [("kl", {}), ("ls", {}), ("be", {}), ("lr", {})] + [("sba", {"lam": v}) for v in (-2, 0.5, 3)]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}{list(p.values())}" for n, p in CASES])
@pytest.mark.parametrize("sigma", (0.5, 2.0))
def test_eq14_matches_finite_difference_of_bregman_to_target(name, params, sigma):
    div = dv.get(name, **params)
    for theta in (0.7, -1.3):
        fd = (bregman_to_target(div, theta + DELTA, sigma) - bregman_to_target(div, theta - DELTA, sigma)) / (2 * DELTA)
        assert math.isfinite(fd) and abs(fd) > 1e-3
        assert eq14_gradient(div, theta, sigma) == pytest.approx(fd, rel=1e-4), (name, theta, sigma)


def test_eq14_fails_with_the_extra_term_flipped_or_dropped():
    div = dv.get("sba", lam=3)
    fd = (bregman_to_target(div, 0.7 + DELTA, 1.0) - bregman_to_target(div, 0.7 - DELTA, 1.0)) / (2 * DELTA)
    assert eq14_gradient(div, 0.7, 1.0, extra_sign=-1.0) != pytest.approx(fd, rel=0.02)
    assert eq14_gradient(div, 0.7, 1.0, extra_sign=0.0) != pytest.approx(fd, rel=0.02)


def test_tilt_reward_is_the_exact_noisy_ratio():
    for sigma in (0.1, 1.0, 5.0):
        log_p, _, log_ps = _logs(0.0, sigma)
        got = _tilt_reward().log_value(X[:, None], sigma) - LOG_Z
        assert torch.allclose(got, log_ps - log_p, atol=1e-10)


@pytest.fixture(scope="module")
def ring():
    return ring_mixture()


def test_gmm_modes_reward_is_the_exact_tilted_mixture(ring):
    rc = RewardConfig(name="gmm_modes", modes="0,3", boost=5.0)
    reward = rw.build_reward(rc, ring)
    target, z = tilted_mixture(ring, rw.mode_factors(rc, ring.num_modes))
    assert z == pytest.approx((2 * 5 + 6) / 8) and target.weights[0] == pytest.approx(5 / 16)
    g_ = torch.Generator().manual_seed(0)
    for sigma in (0.01, 0.3, 1.0, 5.0):
        x = ring.sample(64, sigma=sigma, generator=g_).double()
        s = torch.full((64,), sigma, dtype=torch.float64)
        log_ratio = reward.log_value(x, s) - math.log(z)  # r*_t = R_t / Z
        assert torch.allclose(log_ratio, target.log_prob(x, s) - ring.log_prob(x, s), atol=1e-9)
        g, log_w = rw.target_term(reward, x, s, log_z=math.log(z), div=dv.get("kl"))
        assert torch.allclose(g, target.score(x, s) - ring.score(x, s), atol=1e-9)  # grad log r*_t
        assert torch.equal(log_w, torch.zeros(64, dtype=torch.float64))  # KL: w = 1, Z drops out


def test_target_ratio_loss_gradient_is_the_extra_term():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    g, log_w = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    scale, tw = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    loss, coef = distill.target_ratio_loss(x, g, log_w, scale, tw, norm=4.0)
    (grad,) = torch.autograd.grad(loss, x)
    expected = -(log_w + scale).exp()[:, None] * tw[:, None] * g / (3 * 4.0)
    assert torch.allclose(grad, expected)


@pytest.mark.parametrize("normalize", ["none", "batch_mean", "softmax", "sigma_bins"])
def test_stabilized_log_weight_returns_the_normalisation(normalize):
    torch.manual_seed(1)
    logits, sigma = 3 * torch.randn(64, dtype=torch.float64), torch.rand(64, dtype=torch.float64) * 5 + 0.01
    div = dv.get("sba", lam=5.0)
    stab = dv.Stabilizer(logit_clamp=4.0, ratio_clip=(0.0, 20.0), normalize=normalize, num_sigma_bins=4)
    w = dv.stabilized_weight(div, logits, sigma=sigma, stab=stab)
    exact = div.log_weight(logits.clamp(-math.log(20.0), 4.0))
    log_w, log_n = dv.stabilized_log_weight(div, logits, sigma, stab)
    assert torch.allclose((exact + log_n).exp(), w, rtol=1e-10) and torch.allclose(log_w.exp(), w, rtol=1e-10)


@pytest.mark.parametrize("weighting", ["dmd", "unit", "score"])
def test_time_weight_matches_its_divisor(ring, weighting):
    """w(t) (s_phi - s_psi) = (D_phi - D_psi) / divisor: Eq. 14's w(t) is Eq. 4's."""
    fake = ring_mixture(radius=1.5, std=0.2)
    x = ring.sample(32, sigma=1.0, generator=torch.Generator().manual_seed(2)).double()
    sigma = torch.rand(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3 + 0.1
    d_p, d_q = ring(x, sigma), fake(x, sigma)
    diff = (d_p - d_q) / distill.time_weight_divisor(weighting, sigma, x, d_p)[:, None]
    s_diff = ring.score(x, sigma) - fake.score(x, sigma)
    assert torch.allclose(distill.time_weight(weighting, sigma, x, d_p)[:, None] * s_diff, diff, rtol=1e-5)


class _ExactLogit(torch.nn.Module):
    """Discriminator with the optimal logit l = log p_t - log q_t of two analytic mixtures."""

    def __init__(self, p, q):
        super().__init__()
        self.p, self.q = p, q

    def forward(self, x, sigma, cond=None):
        return (self.p.log_prob(x, sigma) - self.q.log_prob(x, sigma)).float()


@pytest.mark.parametrize("weighting", ["dmd", "unit", "score"])
@pytest.mark.parametrize("name,params,normalize", [("kl", {}, "none"), ("sba", {"lam": 2.0}, "sigma_bins")])
def test_generator_gradient_vanishes_at_the_target_ratio(ring, weighting, name, params, normalize):
    """Fixed point of Eq. 14 with the library's losses: with the exact ratio r_t = q_psi / p and the target
    r*_t = r_t (R_t = q_psi / p, Z = 1), the two terms cancel for every w(t) and normalisation."""
    fake = ring_mixture(radius=1.5, std=0.3)
    n, g = 64, torch.Generator().manual_seed(4)
    x = fake.sample(n, generator=g).requires_grad_(True)
    sigma = 0.5 + 2.5 * torch.rand(n, generator=g)
    x_t = x.detach() + sigma[:, None] * torch.randn(n, 2, generator=g)
    reward = rw.Reward("q/p", lambda x, s, c: fake.log_prob(x, s) - ring.log_prob(x, s), sigma_aware=True,
                       floor=1e-300)  # fmt: skip
    target = rw.TargetRatio(reward, rw.NormalizerEstimator("fixed", value=1.0), target="sigma")
    stab, div = dv.Stabilizer(normalize=normalize, num_sigma_bins=4), dv.get(name, **params)
    d_phi, d_psi = ring(x_t, sigma).float(), fake(x_t, sigma).float()
    logits = _ExactLogit(ring, fake)(x_t, sigma)
    log_w, log_n = dv.stabilized_log_weight(div, logits, sigma, stab)
    divisor = distill.time_weight_divisor(weighting, sigma, x.detach(), d_phi)
    main_loss = distill.dibregman_loss(x, d_phi, d_psi, dv.weight_from_log(log_w, stab), divisor, norm=n)
    g, log_w_star = target.term(x_t, sigma, None, div=div, stab=stab)
    tw = distill.time_weight(weighting, sigma, x.detach(), d_phi)
    extra = distill.target_ratio_loss(x, g, log_w_star, log_n, tw, norm=n)[0]
    (main,) = torch.autograd.grad(main_loss, x, retain_graph=True)
    (total,) = torch.autograd.grad(main_loss + extra, x)
    assert main.norm() > 1e-3
    assert total.norm() < 1e-4 * main.norm()


def test_normalizer_estimator_mean_ema_fixed():
    r = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    est = rw.NormalizerEstimator("mean")
    for chunk in r.split(128):
        est.update(chunk)
    assert est.z == pytest.approx(float(r.mean())) and est.count == 1000
    assert est.stderr == pytest.approx(float(r.std(unbiased=False)) / math.sqrt(1000))
    ema = rw.NormalizerEstimator("ema", halflife=100.0)
    ema.update(torch.zeros(10_000, dtype=torch.float64))
    ema.update(torch.ones(100, dtype=torch.float64))  # one half-life of ones after a long run of zeros
    assert ema.z == pytest.approx(0.5, rel=1e-6)
    fixed = rw.NormalizerEstimator("fixed", value=2.0)
    fixed.update(r)
    assert fixed.z == 2.0 and fixed.empirical == pytest.approx(float(r.mean()))
    again = rw.NormalizerEstimator("mean")
    again.load_state_dict(est.state_dict())
    assert again.z == est.z and again.stderr == est.stderr
    with pytest.raises(ValueError, match="no samples"):
        _ = rw.NormalizerEstimator("mean").z
    zero = rw.NormalizerEstimator("mean")
    zero.update(torch.zeros(5))
    with pytest.raises(ValueError, match="R must be > 0"):
        _ = zero.z


# ---- user rewards (python:MODULE:FUNCTION resolves these: pytest puts tests/ on sys.path) ---------------
def negative_reward(x):
    return x[:, 0]


def nan_reward(x):
    return torch.full((x.shape[0],), float("nan"))


def misshaped_reward(x):
    return torch.ones(x.shape[0], 1)


def sigma_reward(x, sigma):
    return 1 + sigma


@pytest.mark.parametrize(
    "fn,match",
    [
        ("negative_reward", "must be >= 0"),
        ("nan_reward", "NaN"),
        ("misshaped_reward", r"shape \[4\], got \(4, 1\)"),
    ],
)
def test_bad_user_rewards_fail_clearly(fn, match):
    reward = rw.build_reward(RewardConfig(name=f"python:test_reward:{fn}"))
    with pytest.raises(ValueError, match=match):
        reward(torch.randn(4, 2) - 5.0)


def test_user_reward_signature_and_names():
    reward = rw.build_reward(RewardConfig(name="python:test_reward:sigma_reward"))
    assert reward.sigma_aware and torch.allclose(reward(torch.zeros(3, 2), 2.0), torch.full((3,), 3.0))
    assert rw.resolve_target("auto", reward) == "sigma"
    with pytest.raises(ValueError, match="cannot load"):
        rw.build_reward(RewardConfig(name="python:test_reward:no_such_function"))
    with pytest.raises(ValueError, match="unknown reward.*gmm_modes"):
        validate(override(get_preset("gmm"), {"reward.name": "gmm_mode"}))
    with pytest.raises(ValueError, match="needs a Gaussian-mixture teacher"):
        rw.build_reward(RewardConfig(name="gmm_modes"), teacher=torch.nn.Identity())
    with pytest.raises(ValueError, match=r"need indices in \[0, 8\)"):
        rw.build_reward(RewardConfig(name="gmm_modes", modes="0,8"), ring_mixture())


def test_reward_config_errors():
    gmm = get_preset("gmm")
    with pytest.raises(ValueError, match="gan_weight must be 0 with a reward"):
        validate(override(gmm, {"reward.name": "gmm_modes", "loss.gan_weight": 0.1}))
    with pytest.raises(ValueError, match="reward.target"):
        validate(override(gmm, {"reward.name": "gmm_modes", "reward.target": "clean"}))
    with pytest.raises(ValueError, match="z_value"):
        validate(override(gmm, {"reward.name": "gmm_modes", "reward.z_estimator": "fixed"}))


def test_cli_reward_flag():
    from dibregman.cli import build_parser, resolve_config

    args = build_parser().parse_args(["distill", "--reward", "gmm_modes", "--set", "reward.modes=2,5"])
    with pytest.warns(UserWarning, match="GAN term"):
        cfg = resolve_config(args)
    assert cfg.reward.name == "gmm_modes" and cfg.reward.modes == "2,5"
    assert get_preset("gmm").loss.gan_weight > 0 and cfg.loss.gan_weight == 0  # the preset's GAN term is dropped
    explicit = build_parser().parse_args(["distill", "--reward", "gmm_modes", "--set", "loss.gan_weight=0.5"])
    with pytest.raises(ValueError, match="gan_weight must be 0 with a reward"):  # an explicit one is refused
        resolve_config(explicit)


def test_reward_and_gan_follow_one_rule_in_the_api_and_the_cli():
    from dibregman import api

    with pytest.warns(UserWarning, match="turns off the 'gmm' preset's GAN term"):
        cfg = api.preset("gmm", **{"reward.name": "gmm_modes"})
    assert cfg.loss.gan_weight == 0
    with pytest.raises(ValueError, match="gan_weight must be 0 with a reward"):
        api.preset("gmm", **{"reward.name": "gmm_modes", "loss.gan_weight": 0.5})


# ---- engine -----------------------------------------------------------------------------------------
SMALL = {**GMM_SMALL, "reward.z_init_samples": 256}


def _cfg(steps: int, **pairs):
    return override(get_preset("gmm"), {**SMALL, "run.total_kimg": steps * 32 / 1000, **pairs})


def _params(tr: Trainer) -> dict:
    mods = {"g": tr.m.generator, "f": tr.m.fake, "d": tr.m.disc, "e": tr.ema}
    return {f"{n}.{k}": v.clone() for n, m in mods.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("value", [1.0, 3.0])
def test_constant_reward_is_plain_dibregman_bit_for_bit(tmp_path, value):
    plain = Trainer(_cfg(4), tmp_path / "plain")
    plain.train()
    const = Trainer(_cfg(4, **{"reward.name": "constant", "reward.value": value}), tmp_path / "const")
    const.train()
    assert const.target.estimator.z == pytest.approx(value)
    a, b = _params(plain), _params(const)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_reward_is_bitwise_exact(tmp_path):
    pairs = {"reward.name": "gmm_modes", "reward.modes": "1", "divergence.name": "kl"}
    full = Trainer(_cfg(6, **pairs), tmp_path / "full")
    full.train()
    Trainer(_cfg(3, **pairs), tmp_path / "split").train()
    resumed = Trainer(_cfg(6, **pairs), tmp_path / "split")
    assert resumed.state.step == 3 and resumed.target.estimator.count == 256 + 3 * 32
    resumed.train()
    a, b = _params(full), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.target.state_dict() == resumed.target.state_dict()
    log = (tmp_path / "full" / "log.jsonl").read_text()
    assert '"reward/z"' in log and '"reward/gen_R"' in log and '"reward/z_stderr"' in log


def test_bad_user_reward_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="must be >= 0"):
        Trainer(_cfg(2, **{"reward.name": "python:test_reward:negative_reward"}), tmp_path)


def test_mnist_class_reward_through_a_unet_teacher(tmp_path):
    """mnist_class (here with a random classifier file) on a tiny U-Net teacher: target 'denoised' runs."""
    from dibregman import checkpoint as ckpt
    from dibregman.networks.classifier import build_classifier
    from dibregman.networks.unet import build_unet

    torch.manual_seed(0)
    clf = build_classifier()
    ckpt.export_safetensors(clf.state_dict(), {"architecture": clf.config.to_dict()}, tmp_path / "clf")
    net = build_unet("tiny")
    ckpt.export_safetensors(net.state_dict(), {"kind": "edm-unet", "unet": net.cfg.to_dict()}, tmp_path / "t")
    rc = RewardConfig(name="mnist_class", digit=3, classifier=str(tmp_path / "clf.safetensors"))
    x = torch.randn(5, 1, 28, 28).clamp(-1, 1)
    assert torch.allclose(rw.build_reward(rc)(x), clf.eval()(x).softmax(-1)[:, 3], atol=1e-6)
    with pytest.raises(FileNotFoundError):
        rw.build_reward(RewardConfig(name="mnist_class", classifier=str(tmp_path / "missing.safetensors")))
    cfg = override(
        get_preset("mnist"),
        {
            "model.teacher": f"edm:{tmp_path / 't.safetensors'}",
            "model.real": "teacher",
            "model.teacher_pool": 8,
            "model.teacher_pool_steps": 2,
            "optim.batch_size": 4,
            "run.total_kimg": 0.008,
            "run.tensorboard": False,
            "run.sample_every_kimg": 0.0,
            "reward.name": "mnist_class",
            "reward.digit": 3,
            "reward.classifier": str(tmp_path / "clf.safetensors"),
            "reward.z_init_samples": 8,
        },
    )
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.target.target == "denoised"
    out = tr.train()
    assert out["steps"] == 2 and out["bad_steps"] == 0
