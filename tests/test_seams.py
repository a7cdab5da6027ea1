"""The package's seams: what importing it does, what the CLI accepts, which module imports which."""

import pytest

from dibregman.cli import build_parser


def test_cli_refuses_the_test_only_random_features():
    parser = build_parser()
    assert parser.parse_args(["eval", "--samples", "s.npz", "--features", "mnist"]).features == "mnist"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--samples", "s.npz", "--features", "random"])


def test_build_models_takes_an_injected_initialisation():
    """Benchmarks inject a cached initialisation through `build_models(pretrain=...)` instead of monkeypatching."""
    import torch

    from dibregman import build
    from dibregman.config import get_preset, override

    calls = []

    def pretrain(teacher, cfg, device):
        calls.append(cfg.run.seed)
        return build.pretrain_mlp(teacher, cfg, device)

    cfg = override(get_preset("gmm"), {"model.init_steps": 2, "model.mlp_hidden": 8, "model.mlp_depth": 1})
    m = build.build_models(cfg, torch.device("cpu"), pretrain=pretrain)
    assert calls == [0] and m.generator is not None


def test_benchmarks_use_no_private_names_of_the_package():
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench"
    for path in bench.glob("*.py"):
        text = path.read_text()
        assert "cli import _" not in text and "build.pretrain_mlp =" not in text, path
