"""The networks of one distillation run (Algorithm 1) and what their teacher family provides: a leaf module.

Built by `build.build_models` (or a family's own builder, see `teachers.FAMILIES`); read by the loop, the monitor
and the export, none of which branch on the family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

RealSampler = Callable  # real(generator, n) -> (x [n, *shape], condition index [n] or None): Eq. 5's real side
Export = Callable  # export(generator, cfg, run_dir, num_images) -> Path of the written export
Preview = Callable  # preview(generator, path, seed, device) -> None: a sample picture at path


@dataclass
class Models:
    teacher: nn.Module  # phi, frozen
    generator: nn.Module  # G_theta (networks.generator.OneStepGenerator; networks.student.Student for K > 1)
    critic: nn.Module  # psi and eta as one module (networks.discriminator.Critic)
    shape: tuple  # per-sample shape
    sigma_data: float
    real: RealSampler  # the real side of Eq. 5 (line 21), one return type for every family
    export: Export  # how the family writes the EMA generator at the end of a run
    preview: Preview  # how the family draws a sample picture during a run
    conditions: object = None  # ConditionSet D_c that c is drawn from (line 4), or None (unconditional)
    real_conditions: object = None  # ConditionSet of the real side's conditions (line 21), or None

    @property
    def fake(self) -> nn.Module:
        """psi, the critic's fake score."""
        return self.critic.fake

    @property
    def disc(self) -> nn.Module:
        """eta's head (`DiscriminatorHead`; it owns a `separate` backbone)."""
        return self.critic.disc
