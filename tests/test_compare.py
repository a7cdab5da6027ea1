"""`dibregman compare`: runs of one setting (differing only in the seed) are one band; the table's numbers are
read from the logs."""

import json

import pytest

from dibregman.cli import main
from dibregman.compare import band, compare


def _run(path, seed, lr, fids):
    path.mkdir(parents=True)
    cfg = {"optim": {"gen_lr": lr}, "run": {"seed": seed}}
    (path / "config.json").write_text(json.dumps(cfg))
    with open(path / "log.jsonl", "w") as f:
        for i, fid in enumerate(fids):
            rec = {"kimg": float(i + 1), "fid_mnist": fid, "weight/ess_frac": 0.9, "disc/disc_acc": 0.5 + i / 10}
            f.write(json.dumps(rec) + "\n")
        f.write('{"kimg": 9, "fid_mn')  # a line cut by a kill is ignored
    return path


def test_seeds_form_one_setting_with_a_band(tmp_path):
    a = _run(tmp_path / "a", 0, 1e-4, [50.0, 30.0, 20.0])
    b = _run(tmp_path / "b", 1, 1e-4, [60.0, 20.0, 24.0])
    c = _run(tmp_path / "c", 0, 5e-4, [40.0, 45.0, 70.0])
    r = compare([a, b, c], tmp_path / "out" / "cmp")
    rows = {row["setting"]: row for row in r["rows"]}
    assert set(rows) == {"base", "gen_lr=0.0005"}  # labelled by what differs from the most common setting
    two = rows["base"]
    assert two["seeds"] == 2 and two["fid_final"] == {"mean": 22.0, "min": 20.0, "max": 24.0, "n": 2}
    assert two["fid_best"]["mean"] == 20.0 and rows["gen_lr=0.0005"]["fid_best"]["mean"] == 40.0
    b0 = _run(tmp_path / "b0", 2, 1e-4, [1.0])
    (b0 / "config.json").write_text(json.dumps({"optim": {"gen_lr": 1e-4, "gen_sigma_max": None}, "run": {"seed": 2}}))
    cfgs = [json.loads((p / "config.json").read_text()) for p in (a, b0)]
    from dibregman.compare import setting_label

    assert setting_label(cfgs[1], cfgs) == "base"  # a key missing or None reads as "off", like 0
    md = (tmp_path / "out" / "cmp.md").read_text()
    assert "22 [20, 24]" in md and (tmp_path / "out" / "cmp.png").stat().st_size > 1000
    x, mean, lo, hi = band([[(1.0, 1.0), (2.0, 4.0)], [(1.0, 3.0), (2.0, 2.0), (3.0, 9.0)]])
    assert x == [1.0, 2.0] and mean == [2.0, 3.0] and lo == [1.0, 2.0] and hi == [3.0, 4.0]


def test_cli_compare_and_bad_folder(tmp_path, capsys):
    a = _run(tmp_path / "a", 0, 1e-4, [50.0, 30.0])
    assert main(["compare", str(a), "--out", str(tmp_path / "c")]) == 0
    assert "| a | 1 |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError):
        compare([], tmp_path / "e")


def test_kimg_reads_runs_of_different_lengths_at_equal_images(tmp_path, capsys):
    short = _run(tmp_path / "short", 0, 5e-4, [40.0, 45.0])  # a probe stopped at 2 kimg
    long = _run(tmp_path / "long", 0, 1e-4, [50.0, 30.0, 20.0, 10.0])
    rows = {r["setting"]: r for r in compare([short, long], tmp_path / "k", until_kimg=2)["rows"]}
    assert rows["gen_lr=0.0001"]["fid_final"]["mean"] == 30.0  # not 10: read up to 2 kimg
    assert rows["gen_lr=0.0001"]["kimg"] == 2.0 and rows["gen_lr=0.0005"]["fid_final"]["mean"] == 45.0
    full = {r["setting"]: r for r in compare([short, long], tmp_path / "f")["rows"]}
    assert full["gen_lr=0.0001"]["fid_final"]["mean"] == 10.0
    assert main(["compare", str(short), str(long), "--kimg", "2", "--out", str(tmp_path / "c")]) == 0
    assert "| gen_lr=0.0001 | 1 | 2 | 30 |" in capsys.readouterr().out
    assert main(["compare", str(short), "--kimg", "0", "--out", str(tmp_path / "z")]) == 2
    assert "until_kimg must be > 0" in capsys.readouterr().err


def test_an_objective_sweep_names_each_objective():
    """Runs of several divergences: each label starts with its objective and its own parameters (reverse KL's
    unused lam names nothing); other differing keys follow."""
    from dibregman.compare import setting_label

    def cfg(name, lam=5.0, clip=5.0, seed=0):
        return {"divergence": {"name": name, "lam": lam, "alpha": 0.5, "weight_clip": clip}, "run": {"seed": seed}}

    cfgs = [cfg("rkl", lam=3.0), cfg("sba"), cfg("sba", seed=1), cfg("sba", lam=-1.0), cfg("sba", clip=2.0), cfg("lr")]
    labels = [setting_label(c, cfgs) for c in cfgs]
    assert labels == ["rkl", "sba(lam=5)", "sba(lam=5)", "sba(lam=-1)", "sba(lam=5), weight_clip=2.0", "lr"]
    one = [cfg("sba"), cfg("sba", lam=3.0)]  # one divergence: labelled by the differing keys, as before
    assert [setting_label(c, one) for c in one] == ["lam=5.0", "lam=3.0"]
