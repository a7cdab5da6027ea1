"""The distillation's noise-level schedules (`noise.SigmaSchedule`, `loss.sigma_schedule`): each draw has the
distribution its docstring promises in flow time t = sigma / (1 + sigma) (quantiles and means against closed forms
computed with the standard library, not with the code under test), the shift inverts, Karras is unchanged bit for
bit, and `draws.draw_batch` uses the chosen schedule for the generator step, the discriminator and the fake score."""

import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch

from dibregman.noise import (
    SigmaSchedule,
    karras_sigma_at,
    karras_uniform_sigma,
    shift_time,
    sigma_of_time,
    time_of_sigma,
    unshift_time,
)

N = 200_000
QS = (0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98)
WIDE = (1e-6, 1e6)  # a sigma range whose flow-time interval is (0, 1) up to 1e-6: no truncation to speak of


def _times(schedule: SigmaSchedule, t_max: float = 1.0, sigma_range=WIDE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return time_of_sigma(schedule.draw(N, t_max, *sigma_range, generator=g))


def _quantiles(t: torch.Tensor) -> list[float]:
    return torch.quantile(t[:100_000], torch.tensor(QS, dtype=torch.float64)).tolist()


def _logit_normal_quantile(q: float, mean: float, std: float, shift: float = 1.0) -> float:
    u = 1 / (1 + math.exp(-(mean + std * NormalDist().inv_cdf(q))))
    return shift * u / (1 + (shift - 1) * u)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_uniform_quantiles_and_mean(shift):
    t = _times(SigmaSchedule("flow_uniform", shift=shift))
    for q, got in zip(QS, _quantiles(t), strict=True):
        assert got == pytest.approx(shift * q / (1 + (shift - 1) * q), abs=0.006), q
    a = shift - 1  # E[s u / (1 + a u)], u ~ U[0, 1] = (s / a) (1 - ln(1 + a) / a); 1/2 for s = 1
    mean = 0.5 if a == 0 else shift / a * (1 - math.log1p(a) / a)
    assert float(t.mean()) == pytest.approx(mean, abs=0.003)


@pytest.mark.parametrize(("mean", "std", "shift"), [(0.0, 1.0, 1.0), (-0.5, 1.4, 1.0), (0.0, 1.0, 3.0)])
def test_flow_logit_normal_quantiles_and_mean(mean, std, shift):
    t = _times(SigmaSchedule("flow_logit_normal", shift=shift, t_mean=mean, t_std=std))
    for q, got in zip(QS, _quantiles(t), strict=True):
        assert got == pytest.approx(_logit_normal_quantile(q, mean, std, shift), abs=0.006), q
    z = torch.linspace(-9, 9, 20001, dtype=torch.float64)  # E[shift(sigmoid(mean + std z))] by quadrature
    u = torch.sigmoid(mean + std * z)
    density = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    expected = float(torch.trapezoid(shift * u / (1 + (shift - 1) * u) * density, z))
    assert float(t.mean()) == pytest.approx(expected, abs=0.003)


def test_logit_normal_matches_the_teachers_training_draw():
    """The inverse-CDF draw and SD3's sigmoid(mean + std n) (`teachers.flow.logit_normal_time`, what the flow
    teacher was trained on) are the same distribution."""
    from dibregman.teachers.flow import logit_normal_time

    t = _times(SigmaSchedule("flow_logit_normal", t_mean=0.3, t_std=0.8))
    ref = logit_normal_time(N, 0.3, 0.8, generator=torch.Generator().manual_seed(1)).double()
    for a, b in zip(_quantiles(t), _quantiles(ref), strict=True):
        assert a == pytest.approx(b, abs=0.008)


def test_a_range_and_t_max_restrict_the_draw_to_the_top_of_the_schedule():
    """On the teacher's range [0.002, 80], t_max = 0.8 keeps the noisiest 80 % of each schedule's mass: its sigma
    lies in [S(0.8), 80] and its quantiles are those of the distribution restricted to that interval."""
    lo, hi = 0.002, 80.0
    t_lo, t_hi = lo / (1 + lo), hi / (1 + hi)
    uni = _times(SigmaSchedule("flow_uniform"), 0.8, (lo, hi))
    edge = t_hi - 0.8 * (t_hi - t_lo)
    assert float(uni.min()) >= edge - 1e-6 and float(uni.max()) <= t_hi + 1e-6
    for q, got in zip(QS, _quantiles(uni), strict=True):
        assert got == pytest.approx(edge + q * (t_hi - edge), abs=0.006)

    ln = _times(SigmaSchedule("flow_logit_normal"), 0.8, (lo, hi))
    F = NormalDist().cdf  # restricted logit-normal: u ~ U[F(logit edge), F(logit t_hi)]

    def logit(x):
        return math.log(x / (1 - x))

    c_hi = F(logit(t_hi))
    c_edge = c_hi - 0.8 * (c_hi - F(logit(t_lo)))
    assert float(ln.min()) >= _logit_normal_quantile(c_edge, 0, 1) - 1e-6 and float(ln.max()) <= t_hi + 1e-6
    for q, got in zip(QS, _quantiles(ln), strict=True):
        assert got == pytest.approx(_logit_normal_quantile(c_edge + q * (c_hi - c_edge), 0, 1), abs=0.006)


SCHEDULES = [("karras", 1.0), ("flow_uniform", 1.0), ("flow_uniform", 3.0), ("flow_logit_normal", 1.0)]


@pytest.mark.parametrize(("name", "shift"), [*SCHEDULES, ("flow_logit_normal", 3.0)])
def test_schedules_are_monotone_maps_onto_the_sigma_range(name, shift):
    s = SigmaSchedule(name, shift=shift)
    p = torch.linspace(0, 1, 1001)
    sigma = s.sigma_at(p, 0.002, 80.0).double()
    assert (sigma[1:] < sigma[:-1]).all()
    assert float(sigma[0]) == pytest.approx(80.0, rel=1e-5) and float(sigma[-1]) == pytest.approx(0.002, rel=1e-5)
    assert s.sigma_at(p.double(), 0.002, 80.0).dtype == torch.float64  # the caller's dtype


def test_flow_schedules_stay_finite_next_to_t_one():
    """Float64 flow times, clamped below 1: a range reaching sigma = inf still gives finite sigma <= 1e7."""
    for name in ("flow_uniform", "flow_logit_normal"):
        sigma = SigmaSchedule(name, shift=3.0).sigma_at(torch.tensor([0.0, 1e-9, 0.5, 1.0]), 0.002, math.inf)
        assert torch.isfinite(sigma).all() and float(sigma.max()) <= 1.0000001e7


def test_shift_formula_inverts():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.25, 1.0, 3.0, 10.0):
        assert torch.allclose(unshift_time(shift_time(t, s), s), t, atol=1e-12)
        assert torch.allclose(shift_time(unshift_time(t, s), s), t, atol=1e-12)
        assert float(shift_time(0.5, s)) == pytest.approx(s / (1 + s))  # s t / (1 + (s - 1) t) at t = 1/2
    assert torch.allclose(time_of_sigma(sigma_of_time(t[:-1])), t[:-1], atol=1e-12)


@pytest.mark.parametrize("origin", ["sigma_max", "sigma_min"])
def test_karras_schedule_is_unchanged_bit_for_bit(origin):
    """The default draws what Algorithm 1's sampler always drew: rand * t_max (1 - that for origin sigma_min)."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = torch.rand(1000, generator=g1) * 0.8
    want = karras_sigma_at(1 - t if origin == "sigma_min" else t, 0.002, 80.0)
    got = karras_uniform_sigma(1000, 0.8, 0.002, 80.0, generator=g2, origin=origin)
    assert torch.equal(got, want)


def _draw(loss_pairs: dict, n: int = 20_000):
    from dibregman.config import override
    from dibregman.draws import draw_batch
    from dibregman.presets import get_preset

    cfg = override(get_preset("mnist"), loss_pairs)
    m = SimpleNamespace(shape=(1,), sigma_data=0.5, conditions=None, real=lambda g, k: (torch.zeros(k, 1), None))
    return draw_batch(cfg, m, 0, 0, n, torch.device("cpu"), (0.002, 80.0))[0]


def test_draw_batch_uses_the_schedule_everywhere():
    """flow_uniform with t_max = 1: the generator step's, the discriminator's and (fake_sigma=generator) the fake
    score's flow times are uniform on the teacher's interval; Karras' are not (median t: Karras(1/2) = 2.52, i.e.
    t = 2.52 / 3.52 = 0.716)."""
    pairs = {"loss.gen_t_max": 1.0, "loss.disc_t_max": 1.0, "loss.fake_sigma": "generator"}
    b = _draw({**pairs, "loss.sigma_schedule": "flow_uniform"})
    t_lo, t_hi = 0.002 / 1.002, 80 / 81
    for sigma in (b.gen_sigma, b.disc_sigma, b.fake_sigma):
        t = time_of_sigma(sigma)
        assert float(t.median()) == pytest.approx((t_lo + t_hi) / 2, abs=0.01)
        assert float((t < t_lo + 0.25 * (t_hi - t_lo)).double().mean()) == pytest.approx(0.25, abs=0.01)
    assert not torch.equal(b.gen_sigma, b.fake_sigma)  # independent draws from the same schedule
    karras = _draw(pairs)
    assert float(time_of_sigma(karras.gen_sigma).median()) == pytest.approx(0.716, abs=0.01)
