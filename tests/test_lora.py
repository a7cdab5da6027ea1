"""LoRA through PEFT (`networks/lora.py`): psi trains exactly as the hand-written LoRA that PEFT replaced, that code's
checkpoints migrate, LoRA copies share one frozen base with the teacher (and G's EMA), and a LoRA student of a
native EDM U-Net resumes bitwise, snapshots and exports adapters that reload into the same generator, with a model
card whose FIDs are the run's records."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from dibregman import checkpoint as ckpt
from dibregman import trainer_state
from dibregman.build import build_models
from dibregman.cli import main
from dibregman.config import override
from dibregman.evaluate_run import evaluate_run, load_snapshot
from dibregman.generators import load_generator
from dibregman.loop import Trainer
from dibregman.metrics.features import RandomFeatures
from dibregman.networks.lora import FrozenShared, lora_layers
from dibregman.presets import get_preset
from dibregman.teachers.sd import StableDiffusionTeacher
from dibregman.teachers.t2i import trainable_copy
from tiny_hf import tiny_sd_components

PROMPTS = ["a cat", "dog on a mat", "a red house"]


# ---- the hand-written LoRA that PEFT replaced (networks/lora.py before PEFT), kept as the reference -------------
class OldLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.down = nn.Linear(base.in_features, rank, **kw)
        self.up = nn.Linear(rank, base.out_features, **kw)
        nn.init.zeros_(self.up.weight)
        self.scale = 1.0

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def old_add_lora(model: nn.Module, rank: int, targets=("to_q", "to_k", "to_v", "to_out.0")) -> nn.Module:
    model.requires_grad_(False)
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in targets)
    ]
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, OldLoRALinear(getattr(model.get_submodule(parent), attr), rank))
    return model


def old_key(key: str) -> str:
    """A PEFT key in the hand-written LoRA's naming."""
    key = key.replace(".base_layer.", ".base.")
    return key.replace(".lora_A.default.weight", ".down.weight").replace(".lora_B.default.weight", ".up.weight")


@pytest.fixture(scope="module")
def sd_teacher():
    parts = tiny_sd_components(seed=1)
    return StableDiffusionTeacher(*(parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")))


def _dsm_steps(psi, num_steps: int, cond) -> list[torch.Tensor]:
    """A few AdamW steps of psi's denoising loss on fixed draws; psi's outputs at every step."""
    opt = torch.optim.AdamW([p for p in psi.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    outs = []
    for _ in range(num_steps):
        x0, n = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        sigma = torch.rand(3, generator=g) * 3 + 0.1
        out = psi(x0 + sigma[:, None, None, None] * n, sigma, cond)
        (out - x0).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        outs.append(out.detach())
    return outs


@pytest.mark.parametrize("share_base", [True, False], ids=["shared-base", "own-base"])
def test_peft_psi_trains_exactly_as_the_hand_written_lora(sd_teacher, share_base):
    torch.manual_seed(3)
    old = sd_teacher.unguided(old_add_lora(copy.deepcopy(sd_teacher.unet).float().eval(), 4))
    torch.manual_seed(3)  # the same seed: PEFT's A is drawn in the old code's order
    new = trainable_copy(sd_teacher, lora_rank=4, share_base=share_base)
    olds = {n: m for n, m in old.unet.named_modules() if isinstance(m, OldLoRALinear)}
    news = lora_layers(new.unet)
    assert list(olds) == list(news) and len(news) == 32
    for name, layer in news.items():
        assert torch.equal(layer.lora_A["default"].weight, olds[name].down.weight), name
        assert torch.equal(layer.lora_B["default"].weight, olds[name].up.weight), name
    cond = sd_teacher.encode_prompts(PROMPTS)
    for a, b in zip(_dsm_steps(old, 4, cond), _dsm_steps(new, 4, cond), strict=True):
        assert torch.equal(a, b)  # bitwise: same maths, same order of operations
    assert any(bool(layer.lora_B["default"].weight.abs().sum() > 0) for layer in news.values())  # B trained
    trained = {old_key(k): v for k, v in new.unet.state_dict().items()}
    reference = old.unet.state_dict()
    assert trained and all(torch.equal(v, reference[k]) for k, v in trained.items())


def test_checkpoints_of_the_hand_written_lora_are_migrated(sd_teacher):
    psi = trainable_copy(sd_teacher, lora_rank=4)
    with torch.no_grad():
        for name, p in psi.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    full = {k: v for k, v in psi.unet.named_parameters()}  # what the old code saved: base weights included
    old_state = {f"unet.{old_key(k)}": v.detach().clone() for k, v in full.items()}
    assert any(k.endswith(".to_q.down.weight") for k in old_state) and "unet.conv_in.weight" in old_state
    old_state["unet.conv_in.weight"] += 1.0  # base keys are ignored: the base is the teacher's
    fresh = trainable_copy(sd_teacher, lora_rank=4)
    before = sd_teacher.unet.conv_in.weight.clone()
    fresh.load_state_dict(old_state)  # strict
    assert torch.equal(sd_teacher.unet.conv_in.weight, before)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 0.5])
    with torch.no_grad():
        assert torch.equal(fresh(x, sigma, PROMPTS[:2]), psi(x, sigma, PROMPTS[:2]))
    assert set(fresh.state_dict()) == {f"unet.{k}" for k in full if ".lora_" in k}  # adapters only


def t2i_cfg(sd_dir, prompts_file, steps: int, **pairs):
    batch = 2
    return override(
        get_preset("sd15"),
        {
            "model.teacher": f"sd:{sd_dir}", "model.prompts": str(prompts_file), "model.teacher_pool": 4,
            "model.teacher_pool_steps": 2, "optim.batch_size": batch, "optim.accum_steps": 1, "optim.gen_lr": 1e-3,
            "optim.fake_lr": 1e-3, "loss.gan_warmup_kimg": 0.0, "run.total_kimg": steps * batch / 1000,
            "run.log_every_kimg": batch / 1000, "run.sample_every_kimg": 0.0, "run.ckpt_every_kimg": batch / 1000,
            "run.tensorboard": False, **pairs,
        },
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tiny_sd_components(root, seed=0)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _states_equal(a: Trainer, b: Trainer) -> None:
    """Networks, EMA and optimisers of two trainers bitwise equal (their checkpoints' entries)."""
    x, y = trainer_state.state_dict(a), trainer_state.state_dict(b)
    for name in ("generator", "fake", "disc", "ema", "opt_g", "opt_c"):
        assert ckpt.content_checksum(x[name]) == ckpt.content_checksum(y[name]), name


def test_a_pre_peft_checkpoint_resumes_as_if_written_by_peft(sd_dir, tmp_path):
    prompts = sd_dir / "prompts.txt"
    pairs = {"model.fake_lora_rank": 4}
    full = Trainer(t2i_cfg(sd_dir, prompts, 4, **pairs), tmp_path / "full")
    full.train()
    Trainer(t2i_cfg(sd_dir, prompts, 2, **pairs), tmp_path / "split").train()
    path = ckpt.list_checkpoints(tmp_path / "split")[-1]
    state = ckpt.load(path)  # rewrite psi in the old naming, with the base weights the old code stored
    tr = Trainer(t2i_cfg(sd_dir, prompts, 2, **pairs), tmp_path / "probe")
    base = {f"unet.{k}": v for k, v in tr.m.fake.unet.named_parameters() if ".lora_" not in k}
    state["fake"] = {old_key(k): v for k, v in {**base, **state["fake"]}.items()}
    ckpt.save_atomic(state, path)
    resumed = Trainer(t2i_cfg(sd_dir, prompts, 4, **pairs), tmp_path / "split")
    assert resumed.state.step == 2
    resumed.train()
    _states_equal(full, resumed)


def test_lora_copies_share_one_frozen_base(sd_dir):
    prompts = sd_dir / "prompts.txt"
    m = build_models(t2i_cfg(sd_dir, prompts, 2, **{"model.student_lora_rank": 4, "model.fake_lora_rank": 2}), "cpu")
    teacher = {id(p) for p in m.teacher.unet.parameters()}
    ema = copy.deepcopy(m.generator)  # as the loop makes G's EMA
    for net in (m.generator, m.fake, ema):
        base = [p for n, p in net.named_parameters() if ".lora_" not in n]
        assert len(base) == len(teacher) and all(id(p) in teacher and isinstance(p, FrozenShared) for p in base)
        assert all(".lora_" in k for k in net.state_dict())  # checkpoints hold adapters only
        assert {n for n, p in net.named_parameters() if p.requires_grad} == {
            n for n in dict(net.named_parameters()) if ".lora_" in n
        }
    assert not {id(p) for n, p in ema.named_parameters() if ".lora_" in n} & {id(p) for p in m.generator.parameters()}
    x, sigma, cond = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 0.3]), PROMPTS[:2]
    with torch.no_grad():  # B = 0: G starts as the teacher's unguided network
        torch.testing.assert_close(
            m.generator.denoiser(x, sigma, cond), m.teacher.unguided(m.teacher.unet)(x, sigma, cond)
        )
    own = build_models(
        t2i_cfg(sd_dir, prompts, 2, **{"model.student_lora_rank": 4, "model.share_lora_base": False}), "cpu"
    )
    assert not {id(p) for p in own.generator.parameters()} & {id(p) for p in own.teacher.unet.parameters()}
    full = {id(p) for p in own.fake.parameters()}  # a full-weight psi owns its weights even beside a LoRA G
    assert all(p.requires_grad for p in own.fake.parameters()) and not full & {id(p) for p in own.teacher.parameters()}


# ---- a native teacher: the EDM U-Net ----------------------------------------------------------------------
def edm_cfg(teacher: str, steps: int, **pairs):
    return override(
        get_preset("mnist"),
        {
            "model.teacher": f"edm:{teacher}", "model.real": "teacher", "model.teacher_pool": 16,
            "model.teacher_pool_steps": 2, "model.student_lora_rank": 2, "optim.batch_size": 4,
            "optim.lr_schedule": "constant", "run.total_kimg": steps * 4 / 1000, "run.ckpt_every_kimg": 0.008,
            "run.keep_ema_every_kimg": 0.008, "run.tensorboard": False, "run.sample_every_kimg": 0.0, **pairs,
        },
    )  # fmt: skip


def test_edm_lora_student_resumes_bitwise_exports_adapters_and_a_card_of_measured_fids(tiny_teacher, tmp_path):
    full = Trainer(edm_cfg(tiny_teacher, 4), tmp_path / "full")
    out = full.train()
    Trainer(edm_cfg(tiny_teacher, 2), tmp_path / "split").train()
    resumed = Trainer(edm_cfg(tiny_teacher, 4), tmp_path / "split")
    assert resumed.state.step == 2
    resumed.train()
    _states_equal(full, resumed)  # N + N steps with a resume == 2N steps, bitwise
    names = [n for n, _ in full.m.generator.named_parameters() if ".lora_" in n]
    assert (
        any(".qkv." in n for n in names) and any(".conv1." in n for n in names) and any(".affine." in n for n in names)
    )

    run, z = full.run_dir, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    folder = run / "lora"
    assert out["export"] == str(folder) and not (run / "generator.safetensors").exists()
    meta = json.loads((folder / "dibregman.json").read_text())
    assert meta["format"] == "lora" and meta["lora"]["prefix"] == "model" and meta["num_images"] == 16
    gen, _ = load_generator(run)
    with torch.no_grad():
        assert torch.equal(gen(z), full.ema(z))  # teacher + adapters == the EMA student
        assert torch.equal(load_snapshot(run / "ema-000000000016.safetensors")(z), full.ema(z))  # EMA snapshot
        assert torch.equal(load_snapshot(ckpt.list_checkpoints(run)[-1])(z), full.ema(z))  # from a checkpoint
    reference = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    curve = evaluate_run(
        run, reference, num_samples=16, feature_net=RandomFeatures(), metrics=("fid",), cache_dir=False
    )
    card = (folder / "README.md").read_text()
    assert str(folder / "README.md") in curve["written"]
    newest = max(curve["rows"], key=lambda r: r["num_images"])
    row = next(line for line in card.splitlines() if line.startswith("| ") and "fid_curve.json" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[0]) == round(newest["fid"], 3) and cells[1] == curve["protocol"] == "random"
    assert int(cells[3]) == newest["n_samples"] == 16 and cells[4] == newest["reference"]
    assert re.search(r"\| images seen \| 16 \|", card) and "dibregman sample --checkpoint" in card
    out = run / "fid_digits.json"  # `eval --checkpoint RUN --out RUN/X.json`: the card lists that result too
    argv = ["eval", "--checkpoint", str(run), "--features", "mnist", "--reference", "digits::test", "--num", "8",
            "--metrics", "fid", "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res, card = json.loads(out.read_text()), (folder / "README.md").read_text()
    row = next(line for line in card.splitlines() if "fid_digits.json" in line)
    assert row.startswith(f"| {res['fid']:.3f} | {res['protocol']} | mnist | 8 | {res['reference']} |")
    assert f"| divergence | `{full.cfg.divergence.name}`" in card


def test_dit_lora_student_adapts_the_transformer_and_its_export_reloads(tmp_path):
    from tiny_flow_hf import tiny_dit_components

    tiny_dit_components(tmp_path / "dit", seed=0)
    cfg = override(
        get_preset("mnist"),
        {
            "model.teacher": f"dit:{tmp_path / 'dit'}", "model.real": "teacher", "model.teacher_pool": 4,
            "model.teacher_pool_steps": 2, "model.student_lora_rank": 2, "model.guidance_scale": 2.0,
            "optim.batch_size": 2, "run.total_kimg": 0.004, "run.tensorboard": False, "run.sample_every_kimg": 0.0,
        },
    )  # fmt: skip
    tr = Trainer(cfg, tmp_path / "run")
    tr.train()
    den = tr.m.generator.denoiser
    assert den.guidance_scale == 1.0 and tr.m.teacher.guidance_scale == 2.0  # only the teacher is guided
    assert den.vae is tr.m.teacher.vae and all(k.startswith("denoiser.transformer.") for k in tr.ema.state_dict())
    meta = json.loads((tmp_path / "run" / "lora" / "dibregman.json").read_text())
    assert meta["lora"]["prefix"] == "transformer" and meta["lora"]["network_class"] == "DiTTransformer2DModel"
    gen, _ = load_generator(tmp_path / "run")
    z, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(gen(z, labels), tr.ema(z, labels))
