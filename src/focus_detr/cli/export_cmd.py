"""`focus-detr export` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("export", help="(not implemented yet)")


def run(args: argparse.Namespace) -> int:
    from .main import CLIError

    raise CLIError("focus-detr export is not implemented yet")
