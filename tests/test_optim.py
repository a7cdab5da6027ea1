"""The shared loop toolkit (`dibregman.optim`): EMA and cosine schedule."""

import pytest
import torch

from dibregman import optim


def test_ema_halflife_and_mismatch():
    assert optim.ema_beta(10, 10) == 0.5 and optim.ema_beta(10, 0) == 0.0
    ema, net = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optim.update_ema(ema, net, 0.0)
    assert torch.equal(ema.weight, net.weight)
    with pytest.raises(ValueError):  # zip(strict=True): a parameter mismatch is not hidden
        optim.update_ema(torch.nn.Sequential(ema, torch.nn.Linear(2, 2)), net, 0.5)


def test_cosine_factor_ends():
    assert optim.cosine_factor(0.0, 0.1) == 1.0
    assert optim.cosine_factor(1.0, 0.1) == pytest.approx(0.1)
    assert optim.cosine_factor(2.0, 0.1) == pytest.approx(0.1)
    assert optim.cosine_factor(0.5, 0.0) == pytest.approx(0.5)
