"""The distillation engine (Algorithm 1): every divergence runs, resume is exact, data parallel equals one
process, bad input fails clearly, NaN steps are skipped and counted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dibregman import checkpoint as ckpt
from dibregman import divergences
from dibregman.build import objective
from dibregman.config import override, validate
from dibregman.loop import Trainer, distill
from dibregman.monitor import Monitor
from dibregman.presets import get_preset

GMM_SMALL = {  # the gmm preset cut down to seconds; its schedule pinned to the library defaults so that a few
    # steps train every network (no warm-ups) with non-trivial Bregman weights (SBA(5), not the preset's kl)
    "divergence.name": "sba",
    "loss.gen_warmup_kimg": 0.0,
    "loss.gan_weight": 0.0,
    "loss.gan_warmup_kimg": 0.0,
    "loss.regression_weight": 0.0,  # the preset's regression term has its own tests (test_regression.py)
    "optim.lr_schedule": "constant",
    "model.init_steps": 30,
    "model.mlp_hidden": 32,
    "model.mlp_depth": 2,
    "optim.batch_size": 32,
    "run.log_every_kimg": 0.064,
    "run.ckpt_every_kimg": 1000.0,
    "run.sample_every_kimg": 0.0,
    "run.tensorboard": False,
}


def gmm_cfg(**pairs):
    return override(get_preset("gmm"), {**GMM_SMALL, **pairs})


def steps_kimg(steps: int, batch: int = 32) -> float:
    return steps * batch / 1000


def test_every_divergence_and_stabiliser_key_reaches_the_trainer():
    """Every registry name (with its parameter) and every stabiliser key of the config ends up in the `div` and
    `stab` the Trainer weights Eq. 4 with (`build.objective`)."""
    for name in divergences.names():
        params = {"sba": {"divergence.lam": 2.5}, "alpha": {"divergence.alpha": -0.5}}.get(name, {})
        div, _ = objective(gmm_cfg(**{"divergence.name": name, **params}))
        assert div.name == name and div.params == {k.split(".")[1]: v for k, v in params.items()}, name
    stab_keys = {
        "divergence.logit_clamp": 7.0,
        "divergence.ratio_clip_min": 0.2,
        "divergence.ratio_clip_max": 30.0,
        "divergence.normalize": "batch_mean",
        "divergence.num_sigma_bins": 3,
        "divergence.weight_clip": 4.0,
    }
    _, stab = objective(gmm_cfg(**stab_keys))
    assert (stab.logit_clamp, stab.ratio_clip, stab.normalize) == (7.0, (0.2, 30.0), "batch_mean")
    assert (stab.num_sigma_bins, stab.weight_clip) == (3, 4.0)
    _, off = objective(gmm_cfg(**{"divergence.logit_clamp": 0.0, "divergence.weight_clip": 0.0}))
    assert off.logit_clamp is None and off.weight_clip is None and off.ratio_clip is None


def test_logged_weights_differ_between_kl_and_sba_once_the_head_has_trained(tmp_path):
    """The trainer is not hard-wired to one divergence: with a head that learns within a few steps, KL's weights
    stay 1 while SBA(5)'s spread out."""
    pairs = {"optim.head_lr_mult": 50.0, "run.total_kimg": steps_kimg(6), "run.log_every_kimg": steps_kimg(6)}
    pairs["divergence.normalize"] = "batch_mean"
    logs = {}
    for name in ("kl", "sba"):
        distill(gmm_cfg(**pairs, **{"divergence.name": name}), tmp_path / name)
        logs[name] = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[-1])
    assert logs["kl"]["weight/max"] == pytest.approx(1.0) and logs["kl"]["weight/ess_frac"] == pytest.approx(1.0)
    assert logs["sba"]["weight/max"] > 1.05 and logs["sba"]["weight/ess_frac"] < 0.995


def test_batch_draws_do_not_collide_for_many_accumulation_rounds():
    """Round 64 of step 0 and round 0 of step 1 used to share a seed ((seed * M + step) * 64 + round)."""
    from types import SimpleNamespace

    from dibregman.draws import draw_batch

    m = SimpleNamespace(shape=(2,), sigma_data=0.5, real=lambda g, n: (torch.randn(n, 2, generator=g), None))
    m.conditions = None
    cfg = gmm_cfg(**{"optim.accum_steps": 65, "optim.batch_size": 65 * 4})
    a, _ = draw_batch(cfg, m, 0, 64, 4, "cpu", (0.002, 80.0))
    b, _ = draw_batch(cfg, m, 1, 0, 4, "cpu", (0.002, 80.0))
    assert not torch.equal(a.z, b.z)


def _params(trainer: Trainer) -> dict:
    out = {}
    for name, mod in (
        ("g", trainer.m.generator),
        ("f", trainer.m.fake),
        ("d", trainer.m.disc),
        ("e", trainer.ema),
    ):
        out.update({f"{name}.{k}": v.clone() for k, v in mod.state_dict().items()})
    return out


@pytest.mark.parametrize("placement", ["fake_score", "separate"])
def test_resume_is_bitwise_exact(tmp_path, placement):
    pairs = {"model.disc_placement": placement, "loss.gan_weight": 0.1, "optim.gen_every": 2}
    full = Trainer(gmm_cfg(**pairs, **{"run.total_kimg": steps_kimg(6)}), tmp_path / "full")
    full.train()
    half = gmm_cfg(**pairs, **{"run.total_kimg": steps_kimg(3)})
    Trainer(half, tmp_path / "split").train()
    resumed = Trainer(gmm_cfg(**pairs, **{"run.total_kimg": steps_kimg(6)}), tmp_path / "split")
    assert resumed.state.step == 3
    resumed.train()
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cosine_lr_schedule_decays_and_resumes_exactly(tmp_path):
    pairs = {"optim.lr_schedule": "cosine", "optim.lr_final": 0.1, "run.total_kimg": steps_kimg(6)}
    pairs["run.ckpt_every_kimg"] = steps_kimg(3)
    full = Trainer(gmm_cfg(**pairs), tmp_path / "full")
    assert full.lr_factor() == 1.0
    full.train()
    assert full.lr_factor() == pytest.approx(0.1)
    assert full.opt_g.param_groups[0]["lr"] < full.cfg.optim.gen_lr  # the last step ran at a decayed lr
    Trainer(gmm_cfg(**pairs), tmp_path / "split").train(max_steps=3)  # stopped halfway, e.g. killed
    resumed = Trainer(gmm_cfg(**pairs), tmp_path / "split")
    assert resumed.state.step == 3 and resumed.lr_factor() == pytest.approx(0.1 + 0.9 * 0.5)
    resumed.train()
    a, b = _params(full), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_changing_total_kimg_on_resume_is_refused_with_a_cosine_schedule(tmp_path):
    """The cosine lr curve depends on run.total_kimg: changing it on resume is not "length only"."""
    pairs = {"optim.lr_schedule": "cosine", "run.total_kimg": steps_kimg(2)}
    Trainer(gmm_cfg(**pairs), tmp_path).train()
    with pytest.raises(ValueError, match="run.total_kimg.*cosine"):
        Trainer(gmm_cfg(**{**pairs, "run.total_kimg": steps_kimg(4)}), tmp_path)
    Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(2)}), tmp_path / "constant").train()
    assert Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(4)}), tmp_path / "constant").state.step == 2


def test_config_typo_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys in 'divergence'.*'lam'"):
        override(get_preset("gmm"), {"divergence.lamda": 3})
    with pytest.raises(ValueError, match="unknown config section"):
        override(get_preset("gmm"), {"optimiser.lr": 3})
    with pytest.raises(ValueError, match="unknown divergence|valid"):
        Trainer(gmm_cfg(**{"divergence.name": "klx"}), "/nonexistent-never-created")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("imagenet")


def test_discriminator_without_trainable_parameters_is_refused():
    """disc_placement=teacher reads the frozen teacher; with the parameter-free `mean` head eta cannot learn."""
    with pytest.raises(ValueError, match="disc_placement='teacher'.*disc_head='mean'"):
        validate(gmm_cfg(**{"model.disc_placement": "teacher", "model.disc_head": "mean"}))
    validate(gmm_cfg(**{"model.disc_placement": "fake_score", "model.disc_head": "mean"}))  # SiDA: fine


def test_checkpoint_from_another_config_is_refused(tmp_path):
    Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(1)}), tmp_path).train()
    with pytest.raises(ValueError, match="different config.*divergence.lam"):
        Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(2), "divergence.lam": 3.0}), tmp_path)


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    cfg = gmm_cfg(**{"run.total_kimg": steps_kimg(4), "run.ckpt_every_kimg": steps_kimg(2), "run.keep_ckpts": 5})
    Trainer(cfg, tmp_path).train()
    paths = ckpt.list_checkpoints(tmp_path)
    assert len(paths) == 2
    good = paths[-1].read_bytes()
    paths[-1].write_bytes(good[: len(good) // 2])  # a crash mid-copy, a full disk ...
    with pytest.warns(UserWarning, match="skipping"):
        resumed = Trainer(cfg, tmp_path)
    assert resumed.state.step == 2  # the previous, intact checkpoint


class _NaNTeacher(torch.nn.Module):
    """Wraps a teacher and returns NaN on chosen calls."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, bad_calls, 0
        self.sigma_min, self.sigma_max, self.sigma_data = inner.sigma_min, inner.sigma_max, inner.sigma_data
        self.shape = inner.shape

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        out = self.inner(x, sigma, cond)
        return out * float("nan") if self.calls in self.bad_calls else out


def test_nan_step_is_skipped_counted_and_logged(tmp_path):
    tr = Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(5)}), tmp_path)
    tr.m.teacher = _NaNTeacher(tr.m.teacher, bad_calls={2, 3})
    before = {k: v.clone() for k, v in tr.m.generator.state_dict().items()}
    out = tr.train()
    assert out["bad_steps"] == 2 and out["steps"] == 5
    assert all(torch.isfinite(p).all() for p in tr.m.generator.parameters())
    assert any(not torch.equal(before[k], v) for k, v in tr.m.generator.state_dict().items())
    log = (tmp_path / "log.jsonl").read_text()
    assert '"skipped/generator"' in log and '"bad_steps_total": 2' in log


def test_gan_term_never_computes_a_gradient_for_the_critic(tmp_path):
    """accum_steps=2 with a GAN term: the GAN logit reads eta with its weights as constants, so the generator
    phase leaves no gradient on the critic, after a good round and after a NaN round alike."""
    cfg = gmm_cfg(**{"optim.accum_steps": 2, "loss.gan_weight": 0.1, "run.total_kimg": steps_kimg(2)})
    tr = Trainer(cfg, tmp_path)
    mon = Monitor(tmp_path, enabled=False, initial=0, total=1)
    assert tr.run_phase(tr.phase("generator"), mon) and "loss/gen_gan" in mon.values
    assert all(p.grad is None for p in tr.critic_params + tr.gen_params)
    tr.m.teacher = _NaNTeacher(tr.m.teacher, bad_calls={2})
    with pytest.raises(Exception) as ended:  # the engine ends the step: the non-finite error is its cause
        tr.run_phase(tr.phase("generator"), mon)
    assert "non-finite" in str(ended.value.__cause__)
    assert all(p.grad is None for p in tr.critic_params + tr.gen_params)


def test_overflowing_unnormalised_weight_skips_the_step(tmp_path):
    """normalize=none with SBA(50): exp(-50 l) overflows float32 at l = -10; the step is skipped and counted
    (it used to raise a ValueError out of the loop)."""
    pairs = {"divergence.lam": 50.0, "divergence.normalize": "none", "divergence.weight_clip": 0.0}
    cfg = gmm_cfg(**pairs, **{"run.total_kimg": steps_kimg(1)})
    tr = Trainer(cfg, tmp_path)
    tr.m.disc.register_forward_hook(lambda mod, args, out: out - 20.0)  # l = -10 after the clamp: w = e^500
    mon = Monitor(tmp_path, enabled=False, initial=0, total=1)
    with pytest.raises(Exception) as ended:  # the engine ends the step: the overflow is its cause
        tr.run_phase(tr.phase("generator"), mon)
    assert "overflows" in str(ended.value.__cause__)
    assert mon.values["skipped/generator"] == [1.0]


def test_consecutive_nan_steps_abort_with_a_clear_message(tmp_path):
    tr = Trainer(gmm_cfg(**{"run.total_kimg": steps_kimg(10), "run.max_bad_steps": 3}), tmp_path)
    tr.m.teacher = _NaNTeacher(tr.m.teacher, bad_calls=set(range(1, 100)))
    with pytest.raises(RuntimeError, match="3 consecutive non-finite steps"):
        tr.train()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one(tmp_path, parallel):
    """2 processes under DDP (bucketed all-reduce, no_sync over the accumulation) or FSDP2 (sharded) train what
    one process trains, with gradient accumulation and the GAN term."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    sets = [
        f"--set={k}={v}"
        for k, v in {
            **GMM_SMALL,
            "run.total_kimg": steps_kimg(3),
            "loss.gan_weight": 0.1,
            "divergence.normalize": "softmax",
            "optim.accum_steps": 2,
            "run.device": "cpu",
        }.items()
    ]
    base = ["distill", "--preset", "gmm", *sets]
    one = subprocess.run(
        [sys.executable, "-m", "dibregman.cli", *base, "--run-dir", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29533 + (parallel == "fsdp")),
            "-m",
            "dibregman.cli",
            *base,
            f"--set=run.parallel={parallel}",
            "--run-dir",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a = ckpt.load_safetensors(tmp_path / "one" / "generator.safetensors")[0]
    b = ckpt.load_safetensors(tmp_path / "two" / "generator.safetensors")[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_process_group_device_follows_run_device(monkeypatch):
    from dibregman import dist

    monkeypatch.setenv("LOCAL_RANK", "1")  # no RANK/WORLD_SIZE: no process group is started
    assert dist.init("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist.init("cpu") == torch.device("cpu"), "run.device=cpu stays on the CPU (gloo) beside a GPU"
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but only 1 CUDA device\(s\) are visible"):
        dist.init("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="run.device=cuda but CUDA is not available"):
        dist.init("cuda")


def test_shuffle_weights_placebo_moves_the_weights_not_the_draws(tmp_path, monkeypatch):
    """divergence.shuffle_weights permutes Eq. 4's weights within the sigma bins (the same multiset per bin),
    draws from its own stream (the other draws unchanged), and is reproducible."""
    seen = {}

    def capture(key):
        real = divergences.weight_from_log

        def f(log_w, stab):
            seen.setdefault(key, []).append(log_w.detach().clone())
            return real(log_w, stab)

        return f

    for key, shuffle in (("plain", False), ("shuffled", True), ("again", True)):
        monkeypatch.setattr(divergences, "weight_from_log", capture(key))
        cfg = gmm_cfg(**{"divergence.shuffle_weights": shuffle, "run.total_kimg": steps_kimg(2)})
        Trainer(cfg, tmp_path / key).train(max_steps=1)  # one step: both runs see the same critic and logits
    plain, shuffled = seen["plain"][0], seen["shuffled"][0]
    assert torch.equal(plain.sort().values, shuffled.sort().values) and not torch.equal(plain, shuffled)
    assert torch.equal(shuffled, seen["again"][0])
