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
    from dibregman.config import override
    from dibregman.presets import get_preset

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


def _import_graph() -> dict:
    """Module -> the package modules it imports anywhere in its source (module level or inside functions)."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "src" / "dibregman"
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                deps.add(mod)
                deps.update(f"{mod}.{a.name}" for a in node.names)
        graph[name] = deps
    return {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}


def test_no_import_cycle_between_modules():
    """Data flows one way: no two modules import each other, directly or through others (a package importing
    its own submodules lazily, as `teachers` does its families, is not a cycle)."""
    graph = _import_graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = []
    for mod in graph:
        for dep in graph[mod]:
            inside = dep.startswith(mod + ".") or mod.startswith(dep + ".")  # package <-> its own submodule
            if not inside and mod in reach(dep):
                cycles.append((mod, dep))
    assert not cycles, cycles


def test_config_is_self_describing(capsys):
    """Choices come from Literal[...] fields (read by validate), help from field metadata, both listed by the CLI."""
    from dibregman.cli import main
    from dibregman.config import LossConfig, choices, override, validate
    from dibregman.presets import get_preset

    assert choices(LossConfig)["weighting"] == ("dmd", "unit", "score")
    assert choices(LossConfig)["gen_t_origin"] == ("sigma_max", "sigma_min")
    with pytest.raises(ValueError, match=r"optim.order='last' is not valid; choose one of \['critic_first'"):
        validate(override(get_preset("gmm"), {"optim.order": "last"}))
    assert main(["distill", "--preset", "mnist", "--list-keys"]) == 0
    out = capsys.readouterr().out
    assert "divergence.normalize" in out and "none|batch_mean|softmax|sigma_bins" in out and "SBA lambda" in out


def test_off_is_none_and_old_zeros_still_read():
    """`None` means off (or "the teacher's"); 0 and '' from older configs, checkpoints and --set read as None."""
    from dibregman.config import DistillConfig, override, parse_set
    from dibregman.presets import get_preset

    assert DistillConfig().loss.gen_sigma_max is None and DistillConfig().run.threads is None
    cfg = override(get_preset("gmm"), {"divergence.weight_clip": 0, **parse_set(["optim.grad_clip=null"])})
    assert cfg.divergence.weight_clip is None and cfg.optim.grad_clip is None
    old = DistillConfig().to_dict()
    old["loss"]["gen_sigma_min"], old["model"]["real_cache"] = 0.0, ""
    assert DistillConfig.from_dict(old) == DistillConfig()
    assert override(cfg, {"optim.grad_clip": 2}).optim.grad_clip == 2.0


def test_a_new_teacher_family_is_one_registry_line(monkeypatch, tmp_path):
    """A family with the native recipe needs only its loader in `teachers.FAMILIES`: the loop runs it as is."""
    from dibregman import teachers
    from dibregman.loop import distill
    from dibregman.teachers.gmm import ring_mixture
    from test_distill import gmm_cfg, steps_kimg

    monkeypatch.setitem(teachers.FAMILIES, "toy", teachers.TeacherFamily(lambda arg, **kw: ring_mixture()))
    out = distill(gmm_cfg(**{"model.teacher": "toy:ring8", "run.total_kimg": steps_kimg(1)}), tmp_path)
    assert out["steps"] == 1 and out["bad_steps"] == 0 and out["export"].endswith("generator.safetensors")
