"""Local data loaders: round trips through every format, and clear errors that name the offending file."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from dibregman.data import (
    LOADERS,
    load_cifar10,
    load_dataset,
    load_idx,
    load_image_folder,
    load_npz,
    read_idx,
)

Image = pytest.importorskip("PIL.Image")


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)


def _images(n=5, h=6, w=7, c=None, seed=0) -> np.ndarray:
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_idx_roundtrip_plain_and_gzip(tmp_path):
    imgs, labels = _images(), np.arange(5, dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs[:2])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:2])
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte"), imgs)
    x, y = load_dataset(f"mnist:{tmp_path}")
    assert x.shape == (5, 1, 6, 7) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(imgs).float() / 127.5 - 1)
    x_test, _ = load_idx(tmp_path, "test")
    assert x_test.shape == (2, 1, 6, 7)


def test_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="bad-idx"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    _write_idx(short, _images())
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match="short-idx"):
        read_idx(short)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx(tmp_path)


def test_npz_uint8_channels_last_float_and_split_folder(tmp_path):
    imgs, labels = _images(c=3), np.array([3, 1, 4, 1, 5])
    np.savez(tmp_path / "train.npz", images=imgs, labels=labels)
    x, y = load_dataset(f"npz:{tmp_path}")  # a folder: <split>.npz
    assert x.shape == (5, 3, 6, 7) and y.tolist() == labels.tolist()
    torch.testing.assert_close(x, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)
    floats = np.linspace(-1, 1, 4 * 2 * 5 * 5, dtype=np.float32).reshape(4, 2, 5, 5)
    np.savez(tmp_path / "f.npz", x=floats)
    x, y = load_npz(tmp_path / "f.npz", "test")
    assert y is None and torch.equal(x, torch.from_numpy(floats))
    np.savez(tmp_path / "anon.npz", imgs[..., 0])  # no known key: the first array
    assert load_npz(tmp_path / "anon.npz")[0].shape == (5, 1, 6, 7)


def test_npz_errors_name_the_file(tmp_path):
    np.savez(tmp_path / "range.npz", images=np.full((2, 4, 4), 3.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"range\.npz.*\[-1, 1\]"):
        load_npz(tmp_path / "range.npz")
    np.savez(tmp_path / "lab.npz", images=_images(), labels=np.arange(4))
    with pytest.raises(ValueError, match=r"lab\.npz"):
        load_npz(tmp_path / "lab.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape\.npz"):
        load_npz(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        load_npz(tmp_path / "missing.npz")


def test_image_folder_with_classes_and_colour(tmp_path):
    imgs = _images(n=4, h=5, w=5)
    for i, cls in enumerate(["cat", "cat", "dog", "emu"]):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(imgs[i]).save(tmp_path / cls / f"{i}.png")
    x, y = load_dataset(f"folder:{tmp_path}")
    assert x.shape == (4, 1, 5, 5) and y.tolist() == [0, 0, 1, 2]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(imgs).float() / 127.5 - 1)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(_images(n=1, h=5, w=5, c=3)[0]).save(rgb / "a.png")
    Image.fromarray(imgs[0]).save(rgb / "b.png")
    (rgb / ".DS_Store").write_bytes(b"\0")  # hidden files are skipped
    x, y = load_image_folder(rgb)
    assert x.shape == (2, 3, 5, 5) and y is None
    torch.testing.assert_close(x[1], x[1, :1].expand(3, 5, 5))  # grey promoted to RGB


def test_image_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path)
    Image.fromarray(_images(n=1, h=5, w=5)[0]).save(tmp_path / "a.png")
    Image.fromarray(_images(n=1, h=6, w=5)[0]).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"b\.png.*size"):
        load_image_folder(tmp_path)
    (tmp_path / "b.png").unlink()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        load_image_folder(tmp_path)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_image_folder(tmp_path)


def _write_cifar(path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    data = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(i) % 10 for i in range(seed, seed + n)]
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"data": data, b"labels": labels, b"filenames": [b"x"] * n}, f)
    return data, labels


def test_cifar_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    d1, l1 = _write_cifar(root / "data_batch_1", 3, 0)
    d2, l2 = _write_cifar(root / "data_batch_2", 2, 5)
    dt, lt = _write_cifar(root / "test_batch", 4, 7)
    x, y = load_dataset(f"cifar10:{tmp_path}")  # the parent folder works too
    assert x.shape == (5, 3, 32, 32) and y.tolist() == l1 + l2
    torch.testing.assert_close(x[3], torch.from_numpy(d2[0].reshape(3, 32, 32)).float() / 127.5 - 1)
    x, y = load_cifar10(root, "test")
    assert x.shape == (4, 3, 32, 32) and y.tolist() == lt


def test_cifar_errors_and_refuses_code(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": print}))  # a pickle that references code
    with pytest.raises(ValueError, match="data_batch_1"):
        load_cifar10(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_1.*3072"):
        load_cifar10(tmp_path)


def test_digits_and_unknown_kind():
    x, y = load_dataset("digits:")
    assert x.shape == (1797, 1, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.max() == 9
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("imagenet:/data")
    assert {"mnist", "idx", "digits", "folder", "npz", "cifar10"} <= set(LOADERS)
