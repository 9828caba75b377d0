"""Argument groups shared by several subcommands (no torch import: --help stays fast)."""

from __future__ import annotations

import argparse


class UserError(Exception):
    """A mistake in what the user asked for: reported as `error: ...`, exit status 2."""


def add_device_dtype(group: argparse._ArgumentGroup) -> None:
    """--device and --dtype, with the same meaning as LLM(device=..., dtype=...)."""
    group.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run; auto picks cuda when a GPU is visible (default: auto)",
    )
    group.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="weight and activation dtype; auto is bfloat16 on cuda, float32 on cpu "
        "(default: auto)",
    )
