"""Test-suite settings: one intra-op thread. The tests use tiny models whose run time is dominated by thread
start-up and, on a shared 2-core CI box, by contention; one thread is both faster and more repeatable."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
