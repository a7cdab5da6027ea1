"""Property and parity tests for dibregman.divergences: weights vs autograd of h / f, exactness against
mpmath, the derived equivalences, stabilisation, ESS and bad input."""

import math

import mpmath
import pytest
import torch

from dibregman import divergences as dv
from dibregman import viz

LAMS = (-2, -1, -0.5, 0, 0.5, 1, 3, 5, 10)
ALPHAS = (-1, 0, 0.5, 1, 2, 3)
BREGMAN = [("lr", {}), ("kl", {}), ("be", {}), ("ls", {})] + [("sba", {"lam": lam}) for lam in LAMS]
F_DIVS = [(n, {}) for n in ("rkl", "fkl", "js", "hellinger", "jeffreys", "pearson", "neyman")]
F_DIVS += [("alpha", {"alpha": a}) for a in ALPHAS]


def _ids(cases):
    return [f"{n}{list(p.values())}" for n, p in cases]


def _second_derivative(fn, x):
    """fn''(x) by double autograd, elementwise, float64."""
    x = x.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    return d2


def test_registry():
    assert dv.names() == sorted(
        [
            "lr",
            "kl",
            "be",
            "ls",
            "sba",
            "rkl",
            "fkl",
            "js",
            "hellinger",
            "jeffreys",
            "pearson",
            "neyman",
            "alpha",
        ]
    )
    for n in dv.names():
        d = dv.get(n)
        assert d.name == n and d.kind in ("bregman", "f") and d.formula and d.h_or_f and callable(d.fn)
    assert dv.get("sba").params == {"lam": 5.0} and dv.get("sba", lam=3).params == {"lam": 3.0}
    assert dv.get("alpha", alpha=2).params == {"alpha": 2.0} and dv.get("kl").params == {}


@pytest.mark.parametrize("name,params", BREGMAN, ids=_ids(BREGMAN))
def test_bregman_weight_is_autograd_h2_times_r(name, params):
    div = dv.get(name, **params)
    assert div.kind == "bregman"
    l = torch.linspace(-8, 8, 81, dtype=torch.float64)  # autograd of f itself loses digits beyond
    r = torch.exp(-l)
    torch.testing.assert_close(div.weight(l), _second_derivative(div.fn, r) * r, rtol=1e-8, atol=0)


@pytest.mark.parametrize("name,params", F_DIVS, ids=_ids(F_DIVS))
def test_f_weight_is_autograd_f2_times_u2(name, params):
    div = dv.get(name, **params)
    assert div.kind == "f"
    l = torch.linspace(-8, 8, 81, dtype=torch.float64)  # autograd of f itself loses digits beyond
    u = torch.exp(l)
    torch.testing.assert_close(div.weight(l), _second_derivative(div.fn, u) * u**2, rtol=1e-8, atol=0)
    assert float(div.fn(torch.ones((), dtype=torch.float64))) == pytest.approx(0.0, abs=1e-15)  # f(1) = 0


def test_table1_closed_forms():
    l = torch.linspace(-20, 20, 81, dtype=torch.float64)
    torch.testing.assert_close(dv.get("lr").weight(l), torch.sigmoid(l))
    torch.testing.assert_close(dv.get("kl").weight(l), torch.ones_like(l))
    torch.testing.assert_close(dv.get("be").weight(l), torch.exp(l))
    torch.testing.assert_close(dv.get("ls").weight(l), torch.exp(-l))
    for lam in LAMS:
        torch.testing.assert_close(dv.get("sba", lam=lam).weight(l), torch.exp(-lam * l))


# (a, b, c): weight_a = c * weight_b, derived in the module docstring (perspective h(r) = r f(1/r)).
EQUIV = [
    (("sba", {"lam": 0}), ("kl", {}), 1.0),
    (("kl", {}), ("rkl", {}), 1.0),
    (("sba", {"lam": -1}), ("be", {}), 1.0),
    (("be", {}), ("fkl", {}), 1.0),
    (("sba", {"lam": 1}), ("ls", {}), 1.0),
    (("neyman", {}), ("ls", {}), 2.0),
    (("pearson", {}), ("sba", {"lam": -2}), 2.0),
    (("hellinger", {}), ("sba", {"lam": -0.5}), 0.5),
    (("js", {}), ("lr", {}), 1.0),
    (("alpha", {"alpha": 0}), ("rkl", {}), 1.0),
    (("alpha", {"alpha": 1}), ("fkl", {}), 1.0),
] + [(("alpha", {"alpha": a}), ("sba", {"lam": -a}), 1.0) for a in (-3, -1, 0.5, 2, 7)]


@pytest.mark.parametrize("a,b,c", EQUIV, ids=[f"{a[0]}{list(a[1].values())}={b[0]}" for a, b, _ in EQUIV])
def test_equivalences(a, b, c):
    l = torch.linspace(-50, 50, 201, dtype=torch.float64)
    la, lb = dv.get(a[0], **a[1]).log_weight(l), dv.get(b[0], **b[1]).log_weight(l)
    torch.testing.assert_close(la, lb + math.log(c), rtol=0, atol=1e-12)


def test_jeffreys_is_kl_plus_be():
    l = torch.linspace(-50, 50, 201, dtype=torch.float64)
    w = dv.get("kl").weight(l) + dv.get("be").weight(l)
    torch.testing.assert_close(dv.get("jeffreys").weight(l), w, rtol=1e-14, atol=0)


def test_sba_singular_limits_are_kl_and_be():
    r = torch.logspace(-1, 1, 41, dtype=torch.float64)
    torch.testing.assert_close(dv.get("sba", lam=0).fn(r), r * torch.log(r) - r)
    torch.testing.assert_close(dv.get("sba", lam=-1).fn(r), -torch.log(r))

    def remainder(h):  # Bregman remainder h(r) - h(1) - h'(1)(r - 1): invariant under affine terms
        one = torch.ones((), dtype=torch.float64, requires_grad=True)
        (dh1,) = torch.autograd.grad(h(one), one)
        return h(r) - h(one).detach() - dh1 * (r - 1)

    for lam0 in (0.0, -1.0):
        limit = remainder(dv.get("sba", lam=lam0).fn)
        for eps in (1e-5, -1e-5):  # h at lam0 + eps tends to the limit form, up to affine terms
            near = remainder(dv.get("sba", lam=lam0 + eps).fn)
            torch.testing.assert_close(near, limit, rtol=1e-4, atol=1e-6)


def _mp_weight(name, params, l):
    """h''(r) r or f''(u) u^2 from the *definition* of h / f, differentiated by mpmath at 120 digits."""
    lam, a = params.get("lam"), params.get("alpha")
    log = mpmath.log
    funcs = {
        "lr": lambda r: r * log(r) - (1 + r) * log(1 + r),
        "kl": lambda r: r * log(r) - r,
        "be": lambda r: -log(r),
        "ls": lambda r: r * r / 2,
        "sba": lambda r: r * log(r) if lam == 0 else (r ** (1 + lam) - r) / (lam * (lam + 1)),
        "rkl": lambda u: -log(u),
        "fkl": lambda u: u * log(u),
        "js": lambda u: u * log(u) - (1 + u) * log((1 + u) / 2),
        "hellinger": lambda u: (mpmath.sqrt(u) - 1) ** 2,
        "jeffreys": lambda u: (u - 1) * log(u),
        "pearson": lambda u: (u - 1) ** 2,
        "neyman": lambda u: (1 - u) ** 2 / u,
        "alpha": lambda u: (u**a - a * u - (1 - a)) / (a * (a - 1)) if a not in (0, 1) else None,
    }
    if name == "sba" and lam == -1:
        funcs["sba"] = funcs["be"]
    with mpmath.workdps(120):
        bregman = name in ("lr", "kl", "be", "ls", "sba")
        x = mpmath.exp(-mpmath.mpf(l)) if bregman else mpmath.exp(mpmath.mpf(l))
        d2 = mpmath.diff(funcs[name], x, 2, h=x * mpmath.mpf("1e-30"))
        return d2 * x if bregman else d2 * x * x


EXACT = BREGMAN + [c for c in F_DIVS if c[1].get("alpha") not in (0, 1)]


@pytest.mark.parametrize("name,params", EXACT, ids=_ids(EXACT))
def test_exact_and_finite_for_large_logits(name, params):
    grid = [-50, -30, -10, -3, -1, -0.1, -1e-4, 0, 1e-4, 0.1, 1, 3, 10, 30, 50]
    div = dv.get(name, **params)
    l = torch.tensor(grid, dtype=torch.float64)
    log_w, w = div.log_weight(l), div.weight(l)
    for i, li in enumerate(grid):
        ref = _mp_weight(name, params, li)
        assert abs(float(w[i]) / float(ref) - 1) <= 1e-6, (li, float(w[i]), float(ref))
        assert abs(float(log_w[i]) - float(mpmath.log(ref))) <= 1e-6 * max(1.0, abs(float(mpmath.log(ref))))
    assert torch.isfinite(div.log_weight(4 * l.float())).all()  # float32 log weights stay finite (|l| <= 200)


# ---- stabilisation ----
def test_softmax_and_batch_mean_normalisation_in_log_space():
    div = dv.get("sba", lam=10)
    l = torch.linspace(-50, 50, 64)  # float32: the raw weights e^{500} overflow, the log weights do not
    with pytest.raises(ValueError, match="non-finite"):
        dv.stabilized_weight(div, l)
    w = dv.stabilized_weight(div, l, stab=dv.Stabilizer(normalize="softmax"))
    assert torch.isfinite(w).all() and w.dtype == torch.float32
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(w, 64 * torch.softmax(div.log_weight(l), 0))
    torch.testing.assert_close(dv.stabilized_weight(div, l, stab=dv.Stabilizer(normalize="batch_mean")), w)


def test_sigma_bin_normalisation():
    div = dv.get("sba", lam=3)
    g = torch.Generator().manual_seed(0)
    l = torch.randn(200, generator=g, dtype=torch.float64) * 3
    sigma = torch.cat([torch.full((120,), 0.05), torch.full((80,), 20.0)]).double()
    for stab in (
        dv.Stabilizer(normalize="sigma_bins", num_sigma_bins=2),  # batch quantiles
        dv.Stabilizer(normalize="sigma_bins", num_sigma_bins=4, sigma_range=(0.002, 80.0)),  # fixed log range
    ):
        w = dv.stabilized_weight(div, l, sigma=sigma, stab=stab)
        for group in (slice(0, 120), slice(120, 200)):
            assert float(w[group].mean()) == pytest.approx(1.0, rel=1e-12)
            ref = w[group].numel() * torch.softmax(div.log_weight(l[group]), 0)
            torch.testing.assert_close(w[group], ref)
    idx = dv.sigma_bin_index(torch.tensor([0.001, 0.01, 1.0, 50.0, 1e3]), 4, (0.002, 80.0))
    assert idx.tolist() == [0, 0, 2, 3, 3]  # outside the range -> edge bins
    with pytest.raises(ValueError, match="needs sigma"):
        dv.stabilized_weight(div, l, stab=dv.Stabilizer(normalize="sigma_bins"))
    with pytest.raises(ValueError, match="finite positive"):
        dv.stabilized_weight(div, l, sigma=sigma[:10], stab=dv.Stabilizer(normalize="sigma_bins"))


def test_clamps_and_clip():
    l = torch.tensor([-30.0, -5.0, 0.0, 5.0, 30.0], dtype=torch.float64)
    ls = dv.get("ls")  # weight = r = e^{-l}
    w = dv.stabilized_weight(ls, l, stab=dv.Stabilizer(logit_clamp=10.0))
    torch.testing.assert_close(w, torch.exp(-l.clamp(-10, 10)))
    w = dv.stabilized_weight(ls, l, stab=dv.Stabilizer(ratio_clip=(0.1, 20.0)))
    torch.testing.assert_close(w, torch.exp(-l).clamp(0.1, 20.0))
    w = dv.stabilized_weight(ls, l, stab=dv.Stabilizer(ratio_clip=(0.0, 20.0)))  # one-sided
    torch.testing.assert_close(w, torch.exp(-l).clamp(max=20.0))
    w = dv.stabilized_weight(ls, l, stab=dv.Stabilizer(normalize="softmax", weight_clip=2.0))
    assert float(w.max()) == 2.0 and float(w.min()) >= 0
    lg = l.clone().requires_grad_(True)
    assert not dv.stabilized_weight(ls, lg).requires_grad  # a stop-gradient factor


def test_nan_logits():
    l = torch.tensor([0.0, float("nan"), 1.0, -1.0])
    for name in dv.names():
        with pytest.raises(ValueError, match="NaN"):
            dv.get(name).weight(l)
    with pytest.raises(ValueError, match="NaN"):
        dv.stabilized_weight(dv.get("kl"), l)
    w = dv.stabilized_weight(dv.get("be"), l, stab=dv.Stabilizer(nan="zero", normalize="batch_mean"))
    assert float(w[1]) == 0.0 and torch.isfinite(w).all()
    assert float(w[[0, 2, 3]].mean()) == pytest.approx(1.0, rel=1e-6)  # mean over the valid entries
    w = dv.stabilized_weight(dv.get("kl"), torch.full((3,), float("nan")), stab=dv.Stabilizer(nan="zero"))
    assert w.tolist() == [0.0, 0.0, 0.0]


def test_dtypes():
    assert dv.get("lr").weight(torch.tensor([0, 1])).dtype == torch.float32
    w = dv.stabilized_weight(dv.get("sba", lam=5), torch.zeros(4, dtype=torch.bfloat16))
    assert w.dtype == torch.float32 and w.tolist() == [1.0] * 4


def test_ess():
    assert dv.ess(torch.ones(10)) == pytest.approx(10.0)
    assert dv.ess(torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(1.0)
    w = torch.tensor([1.0, 2.0, 3.0])
    assert dv.ess(w) == pytest.approx(36 / 14) and dv.ess(1e30 * w) == pytest.approx(36 / 14)
    assert dv.ess_fraction(torch.ones(8)) == pytest.approx(1.0)
    assert dv.ess(torch.zeros(3)) == 0.0
    diag = dv.weight_diagnostics(w)
    assert diag["w_max"] == 3.0 and diag["ess_fraction"] == pytest.approx(12 / 14)


# ---- custom h and bad input ----
def test_custom_bregman():
    l = torch.linspace(-20, 20, 41, dtype=torch.float64)
    ls = dv.bregman(lambda r: r**2 / 2, name="my_ls")
    assert ls.name == "my_ls" and ls.kind == "bregman"
    torch.testing.assert_close(ls.weight(l), dv.get("ls").weight(l))
    lr = dv.bregman(lambda r: r * torch.log(r) - (1 + r) * torch.log1p(r))
    with torch.no_grad():
        torch.testing.assert_close(lr.log_weight(l), dv.get("lr").log_weight(l))
    assert lr.weight(l.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="strictly convex"):
        dv.bregman(lambda r: -(r**2)).weight(l)
    with pytest.raises(ValueError, match="strictly convex"):
        dv.bregman(lambda r: 3 * r).weight(l)


def test_bad_input():
    with pytest.raises(ValueError, match="valid names.*sba"):
        dv.get("nope")
    for bad in (float("nan"), float("inf"), -float("inf"), "5", True, None, 1j):
        with pytest.raises(ValueError, match="lam="):
            dv.get("sba", lam=bad)
        with pytest.raises(ValueError, match="alpha="):
            dv.get("alpha", alpha=bad)
    with pytest.raises(ValueError, match="unknown parameter"):
        dv.get("kl", lam=1.0)
    with pytest.raises(ValueError, match="unknown parameter.*lambda_"):
        dv.get("sba", lambda_=3.0)
    for kwargs in (
        {"normalize": "mean"},
        {"num_sigma_bins": 0},
        {"ratio_clip": (2.0, 1.0)},
        {"ratio_clip": (-1.0, 1.0)},
        {"logit_clamp": -1.0},
        {"weight_clip": 0.0},
        {"nan": "ignore"},
        {"sigma_range": (1.0, 0.5)},
    ):
        with pytest.raises(ValueError):
            dv.Stabilizer(**kwargs)


def test_describe_and_plot(tmp_path):
    text = dv.describe()
    for n in dv.names():
        assert f"\n{n} " in text
    out = viz.plot_log_weights(tmp_path / "w.png", logits_range=(-5, 5))
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out == tmp_path / "w.png"


def test_shuffle_within_bins_keeps_each_bins_weights():
    """The placebo `divergence.shuffle_weights`: each bin keeps its multiset of weights, the assignment to
    samples changes, and the same generator seed gives the same permutation."""
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(64, generator=g)
    sigma = torch.exp(torch.randn(64, generator=g))
    bins = dv.sigma_bin_index(sigma, 8)
    out = dv.shuffle_within_bins(log_w, bins, torch.Generator().manual_seed(3))
    again = dv.shuffle_within_bins(log_w, bins, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    for k in range(8):
        sel = bins == k
        assert torch.equal(out[sel].sort().values, log_w[sel].sort().values), k
    assert not torch.equal(out, log_w)
    one_bin = dv.shuffle_within_bins(log_w, torch.zeros(64, dtype=torch.long), torch.Generator())
    assert torch.equal(one_bin.sort().values, log_w.sort().values) and not torch.equal(one_bin, log_w)
