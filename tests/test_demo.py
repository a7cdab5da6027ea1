"""A reduced `make demo` runs end to end and writes every report artefact."""

import json

from dibregman.demo import run_demo


def test_quick_demo_writes_every_artefact(tmp_path, capsys):
    summary = run_demo(tmp_path, quick=True)
    for name in ("report.md", "student.png", "teacher.png", "curves.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "run" / "generator.safetensors").exists()
    saved = json.loads((tmp_path / "summary.json").read_text())
    for who in ("student", "teacher"):
        for net in ("mnist_features", "inception"):
            r = saved[who][net]
            assert r["n_samples"] > 0 and r["fid"] >= 0
    assert saved["speed"]["teacher_evaluations"] == 3 and saved["speed"]["student_evaluations"] == 1
    assert saved["speed"]["speedup"] > 0 and saved["fid_curve"]
    report = (tmp_path / "report.md").read_text()
    assert f"{saved['student']['mnist_features']['fid']:.2f}" in report
    assert "![student](student.png)" in report and "speed-up" in report
    assert "Divergence `rkl`," in report  # the `mnist` preset's, without a lambda it does not take
    assert "report.md" in capsys.readouterr().out
    assert summary["distill"]["images_seen"] == saved["distill"]["images_seen"] > 0


def test_shipped_student_is_matched_to_the_teacher_by_content(tmp_path):
    from dibregman.demo import _same_teacher

    a, b, c = (tmp_path / n for n in ("a.safetensors", "b.safetensors", "c.safetensors"))
    a.write_bytes(b"teacher"), b.write_bytes(b"teacher"), c.write_bytes(b"another")
    assert _same_teacher(f"edm:{a}", f"edm:{b}")  # a copy at another path
    assert not _same_teacher(f"edm:{a}", f"edm:{c}")
    assert not _same_teacher(f"edm:{tmp_path / 'missing'}", f"edm:{a}")


def test_divergence_label_names_only_the_parameters_a_divergence_takes():
    from dataclasses import asdict

    from dibregman.config import DivergenceConfig
    from dibregman.demo import _divergence_label

    assert _divergence_label(asdict(DivergenceConfig(name="sba", lam=3.0))) == "`sba` (lam=3)"
    assert _divergence_label(asdict(DivergenceConfig(name="alpha", alpha=0.25))) == "`alpha` (alpha=0.25)"
    assert _divergence_label(asdict(DivergenceConfig(name="lr", lam=3.0))) == "`lr`"
