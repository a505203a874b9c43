"""`focus-detr app`: a local web page to try a model in the browser (detections, keep ratio, focus maps)."""

from __future__ import annotations

import argparse
import errno
import sys

from .options import add_runtime_options
from .predict_cmd import add_model_options

EXAMPLES = """\
examples:
  focus-detr app runs/demo/model_final.pth                 # then open http://127.0.0.1:7860
  focus-detr app focus_detr_r50_4scale_36ep --port 8080    # a pretrained name (downloaded once)
  focus-detr app --preset tiny --random-init               # no weights: random ones, to see the page
  focus-detr app                                           # says how to get weights (offers runs/demo)
  focus-detr app weights.pt --host 0.0.0.0                 # reachable from other machines (no password!)

Needs the optional app extra: pip install 'focus-detr[app]' (Gradio). Requests are served one at a time;
uploads are limited to 20 MB and 40 M pixels.
"""


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {value}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "app", help="a local web page to try a model: detections, keep ratio, focus maps",
        description="Serve a web page on this machine: upload, paste or fetch a picture (or pick an example), see "
                    "the detections (score-threshold slider, table, COCO json download), change the encoder keep "
                    "ratio and see the tokens kept and the time, and look at the focus maps.",
        usage="focus-detr app [options] [WEIGHTS | --preset P --random-init]",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", nargs="?", metavar="WEIGHTS",
                   help="pretrained name, weights file, training checkpoint, official .pth/.zip or Hugging Face "
                        "folder (none: the page says how to get weights, and offers runs/demo/model_final.pth)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 = every interface, "
                        "reachable from the network, without a password)")
    p.add_argument("--port", type=port_number, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="with a --host other machines can reach: let the URL box fetch loopback, private and "
                        "link-local addresses too (refused by default, so visitors cannot read this machine's "
                        "networks)")
    add_model_options(p)
    add_runtime_options(p, quiet_help="do not print the model line and the server's messages")
    return p


def is_loopback(host: str) -> bool:
    from ..data.url_io import is_loopback_host

    return is_loopback_host(host)


def check_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, not an address of this machine), or None. Checked
    before the model is loaded, so a busy port fails in a second."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"unknown address ({e.strerror or e})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the server binds (SO_REUSEADDR): a port left in TIME_WAIT by an app just stopped is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            reason = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            return f"{reason} (choose another with --port)" if e.errno == errno.EADDRINUSE else reason
    return None


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from .errors import CLIError
    from .predict_cmd import model_from_args

    if importlib.util.find_spec("gradio") is None:  # found without importing it (seconds)
        raise CLIError("focus-detr app needs the optional app extra: pip install 'focus-detr[app]'")
    problem = check_listen(args.host, args.port)
    if problem:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {problem}")
    from ..app import DEMO_WEIGHTS, serve

    if args.random_init and args.weights is not None:
        raise CLIError("give either WEIGHTS or --random-init, not both")
    if args.random_init and args.preset is None:
        raise CLIError("--random-init needs --preset (e.g. --preset tiny)")
    model = description = None
    if args.weights is not None or args.random_init:
        model, description = model_from_args(args, args.weights)
        if not args.quiet:
            print(f"model: {description} on {model.device}", file=sys.stderr)
    else:
        from .options import apply_threads, check_device

        check_device(args)
        apply_threads(args)
        offer = f"; the page offers {DEMO_WEIGHTS}" if DEMO_WEIGHTS.is_file() else ""
        print(f"no weights given: the page says how to get some{offer}", file=sys.stderr)
    if not is_loopback(args.host):
        urls = ("its URL box fetches any address, private networks included (--allow-private-urls)"
                if args.allow_private_urls else "its URL box fetches public addresses only")
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the app (it has no "
              f"password; {urls})", file=sys.stderr)
    try:
        serve(model, args.host, args.port, device=args.device, quiet=args.quiet, description=description,
              allow_private_urls=args.allow_private_urls)
    except OSError as e:  # taken between the check and the start
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {str(e).split('. ')[0]}") from None
    return 0
