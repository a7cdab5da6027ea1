"""Command-line interface: thin wrappers that turn flags into configs and call the library.

    dibregman train-teacher | distill | sample | eval | bench | divergences | import-edm | demo
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields


def _parse_value(text: str):
    """`--set key=value`: JSON values where they parse (numbers, true/false, lists), plain strings otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def cmd_train_teacher(args) -> None:
    from .train_teacher import TeacherConfig, train_teacher

    kwargs = {"data": args.data} if args.data else {}
    kwargs.update(_overrides(args.set))
    valid = {f.name for f in fields(TeacherConfig)}
    bad = sorted(set(kwargs) - valid)
    if bad:
        raise ValueError(f"unknown teacher option(s) {bad}; valid: {sorted(valid)}")
    out = train_teacher(TeacherConfig(**kwargs), args.run_dir)
    print(f"teacher EMA weights: {out}")


COMMANDS = {"train-teacher": cmd_train_teacher}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dibregman", description="Di-Bregman one-step diffusion distillation")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-teacher", help="train a native EDM U-Net teacher on a local dataset")
    t.add_argument("--data", default="", help="dataset spec KIND:PATH, e.g. mnist:data/mnist")
    t.add_argument("--run-dir", default="runs/teacher", help="run folder (auto-resumes from its newest checkpoint)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TeacherConfig field")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dibregman {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
