"""Recipe options of the generator/critic noise levels: which end of the Karras schedule t = 0 is (ours vs SiD's
code), and the fake score's DSM noise levels (EDM log-normal or the generator step's own distribution)."""

import pytest
import torch

from dibregman.config import override, validate
from dibregman.noise import karras_sigma_at, karras_uniform_sigma
from dibregman.presets import get_preset


@pytest.mark.parametrize("origin", ["sigma_max", "sigma_min"])
def test_karras_uniform_sigma_origin_sets_the_range(origin):
    g = torch.Generator().manual_seed(0)
    s = karras_uniform_sigma(20000, 0.8, 0.002, 80.0, generator=g, origin=origin)
    edge = float(karras_sigma_at(torch.tensor(0.8 if origin == "sigma_max" else 0.2), 0.002, 80.0))
    lo, hi = (edge, 80.0) if origin == "sigma_max" else (0.002, edge)
    assert s.min() >= lo * (1 - 1e-6) and s.max() <= hi * (1 + 1e-6)
    assert s.min() < lo * 1.2 and s.max() > hi * 0.8  # the whole range is used
    if origin == "sigma_min":
        assert abs(edge - 24.4) < 0.1  # SiD's tmax = 800 range: [0.002, 24.4]


def test_fake_sigma_generator_draws_the_generator_distribution():
    from dibregman.build import build_models
    from dibregman.draws import draw_batch

    pairs = {"model.init_steps": 5, "model.mlp_hidden": 16, "model.mlp_depth": 2, "loss.fake_sigma": "generator"}
    cfg = validate(override(get_preset("gmm"), pairs))
    m = build_models(cfg, torch.device("cpu"))
    b, _ = draw_batch(cfg, m, step=3, rnd=0, n=4096, device="cpu", sigma_range=(0.002, 2.0))
    assert b.fake_sigma.max() <= 2.0 + 1e-6 and b.fake_sigma.min() >= 0.002 - 1e-9
    default, _ = draw_batch(override(cfg, {"loss.fake_sigma": "lognormal"}), m, 3, 0, 4096, "cpu", (0.002, 2.0))
    assert default.fake_sigma.max() > 2.0  # the log-normal draw reaches beyond the generator's range
    assert torch.equal(default.z, b.z) and torch.equal(default.disc_sigma, b.disc_sigma)  # other draws unchanged
    with pytest.raises(ValueError, match="fake_sigma"):
        validate(override(cfg, {"loss.fake_sigma": "uniform"}))


def test_critic_logs_accuracy_and_dsm_per_sigma_bin(tmp_path):
    import json

    from dibregman.loop import distill

    pairs = {"model.init_steps": 5, "model.mlp_hidden": 16, "model.mlp_depth": 2, "optim.batch_size": 64}
    pairs.update({"run.total_kimg": 0.128, "run.log_every_kimg": 0.128, "run.tensorboard": False})
    pairs.update({"loss.gen_warmup_kimg": 0.0, "run.sample_every_kimg": None})
    distill(override(get_preset("gmm"), pairs), tmp_path)
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    acc = {k: v for k, v in rec.items() if k.startswith("disc_acc_by_sigma/")}
    dsm = {k: v for k, v in rec.items() if k.startswith("fake_dsm_by_sigma/")}
    assert len(acc) >= 3 and all(0 <= v <= 1 for v in acc.values())
    assert len(dsm) >= 3 and all(v >= 0 for v in dsm.values())
