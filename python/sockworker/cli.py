"""The ``sockworker`` command: ``sockworker serve MODULE:APP [--host] [--port] ...``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from . import _loop
from .app import App, metrics_networks
from .errors import ServerStartError
from .logs import configure

__all__ = ["check_app", "load_app", "main"]


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


def check_app(target: str) -> int:
    """Whether ``target`` loads as ``serve`` would load it: 0, or 1 with why on stderr (the
    traceback, without the frames of the import machinery). ``--reload`` runs it in a process
    of its own before it replaces the server."""
    try:
        load_app(target)
    except SystemExit as exit_:
        if exit_.code in (None, 0):
            return 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException as error:  # (whatever the import raised is the answer)
        machinery = (os.path.dirname(importlib.__file__), __file__)
        report = traceback.TracebackException.from_exception(error)
        frames = [
            frame
            for frame in report.stack
            if not frame.filename.startswith(("<frozen ", "<string>", *machinery))
        ]
        report.stack = traceback.StackSummary.from_list(frames)
        print("".join(report.format()), end="", file=sys.stderr)
        return 1
    return 0


#: Every flag of ``serve`` takes its default from ``SOCKWORKER_<FLAG>`` (``--io-threads``:
#: ``SOCKWORKER_IO_THREADS``; the app: ``SOCKWORKER_APP``); the command line wins, and an empty
#: variable counts as unset.
ENV_PREFIX = "SOCKWORKER_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: Repeatable options whose variable separates its values with commas (the others: os.pathsep).
_COMMA_LISTS = {"metrics_allow"}


class _Repeatable(argparse._AppendAction):
    """``action="append"``, except that the command line replaces a default (one from a
    ``SOCKWORKER_*`` variable) instead of adding to it: the command line wins."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


def env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Sets the defaults of ``parser``'s options from ``SOCKWORKER_*`` variables; a value the
    option would refuse on the command line is a usage error naming the variable."""
    for action in parser._actions:
        if action.dest in ("help", argparse.SUPPRESS):
            continue
        name = ENV_PREFIX + action.dest.upper()
        if name not in environ:
            continue
        raw = environ[name].strip()
        if not raw:  # set but empty: as if unset
            continue
        value: Any
        if isinstance(action, argparse._StoreTrueAction):
            if raw.lower() not in _TRUE | _FALSE:
                parser.error(f"{name}={raw!r}: expected one of 1, 0, true, false, yes, no")
            value = raw.lower() in _TRUE
        elif isinstance(action, argparse._AppendAction):
            # (Directories are separated as in PATH; networks by commas.)
            separator = "," if action.dest in _COMMA_LISTS else os.pathsep
            value = [part.strip() for part in raw.split(separator) if part.strip()]
        else:
            try:
                value = action.type(raw) if callable(action.type) else raw
            except ValueError:
                parser.error(f"{name}={raw!r}: not a valid value for {action.option_strings[0]}")
            if action.choices is not None and value not in action.choices:
                choices = ", ".join(map(str, action.choices))
                parser.error(f"{name}={raw!r}: expected one of {choices}")
        if not action.option_strings:  # the positional MODULE:APP
            action.nargs = "?"
        action.default = value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sockworker", description="Serve a sockworker app.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve MODULE:APP")
    serve.add_argument("app", metavar="MODULE:APP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8787, help="0 picks a free port (it is logged)")
    serve.add_argument(
        "--io-threads",
        type=int,
        default=None,
        metavar="N",
        help="threads doing socket I/O beside the application's; 0: the application thread does "
        "it too (default: $SOCKWORKER_IO_THREADS, else 0 with one core to ourselves, else 1)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe record shown, the core's included (filtered in the core)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text: 'LEVEL logger: message'; json: one JSON object per line",
    )
    serve.add_argument("--certfile", help="PEM certificate chain: serve https:// and wss://")
    serve.add_argument("--keyfile", help="PEM private key of --certfile")
    serve.add_argument(
        "--data-dir",
        help="where Durable Object storage lives (default: App(data_dir=) or ./.sockworker/data)",
    )
    serve.add_argument(
        "--durability",
        choices=["full", "normal"],
        help="full: a commit is on disk before what depends on it is sent (the default); "
        "normal: in the OS cache (survives a crash of the server, not of the machine)",
    )
    serve.add_argument(
        "--cluster",
        metavar="DSN",
        help="cluster mode: the postgresql:// database the nodes share (leases, KV, alarms)",
    )
    serve.add_argument(
        "--node-id",
        help="cluster mode: this node's name, the same across restarts (default: --advertise)",
    )
    serve.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="cluster mode: where other nodes reach this one (default: the listening address)",
    )
    serve.add_argument(
        "--cluster-secret",
        metavar="SECRET",
        help="cluster mode: what nodes prove to each other on their links (default: from DSN)",
    )
    serve.add_argument(
        "--lease",
        type=float,
        metavar="SECONDS",
        help="cluster mode: how long a lease lasts unrenewed, the failover time (default 10)",
    )
    serve.add_argument(
        "--lease-renew",
        type=float,
        metavar="SECONDS",
        help="cluster mode: seconds between lease renewals (default 3)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="cluster mode: N nodes on this port, each its own process (SO_REUSEPORT)",
    )
    # (Set by --workers for each worker: share the port, and listen for the other nodes on a
    # port of its own.)
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--link-port", type=int, help=argparse.SUPPRESS)
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
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics (Prometheus) on this port, from the core: a scrape never waits for "
        "a busy handler (0 picks a free port; default: off, or App(metrics_port=))",
    )
    serve.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="where --metrics-port listens (default 127.0.0.1: this machine only)",
    )
    serve.add_argument(
        "--metrics-allow",
        action=_Repeatable,
        metavar="CIDR",
        help="a client network that may use the metrics listener, e.g. 10.0.0.0/8 (repeatable; "
        "$SOCKWORKER_METRICS_ALLOW: comma-separated); others get 403 (default: "
        "App(metrics_allow=), else loopback only: 127.0.0.0/8 and ::1; 0.0.0.0/0 lets every "
        "IPv4 client in)",
    )
    serve.add_argument(
        "--metrics-accounts",
        type=int,
        metavar="N",
        help="accounts with metrics labels of their own, the busiest; the rest are "
        'account="_other" (default 20)',
    )
    serve.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the live dashboard at /_sockworker on the metrics listener (needs "
        "--metrics-port)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per HTTP request and per closed WebSocket (logger sockworker.access)",
    )
    serve.add_argument(
        "--reload",
        action="store_true",
        help="restart when a .py file changes (sockets are closed with 1012; storage is kept)",
    )
    serve.add_argument(
        "--reload-dir",
        action=_Repeatable,
        metavar="DIR",
        help="where --reload watches (repeatable; default: the current directory)",
    )
    env_defaults(serve, os.environ)
    args = parser.parse_args(argv)
    configure(args.log_level, args.log_format)
    if args.app is None:
        parser.error("serve: MODULE:APP is required (or SOCKWORKER_APP)")
    if args.workers < 1:
        parser.error("--workers is 1 or more")
    if args.workers > 1:
        if not args.cluster:
            parser.error("--workers N needs --cluster DSN: the workers are nodes of one cluster")
        if args.reload:
            parser.error("--workers and --reload do not go together")
        return _workers(args, argv)
    if args.reload:
        return _reload(args, argv)
    app = load_app(args.app)
    if args.no_metering:
        app.metering = False
    if args.data_dir:
        app.data_dir = args.data_dir
    if args.durability:
        app.durability = args.durability
    try:
        _metrics_flags(app, args)
    except ValueError as error:
        parser.error(str(error))
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    try:
        _cluster_flags(app, args)
    except ValueError as error:
        parser.error(str(error))
    try:
        io_threads = _loop.io_threads(args.io_threads)
    except ValueError as error:
        parser.error(str(error))
    try:
        app.run(
            args.host,
            args.port,
            io_threads=io_threads,
            certfile=args.certfile,
            keyfile=args.keyfile,
            shutdown_timeout=args.shutdown_timeout,
            reuse_port=args.reuse_port,
            link_port=args.link_port,
        )
    except ServerStartError as error:
        print(f"sockworker: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


def _metrics_flags(app: App, args: argparse.Namespace) -> None:
    """``--metrics-port`` and its companions, ``--dashboard`` and ``--access-log`` over the
    App's own settings."""
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            raise ValueError(f"--metrics-port is 0 to 65535, not {args.metrics_port}")
        app.metrics_port = args.metrics_port
    if args.metrics_host:
        app.metrics_host = args.metrics_host
    if args.metrics_allow:
        name = "--metrics-allow"
        if os.environ.get("SOCKWORKER_METRICS_ALLOW", "").strip():
            name += " (or SOCKWORKER_METRICS_ALLOW)"
        app.metrics_allow = metrics_networks(args.metrics_allow, name)
    if args.metrics_accounts is not None:
        if args.metrics_accounts < 1:
            raise ValueError("--metrics-accounts is 1 or more")
        app.metrics_accounts = args.metrics_accounts
    if args.dashboard:
        app.dashboard = True
    if args.access_log:
        app.access_log = True
    if app.dashboard and app.metrics_port is None:
        raise ValueError("--dashboard needs --metrics-port: the dashboard is served there")


def _cluster_flags(app: App, args: argparse.Namespace) -> None:
    """``--cluster`` and its companions over ``App(cluster=...)``."""
    from dataclasses import replace

    from .cluster import Cluster

    flags = {
        "node_id": args.node_id,
        "advertise": args.advertise,
        "lease": args.lease,
        "renew": args.lease_renew,
        "secret": args.cluster_secret,
    }
    given = {name: value for name, value in flags.items() if value is not None}
    if args.cluster:
        base = app.cluster if app.cluster is not None else Cluster(args.cluster)
        app.cluster = replace(base, dsn=args.cluster, **given)
    elif given:
        if app.cluster is None:
            raise ValueError(
                "--node-id, --advertise, --cluster-secret, --lease and --lease-renew need --cluster"
            )
        app.cluster = replace(app.cluster, **given)


def _workers(args: argparse.Namespace, argv: list[str]) -> int:
    """``--workers N``: N nodes of the cluster on one port (see ``sockworker.workers``)."""
    import socket

    from ._runtime import DEFAULT_DATA_DIR
    from .reload import child_argv, free_port
    from .workers import Workers

    port = args.port or free_port(args.host)
    base = args.node_id or f"{socket.gethostname()}:{port}"
    # Each worker has a data directory of its own (its lock, its local files; the objects'
    # storage is in PostgreSQL).
    data_dir = args.data_dir or load_app(args.app).data_dir or DEFAULT_DATA_DIR
    host = args.advertise.rsplit(":", 1)[0] if args.advertise else args.host
    # One metrics listener per worker: worker i listens on the port plus i (0: each picks one).
    metrics_port = args.metrics_port
    if metrics_port is None:
        metrics_port = load_app(args.app).metrics_port
    if host in ("0.0.0.0", "::", ""):
        raise SystemExit("sockworker: --workers on a wildcard address needs --advertise HOST")
    argvs = []
    for index in range(args.workers):
        extra = ["--port", str(port), "--reuse-port", "--link-port", "0"]
        node = f"{base}-w{index}"
        extra += ["--node-id", node, "--advertise", f"{host}:0"]
        extra += ["--data-dir", os.path.join(data_dir, node.replace(":", "_"))]
        if args.io_threads is None:
            # (A core per worker: each one does its own socket I/O.)
            extra += ["--io-threads", "0"]
        if metrics_port is not None:
            extra += ["--metrics-port", str(metrics_port + index if metrics_port else 0)]
        dropped = (
            "--workers",
            "--port",
            "--node-id",
            "--advertise",
            "--data-dir",
            "--metrics-port",
        )
        child = child_argv(argv, (), dropped, extra)
        if "serve" in child and args.app not in child:  # the app came from SOCKWORKER_APP
            child.insert(child.index("serve") + 1, args.app)
        argvs.append(child)
    return Workers(argvs, args.shutdown_timeout).run()


def _reload(args: argparse.Namespace, argv: list[str]) -> int:
    """``--reload``: supervise a child ``serve`` (see ``sockworker.reload``)."""
    from .reload import Reloader, free_port, reload_argv

    port = args.port or free_port(args.host)
    child = reload_argv(argv, port)
    if "serve" in child and args.app not in child:  # the app came from SOCKWORKER_APP
        child.insert(child.index("serve") + 1, args.app)
    dirs = args.reload_dir or [os.getcwd()]
    return Reloader(child, dirs, args.shutdown_timeout, args.app).run()
