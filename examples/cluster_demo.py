"""``make cluster-demo``: a throwaway PostgreSQL and three nodes serving ``examples.cluster_chat``
on 127.0.0.1:8787, :8788 and :8789. Open http://127.0.0.1:8787/room/lobby in one tab and
http://127.0.0.1:8788/room/lobby in another: two nodes, one room. Ctrl-C stops everything (the
database is made in a temporary folder and removed).

    python -m examples.cluster_demo [--port 8787] [--nodes 3]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile

from sockworker.workers import die_with_parent

from tests.postgres import Postgres


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.cluster_demo")
    parser.add_argument("--port", type=int, default=8787, help="the first node's port")
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    with Postgres() as database, tempfile.TemporaryDirectory(prefix="sw-cluster-demo-") as data:
        dsn = database.dsn()
        print(f"PostgreSQL: {dsn}", flush=True)
        nodes = []
        for index in range(args.nodes):
            port = args.port + index
            argv = [sys.executable, "-m", "sockworker", "serve", "examples.cluster_chat:app"]
            argv += ["--port", str(port), "--cluster", dsn, "--node-id", f"node{index + 1}"]
            argv += ["--data-dir", f"{data}/node{index + 1}"]
            # (Should this script be killed, the nodes go too.)
            nodes.append(subprocess.Popen(argv, preexec_fn=die_with_parent))
            print(f"node{index + 1}: http://127.0.0.1:{port}/room/lobby", flush=True)
        print("Ctrl-C stops the nodes and the database.", flush=True)
        try:
            signal.sigwait(stop)
        finally:
            for node in nodes:
                node.send_signal(signal.SIGTERM)
            for node in nodes:
                node.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
