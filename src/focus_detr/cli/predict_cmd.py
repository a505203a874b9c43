"""`focus-detr predict` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("predict", help="(not implemented yet)")


def run(args: argparse.Namespace) -> int:
    from .main import CLIError

    raise CLIError("focus-detr predict is not implemented yet")
