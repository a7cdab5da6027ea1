"""Methods over the engine (`engine.py`): each names its networks, optimisers, phases and losses.

- `dibregman.DiBregman`: Di-Bregman distillation (Algorithm 1), `dibregman distill`.
- `denoising.Denoising`: EDM / rectified-flow teacher training, `dibregman train-teacher`.
- `critic.CriticOnly`: the critic of Algorithm 1 against a fixed student, the ratio calibration's loop.
"""
