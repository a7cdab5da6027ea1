"""Faults (issue 15): a run never loses its last good state, and every bad input is answered in one line.

Checkpoints are verified (a flipped byte falls back to the previous one), never traded for worse ones (NaN streaks,
non-finite weights), one process per run folder, clean stops on SIGINT (also mid-save), and a table of bad inputs
over the CLI: exit code, one line on stderr, no traceback, no file created or changed."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dibregman import checkpoint as ckpt
from dibregman import runguard
from dibregman.cli import main
from dibregman.loop import Trainer
from dibregman.train_teacher import teacher_config, train_teacher
from test_distill import GMM_SMALL, _NaNTeacher, gmm_cfg, steps_kimg

SRC = Path(__file__).parents[1] / "src"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{Path(__file__).parent}"}


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor stored in a torch.save zip (as a bad disk or copy would)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def _finite(tr: Trainer) -> bool:
    return all(torch.isfinite(p).all() for m in (tr.m.generator, tr.ema, tr.m.fake) for p in m.parameters())


# ---- verified checkpoints ---------------------------------------------------------------------------------------
def test_flipped_byte_is_detected_and_the_previous_checkpoint_used(tmp_path):
    cfg = gmm_cfg(**{"run.total_kimg": steps_kimg(4), "run.ckpt_every_kimg": steps_kimg(2), "run.keep_ckpts": 5})
    Trainer(cfg, tmp_path).train()
    paths = ckpt.list_checkpoints(tmp_path)
    _flip_tensor_byte(paths[-1])
    with pytest.raises(ValueError, match="does not match its checksum"):
        ckpt.load(paths[-1])
    with pytest.warns(UserWarning, match="skipping.*checksum"):
        resumed = Trainer(cfg, tmp_path)
    assert resumed.state.step == 2 and _finite(resumed)
    resumed.train()
    assert resumed.state.step == 4 and _finite(resumed)
    assert ckpt.load(ckpt.list_checkpoints(tmp_path)[-1])["step"] == 4  # rewritten, verified


def test_checkpoint_without_checksum_still_loads(tmp_path):
    cfg = gmm_cfg(**{"run.total_kimg": steps_kimg(2)})
    Trainer(cfg, tmp_path).train()
    path = ckpt.list_checkpoints(tmp_path)[-1]
    state = torch.load(path, weights_only=True)
    del state[ckpt.CHECKSUM_KEY], state[ckpt.HEALTHY_KEY]  # the format written before issue 15
    torch.save(state, path)
    assert ckpt.is_healthy(path)
    assert Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(3)}), tmp_path).state.step == 2


def test_nan_streak_never_prunes_the_last_healthy_checkpoint(tmp_path):
    cfg = gmm_cfg(**{"run.total_kimg": steps_kimg(10), "run.ckpt_every_kimg": steps_kimg(1), "run.keep_ckpts": 1})
    tr = Trainer(cfg, tmp_path)
    tr.m.teacher = _NaNTeacher(tr.m.teacher, bad_calls={3, 4, 5})  # steps 2, 3, 4 are non-finite
    tr.train(max_steps=5)
    assert tr.state.bad_steps == 3 and tr.state.bad_in_row == 3
    paths = ckpt.list_checkpoints(tmp_path)
    assert [ckpt.load(p)["step"] for p in paths] == [2, 5], "newest + newest healthy (after step 1)"
    assert ckpt.is_healthy(paths[0]) and not ckpt.is_healthy(paths[1])
    tr.train(max_steps=1)  # healthy again: the streak's checkpoints go
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(tmp_path)] == [6]


def test_corrupt_optimiser_state_is_a_bad_step_that_never_reaches_the_weights(tmp_path):
    """A NaN second moment (as a flipped byte in a checkpoint did) would turn finite gradients into NaN weights:
    the step is skipped before the update, the weights stay finite, nothing non-finite is saved, the abort names
    the newest healthy checkpoint, and the resume takes it."""
    pairs = {"run.total_kimg": steps_kimg(10), "run.ckpt_every_kimg": steps_kimg(1), "run.max_bad_steps": 3}
    tr = Trainer(gmm_cfg(**pairs), tmp_path)
    tr.train(max_steps=2)
    for state in tr.opt_g.state.values():
        state["exp_avg_sq"].fill_(float("nan"))
    with pytest.raises(runguard.TooManyBadSteps, match="3 consecutive non-finite steps.*newest healthy checkpoint"):
        tr.train()
    assert _finite(tr) and all(torch.isfinite(p).all() for p in tr.ema.parameters())
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(tmp_path)] == [1, 2], "a NaN state is never saved"
    resumed = Trainer(gmm_cfg(**pairs), tmp_path)
    assert resumed.state.step == 2 and _finite(resumed) and resumed.state.bad_in_row == 0
    assert resumed.train(max_steps=2)["bad_steps"] == 0  # it trains on


def test_resume_prefers_the_newest_healthy_checkpoint(tmp_path):
    """An unhealthy checkpoint (written after a skipped step, its bad-step count carried) or one whose optimiser
    state is non-finite is passed over for the newest healthy one, so a resume does not abort again at once."""
    pairs = {"run.total_kimg": steps_kimg(10), "run.ckpt_every_kimg": steps_kimg(1), "run.keep_ckpts": 5}
    tr = Trainer(gmm_cfg(**pairs), tmp_path)
    tr.train(max_steps=3)
    paths = ckpt.list_checkpoints(tmp_path)
    unhealthy = ckpt.load(paths[-1])
    unhealthy.update({ckpt.HEALTHY_KEY: False, "bad_in_row": 7})
    ckpt.save_atomic(unhealthy, paths[-1])
    corrupt = ckpt.load(paths[-2])
    for st in corrupt["opt_c"]["state"].values():
        st["exp_avg"].fill_(float("inf"))
    ckpt.save_atomic(corrupt, paths[-2])
    with pytest.warns(UserWarning, match="not healthy"):
        resumed = Trainer(gmm_cfg(**pairs), tmp_path)
    assert resumed.state.step == 1 and resumed.state.bad_in_row == 0


FLAKY = {"calls": 0}


def flaky_reward(x):
    """R = 1, but NaN on one sample of the 3rd and 4th calls (python:test_faults:flaky_reward)."""
    FLAKY["calls"] += 1
    r = torch.ones(x.shape[0])
    if FLAKY["calls"] in (3, 4):
        r[0] = float("nan")
    return r


def test_reward_returning_nan_on_some_samples_is_a_skipped_counted_step(tmp_path):
    FLAKY["calls"] = 0
    pairs = {"reward.name": "python:test_faults:flaky_reward", "reward.z_init_samples": 64}
    out = Trainer(gmm_cfg(**pairs, **{"run.total_kimg": steps_kimg(4)}), tmp_path).train()
    assert FLAKY["calls"] > 4 and out["steps"] == 4 and 1 <= out["bad_steps"] <= 2
    assert '"bad_steps_total": ' in (tmp_path / "log.jsonl").read_text()


def test_teacher_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    from dibregman.methods import denoising as tt  # the teacher's loss, as the Denoising method calls it

    calls, edm_loss = {"n": 0}, tt.edm_loss

    def nan_on_second(*a, **k):
        calls["n"] += 1
        loss = edm_loss(*a, **k)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(tt, "edm_loss", nan_on_second)
    cfg = teacher_config(data="digits:", unet="tiny", batch_size=4, total_kimg=0.016, ckpt_every_kimg=0.008)
    out = train_teacher(cfg, tmp_path)
    state = ckpt.load(ckpt.list_checkpoints(tmp_path)[-1])
    assert state["bad_steps"] == 1 and state["step"] == 4 and state[ckpt.HEALTHY_KEY]
    assert ckpt.all_finite(state["ema"]) and ckpt.load_safetensors(out)[0]
    calls["n"], monkeypatch.setattr(tt, "edm_loss", lambda *a, **k: edm_loss(*a, **k) * float("nan"))
    with pytest.raises(runguard.TooManyBadSteps, match="max_bad_steps=2"):
        train_teacher(teacher_config(**{**vars(cfg), "total_kimg": 0.032, "max_bad_steps": 2}), tmp_path)
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(tmp_path)] == [2, 4]


def test_teacher_sigint_checkpoints_and_resumes_exactly_also_from_the_old_format(tmp_path, monkeypatch):
    from dibregman.methods import denoising as tt  # the teacher's loss, as the Denoising method calls it

    cfg = teacher_config(data="digits:", unet="tiny", batch_size=4, total_kimg=0.024, ckpt_every_kimg=0.016)
    full = ckpt.load_safetensors(train_teacher(cfg, tmp_path / "full"))[0]
    calls, edm_loss = {"n": 0}, tt.edm_loss

    def ctrl_c_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C during step 3
        return edm_loss(*a, **k)

    monkeypatch.setattr(tt, "edm_loss", ctrl_c_on_third)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    with pytest.raises(runguard.RunInterrupted, match="stopped by SIGINT at 0.012 kimg") as e:
        train_teacher(cfg, tmp_path / "split")
    assert e.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is before  # the run's handler is gone
    (path,) = ckpt.list_checkpoints(tmp_path / "split")
    state = torch.load(path, weights_only=True)
    assert state["step"] == 3
    for key in (ckpt.CHECKSUM_KEY, ckpt.HEALTHY_KEY, "bad_steps", "bad_in_row"):
        del state[key]  # the format of the teacher runs in progress before issue 15
    torch.save(state, path)
    split = ckpt.load_safetensors(train_teacher(cfg, tmp_path / "split"))[0]
    assert all(torch.equal(full[k], split[k]) for k in full)


# ---- the run folder ---------------------------------------------------------------------------------------------
def test_stale_tmp_removed_and_log_cut_back_on_resume(tmp_path):
    pairs = {"run.total_kimg": steps_kimg(4), "run.ckpt_every_kimg": steps_kimg(2), "run.keep_ckpts": 5}
    cfg = gmm_cfg(**pairs, **{"run.log_every_kimg": steps_kimg(1)})
    Trainer(cfg, tmp_path).train()
    ckpt.list_checkpoints(tmp_path)[-1].unlink()  # killed after step 4's log record, before its checkpoint
    (tmp_path / "ckpt-000000000128.pt.123-abcd.tmp").write_bytes(b"half")
    (tmp_path / "ckpt-000000000096.pt.tmp").write_bytes(b"old style")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"kimg": 0.1')  # a record cut short
    Trainer(cfg, tmp_path).train()
    assert not list(tmp_path.glob("*.tmp"))
    kimg = [json.loads(line)["kimg"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert kimg == sorted(set(kimg)) and len(kimg) == 4, "each record once, in order"


def test_run_lock_names_the_holder_and_is_released(tmp_path):
    lock = runguard.RunLock(tmp_path).acquire()
    with pytest.raises(runguard.RunLocked, match=f"in use by another dibregman process \\(PID {os.getpid()}\\)"):
        Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(1)}), tmp_path)
    lock.release()
    Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(1)}), tmp_path).train()
    with runguard.RunLock(tmp_path):  # released by the finished run
        pass


def test_sigterm_in_process_checkpoints_and_raises_a_typed_exception(tmp_path):
    def sigterm_at_step_2(trainer, num_images):
        if trainer.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler's preemption

    pairs = {"run.total_kimg": steps_kimg(10), "run.log_every_kimg": steps_kimg(1)}
    with pytest.raises(runguard.RunInterrupted, match="stopped by SIGTERM at 0.064 kimg") as e:
        Trainer(gmm_cfg(**pairs), tmp_path, hooks=[sigterm_at_step_2]).train()
    assert e.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(tmp_path)] == [2]


def test_a_hook_raising_stoprun_logs_its_record_checkpoints_and_the_run_resumes(tmp_path):
    """An early-stopping hook (runguard.StopRun) at step 2: its record is logged, step 2 is checkpointed and the
    exception comes back with that checkpoint; the same command resumes and finishes the run."""

    def stop_at_step_2(trainer, num_images):
        if trainer.state.step == 2:
            raise runguard.StopRun("diverged: test", {"probe": 7.0})
        return {"probe": 1.0}

    pairs = {"run.total_kimg": steps_kimg(4), "run.log_every_kimg": steps_kimg(1)}
    with pytest.raises(runguard.StopRun, match="diverged: test") as e:
        Trainer(gmm_cfg(**pairs), tmp_path, hooks=[stop_at_step_2]).train()
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(tmp_path)] == [2]
    assert e.value.checkpoint is not None and Path(e.value.checkpoint).name == ckpt.list_checkpoints(tmp_path)[0].name
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["probe"] for r in log] == [1.0, 7.0]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored, lock released: it resumes
    out = Trainer(gmm_cfg(**pairs), tmp_path).train()
    assert out["steps"] == 4 and out["export"] is not None


def _distill_cmd(run_dir: Path, steps: int, **pairs) -> list[str]:
    sets = {**GMM_SMALL, "run.total_kimg": steps_kimg(steps), "run.log_every_kimg": steps_kimg(1), **pairs}
    return ["distill", "--preset", "gmm", "--run-dir", str(run_dir), *[f"--set={k}={v}" for k, v in sets.items()]]


def _start(args: list[str], *pre: str) -> subprocess.Popen:
    cmd = [sys.executable, *(pre or ["-m", "dibregman.cli"]), *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"process ended early: {proc.communicate()[1][-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting")
        time.sleep(0.1)


def _last_line(stderr: str) -> str:
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


def _logged(run_dir: Path) -> bool:
    return (run_dir / "log.jsonl").is_file() and (run_dir / "log.jsonl").stat().st_size > 0


def test_second_process_stops_at_once_and_sigint_checkpoints(tmp_path):
    run = tmp_path / "run"
    a = _start(_distill_cmd(run, 100_000, **{"run.ckpt_every_kimg": steps_kimg(1000)}))
    try:
        _wait_for(lambda: _logged(run), a)
        b = subprocess.run(
            [sys.executable, "-m", "dibregman.cli", *_distill_cmd(run, 100_000)],
            env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert b.returncode == 2 and len(b.stderr.strip().splitlines()) == 1, b.stderr
        assert f"(PID {a.pid})" in b.stderr and "Traceback" not in b.stderr
        a.send_signal(signal.SIGINT)
        _, err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGINT" in _last_line(err)
    (path,) = ckpt.list_checkpoints(run)
    state = ckpt.load(path)
    assert state["step"] >= 1 and state[ckpt.HEALTHY_KEY] and not list(run.glob("*.tmp"))
    k = state["step"] + 2  # resume to two more steps: bitwise equal to an uninterrupted run, each record once
    pairs = {"run.total_kimg": steps_kimg(k), "run.log_every_kimg": steps_kimg(1)}
    resumed = Trainer(gmm_cfg(**pairs), run)
    resumed.train()
    full = Trainer(gmm_cfg(**pairs), tmp_path / "full")
    full.train()
    for a, b in ((full.m.generator, resumed.m.generator), (full.ema, resumed.ema), (full.m.fake, resumed.m.fake)):
        a, b = a.state_dict(), b.state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)
    kimg = [json.loads(line)["kimg"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert kimg == [steps_kimg(i) for i in range(1, k + 1)]


SLOW_SAVE = """import sys, time, pathlib
from dibregman import checkpoint as ckpt
orig = ckpt._replace_from_temp
def slow(path, write):
    def w(f):
        write(f)
        pathlib.Path(sys.argv[1]).touch()  # inside a save: the temp file is written, not yet renamed
        time.sleep(1.0)
    return orig(path, w)
ckpt._replace_from_temp = slow
from dibregman.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigint_during_a_save_finishes_it_and_stops_cleanly(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "saving"
    args = _distill_cmd(run, 100_000, **{"run.ckpt_every_kimg": steps_kimg(2), "run.keep_ckpts": 1000})
    a = _start([str(marker), *args], "-c", SLOW_SAVE)
    try:
        _wait_for(marker.exists, a)
        a.send_signal(signal.SIGINT)
        _, err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 130 and "Traceback" not in err and "stopped by SIGINT" in _last_line(err), err[-2000:]
    paths = ckpt.list_checkpoints(run)
    assert paths and all(ckpt.load(p)[ckpt.HEALTHY_KEY] for p in paths) and not list(run.glob("*.tmp"))


# ---- bad inputs over the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_teacher):
    """A folder of good and bad inputs: a finished tiny gmm run, a mismatched export, broken files."""
    d = tmp_path_factory.mktemp("inputs")
    Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(1)}), d / "run").train()
    other = d / "other"
    shutil.copytree(d / "run", other)
    meta = json.loads((other / "generator.json").read_text())
    meta["network"]["config"]["hidden"] = 16  # a generator.json from a narrower run
    (other / "generator.json").write_text(json.dumps(meta))
    (d / "afile").write_text("not a folder")
    (d / "text.safetensors").write_text("hello")
    (d / "png.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (d / "cut.safetensors").write_bytes(Path(tiny_teacher).read_bytes()[:500])
    (d / "zero.npz").write_bytes(b"")
    np.savez(d / "empty.npz", samples=np.zeros((0, 1, 8, 8), np.float32))
    (d / "text.npz").write_text("not numpy")
    (d / "list.json").write_text("[1, 2]")
    (d / "bad.json").write_text("{")
    from fractions import Fraction

    torch.save({"x": Fraction(1, 3)}, d / "object.pt")
    torch.save({f"model.k{i}": torch.zeros(1) for i in range(200)}, d / "wrongkeys.pt")
    (d / "edm.json").write_text(json.dumps({"img_resolution": 8, "img_channels": 1, "model_type": "SongUNet"}))
    return d


TINY = ["--set=model.init_steps=30", "--set=model.mlp_hidden=32", "--set=run.total_kimg=0.032"]
BAD_INPUTS = {  # name: (argv with {d} for the inputs folder, exit code, words the message must contain)
    "teacher batch 0": ("train-teacher --run-dir {d}/new --set batch_size=0", 2, "batch_size=0 must be > 0"),
    "teacher kimg -1": ("train-teacher --run-dir {d}/new --set total_kimg=-1", 2, "total_kimg=-1"),
    "teacher batch abc": ("train-teacher --run-dir {d}/new --set batch_size=abc", 2, "batch_size='abc'"),
    "teacher lr NaN": ("train-teacher --run-dir {d}/new --set lr=NaN", 2, "lr=nan must be a finite"),
    "teacher unknown key": ("train-teacher --run-dir {d}/new --set batchsize=4", 2, "unknown teacher option"),
    "teacher ckpt 0": ("train-teacher --run-dir {d}/new --set ckpt_every_kimg=0", 2, "ckpt_every_kimg=0"),
    "teacher unet": ("train-teacher --run-dir {d}/new --set unet=huge", 2, "unet='huge'"),
    "teacher run-dir file": ("train-teacher --run-dir {d}/afile --data digits:", 2, "--run-dir"),
    "teacher no data": ("train-teacher --run-dir {d}/new --data mnist:{d}/nodata", 2, "nodata"),
    "teacher preset": ("train-teacher --run-dir {d}/new --preset nope --print-config", 2, "unknown teacher preset"),
    "distill batch 0": ("distill --batch 0 --run-dir {d}/new", 2, "--batch must be > 0"),
    "distill kimg 0": ("distill --kimg 0 --run-dir {d}/new", 2, "--kimg must be > 0"),
    "distill kimg -1": ("distill --kimg -1 --run-dir {d}/new", 2, "--kimg must be > 0"),
    "distill batch abc": ("distill --batch abc --run-dir {d}/new", 2, "--batch: invalid int value"),
    "distill lam NaN (kl)": ("distill --divergence kl --set divergence.lam=NaN --run-dir {d}/new", 2, "lam=nan"),
    "distill lr inf": ("distill --set optim.gen_lr=Infinity --run-dir {d}/new", 2, "optim.gen_lr=inf"),
    "distill run-dir file": ("distill --run-dir {d}/afile", 2, "--run-dir {d}/afile is a file"),
    "distill run-dir under file": ("distill --run-dir {d}/afile/sub", 2, "is a file, not a folder"),
    "distill teacher text": (
        "distill --preset mnist --teacher edm:{d}/text.safetensors --run-dir {d}/new",
        2,
        "text.safetensors is not a readable safetensors",
    ),  # fmt: skip
    "distill teacher png": (
        "distill --preset mnist --teacher edm:{d}/png.safetensors --run-dir {d}/new",
        2,
        "png.safetensors is not a readable safetensors",
    ),  # fmt: skip
    "distill teacher cut": (
        "distill --preset mnist --teacher edm:{d}/cut.safetensors --run-dir {d}/new",
        2,
        "cut.safetensors is not a readable safetensors",
    ),  # fmt: skip
    "distill divergence": ("distill --divergence klx --run-dir {d}/new", 2, "unknown divergence"),
    "distill preset": ("distill --preset imagenet --run-dir {d}/new", 2, "unknown preset"),
    "distill set type": ("distill --set optim.batch_size=abc --run-dir {d}/new", 2, "optim.batch_size"),
    "distill set no =": ("distill --set optim.batch_size --run-dir {d}/new", 2, "--set expects key=value"),
    "distill device": ("distill --set run.device=tpu --run-dir {d}/new", 2, "run.device='tpu'"),
    "sample num 0": ("sample --checkpoint {d}/run --num 0 --out {d}/new.png", 2, "--num must be a positive"),
    "sample num -5": ("sample --checkpoint {d}/run --num -5 --out {d}/new.png", 2, "--num must be a positive"),
    "sample batch 0": ("sample --checkpoint {d}/run --batch 0 --out {d}/new.png", 2, "--batch must be a positive"),
    "sample batch -1": ("sample --checkpoint {d}/run --batch -1 --out {d}/new.png", 2, "--batch must be a positive"),
    "sample json mismatch": ("sample --checkpoint {d}/other --out {d}/new.png", 2, "do not belong together"),
    "sample out under file": ("sample --checkpoint {d}/run --out {d}/afile/x.png", 2, "--out"),
    "sample no export": ("sample --checkpoint {d}/nothing --out {d}/new.png", 2, "no generator export"),
    "sample text weights": ("sample --checkpoint {d}/text.safetensors --out {d}/new.png", 2, "not a readable"),
    "eval zero-byte npz": ("eval --samples {d}/zero.npz", 2, "zero.npz is not a readable .npz"),
    "eval empty npz": ("eval --samples {d}/empty.npz", 2, "0 samples"),
    "eval text npz": ("eval --samples {d}/text.npz", 2, "text.npz is not a readable"),
    "eval nothing": ("eval", 2, "give one of"),
    "eval trials 0": ("eval --samples {d}/empty.npz --trials 0", 2, "--trials must be a positive"),
    "eval batch 0": ("eval --samples {d}/empty.npz --batch 0", 2, "--batch must be a positive"),
    "import-edm list kwargs": (
        "import-edm {d}/object.pt {d}/list.json --out {d}/new.safetensors",
        2,
        "list.json must hold a JSON object",
    ),  # fmt: skip
    "import-edm bad json": ("import-edm {d}/object.pt {d}/bad.json --out {d}/new.safetensors", 2, "not valid JSON"),
    "import-edm object pickle": (
        "import-edm {d}/object.pt {d}/edm.json --out {d}/new.safetensors",
        2,
        "not a plain state dict of tensors",
    ),  # fmt: skip
    "import-edm wrong keys": (
        "import-edm {d}/wrongkeys.pt {d}/edm.json --out {d}/new.safetensors",
        2,
        "(200 in all)",
    ),  # fmt: skip
    "import-edm missing": ("import-edm {d}/nothing.pt {d}/edm.json --out {d}/new.safetensors", 2, "not found"),
    "unknown command": ("distil", 2, "invalid choice"),
    "teacher overrides type": ("train-teacher --run-dir {d}/new --set unet_overrides=5", 2, "unet_overrides=5"),
    "teacher bool": ("train-teacher --run-dir {d}/new --set conditional=maybe", 2, "conditional='maybe'"),
    "teacher data kind": ("train-teacher --run-dir {d}/new --data nosuch:", 2, "unknown dataset kind"),
    "distill ckpt period": ("distill --set run.ckpt_every_kimg=-1 --run-dir {d}/new", 2, "run.ckpt_every_kimg=-1.0"),
    "distill max bad 0": ("distill --set run.max_bad_steps=0 --run-dir {d}/new", 2, "run.max_bad_steps=0 must"),
    "distill keep -1": ("distill --set run.keep_ckpts=-1 --run-dir {d}/new", 2, "run.keep_ckpts=-1 must be >= 1"),
    "distill keep 0": ("distill --set run.keep_ckpts=0 --run-dir {d}/new", 2, "run.keep_ckpts=0 must be >= 1"),
    "teacher keep -1": ("train-teacher --run-dir {d}/new --set keep_ckpts=-1", 2, "keep_ckpts=-1 must be > 0"),
    "distill mlp depth": ("distill --set model.mlp_depth=0 --run-dir {d}/new", 2, "model.mlp_depth=0 must"),
    "distill threads": ("distill --set run.threads=-1 --run-dir {d}/new", 2, "run.threads=-1 must"),
    "distill lr": ("distill --set optim.gen_lr=-1 --run-dir {d}/new", 2, "optim.gen_lr=-1.0 must"),
    "distill beta": ("distill --set optim.beta2=1.5 --run-dir {d}/new", 2, "optim.beta2=1.5"),
    "distill teacher kind": ("distill --teacher nosuch:x --run-dir {d}/new", 2, "unknown teacher spec"),
    "distill reward": ("distill --reward nosuch --run-dir {d}/new", 2, "unknown reward 'nosuch'"),
    "distill teacher missing": (
        "distill --preset mnist --teacher edm:{d}/no.safetensors --run-dir {d}/new",
        2,
        "weights not found",
    ),  # fmt: skip
    "eval missing npz": ("eval --samples {d}/nothing.npz", 2, "samples not found"),
    "eval not samples": ("eval --samples {d}/afile", 2, "must be a .npz, .npy or an image folder"),
    "demo out file": ("demo --out {d}/afile", 2, "--out {d}/afile is a file"),
    "sample device": ("sample --checkpoint {d}/run --device tpu --out {d}/new.png", 2, "--device: invalid choice"),
    "sample out folder": ("sample --checkpoint {d}/run --out {d}/run", 2, "is a folder; give a file"),
    "plot under file": ("divergences --plot {d}/afile/x.png", 2, "--plot"),
}


def _snapshot(d: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(name, files, capsys):
    argv, code, words = BAD_INPUTS[name]
    argv = [a.format(d=files) for a in argv.split()]
    if argv[0] == "distill":
        argv += TINY
    before = _snapshot(files)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert words.format(d=files) in err, err
    assert _snapshot(files) == before, "nothing created or changed"


def test_bad_input_in_a_real_process_is_one_line(files):
    out = subprocess.run(
        [sys.executable, "-m", "dibregman.cli", "sample", "--checkpoint", str(files / "other"), "--out", "x.png"],
        env=ENV, capture_output=True, text=True, timeout=120, cwd=files,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "shape mismatch" in out.stderr, out.stderr
