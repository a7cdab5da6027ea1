"""Parallelism and sharded checkpoints on CPU (gloo, `torchrun --nproc_per_node 2`): a sharded checkpoint resumes
on 1 and on 2 processes to the same parameters as an uninterrupted run, a one-process checkpoint resumes under
FSDP2, a kill -9 during a sharded save leaves the previous checkpoint usable, and a corrupt shard is skipped."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dibregman import checkpoint as ckpt
from test_distill import GMM_SMALL, steps_kimg

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
PAIRS = {**GMM_SMALL, "loss.gan_weight": 0.1, "divergence.normalize": "softmax", "run.device": "cpu"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(procs: int) -> list[str]:
    """The command that starts `procs` processes on this machine (a free port each time)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
            str(_free_port())]  # fmt: skip


def _args(steps: int, **pairs) -> list[str]:
    sets = {**PAIRS, "run.total_kimg": steps_kimg(steps), "run.ckpt_every_kimg": steps_kimg(1), **pairs}
    return ["distill", "--preset", "gmm", *(f"--set={k}={v}" for k, v in sets.items())]


def _run(run_dir: Path, steps: int, procs: int = 1, **pairs) -> subprocess.CompletedProcess:
    cmd = ["-m", "dibregman.cli", *_args(steps, **pairs), "--run-dir", str(run_dir)]
    cmd = [*torchrun(procs), *cmd] if procs > 1 else [sys.executable, *cmd]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _generator(run_dir: Path) -> dict:
    return ckpt.load_safetensors(run_dir / "generator.safetensors")[0]


def _assert_same(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_sharded_checkpoints_resume_on_one_and_two_processes(tmp_path):
    _run(tmp_path / "full", 4)  # one process, uninterrupted: the reference
    reference = _generator(tmp_path / "full")
    _run(tmp_path / "fsdp", 2, procs=2, **{"run.parallel": "fsdp"})
    saved = ckpt.list_checkpoints(tmp_path / "fsdp")
    assert saved and all(p.is_dir() for p in saved), "a multi-process run writes sharded folders"
    shutil.copytree(tmp_path / "fsdp", tmp_path / "fsdp_to_one")
    _run(tmp_path / "fsdp", 4, procs=2, **{"run.parallel": "fsdp"})  # the same world size
    _run(tmp_path / "fsdp_to_one", 4)  # one process reads the shards
    _run(tmp_path / "pt", 2)  # a one-process .pt checkpoint ...
    _run(tmp_path / "pt", 4, procs=2, **{"run.parallel": "fsdp"})  # ... resumed under FSDP2
    for name in ("fsdp", "fsdp_to_one", "pt"):
        _assert_same(reference, _generator(tmp_path / name))


KILL_SCRIPT = """
import os, sys
from dibregman import cli, sharded
real, calls = sharded.files_checksum, {"n": 0}
def dying(folder):
    calls["n"] += 1
    if calls["n"] == 2:  # the second save: the shards are written, the folder is not complete
        os.kill(os.getpid(), 9)
    return real(folder)
sharded.files_checksum = dying
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_a_sharded_save_leaves_the_previous_checkpoint_usable(tmp_path):
    script = tmp_path / "kill_in_save.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "run"
    launch = torchrun(2)
    cmd = [*launch, str(script), *_args(3, **{"run.parallel": "ddp"}), "--run-dir", str(run)]
    killed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-000000000032"]
    assert any(p.name.endswith(".tmp") for p in run.iterdir()), "the cut save left its temp folder"
    _run(run, 3, procs=2, **{"run.parallel": "ddp"})  # resumes from the first checkpoint
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    _run(tmp_path / "full", 3)
    _assert_same(_generator(tmp_path / "full"), _generator(run))


def test_a_corrupt_shard_is_skipped_for_the_previous_checkpoint(tmp_path):
    """A flipped byte in a shard fails the folder's checksum: the run falls back to the previous checkpoint."""
    from dibregman.checkpoint import META, files_checksum
    from dibregman.config import override
    from dibregman.loop import Trainer
    from dibregman.presets import get_preset

    first, second = tmp_path / "ckpt-000000000032", tmp_path / "ckpt-000000000064"
    cfg = override(get_preset("gmm"), {**PAIRS, "run.total_kimg": steps_kimg(4)})
    tr = Trainer(cfg, tmp_path / "pt")
    tr.train(max_steps=1)
    from dibregman import sharded, trainer_state

    for path in (first, second):  # one process can write the sharded format too (DCP without a process group)
        sharded.save(trainer_state.sharded_state(tr), trainer_state._small_state(tr), path)
        tr.train(max_steps=1)
    assert files_checksum(second) == ckpt.load(second / META)["files_sha256"]
    shard = next(p for p in second.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    shutil.copy(tmp_path / "pt" / "config.json", tmp_path / "config.json")
    with pytest.warns(UserWarning, match="files do not match the checksum"):
        resumed = Trainer(cfg, tmp_path)
    assert resumed.state.step == 1


UNET_RUN = {  # the golden curve's tiny U-Net run, shortened
    "model.real": "teacher",
    "model.teacher_pool": 16,
    "model.teacher_pool_steps": 2,
    "optim.batch_size": 4,
    "run.total_kimg": 3 * 4 / 1000,
    "run.sample_every_kimg": 0.0,
    "run.tensorboard": False,
    "loss.gen_warmup_kimg": 0.0,
    "loss.gan_weight": 0.1,
    "loss.gan_warmup_kimg": 0.0,
}


def test_family_blocks_and_activation_checkpointing_keep_the_numbers(tmp_path, tiny_teacher):
    """The EDM family's blocks are the U-Net's outermost UNetBlocks; recomputing them in the backward pass
    (model.grad_checkpointing) trains the same generator."""
    from dibregman.config import override
    from dibregman.loop import Trainer
    from dibregman.presets import get_preset
    from dibregman.teachers import FAMILIES

    runs = {}
    for ac in (False, True):
        pairs = {**UNET_RUN, "model.teacher": f"edm:{tiny_teacher}", "model.grad_checkpointing": ac}
        torch.manual_seed(0)
        tr = Trainer(override(get_preset("mnist"), pairs), tmp_path / str(ac))
        blocks = FAMILIES["edm"].parallelize(tr.m.generator)
        assert blocks and all(type(b).__name__ == "UNetBlock" for b in blocks)
        assert not any(a is not b and b in list(a.modules()) for a in blocks for b in blocks), "outermost only"
        assert ("forward" in vars(blocks[0])) == ac  # checkpointed blocks run through torch.utils.checkpoint
        tr.train()
        runs[ac] = tr.m.generator.state_dict()
    for k, v in runs[False].items():
        torch.testing.assert_close(v, runs[True][k], rtol=1e-5, atol=1e-6, msg=k)
    assert FAMILIES["gmm"].parallelize(torch.nn.Linear(2, 2)) == []


def test_compile_option_compiles_the_trained_networks_in_place(tmp_path, monkeypatch):
    """run.compile: the engine compiles G and the critic in place (names unchanged, so checkpoints and exports
    read as before); compilation itself is measured in bench/compile_speed.py, not here (minutes on a CPU)."""
    from dibregman.config import override
    from dibregman.loop import Trainer
    from dibregman.presets import get_preset

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    cfg = override(get_preset("gmm"), {**PAIRS, "run.compile": True, "run.total_kimg": steps_kimg(1)})
    tr = Trainer(cfg, tmp_path)
    assert compiled == [tr.m.generator, tr.m.critic]
    keys = set(tr.m.generator.state_dict())
    tr.train()
    assert keys == set(tr.m.generator.state_dict()) and all(not k.startswith("_orig_mod") for k in keys)


EVERY_PRESET = """
import sys
from pathlib import Path
import torch
from dibregman import checkpoint as ckpt, dist
from dibregman.config import override
from dibregman.loop import Trainer
from dibregman.networks.unet import build_unet
from dibregman.presets import PRESETS, get_preset
from tiny_hf import tiny_sd_components

root, mode = Path(sys.argv[1]), sys.argv[2]
common = {"run.parallel": mode, "run.device": "cpu", "run.tensorboard": False, "run.sample_every_kimg": 0.0,
          "loss.gen_warmup_kimg": 0.0, "optim.batch_size": 4, "optim.accum_steps": 1, "run.total_kimg": 0.008}
dist.init("cpu")
if dist.rank() == 0:
    for c in (1, 3):
        torch.manual_seed(0)
        net = build_unet("tiny", img_channels=c)
        ckpt.export_safetensors(net.state_dict(), {"kind": "edm-unet", "unet": net.cfg.to_dict()}, root / f"t{c}")
    tiny_sd_components(root / "sd", seed=0)
    (root / "prompts.txt").write_text("a cat\\na dog\\n")
dist.barrier()
tiny = {  # each preset's own recipe on tiny networks, two steps
    "gmm": {"model.init_steps": 5, "model.mlp_hidden": 16, "model.mlp_depth": 1},
    "mnist": {"model.teacher": f"edm:{root / 't1.safetensors'}", "model.real": "teacher", "model.teacher_pool": 8,
              "model.teacher_pool_steps": 2},
    "mnist-paper": {"model.teacher": f"edm:{root / 't1.safetensors'}", "model.real": "teacher",
                    "model.teacher_pool": 8, "model.teacher_pool_steps": 2},
    "cifar10": {"model.teacher": f"edm:{root / 't3.safetensors'}", "model.real": "teacher", "model.teacher_pool": 8,
                "model.teacher_pool_steps": 2},
    "sd15": {"model.teacher": f"sd:{root / 'sd'}", "model.prompts": str(root / "prompts.txt"),
             "model.teacher_pool": 4, "model.teacher_pool_steps": 2},
}
assert set(tiny) == set(PRESETS), sorted(PRESETS)
for name, pairs in tiny.items():
    out = Trainer(override(get_preset(name), {**common, **pairs}), root / f"{name}-{mode}").train()
    assert out["steps"] == 2 and out["bad_steps"] == 0, (name, out)
    dist.print0(f"ok {name} {mode}")
dist.destroy()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_trains_the_tiny_variant_of_every_preset(tmp_path, mode):
    script = tmp_path / "every_preset.py"
    script.write_text(EVERY_PRESET)
    launch = torchrun(2)
    out = subprocess.run(
        [*launch, str(script), str(tmp_path), mode], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(f"ok {name} {mode}" in out.stdout for name in ("gmm", "mnist", "mnist-paper", "cifar10", "sd15")), (
        out.stdout[-2000:]
    )
