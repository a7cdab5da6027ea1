"""Condition data of Algorithm 1 (Di-Bregman, Zhu et al.): the condition set D_c that c ~ D_c is drawn from
(line 4), and the captioned images (x_gt, c) ~ D_d of the discriminator's real side (line 21).
Local files only.

- `read_prompts(path)`: one prompt per line (.txt), a CSV/TSV with a `prompt`/`caption`/`text` column, JSON
  Lines with one of those keys (or plain JSON strings), or a .json list of strings/objects.
- `read_captioned_images(root)`: image + caption pairs, either `metadata.jsonl`/`metadata.csv` with
  `file_name` + `text` (diffusers' ImageFolder layout) or `NAME.png` beside `NAME.txt`.
- `load_image(path, height, width)`: RGB resized to cover (height, width), centre-cropped, in [-1, 1].
- `ConditionSet`: prompts drawn by index from a seeded generator, embedded on demand by the text encoder.
- `LabelSet`: class labels drawn uniformly; a label is its own embedding (class-conditional teachers).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .data import IMAGE_SUFFIXES

PROMPT_KEYS = ("prompt", "caption", "text")  # accepted column / key names, first match wins


def _pick(record: dict, source: str) -> str:
    keys = {k.lower(): k for k in record}
    for want in PROMPT_KEYS:
        if want in keys:
            return str(record[keys[want]])
    raise ValueError(f"{source}: no prompt field; expected one of {list(PROMPT_KEYS)}, got {sorted(record)}")


def _read_table(path: Path) -> list[str]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    return [_pick(row, f"{path} row {i + 2}") for i, row in enumerate(rows)]


def _read_json(path: Path) -> list[str]:
    if path.suffix.lower() == ".json":
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json prompts file must hold a list, got {type(items).__name__}")
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        items = [json.loads(line) for line in lines if line.strip()]
    return [it if isinstance(it, str) else _pick(it, f"{path} item {i}") for i, it in enumerate(items)]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a .txt (one per line), .csv/.tsv (column prompt/caption/text), .jsonl or .json file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        prompts = _read_table(path)
    elif suffix in (".jsonl", ".json"):
        prompts = _read_json(path)
    else:
        prompts = path.read_text(encoding="utf-8").splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def _metadata(root: Path) -> list[tuple[Path, str]] | None:
    """Pairs listed in `metadata.jsonl` / `metadata.csv` (diffusers ImageFolder), or None when absent."""
    if (root / "metadata.jsonl").is_file():
        lines = (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    elif (root / "metadata.csv").is_file():
        with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    else:
        return None
    pairs = []
    for i, rec in enumerate(records):
        if "file_name" not in rec:
            raise ValueError(f"{root}/metadata record {i} lacks 'file_name': {sorted(rec)}")
        pairs.append((root / rec["file_name"], _pick(rec, f"{root}/metadata record {i}").strip()))
    return pairs


def read_captioned_images(root: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a folder, sorted by path; every listed image must exist."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"captioned image folder not found: {root}")
    pairs = _metadata(root)
    if pairs is None:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise ValueError(f"{root}: {len(missing)} image(s) lack a caption file NAME.txt, e.g. {missing[:3]}")
        pairs = [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]
    absent = [str(p) for p, _ in pairs if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{root}: metadata lists missing image(s), e.g. {absent[:3]}")
    if not pairs:
        raise ValueError(f"{root}: no captioned images (NAME.png + NAME.txt, or metadata.jsonl)")
    return sorted(pairs)


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """RGB image resized (bicubic) to cover height x width, centre-cropped: float32 [3, H, W] in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(height / im.height, width / im.width)
        size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return x.permute(2, 0, 1).float() / 127.5 - 1


class ConditionSet:
    """A list of prompts; `draw` takes indices from a seeded generator, `embed` encodes the chosen ones."""

    def __init__(self, prompts: list[str], encode: Callable[[list[str]], torch.Tensor]):
        if not prompts:
            raise ValueError("a condition set needs at least one prompt")
        self.prompts = list(prompts)
        self.encode = encode  # list of prompts -> text embeddings [N, L, D]

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, generator: torch.Generator, n: int) -> torch.Tensor:
        """n indices c ~ U(D_c), int64 [n] on the CPU."""
        return torch.randint(len(self.prompts), (n,), generator=generator)

    def embed(self, index: torch.Tensor, device) -> torch.Tensor:
        """Text embeddings [len(index), L, D] of the indexed prompts, on `device`."""
        return self.encode([self.prompts[i] for i in index.tolist()]).to(device)


class LabelSet:
    """The classes 0..K-1 of a class-conditional teacher: `draw` takes labels uniformly from a seeded generator,
    `embed` hands them to the networks as they are (labels [N] int64 are the condition)."""

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"a label set needs at least one class, got {num_classes}")
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return self.num_classes

    def draw(self, generator: torch.Generator, n: int) -> torch.Tensor:
        """n labels c ~ U{0, ..., K-1}, int64 [n] on the CPU."""
        return torch.randint(self.num_classes, (n,), generator=generator)

    def embed(self, index: torch.Tensor, device) -> torch.Tensor:
        """The labels themselves, int64 [N] on `device`."""
        return index.to(device)
