"""Reading configs: `--list-keys` (every key of a config dataclass with its type, the preset's value and its help,
the field metadata of `config.opt`) and the comparison of a saved config with a new one (`config_diff`, the keys a
resume may change)."""

from __future__ import annotations

import math
import typing
from dataclasses import fields, is_dataclass
from typing import Literal, get_args, get_origin


def _type_name(hint) -> str:
    if get_origin(hint) is Literal:
        return "|".join(get_args(hint))
    args = get_args(hint)
    return " | ".join("None" if a is type(None) else a.__name__ for a in args) if args else hint.__name__


def _key_rows(obj, prefix: str = "") -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(type(obj))
    rows = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            rows += _key_rows(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, _type_name(hints[f.name]), repr(value), f.metadata.get("help", "")))
    return rows


def describe_keys(cfg) -> str:
    """Every key of a config dataclass (`DistillConfig`: section.key; `TeacherConfig`: key) with its type, value
    (the preset's default) and help: `dibregman distill --list-keys`, `dibregman train-teacher --list-keys`."""
    rows = _key_rows(cfg)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]]) for r in rows)


# Keys that may change between a checkpoint and its resumption (length and reporting only; the length not
# under a cosine lr schedule, which depends on it).
RESUMABLE_CHANGES = {
    "run.total_kimg",
    "run.log_every_kimg",
    "run.ckpt_every_kimg",
    "run.sample_every_kimg",
    "run.keep_ckpts",
    "run.keep_ema_every_kimg",
    "run.threads",
    "run.device",
    "run.parallel",
    "run.cpu_offload",
    "run.compile",
    "model.grad_checkpointing",
    "run.tensorboard",
    "run.max_bad_steps",
}


def config_diff(a: dict, b: dict, prefix: str = "") -> set:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = set(a) | set(b)
    out = set()
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, float | int) and isinstance(vb, float | int) and math.isclose(va, vb)):
            out.add(f"{prefix}{k}")
    return out


__all__ = ["RESUMABLE_CHANGES", "config_diff", "describe_keys"]
