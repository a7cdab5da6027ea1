"""Smoke test of the `make bench` machinery: bench/run_all.py --quick (a couple of training steps, tiny sample
sets) into a temporary folder, then the artefacts: one JSON per benchmark, its PNGs, and a BENCHMARKS.md that
shows the numbers of the JSON and is regenerated identically from the JSON alone. Without data/mnist the
scripts' quick mode uses teacher samples as the reference, so this runs on a fresh checkout too."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)  # the scripts chdir to the repository root; restore the cwd afterwards
    import common
    import run_all
    import seedstats

    out = tmp_path / "results"
    argv = [
        "--quick",
        "--threads",
        "1",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--gmm-args",
        "--only rkl,sba(lam=5) --seeds 1 --teachers gmm:ring8",
        "--mnist-args",
        "--objectives rkl,sba(lam=5) --seeds 1",
        "--teacher-args",
        "--nfe 1,3 --samplers heun",
    ]
    assert run_all.main(argv) == 0

    data = {name: json.loads((out / f"{name}.json").read_text()) for name in run_all.REPORT_ORDER}
    for name, d in data.items():
        assert d["quick"] and d["wall_sec"] >= 0 and d["machine"]["torch"], name
        for png in d.get("plots", []):
            assert (out / png).stat().st_size > 1000, png
    md = (out / "BENCHMARKS.md").read_text()
    assert "SMOKE RUN" in md and "## Verdict: each objective against reverse KL at equal images" in md

    f, fs = common.fmt, seedstats.fmt_stat
    gmm = data["gmm_sweep"]["runs"]
    assert [r["label"] for r in gmm] == ["rkl", "sba(lam=5)"]
    row = data["gmm_sweep"]["summary"][0]
    assert f"| `rkl` | `1` | 1 | {fs(row['modes_covered'])} of 8 | {fs(row['within_3sigma'])} |" in md
    assert fs(data["gmm_sweep"]["summary"][1]["mmd2"]) in md
    mnist = data["mnist_sweep"]["runs"]
    assert [r["images_seen"] for r in mnist] == [16, 16]
    assert fs(data["mnist_sweep"]["summary"][1]["final_fid"], 4) in md
    tq = data["teacher_quality"]["rows"]
    assert [(r["sampler"], r["nfe"]) for r in tq] == [("heun", 1), ("heun", 3)]
    assert f(tq[1]["mnist_features"]["fid"], 4) in md
    speed = data["speed"]
    assert speed["sampling"]["teacher"]["evaluations"] == 35
    assert f"**{f(speed['sampling']['speedup'], 4)}x**" in md
    assert f"**{f(speed['train_step']['ratio_median'], 4)}**" in md

    (out / "BENCHMARKS.md").unlink()  # the report is a function of the JSON files only
    assert run_all.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "BENCHMARKS.md").read_text() == md


@pytest.mark.slow
def test_speed_cifar10_variant_is_reported_beside_speed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)
    import common
    import run_all
    import speed

    out = tmp_path / "results"
    common_args = ["--quick", "--threads", "1", "--out", str(out), "--work", str(tmp_path / "work")]
    d = speed.main([*common_args, "--preset", "cifar10", "--tag", "fp32", "--set", "optim.bf16=false"])
    assert (out / "speed_cifar10_fp32.json").is_file() and d["preset"] == "cifar10"
    assert d["teacher"]["weights"].startswith("random initialisation")  # no CIFAR-10 teacher file in the repo
    assert d["train_step"]["bf16"] is False
    assert run_all.main(["--report-only", "--out", str(out)]) == 0
    md = (out / "BENCHMARKS.md").read_text()
    title = speed.title(d)
    assert f"## {title}" in md and title.startswith("Speed and memory: cifar10")
    assert f"(#{run_all.anchor('speed_cifar10_fp32', d)})" in md
    assert f"**{common.fmt(d['train_step']['ratio_median'], 4)}**" in md


@pytest.mark.slow
def test_gmm_sweep_workers_give_the_same_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)
    import gmm_sweep

    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        argv = ["--quick", "--threads", "1", "--only", "rkl,sba(lam=5)", "--workers", str(workers), "--seeds", "1"]
        argv += ["--teachers", "gmm:ring8"]
        d = gmm_sweep.main([*argv, "--out", str(out), "--work", str(tmp_path / f"work{workers}")])
        runs[workers] = [(r["label"], r["metrics"]) for r in d["runs"]]
    assert [label for label, _ in runs[2]] == ["rkl", "sba(lam=5)"]  # job order, not finishing order
    assert runs[1] == runs[2]


def test_report_only_renders_the_committed_results(tmp_path, monkeypatch):
    """`run_all.py --report-only` on the committed result JSON (whatever version of each sweep wrote it)."""
    import shutil

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import run_all

    for p in (ROOT / "bench" / "results").glob("*.json"):
        shutil.copy(p, tmp_path / p.name)
    assert run_all.main(["--report-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "BENCHMARKS.md").read_text()
    for name, d in run_all.load_results(tmp_path).items():
        assert f"(#{run_all.anchor(name, d)})" in md, name


@pytest.mark.slow
def test_repro_quick_runs_every_stage_and_the_pipeline_composes(tmp_path, monkeypatch):
    """`bench/repro.py --quick`: teacher, distillation, Figure-4 sweep (two processes, then --collect), GMM
    sweep and the reports; every JSON holds finite numbers and `dibregman compare` reads the sweep's runs."""
    import math

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)
    import repro

    out = tmp_path / "repro"
    rec = repro.main(["--quick", "--threads", "1", "--procs", "2", "--out", str(out)])
    assert list(rec["stages"]) == ["teacher", "distill", "figure4", "gmm", "report"]
    saved = json.loads((out / "repro.json").read_text())
    assert all(math.isfinite(s["wall_sec"]) for s in saved["stages"].values())
    assert Path(saved["stages"]["teacher"]["spec"].partition(":")[2]).is_file()
    checks = [("results/mnist_sweep.json", "final_fid"), ("results/mnist_sweep.json", "classifier_score")]
    checks += [("distill/mnist_sweep.json", "final_fid"), ("results/gmm_sweep.json", "mmd2")]
    for path, key in checks:
        d = json.loads((out / path).read_text())
        assert d["summary"] and all(math.isfinite(r[key]["mean"]) for r in d["summary"]), path
    fig4 = json.loads((out / "results/mnist_sweep.json").read_text())
    assert fig4["missing"] == [] and len(fig4["runs"]) == 8  # 4 objectives x 2 seeds, fkl = sba(lam=-1)'s runs
    assert sorted(p.name for p in (out / "logs").glob("figure4-*.log")) == ["figure4-0.log", "figure4-1.log"]
    md = (out / "results/BENCHMARKS.md").read_text()
    assert "## Verdict" in md and "## MNIST objective sweep" in md and "## GMM objective sweep" in md
    assert (out / "results/verdict.md").read_text().startswith("## Verdict")
    cmp = (out / "results/compare_figure4.md").read_text()
    assert "fid_mnist" in cmp and (out / "results/compare_figure4.png").stat().st_size > 1000


def test_speed_parallel_quick_runs_a_step_under_fsdp2_on_the_cpu(tmp_path, monkeypatch):
    """`bench/speed.py --parallel fsdp --quick` hands over to bench/speed_parallel.py: one Algorithm 1 step of a tiny
    UNet under FSDP2 (`fully_shard`, bf16 MixedPrecisionPolicy) on gloo with world size 1, JSON + Markdown written,
    the process group it made destroyed again."""
    import torch.distributed as dist

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)
    import speed

    out = tmp_path / "results"
    argv = ["--parallel", "fsdp", "--quick", "--threads", "1", "--checkpointing", "on", "--steps", "1", "--warmup", "0"]
    d = speed.main([*argv, "--out", str(out)])
    (row,) = d["rows"]
    assert row["status"] == "ok" and row["mode"] == "fsdp" and row["world"] == 1 and row["sharded"]
    assert row["checkpointing"] and len(row["times_sec"]) == 1 and row["median_sec"] > 0
    assert json.loads((out / "parallel_speed_quick.json").read_text())["rows"] == d["rows"]
    assert "| tiny |" in (out / "parallel_speed_quick.md").read_text() and not dist.is_initialized()
