"""The ``sockworker`` command: ``sockworker serve MODULE:APP [--host] [--port] ...``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .app import App

__all__ = ["load_app", "main"]


def load_app(target: str) -> App:
    """Imports ``module:attribute`` (from the current directory too) and checks it is an App."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"sockworker: expected MODULE:APP, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise SystemExit(
            f"sockworker: module {module_name!r} has no attribute {attribute!r}"
        ) from None
    if not isinstance(app, App):
        raise SystemExit(f"sockworker: {target} is a {type(app).__name__}, not a sockworker.App")
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sockworker", description="Serve a sockworker app.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve MODULE:APP")
    serve.add_argument("app", metavar="MODULE:APP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8787, help="0 picks a free port (it is logged)")
    serve.add_argument("--io-threads", type=int, default=1, help="tokio threads doing socket I/O")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--certfile", help="PEM certificate chain: serve https:// and wss://")
    serve.add_argument("--keyfile", help="PEM private key of --certfile")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, wait this long at most for sockets to close (default 10)",
    )
    serve.add_argument(
        "--no-metering",
        action="store_true",
        help="turn CPU accounting, CPU limits and the meter off (as App(metering=False))",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = load_app(args.app)
    if args.no_metering:
        app.metering = False
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    app.run(
        args.host,
        args.port,
        io_threads=args.io_threads,
        certfile=args.certfile,
        keyfile=args.keyfile,
        shutdown_timeout=args.shutdown_timeout,
    )
    return 0
