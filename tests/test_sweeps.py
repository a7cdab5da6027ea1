"""The objective sweeps of bench/ (mnist_sweep.py, gmm_sweep.py) and their verdict: statistics over seeds on
synthetic numbers, the classifier score on synthetic logits, bitwise-equal weights training bitwise-equal runs,
a killed sweep resuming exactly and skipping finished runs, a run held by another process skipped, a diverged
run recorded and left out, and a verdict that follows the numbers (flip them and it flips)."""

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seedstats as ss  # noqa: E402
import sweeprun  # noqa: E402


def test_band_stat_target_and_compare_on_synthetic_numbers():
    a = [(0.0, 100.0), (5.0, 40.0), (10.0, 20.0)]
    b = [(0.0, 110.0), (5.0, 30.0), (10.0, 24.0), (15.0, 9.0)]
    x, mean, lo, hi = ss.band([a, b])
    assert x == [0.0, 5.0, 10.0] and mean == [105.0, 35.0, 22.0] and lo == [100.0, 30.0, 20.0] and hi[1] == 40.0
    assert ss.stat([3.0, None, float("nan"), 1.0, 2.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert ss.stat([None]) is None and ss.fmt_stat(None) == "n/a"
    assert ss.fmt_stat(ss.stat([20.0, 24.0])) == "22 [20, 24]" and ss.fmt_stat(ss.stat([7.0])) == "7"
    assert ss.checkpoints([5.0, 10.0, 15.0, 20.0]) == [5.0, 10.0, 20.0]  # nearest to 1/4, 1/2, 1 of the last
    assert ss.stat_at([a, b], 10.0) == {"mean": 22.0, "min": 20.0, "max": 24.0, "n": 2}
    assert ss.kimg_to_target(a, 40.0) == 5.0 and ss.kimg_to_target(a, 19.0) is None
    assert ss.kimg_to_target([(0.0, 1.0), (5.0, 7.5)], 7.0, lower_is_better=False) == 5.0  # a score: >= target
    r = ss.reach([a, b], 25.0)
    assert r["per_seed"] == [10.0, 10.0] and r["reached"] == 2 and r["kimg"]["mean"] == 10.0
    r = ss.reach([a, b], 15.0)
    assert r["per_seed"] == [None, 15.0] and r["reached"] == 1 and ss.fmt_reach(r) == "15 kimg (1/2 seeds)"
    assert ss.reach([a], None) is None and ss.fmt_reach(ss.reach([a], 1.0)) == "not reached (0/1)"
    assert ss.tail_mean(b) == pytest.approx((24 + 9) / 2)  # the second half: kimg >= 7.5
    low, high, mid = ss.stat([10.0, 12.0]), ss.stat([13.0, 15.0]), ss.stat([11.0, 14.0])
    assert ss.compare(low, high) == ss.BETTER and ss.compare(high, low) == ss.WORSE
    assert ss.compare(low, high, lower_is_better=False) == ss.WORSE  # a score: higher is better
    assert ss.compare(mid, low) == ss.TIE and ss.compare(ss.stat([12.0, 13.0]), high) == ss.TIE  # touching: tie
    assert ss.compare(ss.stat([1.0]), high) == ss.ONE_SEED and ss.compare(None, high) == "n/a"


def test_tail_mean_is_the_second_half_of_training():
    assert ss.tail_mean([(0.0, 9.0), (5.0, 1.0), (10.0, 2.0), (20.0, 3.0)]) == pytest.approx(2.5)  # kimg >= 10
    assert ss.tail_mean([]) is None


def _one_hot_net():
    """A feature net whose class is written in the first pixel (tests only): confident one-hot logits."""
    from dibregman.metrics.features import FeatureNet

    class OneHot(FeatureNet):
        name, dim, has_logits = "onehot", 4, True

        def features(self, images):
            return images.flatten(1)[:, :4].float()

        def logits(self, images):
            k = images.flatten(1)[:, 0].round().long().clamp(0, 9)
            return 30.0 * torch.nn.functional.one_hot(k, 10).float()

    return OneHot()


def test_classifier_score_is_exp_expected_kl_on_synthetic_logits():
    """The sweep's IS-like score (Fig. 5): exp(E KL(p(y|x) || p(y))) = the number of equally used, confidently
    classified classes; 1 for a single class."""
    import mnist_sweep
    from dibregman.evaluate import prepare_reference

    net = _one_hot_net()
    g = torch.Generator().manual_seed(0)
    ref_images = torch.rand(64, 1, 4, 4, generator=g)
    ctx = {"net": net, "device": torch.device("cpu")}
    ctx["ref"] = prepare_reference(ref_images, net, cache_dir=False)

    def images_of(classes):
        x = torch.rand(len(classes), 1, 4, 4, generator=g)
        x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.float32)
        return x

    ten = mnist_sweep.score(images_of([k % 10 for k in range(200)]), ctx, ("fid", "score"), 1)
    one = mnist_sweep.score(images_of([3] * 200), ctx, ("fid", "score"), 1)
    five = mnist_sweep.score(images_of([k % 5 for k in range(200)]), ctx, ("score",), 1)
    assert ten["classifier_score"] == pytest.approx(10.0, rel=1e-6)
    assert one["classifier_score"] == pytest.approx(1.0, rel=1e-6)
    assert five["classifier_score"] == pytest.approx(5.0, rel=1e-6)
    assert math.isfinite(ten["fid"]) and ten["class_proportions"] == pytest.approx([0.1] * 10)


def test_bitwise_equal_weights_are_one_run_and_train_bitwise_equal(tmp_path):
    """SBA(lambda = -1) and forward KL share the weight e^l bit for bit: the sweeps train them once. Check that
    they do train identically, and that another weight (reverse KL's 1) does not."""
    from dibregman.config import override
    from dibregman.loop import Trainer
    from dibregman.presets import get_preset
    from test_distill import GMM_SMALL

    assert sweeprun.identical_weights(list(sweeprun.FIGURE4)) == {"fkl": "sba(lam=-1)"}
    states = {}
    for name, params in (("sba", {"lam": -1.0}), ("fkl", {}), ("rkl", {})):
        pairs = {**GMM_SMALL, "divergence.name": name, **{f"divergence.{k}": v for k, v in params.items()}}
        cfg = override(get_preset("gmm"), {**pairs, "run.total_kimg": 0.256, "run.device": "cpu"})
        tr = Trainer(cfg, tmp_path / name)
        tr.train()
        states[name] = tr.ema.state_dict()
        logs = sweeprun.read_log(tmp_path / name)
        if name == "fkl":
            assert min(r["weight/ess_frac"] for r in logs) < 1.0  # the weights are not all equal: a real test
    equal = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert equal(states["sba"], states["fkl"]) and not equal(states["fkl"], states["rkl"])


def _mnist_argv(tmp_path, work: str, *extra) -> list[str]:
    return [
        "--quick", "--threads", "1", "--objectives", "rkl,sba(lam=5)", "--seeds", "1", "--kimg", "0.032",
        "--fid-every-kimg", "0.016", "--ckpt-every-kimg", "0.008", "--teacher-nfe", "0",
        "--out", str(tmp_path / f"out-{work}"), "--work", str(tmp_path / work), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_killed_mnist_sweep_resumes_exactly_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    """SIGINT during the second run: the first run's result stays, the second keeps its checkpoint; the same
    command again skips the first and resumes the second, which ends equal to an uninterrupted sweep's."""
    import mnist_sweep
    from dibregman import runguard
    from dibregman.loop import Trainer

    monkeypatch.chdir(ROOT)
    reference = mnist_sweep.main(_mnist_argv(tmp_path, "straight"))

    class KilledOnce(Trainer):
        fired = False

        def __init__(self, cfg, run_dir, hooks=None, **kw):
            def kill(trainer, num_images):
                if cfg.divergence.name == "sba" and num_images >= 16 and not KilledOnce.fired:
                    KilledOnce.fired = True
                    os.kill(os.getpid(), signal.SIGINT)  # the loop checkpoints this step, then stops
                return {}

            super().__init__(cfg, run_dir, hooks=[*(hooks or []), kill], **kw)

    monkeypatch.setattr(mnist_sweep, "Trainer", KilledOnce)
    with pytest.raises(runguard.RunInterrupted):
        mnist_sweep.main(_mnist_argv(tmp_path, "killed"))
    runs = tmp_path / "killed" / "mnist_sweep" / "0.032kimg-b8"
    first, second = runs / "rkl-s0" / sweeprun.RESULT, runs / "sba_lam_5-s0"
    assert first.is_file() and not (second / sweeprun.RESULT).exists()
    assert [p.name for p in sorted(second.glob("ckpt-*.pt"))][-1] == "ckpt-000000000016.pt"
    before = first.stat().st_mtime_ns
    capsys.readouterr()

    monkeypatch.setattr(mnist_sweep, "Trainer", Trainer)
    resumed = mnist_sweep.main(_mnist_argv(tmp_path, "killed"))
    out = capsys.readouterr().out
    assert "rkl seed 0: finished, skipped" in out and "resumed from" in out
    assert first.stat().st_mtime_ns == before  # the finished run was not touched
    assert resumed["missing"] == [] and [r["label"] for r in resumed["runs"]] == ["rkl", "sba(lam=5)"]
    for a, b in zip(resumed["runs"], reference["runs"], strict=True):
        assert a["curve"] == b["curve"] and a["final"]["mnist_features"] == b["final"]["mnist_features"]
        assert [c["kimg"] for c in a["curve"]] == [0.0, 0.016, 0.032]  # kimg 0 = the initial generator
    log = [json.loads(x) for x in (second / "log.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in log] == [0.0, 0.016, 0.032]  # cut back to the checkpoint, then continued

    # --until-kimg: a probe that is a prefix of the full run; without it the same run finishes, equal
    # (0.012 kimg rounds up to the checkpoint at 0.016: the prefix ends where the full run can resume without loss)
    prefix = mnist_sweep.main(_mnist_argv(tmp_path, "prefix", "--only", "sba(lam=5)", "--until-kimg", "0.012"))
    run = tmp_path / "prefix" / "mnist_sweep" / "0.032kimg-b8" / "sba_lam_5-s0"
    assert "stopped at 0.016 of 0.032 kimg" in capsys.readouterr().out and prefix["runs"] == []
    assert not (run / sweeprun.RESULT).exists() and sorted(run.glob("ckpt-*.pt"))[-1].name == "ckpt-000000000016.pt"
    done = mnist_sweep.main(_mnist_argv(tmp_path, "prefix", "--only", "sba(lam=5)"))
    assert done["runs"][0]["curve"] == reference["runs"][1]["curve"]
    assert done["runs"][0]["final"]["mnist_features"] == reference["runs"][1]["final"]["mnist_features"]
    with pytest.raises(ValueError, match="--until-kimg must lie in"):
        mnist_sweep.main(_mnist_argv(tmp_path, "prefix", "--until-kimg", "1"))


@pytest.mark.slow
def test_the_shuffled_placebo_and_the_paper_design_finish_and_are_reported(tmp_path, monkeypatch):
    """The placebo `sba(lam=5) shuffled` carries a stabiliser option in its spec: it trains, is recorded (its
    weight says it is shuffled) and collected; `--paper-design` runs live apart, with the paper's config."""
    import mnist_sweep

    monkeypatch.chdir(ROOT)
    argv = [*_mnist_argv(tmp_path, "placebo"), "--objectives", "sba(lam=5) shuffled"]
    data = mnist_sweep.main(argv)
    (run,) = data["runs"]
    assert run["label"] == "sba(lam=5) shuffled" and run["weight"].endswith("shuffled within sigma bins")
    assert run["params"] == {"lam": 5.0, "shuffle_weights": True} and not data["missing"]
    paper = mnist_sweep.main([*argv, "--paper-design"])
    (folder,) = (tmp_path / "placebo" / "mnist_sweep_paper").glob("*/sba_lam_5_shuffled-s0")
    saved = json.loads((folder / sweeprun.RESULT).read_text())["config"]
    assert saved["model"]["disc_head"] == "mean" and saved["divergence"]["normalize"] == "none"
    assert saved["loss"]["gen_t_max"] == 1.0 and paper["runs"][0]["curve"] != run["curve"]


@pytest.mark.slow
def test_a_run_held_by_another_process_is_skipped_then_collected(tmp_path, monkeypatch, capsys):
    """Two processes on one work folder: a run whose lock is held is skipped (listed as missing), the others
    train; once it is free the same command trains it, and --collect alone rebuilds the complete JSON."""
    import mnist_sweep
    from dibregman import runguard

    monkeypatch.chdir(ROOT)
    held = tmp_path / "w" / "mnist_sweep" / "0.032kimg-b8" / "sba_lam_5-s0"
    lock = runguard.RunLock(held).acquire()
    try:
        d = mnist_sweep.main(_mnist_argv(tmp_path, "w"))
    finally:
        lock.release()
    assert "sba(lam=5) seed 0: skipped" in capsys.readouterr().out
    assert [r["label"] for r in d["runs"]] == ["rkl"] and d["missing"][0]["label"] == "sba(lam=5)"
    mnist_sweep.main(_mnist_argv(tmp_path, "w", "--only", "sba(lam=5)"))
    d = mnist_sweep.main(_mnist_argv(tmp_path, "w", "--collect"))
    assert [r["label"] for r in d["runs"]] == ["rkl", "sba(lam=5)"] and d["missing"] == []
    assert (tmp_path / "out-w" / "mnist_sweep.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_changed_teacher_file_is_refused(tmp_path, monkeypatch):
    """A teacher still in training rewrites its export under the same name: runs started from the old file are
    neither resumed nor counted as finished from the new one."""
    import common
    import mnist_sweep

    monkeypatch.chdir(ROOT)
    argv = _mnist_argv(tmp_path, "t", "--only", "rkl")
    assert mnist_sweep.main(argv)["runs"][0]["teacher_sha256"]
    info = common.teacher_info
    monkeypatch.setattr(common, "teacher_info", lambda spec: {**info(spec), "sha256": "0123456789ab"})
    with pytest.raises(ValueError, match="started from a teacher file with sha256"):
        mnist_sweep.main(argv)
    d = mnist_sweep.main([*argv, "--collect"])
    assert d["runs"] == [] and "another teacher file" in d["missing"][0]["why"]


@pytest.mark.slow
def test_gmm_sweep_skips_finished_runs_and_trains_only_new_ones(tmp_path, monkeypatch):
    import gmm_sweep
    from dibregman.loop import Trainer

    monkeypatch.chdir(ROOT)
    argv = ["--quick", "--threads", "1", "--seeds", "2", "--teachers", "gmm:ring8", "--out", str(tmp_path / "o")]
    argv += ["--work", str(tmp_path / "w")]
    first = gmm_sweep.main([*argv, "--only", "rkl"])
    assert {(r["label"], r["seed"]) for r in first["runs"]} == {("rkl", 0), ("rkl", 1)}
    built = []

    class Counting(Trainer):
        def __init__(self, cfg, *a, **kw):
            built.append((cfg.divergence.name, cfg.run.seed))
            super().__init__(cfg, *a, **kw)

    monkeypatch.setattr(gmm_sweep, "Trainer", Counting)
    second = gmm_sweep.main([*argv, "--only", "rkl,sba(lam=-1)"])
    assert sorted(built) == [("sba", 0), ("sba", 1)]  # rkl finished: skipped; fkl is sba(lam=-1)'s run
    fkl = [r for r in second["runs"] if r["label"] == "fkl"]
    assert len(fkl) == 2 and all(r["alias_of"] == "sba(lam=-1)" for r in fkl)
    assert {m["label"] for m in second["missing"]} == {"sba(lam=1)", "sba(lam=3)", "sba(lam=5)", "sba(lam=10)",
                                                       "lr (= js)"}  # fmt: skip


def test_a_tagged_gmm_variant_is_its_own_result_section_and_verdict_block(tmp_path, monkeypatch):
    """`--set ... --tag NAME` writes gmm_sweep_NAME.json and its own PNGs next to the sweep's; BENCHMARKS.md
    gives it a section titled by its overrides and the verdict a block per teacher under them."""
    import gmm_sweep
    import run_all
    import verdict

    monkeypatch.chdir(ROOT)
    argv = ["--quick", "--threads", "1", "--seeds", "1", "--teachers", "gmm:ring8", "--out", str(tmp_path / "o")]
    v = gmm_sweep.main([*argv, "--work", str(tmp_path / "w"), "--collect", "--set", "loss.regression_weight=0",
                        "--tag", "noreg"])  # fmt: skip
    assert v["benchmark"] == "gmm_sweep_noreg" and v["set"] == {"loss.regression_weight": 0}
    assert v["plots"] == ["gmm_sweep_noreg.png", "gmm_sweep_noreg_curves.png"]
    assert (tmp_path / "o" / "gmm_sweep_noreg.json").is_file() and not (tmp_path / "o" / "gmm_sweep.json").exists()
    with pytest.raises(ValueError, match="--tag must be"):
        gmm_sweep.main([*argv, "--work", str(tmp_path / "w"), "--collect", "--tag", "No Reg"])
    md = run_all.write_report(tmp_path / "o").read_text()
    assert "## GMM objective sweep with seeds (exact teachers): `loss.regression_weight=0`" in md
    assert "- [gmm_sweep_noreg](#gmm-objective-sweep-with-seeds-exact-teachers-lossregression_weight0)" in md
    both = {"gmm_sweep": _gmm_json([0.05, 0.06], [0.05, 0.06]),
            "gmm_sweep_noreg": {**_gmm_json([0.01, 0.02], [0.05, 0.06]), "benchmark": "gmm_sweep_noreg",
                                "set": {"loss.regression_weight": 0}}}  # fmt: skip
    block = "\n".join(verdict.markdown(both))
    assert "### GMM `gmm:ring8` (100 kimg per run, 2 seeds)" in block
    assert "### GMM `gmm:ring8` with `loss.regression_weight=0` (100 kimg per run, 2 seeds)" in block
    assert "- GMM `gmm:ring8` with `loss.regression_weight=0`, mode coverage (mode TV): use `sba(lam=5)`" in block
    collapsed = _gmm_json([0.6, 0.5], [0.05, 0.06])  # fewer modes, tighter around them: better at one metric only
    for r in collapsed["runs"]:
        sba = r["label"] != "rkl"
        r["metrics"].update(modes_covered=3 if sba else 8, within_3sigma=0.97 if sba else 0.94)
    line = next(x for x in verdict.markdown({"gmm_sweep": collapsed}) if x.startswith("- `sba(lam=5)`"))
    assert line.startswith("- `sba(lam=5)`: better at within 3σ; worse at modes, mode TV, MMD² (ESS")  # no "i.e."


@pytest.mark.slow
def test_a_diverged_run_is_recorded_left_out_and_not_retried(tmp_path, monkeypatch):
    """`run.max_bad_steps` non-finite steps in a row: the run is recorded as failed (the sweep goes on), the
    summary over seeds leaves it out and says so, and a rerun does not train it again."""
    import gmm_sweep
    from dibregman import runguard
    from dibregman.loop import Trainer

    class Diverging(Trainer):
        def train(self, max_steps=None):
            if self.cfg.divergence.name == "sba":
                super().train(max_steps=1)
                raise runguard.TooManyBadSteps("aborting: 20 consecutive non-finite steps")
            return super().train(max_steps)

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(gmm_sweep, "Trainer", Diverging)
    argv = ["--quick", "--threads", "1", "--seeds", "2", "--teachers", "gmm:ring8", "--only", "rkl,sba(lam=5)"]
    argv += ["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]
    d = gmm_sweep.main(argv)
    failed = [r for r in d["runs"] if r.get("failed")]
    assert [(r["label"], r["seed"]) for r in failed] == [("sba(lam=5)", 0), ("sba(lam=5)", 1)]
    assert all(r["images_seen"] < 128 for r in failed)  # stopped after its first step
    row = next(r for r in d["summary"] if r["label"] == "sba(lam=5)")
    assert row["seeds"] == [] and row["failed_seeds"] == [0, 1] and row["mmd2"] is None
    assert "`sba(lam=5)` diverged with seeds [0, 1]: left out." in gmm_sweep.render(d, {})
    monkeypatch.setattr(gmm_sweep, "Trainer", None)  # a rerun builds no Trainer: every run is finished
    assert len(gmm_sweep.main(argv)["runs"]) == len(d["runs"])


def test_the_divergence_rule_stops_the_diverged_committed_curves_and_no_healthy_one():
    """`sweeprun.diverged` over every prefix of the committed MNIST curves meets exactly the runs recorded as
    diverged, and no healthy one: the paper design's SBA(5) seed 0 (stopped by hand at 52k images, before the rule
    existed) first at 45 kimg; every run made with --stop-diverged (SBA(3) seed 0, ...) where it stopped."""
    logs = sorted((ROOT / "bench" / "results").glob("mnist_*_runs/*/*/*/log.jsonl"))
    assert len(logs) >= 21
    first, last, recorded = {}, {}, set()
    for path in logs:
        run = path.parent.relative_to(ROOT / "bench" / "results").as_posix()
        curve = [(float(r["kimg"]), float(r["fid_mnist"])) for r in sweeprun.read_log(path.parent) if "fid_mnist" in r]
        hits = [curve[i - 1][0] for i in range(1, len(curve) + 1) if sweeprun.diverged(curve[:i])]
        if hits:
            first[run], last[run] = hits[0], curve[-1][0]
        if str((sweeprun.read_result(path.parent) or {}).get("failed", "")).startswith("diverged"):
            recorded.add(run)
    paper = "mnist_paper_runs/mnist_sweep_paper/150kimg-b64"
    assert {f"{paper}/sba_lam_5-s0", f"{paper}/sba_lam_3-s0"} <= recorded == set(first)
    assert first.pop(f"{paper}/sba_lam_5-s0") == pytest.approx(45.056)
    assert first == pytest.approx({run: last[run] for run in first})  # the rule stopped each of the others there
    assert sweeprun.diverged([(0.0, 300.0), (5.0, 10.0), (10.0, 21.0), (15.0, 25.0)]) is None  # too few after
    assert sweeprun.diverged([(5.0, 10.0), (10.0, 21.0), (15.0, 25.0), (20.0, 19.0)]) is None  # one back under 2x
    assert "21.0, 25.0, 30.0" in sweeprun.diverged([(5.0, 10.0), (10.0, 21.0), (15.0, 25.0), (20.0, 30.0)])


def test_stop_diverged_records_the_run_as_failed_where_it_stopped_and_a_rerun_skips_it(tmp_path, monkeypatch):
    import mnist_sweep

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sweeprun, "diverged", lambda curve: "diverged: test" if curve[-1][0] >= 0.016 else None)
    argv = [*_mnist_argv(tmp_path, "div"), "--only", "sba(lam=5)", "--stop-diverged"]
    (run,) = mnist_sweep.main(argv)["runs"]
    assert run["failed"] == "diverged: test" and run["images_seen"] == 16
    assert [c["kimg"] for c in run["curve"]] == [0.0, 0.016] and run["final"]["mnist_features"]["fid"] > 0
    monkeypatch.setattr(mnist_sweep, "Trainer", None)  # a rerun builds no Trainer: the run is finished
    assert mnist_sweep.main(argv)["runs"][0]["failed"] == "diverged: test"


# ---- the verdict follows the numbers ----------------------------------------------------------------------
def _mnist_json(sba_fids: list[float], rkl_fids: list[float]) -> dict:
    """Two seeds each of rkl and sba(lam=5) with constant in-loop curves at the given final FIDs."""
    runs = []
    for label, fids in (("rkl", rkl_fids), ("sba(lam=5)", sba_fids)):
        for seed, v in enumerate(fids):
            curve = [{"kimg": k, "fid": v + 100 * (k == 0), "score": 9.0 - v / 100} for k in (0.0, 5.0, 10.0, 20.0)]
            final = {"mnist_features": {"fid": v, "classifier_score": 9.0 - v / 100}}
            div = {"divergence": "sba", "params": {"lam": 5.0}} if label != "rkl" else {"divergence": "rkl"}
            runs.append({"label": label, "seed": seed, "weight": "1", "curve": curve, "final": final,
                         "images_seen": 20000, "ess_frac_half": 0.9, "weight_max_half": 2.0, **div})  # fmt: skip
    return {"runs": runs, "sizes": {"kimg": 20.0, "n_fid": 2000, "seeds": [0, 1]}, "seed": 0}


def _gmm_json(sba_tv: list[float], rkl_tv: list[float]) -> dict:
    runs = []
    for label, tvs in (("rkl", rkl_tv), ("sba(lam=5)", sba_tv)):
        for seed, tv in enumerate(tvs):
            m = {"modes_covered": 8, "within_3sigma": 0.95, "mode_tv": tv, "mmd2": tv / 10, "energy": 0.0,
                 "num_modes": 8, "mmd2_floor": 0.0, "mmd2_floor_std": 1e-4}  # fmt: skip
            runs.append({"teacher": "gmm:ring8", "label": label, "seed": seed, "metrics": m, "curve": []})
    return {"runs": runs, "sizes": {"kimg": 100.0, "seeds": [0, 1]}, "preset": {}}


def test_mnist_table_counts_images_to_the_teacher_and_to_twice_its_fid():
    """Curves that never reach the teacher's FID still get a number: the images to twice that FID."""
    import mnist_report

    d = {**_mnist_json([20.0, 22.0], [12.0, 14.0]), "target": {"fid": 7.0, "source": "teacher, Heun 35", "n": 500}}
    d["teacher_scores"] = {"nfe": 35, "loop": {"fid": 7.0}}
    rows = mnist_report.summarise(d)
    rkl, sba = rows
    assert rkl["reach"]["reached"] == 0 and rkl["reach_loose"]["per_seed"] == [5.0, 5.0]
    assert sba["reach_loose"]["reached"] == 0
    table = "\n".join(mnist_report.curve_table({**d, "sizes": {**d["sizes"], "n_fid_loop": 500}}, rows))
    assert "| kimg to FID ≤ 7 | kimg to FID ≤ 14 |" in table
    assert "| not reached (0/2) | 5 [5, 5] kimg (2/2 seeds) |" in table and table.count("not reached (0/2)") == 3
    assert table.splitlines()[-1].count("|") == table.splitlines()[2].count("|")  # the teacher row is complete


def test_unfinished_runs_are_listed_once_per_setting_with_their_seeds():
    """A sweep's missing runs read as one entry per setting with its seeds, an alias's runs under its target only."""
    import common
    import gmm_report

    miss = [{"teacher": t, "label": lab, "seed": s} for t in ("ring", "uneven") for lab in ("a", "b") for s in (0, 1)]
    miss.append({"teacher": "ring", "label": "c", "seed": 2})
    line = gmm_report.missing({"missing": miss})[0]
    assert line == ("Not finished (9 runs): `ring` `a` seeds 0, 1; `ring` `b` seeds 0, 1; `uneven` `a` seeds 0, 1; "
                    "`uneven` `b` seeds 0, 1; `ring` `c` seed 2")  # fmt: skip
    assert common.unfinished([{"label": "x", "seed": 1}], ("label",)) == "Not finished (1 run): `x` seed 1"
    alias = [{"label": "fkl", "seed": 1}, {"label": "sba(lam=-1)", "seed": 1}]  # the same run under two names
    assert common.unfinished(alias, ("label",), {"fkl": "sba(lam=-1)"}) == "Not finished (1 run): `sba(lam=-1)` seed 1"
    assert gmm_report.missing({"missing": []}) == []


def test_verdict_follows_the_numbers_and_flips_with_them():
    import verdict

    def block(mnist, gmm):
        return "\n".join(verdict.markdown({"mnist_sweep": mnist, "gmm_sweep": gmm}))

    md = block(_mnist_json([20.0, 22.0], [30.0, 33.0]), _gmm_json([0.01, 0.02], [0.05, 0.06]))
    assert "- `sba(lam=5)`: better at FID at 5 kimg, FID at 10 kimg, FID at 20 kimg, final FID (n=2000), " \
           "classifier score, i.e. everywhere (ESS" in md  # fmt: skip
    assert "better at modes" not in md and "better at mode TV, MMD²; within seed spread elsewhere" in md
    flipped = block(_mnist_json([30.0, 33.0], [20.0, 22.0]), _gmm_json([0.05, 0.06], [0.01, 0.02]))
    assert "- `sba(lam=5)`: worse at FID at 5 kimg" in flipped and "worse at mode TV, MMD²" in flipped
    assert "better at" not in flipped
    tie = block(_mnist_json([20.0, 31.0], [30.0, 33.0]), _gmm_json([0.01, 0.055], [0.05, 0.06]))
    assert tie.count("within seed spread of reverse KL everywhere") == 2
    assert "### MNIST (20 kimg per run, 2 seeds)" in md
    one = block(_mnist_json([20.0], [30.0]), None)  # two seeds planned, one finished
    assert "fewer than two seeds: no spread to judge by" in one and "GMM" not in one
    assert "### MNIST (20 kimg per run, 1 seed of 2 planned)" in one
    assert verdict.markdown({}) == []
    # what to use follows the same numbers: the better objective where it wins, reverse KL otherwise
    assert "- MNIST, sharpness (final FID, n=2000): use `sba(lam=5)`, better than reverse KL" in md
    assert "- GMM `gmm:ring8`, mode coverage (mode TV): use `sba(lam=5)`" in md
    assert "- MNIST, sharpness (final FID, n=2000): reverse KL has the best mean (21 [20, 22]): use `rkl`." in flipped
    assert "lies within reverse KL's seed spread" in tie and "from one seed: not enough to prefer it" in one
    two = _gmm_json([0.01, 0.02], [0.05, 0.06])  # a second teacher with one seed finished so far
    two["runs"] += [{**r, "teacher": "gmm:ring8-uneven"} for r in _gmm_json([0.01], [0.05])["runs"]]
    md2 = block(None, two)
    assert "### GMM `gmm:ring8` (100 kimg per run, 2 seeds)" in md2
    assert "### GMM `gmm:ring8-uneven` (100 kimg per run, 1 seed of 2 planned)" in md2


def test_an_alias_gets_one_line_pointing_at_its_target_which_takes_the_measurements_made_under_either_name():
    """fkl is sba(lam=-1)'s run under a second name: the verdict says so in one line instead of repeating the
    target's, and a gradient-noise measurement recorded as `fkl` lands on the target's line."""
    import verdict

    d = _mnist_json([20.0, 22.0], [30.0, 33.0])
    d["runs"] += [{**r, "label": "fkl", "alias_of": "sba(lam=5)"} for r in d["runs"] if r["label"] == "sba(lam=5)"]
    obj = lambda be, cos: {"batch_equiv": be, "cos_rkl": cos, "signal": 1.0}  # noqa: E731
    noise = {"checkpoints": [{"batches": 8, "objectives": {"rkl": obj(1.0, 1.0), "fkl": obj(0.3, 0.7)}}]}
    lines = verdict.markdown({"mnist_sweep": d}, None, noise)
    target = next(x for x in lines if x.startswith("- `sba(lam=5)`"))
    assert "better at" in target and "as reverse KL's with 0.3 of the batch" in target
    assert "- `fkl` (= `sba(lam=5)`): the same runs as `sba(lam=5)` (identical weights), read there." in lines
    assert sum(x.startswith("| `fkl` (= `sba(lam=5)`) |") for x in lines) == 1  # the table keeps its row


def test_verdict_says_why_from_the_weights_and_the_calibration():
    """An SBA(lambda) row names its log-weight sensitivity (lambda) and, given the calibration benchmark's logit
    error of the default head, the factor e^{lambda * RMSE} its weights are off by; reverse KL gets no such line."""
    import verdict

    assert verdict.log_weight_slope("sba", {"lam": 5.0}) == pytest.approx(5.0)
    assert verdict.log_weight_slope("lr", {}) == pytest.approx(0.5)  # d log sigmoid(l) / dl at 0
    assert verdict.log_weight_slope("rkl", {}) == 0.0
    bins = lambda e: [{"rmse_q": e}, {"rmse_q": e}]  # noqa: E731
    cal = {"runs": [{"placement": "fake_score", "head": "linear", "bins": bins(0.1)},
                    {"placement": "fake_score", "head": "linear", "bins": bins(0.2)},
                    {"placement": "separate", "head": "linear", "bins": bins(3.0)}]}  # fmt: skip
    assert verdict.logit_error(cal)["max"] == pytest.approx(0.2)  # the default head's runs only
    assert verdict.logit_error({**cal, "quick": True}) is None
    sweep = {"mnist_sweep": _mnist_json([20.0, 22.0], [30.0, 33.0])}

    def sba5(*extra) -> str:  # the verdict's explanation line for SBA(5)
        return next(
            x for x in "\n".join(verdict.markdown(sweep, *extra)).splitlines() if x.startswith("- `sba(lam=5)`")
        )

    line = sba5(cal)
    assert "moves its log weight by 5δ" in line and "off by ×1.65-2.72 (one std)" in line  # e^0.5, e^1
    assert "keeps about 0.9 of the batch" in line
    bare = "\n".join(verdict.markdown(sweep))
    assert "moves its log weight by 5δ; each step" in bare and "off by" not in bare  # no calibration: no factor
    assert not any(x.startswith("- `rkl`") for x in bare.splitlines())
    obj = lambda be, cos, sig=1.0: {"batch_equiv": be, "cos_rkl": cos, "signal": sig}  # noqa: E731
    ckpt = lambda sba: {"batches": 32, "objectives": {"rkl": obj(1.0, 1.0), "sba(lam=5)": sba}}  # noqa: E731
    noise = {"checkpoints": [ckpt(obj(0.1, 0.5)), ckpt(obj(0.2, 0.9)), ckpt(obj(9.0, 9.0, sig=-1.0))]}
    line = sba5(cal, noise)  # the unresolved checkpoint is left out
    assert "as reverse KL's with 0.1-0.2 of the batch, its mean direction at cos 0.5-0.9" in line
    assert "(2 checkpoints, 32 paired batches each, `grad_noise.md`)" in line and "exceeds 1" not in line
    noise["checkpoints"][1]["objectives"]["sba(lam=5)"]["cos_rkl"] = 1.004  # shown as 1: nothing to explain
    line = sba5(cal, noise)
    assert "at cos 0.5-1 to reverse KL's" in line and "exceeds 1" not in line
    noise["checkpoints"][1]["objectives"]["sba(lam=5)"]["cos_rkl"] = 1.08  # the unbiased estimate can pass 1
    line = sba5(cal, noise)
    assert "at cos 0.5-1.1, an estimate from independent halves of the batches that exceeds 1 by its error" in line
