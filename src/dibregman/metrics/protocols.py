"""FID protocols: the exact path from a generated image to the Inception-v3 input, named after the papers' tools.

Every Inception number records its protocol; numbers of different protocols are never compared or put in one
table column (`evaluate.fid_table` refuses). Both protocols share the network (TF Inception-v3 of 2015-12-05,
2048-d pool3 features, input scaled as u / 128 - 1), the quantisation and the statistics:

* quantisation: samples x in [-1, 1] become 8-bit as when written to PNG by EDM's `generate.py`,
  u = clip(floor(127.5 x + 128), 0, 255); reference images that are already 8-bit are unchanged by it.
* statistics: mu = mean, sigma = covariance with 1/(n - 1) (numpy `np.cov`), accumulated in float64 as sums
  of features and of outer products (EDM `fid.py`), FID by the closed form of `distances.frechet_distance`.

`edm`   -- EDM / SiD / DMD2 tables (NVlabs/edm `fid.py`, StyleGAN2-ADA's TorchScript Inception; clean-fid's
           `legacy_tensorflow` mode): grey repeated to RGB, TensorFlow-1 `resize_bilinear(align_corners=False)` of
           the 8-bit values to 299x299 (the resize inside that TorchScript network, `features.resize_bilinear_tf1`).
`clean` -- clean-fid's default "clean" mode (Parmar et al. 2022; the Di-Bregman paper's 3.61, DMD2's COCO
           numbers): grey repeated to RGB, each channel of the 8-bit image converted to a float32 PIL image
           (mode "F"), resized to 299x299 with PIL's bicubic filter (a = -0.5, antialiased when shrinking), clipped
           to [0, 255], not re-quantised (`resize_pil_bicubic`; clean-fid `resize.make_resizer("PIL", False,
           "bicubic", (299, 299))`).
`torch-bilinear` -- not a paper protocol: pytorch-fid's `F.interpolate(bilinear)` resize on the same network,
           kept for comparisons with older numbers of this repository.

Reference statistics files: EDM's `fid.py ref` and clean-fid's `make_custom_stats` both write an `.npz` with
`mu` [2048] and `sigma` [2048, 2048] (float64); clean-fid names them `<name>_<mode>_<split>_<res>.npz`, so
`clean` / `legacy_tensorflow` in the file name tells the protocol (`protocol_from_filename`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

PROTOCOLS = ("edm", "clean", "torch-bilinear")
INCEPTION_SIZE = (299, 299)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    return protocol


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> float values in {0, ..., 255}: clip(floor(127.5 x + 128), 0, 255) (EDM's PNG)."""
    return (images.float() * 127.5 + 128).floor().clamp(0, 255)


def resize_pil_bicubic(u: torch.Tensor, size: tuple[int, int] = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's "clean" resize: 8-bit values [N, C, H, W] -> float32 [N, C, *size] on the same device, each
    channel as a PIL float image ("F") resized with BICUBIC, then clipped to [0, 255]."""
    from PIL import Image

    a = u.detach().to("cpu", torch.float32).numpy()
    out = np.empty((*a.shape[:2], *size), dtype=np.float32)
    for i in range(a.shape[0]):
        for c in range(a.shape[1]):
            img = Image.fromarray(np.ascontiguousarray(a[i, c]))  # float32 2-D array -> mode "F"
            assert img.mode == "F", img.mode
            out[i, c] = np.asarray(img.resize((size[1], size[0]), resample=Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255)).to(u.device)


def protocol_from_filename(path: str | Path) -> str | None:
    """clean-fid's stats names carry the mode: `_clean_` -> "clean", `_legacy_tensorflow_` -> "edm"; else None."""
    name = Path(path).name.lower()
    if re.search(r"(^|_)clean(_|\.)", name):
        return "clean"
    if "legacy_tensorflow" in name:
        return "edm"
    if "legacy_pytorch" in name:
        raise ValueError(
            f"{path}: clean-fid 'legacy_pytorch' statistics use pytorch-fid's Inception weights, which no protocol "
            f"here reproduces; valid protocols: {list(PROTOCOLS)}"
        )
    return None
