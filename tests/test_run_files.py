"""Every file a run writes is as safe as a checkpoint (issue 32, item 5), and a command that refuses leaves the run
folder as it found it.

`regression_pairs.pt` is verified and regenerated when bad; `train-teacher` and `distill` refuse each other's
folders before writing anything; the lock and the world size are checked before any model is built; a full disk
or a read-only folder is one line; an error during a run is printed after the progress bar is closed; a user's
reward that raises shows the user's own traceback; SIGTERM during start-up says so."""

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from dibregman import checkpoint as ckpt
from dibregman import runguard
from dibregman.cli import main
from dibregman.config import override
from dibregman.loop import Trainer
from dibregman.presets import get_preset
from dibregman.regression import FILE
from dibregman.train_teacher import teacher_config, train_teacher
from test_distill import GMM_SMALL, gmm_cfg, steps_kimg
from test_faults import ENV, _flip_tensor_byte, _snapshot

REG = {"loss.regression_weight": 1.0, "loss.regression_pairs": 64, "loss.regression_steps": 4}
SETS = [f"--set={k}={v}" for k, v in {**GMM_SMALL, **REG, "run.total_kimg": steps_kimg(2)}.items()]


def _reg_cfg(steps: int = 1, **pairs):
    return override(get_preset("gmm"), {**GMM_SMALL, **REG, "run.total_kimg": steps_kimg(steps), **pairs})


def _teacher_cfg(**kw):
    return teacher_config(data="digits:", unet="tiny", batch_size=4, total_kimg=0.008, ckpt_every_kimg=0.008, **kw)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # what came before (a progress bar of an earlier run)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _last_line(err: str) -> str:
    """The error of a run that had started: the last line, after the closed progress bar (which redraws with \\r)."""
    assert "Traceback" not in err, err
    return err.rstrip("\n").split("\n")[-1]


# ---- regression_pairs.pt ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_bad_pairs_file_is_named_and_regenerated(damage, tmp_path):
    first = Trainer(_reg_cfg(), tmp_path).regression
    path = tmp_path / FILE
    if damage == "flipped byte":  # accepted silently before: a resumed generator moved by 0.23-0.30
        _flip_tensor_byte(path)
    else:  # blocked every resume with `[Errno 22] Invalid argument`, not naming the file
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"{FILE}.*(corrupt|checksum).*regenerat") as rec:
        again = Trainer(_reg_cfg(), tmp_path).regression
    assert len(rec) == 1 and len(str(rec[0].message).splitlines()) == 1
    assert torch.equal(again.x, first.x) and torch.equal(again.z, first.z)
    assert torch.equal(ckpt.load(path)["x"], first.x), "rewritten, with a checksum that verifies"


def test_pairs_file_carries_a_checksum_and_another_configs_pairs_are_still_refused(tmp_path):
    Trainer(_reg_cfg(), tmp_path)
    assert ckpt.CHECKSUM_KEY in torch.load(tmp_path / FILE, weights_only=True)
    with pytest.raises(ValueError, match="holds pairs made for"):
        Trainer(_reg_cfg(**{"loss.regression_pairs": 32}), tmp_path)


SLOW_PAIRS = """import sys, time, pathlib, torch
save = torch.save
def slow(obj, f, *a, **k):
    save(obj, f, *a, **k)
    if "regression_pairs" in str(getattr(f, "name", f)):
        pathlib.Path(sys.argv[1]).touch()  # the pairs' temp file is written, not yet renamed
        time.sleep(60)
torch.save = slow
from dibregman.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_while_writing_the_pairs_leaves_no_temp_file_and_a_cut_copy_is_remade(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "writing"
    cmd = [sys.executable, "-c", SLOW_PAIRS, str(marker), "distill", "--preset", "gmm", "--run-dir", str(run), *SETS]
    a = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not marker.exists() and a.poll() is None and time.time() - t0 < 120:
            time.sleep(0.05)
        assert marker.exists(), a.communicate()[1][-2000:]
        a.kill()  # SIGKILL: no handler, no finally
        a.wait(timeout=60)
    finally:
        a.kill()
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "the kill left a temp file"
    assert not (run / FILE).exists()
    (run / FILE).write_bytes(b"PK\x03\x04 a copy cut short")  # and, on top, a truncated copy of the pairs
    argv = ["distill", "--preset", "gmm", "--run-dir", str(run), *SETS]
    out = subprocess.run([sys.executable, "-m", "dibregman.cli", *argv], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    warned = [line for line in out.stderr.splitlines() if "warning" in line.lower()]
    assert len(warned) == 1 and warned[0].startswith(f"warning: regression pairs file {run / FILE} is corrupt"), warned
    assert warned[0].endswith("regenerating it"), "one line: no source line, no UserWarning prefix"
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    assert ckpt.load(run / FILE)["x"].shape[0] == REG["loss.regression_pairs"]


# ---- a command that refuses leaves the folder as it found it -----------------------------------------------------
def test_train_teacher_refuses_a_distill_folder_and_changes_nothing(tmp_path, capsys):
    Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(1)}), tmp_path).train()
    before = _snapshot(tmp_path)
    rc, err = _run(["train-teacher", "--preset", "digits", "--run-dir", str(tmp_path)], capsys)
    assert rc == 2 and _one_line(err) and "internal error" not in err, err
    assert "distill" in err and str(tmp_path) in err, err
    assert _snapshot(tmp_path) == before, "config.json and every other file untouched"


def test_train_teacher_refuses_another_objective_before_writing(tmp_path):
    train_teacher(_teacher_cfg(), tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="objective='edm'"):
        train_teacher(_teacher_cfg(objective="flow"), tmp_path)
    assert _snapshot(tmp_path) == before


def test_distill_refuses_a_teacher_folder_and_changes_nothing(tmp_path, capsys):
    train_teacher(_teacher_cfg(), tmp_path)
    (tmp_path / ".lock").unlink()  # a copied teacher folder: a refusal must not leave a lock either
    before = _snapshot(tmp_path)
    rc, err = _run(["distill", "--preset", "gmm", "--run-dir", str(tmp_path), *SETS], capsys)
    assert rc == 2 and _one_line(err) and "teacher" in err, err
    assert _snapshot(tmp_path) == before and not (tmp_path / FILE).exists() and not (tmp_path / ".lock").exists()


def test_world_size_is_checked_before_the_run_folder_exists(tmp_path, monkeypatch):
    from dibregman import dist

    monkeypatch.setattr(dist, "world_size", lambda: 3)  # torchrun --nproc_per_node 3 with a batch of 32
    with pytest.raises(ValueError, match="32 .*world size 3"):
        Trainer(_reg_cfg(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_second_process_sees_the_lock_before_building_any_model(tmp_path, monkeypatch):
    from dibregman.methods import dibregman as dibregman_method

    def build(*a, **k):
        raise AssertionError("models built before the lock was probed")

    monkeypatch.setattr(dibregman_method, "build_models", build)
    with runguard.RunLock(tmp_path), pytest.raises(runguard.RunLocked, match="in use by another dibregman process"):
        Trainer(_reg_cfg(), tmp_path)
    assert not (tmp_path / FILE).exists()


def test_train_teacher_probes_the_lock_before_loading_data(tmp_path, monkeypatch):
    from dibregman import train_teacher as tt

    monkeypatch.setattr(tt, "load_dataset", lambda spec: pytest.fail("data loaded before the lock was probed"))
    with runguard.RunLock(tmp_path), pytest.raises(runguard.RunLocked):
        train_teacher(_teacher_cfg(), tmp_path)


# ---- a full disk, a read-only folder -----------------------------------------------------------------------------
def _disk_full(monkeypatch) -> None:
    """torch.save writes to /dev/full: torch's own `RuntimeError: [enforce fail at inline_container.cc]` (ENOSPC)."""
    save = torch.save

    def full(obj, f, *a, **k):
        dev = open("/dev/full", "wb")
        try:
            save(obj, dev, *a, **k)
        finally:
            with contextlib.suppress(OSError):
                dev.close()

    monkeypatch.setattr(torch, "save", full)


HAS_DEV_FULL = os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)


@pytest.mark.skipif(not HAS_DEV_FULL, reason="needs the /dev/full device")
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = gmm_cfg(**{"run.total_kimg": steps_kimg(2), "run.ckpt_every_kimg": steps_kimg(1)})
    Trainer(cfg, tmp_path).train(max_steps=1)
    good = ckpt.list_checkpoints(tmp_path)
    _disk_full(monkeypatch)
    with pytest.raises(RuntimeError, match="inline_container"):  # what the CLI said as an internal error
        torch.save({"x": torch.zeros(10_000)}, tmp_path / "unused")
    rc, err = _run(["distill", "--preset", "gmm", "--run-dir", str(tmp_path), *_sets(cfg)], capsys)
    line = _last_line(err)
    assert rc == 1 and line.startswith("dibregman distill: error: no space left on device writing"), err
    assert ckpt.list_checkpoints(tmp_path) == good and ckpt.load(good[-1])["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def _sets(cfg) -> list[str]:
    pairs = {**GMM_SMALL, "run.total_kimg": cfg.run.total_kimg, "run.ckpt_every_kimg": cfg.run.ckpt_every_kimg}
    return [f"--set={k}={v}" for k, v in pairs.items()]


def test_folder_turned_read_only_during_a_run_is_one_line(tmp_path, monkeypatch, capsys):
    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(ckpt, "open", read_only, raising=False)  # every checkpoint write fails as on a ro mount
    rc, err = _run(["distill", "--preset", "gmm", "--run-dir", str(tmp_path), *SETS], capsys)
    assert rc == 2 and f"error: run folder {tmp_path} is not writable" in _last_line(err), err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_refused_before_anything_runs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        rc, err = _run(["distill", "--preset", "gmm", "--run-dir", str(run), *SETS], capsys)
    finally:
        run.chmod(0o755)
    assert rc == 2 and _one_line(err) and f"run folder {run} is not writable" in err, err
    assert not list(run.iterdir())


# ---- errors during a run come after the progress bar ---------------------------------------------------------
PLAIN = """import sys
from dibregman.cli import main
sys.exit(main(sys.argv[1:]))
"""
DOUBLE_CTRL_C = """import os, signal, sys
from dibregman import loop
step = loop.Trainer.step
def step_then_ctrl_c_twice(self, mon):
    step(self, mon)
    if self.state.step == 3:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
loop.Trainer.step = step_then_ctrl_c_twice
from dibregman.cli import main
sys.exit(main(sys.argv[1:]))
"""
DISK_FULL = """import sys, torch  # ENOSPC as Python's close() of the file reports it
save = torch.save
def full(obj, f, *a, **k):
    with open("/dev/full", "wb") as dev:
        save(obj, dev, *a, **k)
torch.save = full
from dibregman.cli import main
sys.exit(main(sys.argv[1:]))
"""
CASES = {  # script, extra --set pairs, exit code, words of the error
    "max_bad_steps": (
        PLAIN,
        {"reward.name": "python:test_run_files:nan_reward", "run.max_bad_steps": 2},
        1,
        "aborting: 2 consecutive non-finite steps",
    ),
    "double ctrl-c": (DOUBLE_CTRL_C, {}, 130, "interrupted"),
    "disk full": (DISK_FULL, {"run.ckpt_every_kimg": steps_kimg(2)}, 1, "no space left on device"),
}


def nan_reward(x):
    """A reward that is NaN everywhere: every step is skipped (python:test_run_files:nan_reward)."""
    return torch.full((x.shape[0],), float("nan"))


@pytest.mark.parametrize("case", CASES)
def test_an_error_during_a_run_is_printed_after_the_closed_progress_bar(case, tmp_path):
    if case == "disk full" and not HAS_DEV_FULL:
        pytest.skip("needs the /dev/full device")
    script, pairs, code, words = CASES[case]
    sets = {**GMM_SMALL, "reward.z_init_samples": 0, "run.total_kimg": steps_kimg(1000), **pairs}
    argv = ["distill", "--preset", "gmm", "--run-dir", str(tmp_path), *[f"--set={k}={v}" for k, v in sets.items()]]
    out = subprocess.run([sys.executable, "-c", script, *argv], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == code, out.stderr[-2000:]
    lines = out.stderr.rstrip("\n").split("\n")  # the bar redraws with \r; a line ends only at \n
    assert lines[-1].startswith("dibregman distill: ") and words in lines[-1], repr(out.stderr[-1000:])
    assert sum("dibregman distill:" in line for line in lines) == 1, "the error is printed once, on its own line"


# ---- small ones ------------------------------------------------------------------------------------------------
def broken_reward(x):
    return _reward_helper(x)


def _reward_helper(x):
    return 1 / 0  # the user's own bug


def test_a_user_reward_that_raises_shows_the_users_traceback(tmp_path, capsys):
    sets = [f"--set={k}={v}" for k, v in GMM_SMALL.items()] + ["--reward", "python:test_run_files:broken_reward"]
    rc, err = _run(["distill", "--preset", "gmm", "--run-dir", str(tmp_path), *sets], capsys)
    assert rc == 1 and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "ZeroDivisionError: division by zero" in err, err
    assert "in broken_reward" in err and "in _reward_helper" in err and "1 / 0" in err, err
    assert "rewards.py" not in err and "loop.py" not in err, "only the user's frames"
    assert lines[-1].startswith("dibregman distill: error: reward 'python:test_run_files:broken_reward' raised")


SIGTERM_AT_START = """import os, signal, sys
from dibregman.methods import dibregman as method
def build(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption while the models are built
    raise AssertionError("still running after SIGTERM")
method.build_models = build
from dibregman.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_start_up_says_so_and_exits_143(tmp_path):
    argv = ["distill", "--preset", "gmm", "--run-dir", str(tmp_path / "run"), *SETS]
    out = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_START, *argv], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 128 + signal.SIGTERM, (out.returncode, out.stderr[-2000:])
    assert _one_line(out.stderr) and "stopped by SIGTERM during start-up" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
