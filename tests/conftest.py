"""Test-suite settings: one intra-op thread. The tests use tiny models whose run time is dominated by thread
start-up and, on a shared 2-core CI box, by contention; one thread is both faster and more repeatable."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A randomly initialised tiny EDM U-Net exported like a trained teacher (8x8, one channel)."""
    from dibregman import checkpoint as ckpt
    from dibregman.networks.unet import build_unet

    torch.manual_seed(0)
    net = build_unet("tiny")
    path = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    ckpt.export_safetensors(net.state_dict(), {"kind": "edm-unet", "unet": net.cfg.to_dict()}, path)
    return str(path)
