"""dibregman: one-step diffusion distillation by Bregman density-ratio matching (Di-Bregman)."""

__version__ = "0.1.0"
