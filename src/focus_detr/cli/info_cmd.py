"""`focus-detr info` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("info", help="(not implemented yet)")


def run(args: argparse.Namespace) -> int:
    from .main import CLIError

    raise CLIError("focus-detr info is not implemented yet")
