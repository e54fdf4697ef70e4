#!/usr/bin/env python3
"""Storage benchmark (SPEC §6): Durable Object storage through the whole stack, against the same
work in a plain Python `sqlite3` loop with the same durability, in one run.

- **KV per event.** Each WebSocket message to an object puts its payload and gets it back
  (bench/apps/storage_bench.py); the load generator's messages/s are events/s. The peer is a
  Python loop doing, per event, an INSERT OR REPLACE, a SELECT and a COMMIT on one SQLite file in
  WAL mode with the same `synchronous` (FULL for durability "full", NORMAL for "normal"). The
  ratio is sockworker's events/s divided by the loop's, in the same round.
- **Commits.** From the server's /metrics before and after each window: commit points, COMMITs
  and fsyncs per second, and events per fsync (group commit: a batch of events costs one commit
  per object written, and one fsync per log per committer round).
- **Memory.** RSS per connection of 2,000 sockets whose objects wrote once and hibernated,
  against the same without storage (the difference is what storage leaves behind per hibernated
  object), and of 500 resident objects with an open database against the same without.

The server and the sqlite3 loop run under `taskset -c 0`, the load generator under
`taskset -c 1`; rounds are interleaved and the median is reported. Results:
bench/results/storage.md and storage.json.

    python bench/storage.py              # 3 rounds, about 4 minutes
    python bench/storage.py --rounds 1 --duration 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # the runner's helpers
    HOST,
    LOADGEN_CPU,
    RESULTS,
    ROOT,
    SERVER_CPU,
    build_loadgen,
    free_port,
    machine,
    pin,
    raise_nofile,
    run_loadgen,
    stop,
    wait_for_port,
)

APP = "bench.apps.storage_bench:app"
SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        name: float(value)
        for name, value in (
            line.split() for line in text.splitlines() if line.startswith("sockworker_")
        )
    }


def serve(
    durability: str, data_dir: Path, log: Any, pinned: bool
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "sockworker", "serve", APP, "--host", HOST, "--port", str(port),
        "--data-dir", str(data_dir), "--durability", durability, "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(
        pin(SERVER_CPU, cmd, pinned),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    problem = wait_for_port(port, proc, timeout=60)
    if problem:
        stop(proc)
        raise RuntimeError(problem)
    return proc, port


def loadgen(
    binary: Path, scenario: str, port: int, path: str, pid: int, args: list[str], duration: float,
    pinned: bool, warmup: float = 0.5,
) -> dict[str, Any]:  # fmt: skip
    cmd = [
        str(binary), scenario, "--url", f"ws://{HOST}:{port}{path}", "--server-pid", str(pid),
        "--duration", str(duration), "--warmup", str(warmup), *args,
    ]  # fmt: skip
    return run_loadgen(pin(LOADGEN_CPU, cmd, pinned), timeout=duration + warmup + 300)


def sqlite_loop(durability: str, duration: float, pinned: bool) -> float:
    """Events per second of the plain loop, run in a child pinned like the server."""
    code = f"""
import os, sqlite3, sys, tempfile, time
path = os.path.join(tempfile.mkdtemp(prefix="sw-bench-sqlite-"), "loop.sqlite")
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous={SYNCHRONOUS[durability]}")
db.execute("CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
payload = os.urandom(64)
n, end = 0, time.perf_counter() + {duration}
start = time.perf_counter()
while time.perf_counter() < end:
    key = b"k%d" % (n % 256)
    db.execute("BEGIN")
    db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, payload))
    db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    db.execute("COMMIT")
    n += 1
print(n / (time.perf_counter() - start))
"""
    out = subprocess.run(
        pin(SERVER_CPU, [sys.executable, "-c", code], pinned),
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    )
    return float(out.stdout.strip())


CASES = [
    # (name, loadgen scenario, path, args, warm-up seconds: the first message of a new object
    # opens and creates its database)
    ("pingpong, 1 object, 1 connection", "pingpong", "/one", ["-c", "1", "-s", "64"], 0.5),
    ("pipeline, 1 object, window 16", "pipeline", "/one", ["-c", "1", "-s", "64", "-w", "16"], 0.5),
    ("pingpong, 100 objects", "pingpong", "/many", ["-c", "100", "-s", "64"], 1.0),
    ("pingpong, 1,000 objects", "pingpong", "/many", ["-c", "1000", "-s", "64"], 3.0),
]
MEMORY = [
    # (name, with storage, without, connections)
    ("hibernated object", "/hib", "/hib-bare", 2000),
    ("resident object", "/res", "/res-bare", 500),
]
COUNTERS = {
    "commit_points": "sockworker_storage_commit_points_total",
    "commits": "sockworker_storage_commits_total",
    "fsyncs": "sockworker_storage_fsyncs_total",
}


def run_case(
    binary: Path, durability: str, case: tuple[str, str, str, list[str], float], duration: float,
    pinned: bool, log: Any,
) -> dict[str, Any]:  # fmt: skip
    _, scenario, path, args, warmup = case
    with tempfile.TemporaryDirectory(prefix="sw-bench-data-") as data:
        proc, port = serve(durability, Path(data), log, pinned)
        try:
            before = metrics(port)
            started = time.perf_counter()
            result = loadgen(binary, scenario, port, path, proc.pid, args, duration, pinned, warmup)
            elapsed = time.perf_counter() - started
            after = metrics(port)
        finally:
            stop(proc)
    figures = {
        "msgs_per_s": result["msgs_per_s"],
        "server_cpu_us_per_msg": result.get("server_cpu_us_per_msg"),
        "p50_ms": (result.get("p50_us") or 0) / 1000 or None,
    }
    # The counters cover the warm-up and the connections' opening too: rates over that span.
    for key, metric in COUNTERS.items():
        figures[f"{key}_per_s"] = (after.get(metric, 0) - before.get(metric, 0)) / elapsed
    events = result["msgs_per_s"] * duration
    fsyncs = (after.get(COUNTERS["fsyncs"], 0) - before.get(COUNTERS["fsyncs"], 0)) or None
    figures["events_per_fsync_window"] = events / fsyncs if fsyncs else None
    return figures


def run_memory(binary: Path, path: str, connections: int, pinned: bool, log: Any) -> float | None:
    with tempfile.TemporaryDirectory(prefix="sw-bench-data-") as data:
        proc, port = serve("full", Path(data), log, pinned)
        try:
            result = loadgen(
                binary, "idle", port, path, proc.pid,
                ["-c", str(connections), "--hold", "6"], 1.0, pinned,
            )  # fmt: skip
        finally:
            stop(proc)
    value = result.get("rss_per_conn_bytes")
    return float(value) if value is not None else None


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    raise_nofile()
    pinned = not args.no_pin
    binary = build_loadgen(args.no_build) / "loadgen"
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / "raw"
    raw.mkdir(exist_ok=True)
    runs: dict[str, Any] = {"kv": {}, "loop": {}, "memory": {}}
    with (raw / "storage-servers.log").open("wb") as log:
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}/{args.rounds}", flush=True)
            for durability in ("full", "normal"):
                loop = sqlite_loop(durability, args.duration, pinned)
                runs["loop"].setdefault(durability, []).append(loop)
                print(f"  sqlite3 loop ({durability}): {loop:,.0f} events/s", flush=True)
                for case in CASES:
                    figures = run_case(binary, durability, case, args.duration, pinned, log)
                    figures["ratio"] = figures["msgs_per_s"] / loop
                    runs["kv"].setdefault(f"{durability}|{case[0]}", []).append(figures)
                    print(f"  {durability} {case[0]}: {figures['msgs_per_s']:,.0f}/s "
                          f"({figures['ratio']:.2f}x), {figures['fsyncs_per_s']:,.0f} fsyncs/s",
                          flush=True)  # fmt: skip
            for name, with_path, bare_path, connections in MEMORY:
                stored = run_memory(binary, with_path, connections, pinned, log)
                bare = run_memory(binary, bare_path, connections, pinned, log)
                runs["memory"].setdefault(name, []).append({"storage": stored, "bare": bare})
                print(f"  {name}: {fmt(stored)} B with storage, {fmt(bare)} B without", flush=True)
    lines = [
        "# Storage benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine().get('cpu', '')}; "
        f"medians of {args.rounds} rounds of {args.duration:g} s; `python bench/storage.py`.",
        "",
        "KV put + get per event, events/s (a WebSocket message per event through the whole "
        "stack) against a plain `sqlite3` loop doing the same put + get + COMMIT per event "
        "with the same durability, in the same round:",
        "",
        "| durability | case | events/s | ratio to the loop | p50 ms | commits/s | fsyncs/s "
        "| events per fsync | server CPU µs/event |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]  # fmt: skip
    summary: dict[str, Any] = {"kv": {}, "loop": {}, "memory": {}}
    for durability in ("full", "normal"):
        loop = median(runs["loop"][durability])
        summary["loop"][durability] = loop
        lines.append(
            f"| {durability} | plain sqlite3 loop (the peer) | {fmt(loop)} | 1.00 | — "
            f"| {fmt(loop)} "
            f"| {fmt(loop) if durability == 'full' else '—'} | 1 | — |"
        )
        for case in CASES:
            rows = runs["kv"][f"{durability}|{case[0]}"]
            med = {key: median([row[key] for row in rows]) for key in rows[0]}
            summary["kv"][f"{durability}|{case[0]}"] = med
            lines.append(
                f"| {durability} | {case[0]} | {fmt(med['msgs_per_s'])} | {fmt(med['ratio'], 2)} | "
                f"{fmt(med['p50_ms'], 1)} | "
                f"{fmt(med['commits_per_s'])} | {fmt(med['fsyncs_per_s'])} | "
                f"{fmt(med['events_per_fsync_window'], 1)} | "
                f"{fmt(med['server_cpu_us_per_msg'], 1)} |"
            )
    lines += [
        "",
        "RSS per connection (bytes; the load generator's idle scenario, each connection's object "
        "its own):",
        "",
        "| object | with storage | without | storage's share |",
        "|---|--:|--:|--:|",
    ]
    for name, *_ in MEMORY:
        rows = runs["memory"][name]
        stored = median([row["storage"] for row in rows])
        bare = median([row["bare"] for row in rows])
        share = stored - bare if stored is not None and bare is not None else None
        summary["memory"][name] = {"storage": stored, "bare": bare, "share": share}
        lines.append(f"| {name} | {fmt(stored)} | {fmt(bare)} | {fmt(share)} |")
    (RESULTS / "storage.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "storage.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
