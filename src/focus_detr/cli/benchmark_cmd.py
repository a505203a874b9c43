"""`focus-detr benchmark` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("benchmark", help="(not implemented yet)")


def run(args: argparse.Namespace) -> int:
    from .main import CLIError

    raise CLIError("focus-detr benchmark is not implemented yet")
