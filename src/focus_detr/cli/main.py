"""``focus-detr`` console script: one sub-command per module in this package.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``
(the exit code). Errors that are the user's to fix are raised as :class:`~focus_detr.cli.errors.CLIError`
(message, exit code 2) or the library's own error types (cli/errors.py lists them) and printed in one line
without a traceback; ``--debug`` shows the traceback. Any other exception is a bug: its traceback and a line
asking to report it are printed (exit code 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..allocator import reuse_freed_memory
from ..devices import DeviceError
from .errors import CLIError, is_user_error, report_bug

# Order = order in --help.
COMMANDS = ["demo", "make_data", "train", "eval", "predict", "explain", "convert", "info", "models", "export",
            "benchmark", "compare_modes", "app"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="focus-detr",
        description="Focus-DETR (ICCV 2023) in pure PyTorch: train, evaluate, predict, explain, convert, export.",
        epilog="Run `focus-detr COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"focus-detr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"focus_detr.cli.{name}_cmd")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        # Large tensors reuse the pages of the last forward instead of fresh ones (focus_detr/allocator.py).
        reuse_freed_memory()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CLIError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except DeviceError as e:  # a device this machine lacks: a usage error, like a malformed --device
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - every exception ends here: one line, or a traceback for a bug
        if args.debug:
            raise
        if not is_user_error(e):
            report_bug(e)
            return 1
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover  (python -m focus_detr.cli.main, as under torchrun)
    sys.exit(main())
