"""EDM U-Net: preconditioning identities (EDM Table 1), EDM parameter names, training, EDM import."""

import json

import pytest
import torch

from dibregman.networks.unet import build_unet
from dibregman.noise import edm_preconditioning
from dibregman.teachers import Denoiser, load_teacher
from dibregman.teachers.edm import edm_kwargs_to_config, import_edm_state_dict, load_edm_teacher
from dibregman.train_teacher import TeacherConfig, edm_loss

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0])

# EDMPrecond init_kwargs as EDM's persistence records them, for our `tiny` preset.
TINY_EDM_KWARGS = dict(
    img_resolution=8, img_channels=1, label_dim=0, use_fp16=False, model_type="SongUNet",
    embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
    resample_filter=[1, 1], model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
    dropout=0.0, augment_dim=9,
)  # fmt: skip


def _perturbed(net):
    with torch.no_grad():  # EDM initialises output layers near zero; make F(x) visibly non-zero
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def test_preconditioning_identities():
    net = build_unet("tiny")
    sd = net.sigma_data
    c_skip, c_out, c_in, _ = edm_preconditioning(SIGMAS, sd)
    # unit-variance network input: Var[c_in (x0 + sigma n)] = c_in^2 (sd^2 + sigma^2) = 1
    torch.testing.assert_close(c_in.square() * (sd**2 + SIGMAS.square()), torch.ones(5))
    # unit-variance effective target F* = (x0 - c_skip (x0 + sigma n)) / c_out for Var[x0] = sd^2:
    target_var = ((1 - c_skip).square() * sd**2 + c_skip.square() * SIGMAS.square()) / c_out.square()
    torch.testing.assert_close(target_var, torch.ones(5))
    # the loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 equalises it: lambda c_out^2 = 1
    lam = (SIGMAS.square() + sd**2) / (SIGMAS * sd).square()
    torch.testing.assert_close(lam * c_out.square(), torch.ones(5))


def test_denoiser_is_identity_at_zero_noise_and_features_shape():
    torch.manual_seed(0)
    net = _perturbed(build_unet("tiny"))
    assert isinstance(net, Denoiser)  # the one interface D(x, sigma, cond)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        out = net(x, 1e-4)
        assert (out - x).abs().max() < 1e-3 < (net(x, 1.0) - x).abs().max()
        feats = net.features(x, torch.tensor([0.1, 1.0, 10.0, 80.0]))
    assert feats.shape == (4, net.model.feature_channels, 4, 4) == (4, 16, 4, 4)


def test_parameter_names_follow_edm():
    keys = set(build_unet("tiny").state_dict())
    for key in ["model.map_layer0.weight", "model.map_layer1.bias", "model.enc.8x8_conv.weight",
                "model.enc.8x8_block0.conv0.weight", "model.enc.4x4_down.conv0.weight",
                "model.enc.4x4_block0.qkv.weight", "model.dec.4x4_in0.proj.weight",
                "model.dec.8x8_aux_conv.weight", "model.enc.4x4_down.conv0.resample_filter"]:  # fmt: skip
        assert key in keys, key


def test_class_conditioning_changes_the_output():
    torch.manual_seed(1)
    net = _perturbed(build_unet("tiny", label_dim=10))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = net(x, 1.0, torch.tensor([0, 0]))
        b = net(x, 1.0, torch.tensor([3, 3]))
    assert "model.map_label.weight" in net.state_dict()
    assert (a - b).abs().max() > 1e-3


def test_a_few_training_steps_reduce_the_loss():
    from sklearn.datasets import load_digits

    x0 = torch.from_numpy(load_digits().images[:16]).float()[:, None] / 8 - 1  # [16, 1, 8, 8]
    torch.manual_seed(0)
    net = build_unet("tiny")
    cfg = TeacherConfig()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def eval_loss():  # same noise levels and noise every time
        torch.manual_seed(123)
        with torch.no_grad():
            return float(sum(edm_loss(net, x0, None, cfg) for _ in range(4)) / 4)

    before = eval_loss()
    torch.manual_seed(1)
    for _ in range(30):
        loss = edm_loss(net, x0, None, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * before


def test_import_edm_roundtrip(tmp_path):
    torch.manual_seed(2)
    edm_net = _perturbed(build_unet("tiny"))  # stands in for an EDMPrecond with the same names
    state = dict(edm_net.state_dict())
    state["model.map_augment.weight"] = torch.randn(8, 9)  # EDM's augmentation-label layer: dropped
    torch.save(state, tmp_path / "edm_sd.pt")
    (tmp_path / "edm_kwargs.json").write_text(json.dumps(TINY_EDM_KWARGS))
    out = import_edm_state_dict(tmp_path / "edm_sd.pt", tmp_path / "edm_kwargs.json", tmp_path / "teacher.safetensors")
    assert out.name == "teacher.safetensors" and out.with_suffix(".json").is_file()
    for teacher in (load_edm_teacher(out), load_teacher(f"edm:{out}")):
        assert teacher.cfg.model_channels == 8 and teacher.sigma_min == 0.002 and teacher.sigma_max == 80.0
        x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
        with torch.no_grad():
            torch.testing.assert_close(teacher(x, sigma), edm_net(x, sigma), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="DhariwalUNet"), "model_type"),
        (dict(embedding_type="fourier", channel_mult_noise=2), "embedding_type"),
        (dict(encoder_type="residual"), "encoder_type"),
        (dict(decoder_type="skip"), "decoder_type"),
        (dict(resample_filter=[1, 3, 3, 1]), "resample_filter"),
        (dict(img_channels=None), "img_channels"),
        (dict(fancy_option=True), "fancy_option"),
    ],
)
def test_import_edm_rejects_other_architectures(change, match):
    kwargs = {k: v for k, v in {**TINY_EDM_KWARGS, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        edm_kwargs_to_config(kwargs)


def test_import_edm_rejects_mismatched_or_pickled_files(tmp_path):
    torch.save(build_unet("tiny", model_channels=16).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt"):
        import_edm_state_dict(tmp_path / "wide.pt", TINY_EDM_KWARGS, tmp_path / "out")
    torch.save(build_unet("tiny"), tmp_path / "module.pt")  # a pickled module (code), not a state dict
    with pytest.raises(ValueError, match=r"module\.pt"):
        import_edm_state_dict(tmp_path / "module.pt", TINY_EDM_KWARGS, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"absent\.pt"):
        import_edm_state_dict(tmp_path / "absent.pt", TINY_EDM_KWARGS, tmp_path / "out")


def test_train_teacher_resume_is_exact(tmp_path):
    """2 steps + resume + 2 steps equals 4 steps bitwise: the data sampler's state travels in the checkpoint."""
    import numpy as np

    from dibregman.train_teacher import train_teacher

    data = tmp_path / "data.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 255, (64, 1, 8, 8), dtype=np.uint8))
    base = dict(data=f"npz:{data}", unet="tiny", batch_size=8, lr_warmup_kimg=0.0, lr_final_ratio=1.0)  # constant lr
    base.update(ckpt_every_kimg=0.016, keep_ckpts=4)
    full = train_teacher(TeacherConfig(**base, total_kimg=0.032), tmp_path / "full")
    train_teacher(TeacherConfig(**base, total_kimg=0.016), tmp_path / "split")
    split = train_teacher(TeacherConfig(**base, total_kimg=0.032), tmp_path / "split")
    from safetensors.torch import load_file

    a, b = load_file(str(full)), load_file(str(split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_teacher_device_is_checked(tmp_path):
    """device: cpu (the default) | cuda | auto; an unknown name, or cuda on a machine without it, is a ValueError
    before anything is created."""
    from dibregman.train_teacher import teacher_config, teacher_device

    assert TeacherConfig().device == "cpu" and teacher_device(teacher_config("digits")).type == "cpu"
    with pytest.raises(ValueError, match="device='gpu' is not valid"):
        teacher_config("digits", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            teacher_config("digits", device="cuda")
        assert teacher_device(teacher_config("digits", device="auto")).type == "cpu"


def test_train_teacher_presets_print_config_and_list_keys(tmp_path, capsys):
    """`train-teacher` takes the distill path: --preset, --set, --print-config (JSON, nothing created),
    --list-keys; `mnist` is TeacherConfig's defaults (the shipped teacher's recipe)."""
    from dataclasses import asdict

    from dibregman.cli import main
    from dibregman.train_teacher import TEACHER_PRESETS, teacher_config

    assert TEACHER_PRESETS["mnist"] == TeacherConfig() == teacher_config()
    run = tmp_path / "run"
    assert main(["train-teacher", "--run-dir", str(run), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == asdict(TeacherConfig())
    argv = ["train-teacher", "--run-dir", str(run), "--preset", "digits", "--set", "seed=3", "--print-config"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == asdict(teacher_config("digits", seed=3)) and printed["data"] == "digits:"
    assert main(["train-teacher", "--preset", "digits", "--list-keys"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(asdict(TeacherConfig())) and rows[5].split()[:3] == ["batch_size", "int", "32"]
    assert main(["train-teacher", "--run-dir", str(run), "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown teacher preset 'nope'" in err and "digits" in err
    from dibregman import api

    with pytest.raises(ValueError, match="unknown teacher preset"):
        api.train_teacher(run, preset="nope")
    assert list(tmp_path.iterdir()) == []  # nothing created
