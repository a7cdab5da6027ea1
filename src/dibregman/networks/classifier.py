"""A small CNN digit classifier for 28x28 grey images: the fast MNIST feature network of `dibregman.metrics`.

Three 3x3 conv blocks (28 -> 14 -> 7 -> 3 pixels), then a 128-d penultimate layer (`features`) and a linear
head (`logits`). Trained by `bench/train_classifier.py` on the 60k MNIST training digits; the shipped weights
live in `dibregman/assets/mnist_classifier.safetensors` (+ `.json` with test accuracy and the exact command).
Inputs are float images in [-1, 1], shape [N, 1, 28, 28], exactly as `dibregman.data.load_dataset` returns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of `DigitClassifier`; the defaults are the shipped MNIST classifier (0.13 M params)."""

    img_channels: int = 1  # input channels
    img_resolution: int = 28  # input side length in pixels
    channels: tuple[int, ...] = (32, 64, 64)  # conv widths; each block halves the resolution (floor)
    feature_dim: int = 128  # width of the penultimate layer = feature dimension for FID/KID/PR
    num_classes: int = 10  # output classes
    dropout: float = 0.25  # dropout before the head (training only)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown ClassifierConfig keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


class DigitClassifier(nn.Module):
    """conv-BN-ReLU-maxpool blocks -> flatten -> Linear -> ReLU (= features) -> dropout -> Linear (logits)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        blocks, c_in, res = [], config.img_channels, config.img_resolution
        for c_out in config.channels:
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in, res = c_out, res // 2
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in * res * res, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> penultimate activations [N, feature_dim] (post-ReLU)."""
        return torch.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> logits [N, num_classes]."""
        return self.head(self.dropout(self.features(x)))


def build_classifier(config: ClassifierConfig | dict | None = None) -> DigitClassifier:
    if config is None:
        config = ClassifierConfig()
    elif isinstance(config, dict):
        config = ClassifierConfig.from_dict(config)
    return DigitClassifier(config)
