"""Evaluation as the papers do it: the edm / clean FID pipelines (clean-fid's PIL-bicubic resize against an
independent re-computation), mu/sigma statistics files (EDM / clean-fid format) written and read back, the cache
key's protocol, progress lines, the exact float64 reduction over ranks (and a 2-process torchrun), and the
FID-versus-images curve of a run's EMA snapshots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dibregman.evaluate import evaluate_generator, evaluate_samples
from dibregman.evaluate_run import evaluate_run, fid_table, list_snapshots, load_snapshot
from dibregman.metrics import (
    FeatureSums,
    Progress,
    RandomFeatures,
    feature_stats,
    load_stats,
    reference_stats,
    resize_pil_bicubic,
    save_stats,
)
from dibregman.metrics.protocols import protocol_from_filename, quantize_uint8


# ---------------------------------------------------------------- clean-fid's resize, re-derived
def _bicubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return np.where(t < 1, near, np.where(t < 2, far, 0.0))


def _pil_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of Pillow's separable resample (libImaging/Resample.c precompute_coeffs):
    centre (i + 0.5) * scale, support 2 * max(scale, 1), taps normalised to sum 1."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - 2 * fscale + 0.5), 0), min(int(centre + 2 * fscale + 0.5), n_in)
        k = _bicubic((np.arange(lo, hi) - centre + 0.5) / fscale)
        w[i, lo:hi] = k / k.sum()
    return w


@pytest.mark.parametrize("shape,size", [((8, 8), (299, 299)), ((28, 28), (299, 299)), ((13, 9), (5, 7))])
def test_clean_resize_equals_an_independent_bicubic(shape, size):
    gen = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (2, 3, *shape), generator=gen).float()
    out = resize_pil_bicubic(u, size)
    assert out.shape == (2, 3, *size) and out.dtype == torch.float32
    wy, wx = _pil_weights(shape[0], size[0]), _pil_weights(shape[1], size[1])
    expected = np.clip(wy @ u.double().numpy() @ wx.T, 0, 255)  # [2, 3, H', W'] float64, separable
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-3)
    assert (out != out.round()).any(), "clean-fid keeps the float result: no re-quantisation"


def test_clean_resize_fixed_points():
    flat = torch.full((1, 1, 8, 8), 77.0)
    assert torch.allclose(resize_pil_bicubic(flat), torch.full((1, 1, 299, 299), 77.0), atol=1e-4)
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 255.0  # bicubic over/undershoots at a step: clean-fid clips to [0, 255]
    out = resize_pil_bicubic(edge)
    assert out.min() == 0 and out.max() == 255
    assert (out[0, 0, :, 0] == 0).all() and (out[0, 0, :, -1] == 255).all()


def test_quantisation_is_edms_png_rounding():
    u = torch.arange(256.0)
    assert torch.equal(quantize_uint8(u / 127.5 - 1), u)  # 8-bit data round-trips exactly
    assert quantize_uint8(torch.tensor([-1.5, -1.0, 1.0, 2.0])).tolist() == [0.0, 0.0, 255.0, 255.0]
    assert protocol_from_filename("cifar10_clean_train_32.npz") == "clean"
    assert protocol_from_filename("cifar10_legacy_tensorflow_train_32.npz") == "edm"
    assert protocol_from_filename("cifar10-32x32.npz") is None
    with pytest.raises(ValueError, match="legacy_pytorch"):
        protocol_from_filename("cifar10_legacy_pytorch_train_32.npz")


def test_inception_protocols_feed_the_documented_inputs():
    try:
        from dibregman.metrics import InceptionV3Features

        net = InceptionV3Features(protocol="edm")
    except FileNotFoundError as e:
        pytest.skip(f"FID Inception weights missing: {e}")
    from dibregman.metrics.features import resize_bilinear_tf1

    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    u = (x * 127.5 + 128).floor()
    edm = net.to_network_input(x)
    assert torch.equal(edm, resize_bilinear_tf1(u, (299, 299)).expand(-1, 3, -1, -1) / 128 - 1)
    fp_edm = net.fingerprint
    net.protocol = "clean"
    clean = net.to_network_input(x)
    assert torch.equal(clean, resize_pil_bicubic(u).expand(-1, 3, -1, -1) / 128 - 1)
    assert net.fingerprint != fp_edm and not torch.allclose(clean, edm, atol=1e-3)
    with pytest.raises(ValueError, match="unknown FID protocol"):
        InceptionV3Features(protocol="legacy")


# ---------------------------------------------------------------- statistics files and the cache key
def _net(protocol: str) -> RandomFeatures:
    net = RandomFeatures(dim=8)
    net.protocol = protocol  # stands in for an Inception net of that protocol
    return net


def test_stats_files_round_trip_and_refuse_other_protocols(tmp_path):
    gen = torch.Generator().manual_seed(2)
    ref_images = torch.rand(60, 1, 8, 8, generator=gen) * 2 - 1
    samples = torch.rand(30, 1, 8, 8, generator=gen) * 2 - 1
    net = _net("clean")
    ref = reference_stats(ref_images, net, identity="toy:test", cache_dir=False)
    path = save_stats(ref, tmp_path / "ours.npz")
    edm_style = dict(np.load(path, allow_pickle=False))  # how EDM's fid.py and clean-fid read a file
    np.testing.assert_array_equal(edm_style["mu"], ref.mu.numpy())
    np.testing.assert_array_equal(edm_style["sigma"], ref.sigma.numpy())
    back = load_stats(path, protocol="clean", dim=8)
    assert torch.equal(back.mu, ref.mu) and torch.equal(back.sigma, ref.sigma) and back.num_images == 60
    assert back.protocol == "clean" and back.key["protocol_source"] == "file"
    with pytest.raises(ValueError, match="'clean'-protocol statistics"):
        load_stats(path, protocol="edm")
    with pytest.raises(ValueError, match="8-d"):
        load_stats(path, protocol="clean", dim=2048)

    kw = dict(feature_net=net, cache_dir=False, kid_subsets=2)
    from_images = evaluate_samples(samples, ref_images, **kw)
    with pytest.warns(UserWarning, match="mu/sigma only"):
        from_file = evaluate_samples(samples, f"stats:{path}", **kw)
    assert from_file["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert from_file["protocol"] == "clean" and from_file["metrics_skipped"] == ["kid", "pr"]

    np.savez(tmp_path / "cifar10-32x32.npz", mu=ref.mu.numpy(), sigma=ref.sigma.numpy())  # EDM's fid.py ref
    edm = load_stats(tmp_path / "cifar10-32x32.npz", protocol="edm")
    assert edm.key["protocol_source"] == "declared" and edm.num_images is None
    cf = tmp_path / "toy_clean_custom_na.npz"  # clean-fid's make_custom_stats: name carries the mode
    np.savez_compressed(cf, mu=ref.mu.numpy(), sigma=ref.sigma.numpy())
    assert load_stats(cf, protocol="clean").key["protocol_source"] == "file"
    with pytest.raises(ValueError, match="--protocol clean"):
        evaluate_samples(samples, f"stats:{cf}", **{**kw, "feature_net": _net("edm")})


def test_cache_key_and_file_include_the_protocol(tmp_path):
    images = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    edm = reference_stats(images, _net("edm"), identity="toy", cache_dir=tmp_path)
    clean = reference_stats(images, _net("clean"), identity="toy", cache_dir=tmp_path)
    assert not clean.from_cache and edm.path != clean.path and "clean" in clean.path.name
    assert reference_stats(images, _net("clean"), identity="toy", cache_dir=tmp_path).from_cache
    assert load_stats(clean.path, protocol="clean").features.shape == (20, 8)  # the cache is a stats file too


# ---------------------------------------------------------------- progress
def test_progress_lines_report_count_speed_and_eta(tmp_path, capsys):
    bar = Progress("thing", 10, every_s=0)
    bar.update(4)
    bar.update(6)
    lines = capsys.readouterr().err.strip().splitlines()
    assert "4/10 images (40%)" in lines[0] and "img/s" in lines[0] and "ETA" in lines[0]
    assert "10/10" in lines[1] and "done in" in lines[1]
    Progress("silent", 5, enabled=False).update(5)
    assert capsys.readouterr().err == ""

    images = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    kw = dict(feature_net=RandomFeatures(), cache_dir=tmp_path, metrics=("fid",), batch_size=8, progress=True)
    evaluate_samples(images[:12], images, **kw)
    err = capsys.readouterr().err
    assert "reference statistics: computing" in err and f"caching them in {tmp_path}" in err
    assert "features of reference] 24/24 images" in err and "features of samples] 12/12 images" in err
    evaluate_samples(images[:12], images, **kw)
    assert "loaded" in capsys.readouterr().err


# ---------------------------------------------------------------- exact reduction over ranks
def test_feature_sums_reduce_exactly():
    f = torch.randn(101, 6, generator=torch.Generator().manual_seed(5)) + 3.0
    mu, sigma = feature_stats(f)
    parts = [FeatureSums(6).add(c) for c in f.split([40, 1, 60])]  # three "ranks", uneven slices
    total = parts[0]
    for p in parts[1:]:  # what all_reduce computes: the sums of the sums
        total.n += p.n
        total.sum += p.sum
        total.outer += p.outer
    mu2, sigma2 = total.mu_sigma()
    torch.testing.assert_close(mu2, mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma2, sigma, rtol=0, atol=1e-12)


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    gen = np.random.default_rng(6)
    np.savez(tmp_path / "s.npz", samples=gen.integers(0, 256, size=(41, 8, 8), dtype=np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    args = ["-m", "dibregman.cli", "eval", "--samples", str(tmp_path / "s.npz"), "--reference", "digits::test"]
    args += ["--features", "mnist", "--device", "cpu", "--batch", "16", "--quiet", "--trials", "2"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    runs = {}
    for name, launch in (("one", []), ("two", torchrun)):
        cmd = [sys.executable, *launch, *args, "--out", str(tmp_path / f"{name}.json")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    one, two = runs["one"], runs["two"]
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["n_samples"] == two["n_samples"] == 41
    for key in ("fid", "kid", "precision", "recall", "classifier_score", "fid_trial_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------- FID versus images of a run
def test_fid_curve_of_a_runs_ema_snapshots(tmp_path, tiny_teacher, capsys):
    from dibregman.cli import main
    from dibregman.config import override
    from dibregman.generators import generate, generate_rows, load_generator
    from dibregman.loop import distill
    from dibregman.presets import get_preset

    cfg = override(
        get_preset("mnist"),
        {
            "model.teacher": f"edm:{tiny_teacher}", "model.real": "teacher", "model.teacher_pool": 16,
            "model.teacher_pool_steps": 2, "optim.batch_size": 4, "run.total_kimg": 0.016,
            "run.ckpt_every_kimg": 0.004, "run.keep_ckpts": 2, "run.keep_ema_every_kimg": 0.008,
            "run.tensorboard": False, "run.sample_every_kimg": 0.0,
        },
    )  # fmt: skip
    run = tmp_path / "run"
    distill(cfg, run)
    snaps = list_snapshots(run)  # ckpt-8 pruned (keep 2) but kept as ema-8; ckpt-16 and ema-16: the export
    names = ["ema-000000000008.safetensors", "ckpt-000000000012.pt", "ema-000000000016.safetensors"]
    assert [p.name for p in snaps] == names
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    final, _ = load_generator(run)
    kw = dict(seed=3, batch_size=4, device="cpu", progress=False)  # a rank's rows cut across batches
    halves = [generate_rows(final, 10, rows, **kw) for rows in (slice(0, 5), slice(5, 10))]
    assert torch.equal(torch.cat(halves), generate(final, 10, seed=3, batch_size=4))
    assert torch.equal(load_snapshot(snaps[-1])(z), final(z))
    from_ckpt = load_snapshot(snaps[1])  # rebuilt from the teacher named in the checkpoint's config
    assert from_ckpt(z).shape == (3, 1, 8, 8) and not torch.equal(from_ckpt(z), final(z))

    reference = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    net = RandomFeatures()
    curve = evaluate_run(run, reference, num_samples=16, feature_net=net, metrics=("fid",), cache_dir=False)
    assert [r["num_images"] for r in curve["rows"]] == [8, 12, 16] and curve["protocol"] == "random"
    assert Path(curve["written"][0]).is_file() and Path(curve["written"][1]).stat().st_size > 1000
    same = evaluate_samples(generate(final, 16, seed=0), reference, feature_net=net, metrics=("fid",), cache_dir=False)
    assert curve["rows"][-1]["fid"] == pytest.approx(same["fid"], rel=1e-9)
    direct = evaluate_generator(final, 16, reference, feature_net=net, metrics=("fid",), cache_dir=False, progress=True)
    assert direct["fid"] == pytest.approx(same["fid"], rel=1e-9)
    assert "[generation] 16/16 images (100%)" in capsys.readouterr().err
    table = fid_table(curve["rows"] + [{**curve["rows"][0], "protocol": "clean", "fid": 1.0}])
    assert table.splitlines()[0] == "| kimg | FID (random/clean) | FID (random) |"

    out = tmp_path / "cli_curve"
    argv = ["eval", "--run", str(run), "--every-ckpt", "--features", "mnist", "--reference", "digits::test"]
    argv += ["--num", "8", "--metrics", "fid", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["feature_net"] == "mnist" and len(saved["rows"]) == 3 and out.with_suffix(".png").is_file()
    argv[argv.index("--every-ckpt")] = "--ckpt=ckpt-000000000012.pt"  # a list of snapshots, named in the run
    assert main(argv) == 0 and len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 1
    assert main(["eval", "--run", str(run), "--features", "mnist"]) == 2  # --run needs --every-ckpt or --ckpt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_on_the_gpu_equals_the_cpu():
    gen = torch.Generator().manual_seed(7)
    reference, samples = (torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1 for n in (64, 48))
    kw = dict(feature_net=RandomFeatures(), cache_dir=False, kid_subsets=3, kid_subset_size=32)
    cpu = evaluate_samples(samples, reference, device="cpu", **kw)
    gpu = evaluate_samples(samples, reference, device="cuda", **kw)
    assert gpu["device"].startswith("cuda")
    for key in ("fid", "kid"):  # (precision/recall may flip a point on a k-NN radius: not compared)
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-4, abs=1e-6), key
