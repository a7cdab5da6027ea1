"""The package's seams: what importing it does, what the CLI accepts, which module imports which."""

import pytest

from dibregman.cli import build_parser


def test_cli_refuses_the_test_only_random_features():
    parser = build_parser()
    assert parser.parse_args(["eval", "--samples", "s.npz", "--features", "mnist"]).features == "mnist"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--samples", "s.npz", "--features", "random"])
