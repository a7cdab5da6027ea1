import torch

from dibregman.networks.unet import build_unet
from dibregman.teachers import Denoiser


def test_unet_is_a_denoiser():
    net = build_unet("tiny")
    assert isinstance(net, Denoiser)
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.tensor([0.1, 1.0, 10.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
