"""`dibregman distill` in Python: the Di-Bregman method (`methods/dibregman.py`) trained by the engine
(`engine.py`). `Trainer(cfg, run_dir).train()` builds both; its attributes reach the method's networks
(`m`), objective (`div`, `stab`) and optimisers, so scripts and tests can look inside a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .config import DistillConfig
from .engine import Engine, Phase, State
from .methods.dibregman import DiBregman


class Trainer(Engine):
    """The engine over `DiBregman(cfg, run_dir)`; resumes from the run folder's newest healthy checkpoint."""

    def __init__(
        self,
        cfg: DistillConfig,
        run_dir: str | Path,
        hooks: list[Callable] | None = None,
        *,
        pretrain: Callable | None = None,  # see build.build_models
    ):
        super().__init__(DiBregman(cfg, run_dir, pretrain=pretrain), run_dir, hooks)

    @property
    def cfg(self) -> DistillConfig:
        return self.method.cfg

    @property
    def m(self):
        return self.method.m

    def lr_factor(self) -> float:
        """The learning-rate multiplier at the current images seen (the method's schedule)."""
        return self.method.lr_factor(self.state)

    @property
    def opt_g(self):
        return self.method.optimizers["generator"]

    @property
    def opt_c(self):
        return self.method.optimizers["critic"]

    def phase(self, name: str):
        """The named phase of the current step (critic or generator), as the engine runs it."""
        m = self.method
        loss = m.critic_loss if name == "critic" else m.generator_loss
        return Phase(name, m.trainable()[name], loss, ema=name == "generator")


def _delegate(name: str) -> property:
    """Trainer.<name> reads and writes the method's attribute of that name."""
    return property(lambda self: getattr(self.method, name), lambda self, v: setattr(self.method, name, v))


for _name in ("div", "stab", "target", "regression", "sigma_range", "gen_params", "critic_params"):
    setattr(Trainer, _name, _delegate(_name))


def distill(
    cfg: DistillConfig,
    run_dir: str | Path,
    *,
    hooks: list[Callable] | None = None,
    max_steps: int | None = None,
) -> dict:
    """Run (or resume) Di-Bregman distillation in `run_dir`; returns a summary dict. Mirrors `dibregman distill`."""
    trainer = Trainer(cfg, run_dir, hooks)
    return trainer.train(max_steps=max_steps)


def export_run(run_dir: str | Path) -> str:
    """The EMA generator of a run's newest healthy checkpoint (a one-process file or a sharded folder of any world
    size) written the teacher family's way (`generator.safetensors`, or the diffusers folder for text-to-image):
    one process reads the shards. Mirrors `dibregman export`."""
    from dataclasses import replace

    from . import checkpoint as ckpt

    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not config.is_file() or not ckpt.list_checkpoints(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no distillation run (config.json and a checkpoint)")
    cfg = DistillConfig.from_dict(json.loads(config.read_text()))
    one = replace(cfg, run=replace(cfg.run, parallel="none", device="cpu" if cfg.run.device == "cpu" else "auto"))
    trainer = Trainer(one, run_dir)
    if trainer.state.step == 0:
        raise ValueError(f"no checkpoint of {run_dir} could be loaded (see the warnings above)")
    return trainer.export()


__all__ = ["State", "Trainer", "distill", "export_run"]
