"""`focus-detr demo` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("demo", help="(not implemented yet)")


def run(args: argparse.Namespace) -> int:
    from .main import CLIError

    raise CLIError("focus-detr demo is not implemented yet")
