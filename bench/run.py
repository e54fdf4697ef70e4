#!/usr/bin/env python3
"""Benchmark runner: sockworker against its peers, side by side, in one run.

Each measurement starts a fresh server pinned to CPU 0 (`taskset -c 0`), waits until its port
accepts, runs one scenario of the Rust load generator (`bench/loadgen`) pinned to CPU 1, and stops
the server. Servers take turns within a round (A B C, A B C, ...), at least 3 rounds per scenario;
the machine's load average is recorded beside each round; the median over rounds is reported, with
ratios to picows and to the Rust reference server taken within each round.

    python bench/run.py --quick                      # pingpong + pipeline at 64 B, idle 10,000
    python bench/run.py                              # everything
    python bench/run.py --servers sockworker,picows,websockets --rounds 5

Results: bench/results/latest.md (table), latest.png (chart), latest.json (every figure), and the
raw per-run lines and server logs in bench/results/raw/.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
RAW = RESULTS / "raw"
HOST = "127.0.0.1"
SERVER_CPU = "0"
LOADGEN_CPU = "1"
# A measurement during which other work used more than this many cores is taken again.
DISTURBED = 0.2
README_START = "<!-- bench:latest:start -->"
README_END = "<!-- bench:latest:end -->"
ALL_SERVERS = [
    "sockworker",
    "sockworker-nometer",
    "sockworker-threads",
    "picows",
    "websockets",
    "aiohttp",
    "granian",
    "socketify",
    "rust-ref",
]
QUICK_SERVERS = ["sockworker", "picows", "websockets", "rust-ref"]
#: The server of `--baseline DIR`.
BASELINE = "sockworker-base"


@dataclass
class Case:
    """One scenario with its parameters; `name` is what the table shows."""

    name: str
    scenario: str
    args: list[str]
    broadcast: bool = False


@dataclass
class Server:
    name: str
    echo: list[str] | None
    broadcast: list[str] | None
    cwd: Path
    missing: str | None = None  # why it cannot run here, if it cannot
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    case: str
    server: str
    round: int
    loadavg: tuple[float, float, float]
    background: float | None = None  # cores busy before the round, with no benchmark running
    attempts: int = 1
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def cases(profile: str, idle: int) -> list[Case]:
    quick = [
        Case("pingpong 64B c1", "pingpong", ["-c", "1", "-s", "64"]),
        Case("pipeline 64B c1 w16", "pipeline", ["-c", "1", "-s", "64", "-w", "16"]),
        Case(f"idle {idle:,}", "idle", ["-c", str(idle), "--hold", "2"]),
    ]
    if profile == "quick":
        return quick
    full = [quick[0]]
    full += [Case(f"pingpong {s} c1", "pingpong", ["-c", "1", "-s", str(n)]) for s, n in SIZES]
    full += [Case(f"pingpong {s} c100", "pingpong", ["-c", "100", "-s", str(n)]) for s, n in ALL]
    full += [
        quick[1],
        Case("pipeline 64B c1 w128", "pipeline", ["-c", "1", "-s", "64", "-w", "128"]),
        Case("large 64KiB", "large", ["-c", "1", "-s", str(64 << 10)]),
        Case("large 1MiB", "large", ["-c", "1", "-s", str(1 << 20)]),
        Case("handshake c8", "handshake", ["-c", "8", "-s", "64"]),
        quick[2],
    ]
    full += [
        Case(f"broadcast {n:,} subs", "broadcast", ["-c", str(n), "-s", "64"], broadcast=True)
        for n in (16, 100, 1000)
    ]
    return full


SIZES = [("1KiB", 1024), ("16KiB", 16384)]
ALL = [("64B", 64), *SIZES]


def has_module(python: str, module: str) -> str | None:
    """None if `python` can import `module`, else the reason it cannot."""
    proc = subprocess.run(
        [python, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PEERS,
        check=False,
    )
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"cannot import {module}: {lines[-1] if lines else proc.returncode}"


def snapshot_sockworker(dest: Path) -> Path:
    """Copy python/sockworker (with the built extension) and examples/ into `dest`.

    The working tree may be edited, or rebuilt, while a run goes on; every sockworker measurement
    of a run uses this copy, taken when the run starts, so they all measure the same code.
    """
    shutil.copytree(ROOT / "python" / "sockworker", dest / "sockworker")
    shutil.copytree(ROOT / "examples", dest / "examples")
    return dest


def servers(
    python: str,
    loadgen_dir: Path,
    wanted: list[str],
    snapshot: Path | None,
    baseline: Path | None = None,
) -> dict[str, Server]:
    venv_python = ROOT / ".venv" / "bin" / "python"
    native = list((ROOT / "python" / "sockworker").glob("_native*.so"))
    port = "{port}"
    peer = {
        name: [python, str(PEERS / f"{name}_echo.py"), "--port", port]
        for name in ("picows", "websockets", "aiohttp", "granian", "socketify")
    }
    peer_bc = {
        name: [python, str(PEERS / f"{name}_broadcast.py"), "--port", port]
        for name in ("picows", "websockets", "aiohttp")
    }
    # `python -m sockworker serve` with the snapshot first on PYTHONPATH (see snapshot_sockworker).
    sw = [str(venv_python), "-m", "sockworker", "serve", "{app}", "--host", HOST, "--port", port]
    sw_dir = snapshot or ROOT
    out = {
        "sockworker": Server(
            "sockworker",
            [s.replace("{app}", "examples.echo:app") for s in sw],
            [s.replace("{app}", "examples.broadcast:app") for s in sw]
            if (sw_dir / "examples" / "broadcast.py").exists()
            else None,
            sw_dir,
            None
            if (ROOT / ".venv" / "bin" / "sockworker").exists() and native
            else "not built yet (run `make build`: no .venv/bin/sockworker or _native*.so)",
            {"PYTHONPATH": str(sw_dir)},
        ),
        # The same, with CPU accounting, CPU limits and the meter off: what metering costs.
        "sockworker-nometer": Server(
            "sockworker-nometer",
            [s.replace("{app}", "examples.echo:app") for s in sw] + ["--no-metering"],
            None,
            sw_dir,
            None
            if (ROOT / ".venv" / "bin" / "sockworker").exists() and native
            else "not built yet (run `make build`: no .venv/bin/sockworker or _native*.so)",
            {"PYTHONPATH": str(sw_dir)},
        ),
        # The same with one I/O thread beside the Python thread: the threaded design, on the one
        # core the server is pinned to (sockworker alone runs single-threaded there).
        "sockworker-threads": Server(
            "sockworker-threads",
            [s.replace("{app}", "examples.echo:app") for s in sw] + ["--io-threads", "1"],
            [s.replace("{app}", "examples.broadcast:app") for s in sw] + ["--io-threads", "1"]
            if (sw_dir / "examples" / "broadcast.py").exists()
            else None,
            sw_dir,
            None
            if (ROOT / ".venv" / "bin" / "sockworker").exists() and native
            else "not built yet (run `make build`: no .venv/bin/sockworker or _native*.so)",
            {"PYTHONPATH": str(sw_dir)},
        ),
        "rust-ref": Server(
            "rust-ref",
            [str(loadgen_dir / "echo_ref"), "--host", HOST, "--port", port],
            [str(loadgen_dir / "echo_ref"), "--host", HOST, "--port", port, "--broadcast"],
            ROOT,
        ),
    }
    if baseline is not None:
        # Another build (a copy of its python/sockworker, with the extension, and examples/),
        # measured in the same rounds: before and after a change, interleaved.
        out[BASELINE] = Server(
            BASELINE,
            [s.replace("{app}", "examples.echo:app") for s in sw],
            [s.replace("{app}", "examples.broadcast:app") for s in sw]
            if (baseline / "examples" / "broadcast.py").exists()
            else None,
            baseline,
            None
            if list((baseline / "sockworker").glob("_native*.so"))
            else f"no sockworker/_native*.so in {baseline}",
            {"PYTHONPATH": str(baseline)},
        )
    for name in ("picows", "websockets", "aiohttp", "granian", "socketify"):
        out[name] = Server(name, peer[name], peer_bc.get(name), PEERS)
    for name in wanted:
        s = out[name]
        if s.missing is None and not name.startswith("sockworker") and name != "rust-ref":
            s.missing = has_module(python, name)
    return {name: out[name] for name in wanted}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Connect until the port accepts; None on success, else why not. Bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        if proc.poll() is not None:
            return f"server exited with status {proc.returncode} before listening"
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return None
        except OSError:
            pass
        if time.monotonic() > deadline:
            return f"port {port} did not accept within {timeout:.0f} s"
        time.sleep(0.02)  # between connection attempts; there is no event to await here
    return "gave up waiting for the port"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it was started in a session of its own), then KILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs together, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, sum(fields[:8])


def background_load(seconds: float = 0.5) -> float | None:
    """Cores kept busy by other work over `seconds`, measured while no benchmark process runs."""
    try:
        b0, _ = busy_ticks()
        time.sleep(seconds)  # a measuring interval, not a wait for an event
        b1, _ = busy_ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (b1 - b0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_for_quiet(limit: float, threshold: float = 0.2) -> float | None:
    """Measure other work on the machine; while it is above `threshold` cores, wait (at most
    `limit` seconds, in half-second measurements). Return the last measurement."""
    deadline = time.monotonic() + limit
    load = background_load()
    for _ in range(10_000):
        if load is None or load <= threshold or time.monotonic() >= deadline:
            break
        load = background_load()
    return load


def pin(cpu: str, cmd: list[str], pinned: bool) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if pinned else cmd


def run_loadgen(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Runs the load generator; its last JSON line, or RuntimeError with why there is none."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen exited {out.returncode}: {out.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def measure(
    server: Server,
    case: Case,
    loadgen: Path,
    duration: float,
    warmup: float,
    pinned: bool,
    log: Any,
) -> dict[str, Any]:
    template = server.broadcast if case.broadcast else server.echo
    assert template is not None
    port = free_port()
    cmd = [part.replace("{port}", str(port)) for part in template]
    log.write(f"\n=== {case.name}: {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        pin(SERVER_CPU, cmd, pinned),
        cwd=server.cwd,
        env={**os.environ, **server.env},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        problem = wait_for_port(port, proc, timeout=60)
        if problem:
            raise RuntimeError(problem)
        path = "/bench-room" if case.broadcast else "/"
        lg = [
            str(loadgen),
            case.scenario,
            "--url",
            f"ws://{HOST}:{port}{path}",
            "--server-pid",
            str(proc.pid),
            "--label",
            server.name,
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            *case.args,
        ]
        result = run_loadgen(pin(LOADGEN_CPU, lg, pinned), timeout=duration + warmup + 300)
        if not result.get("messages"):
            why = result.get("first_error", "no error given")
            raise RuntimeError(f"no message measured: {why}")
        if proc.poll() is not None:
            result["server_exited"] = proc.returncode
        return result
    finally:
        stop(proc)


def median(values: list[float]) -> float | None:
    clean = [v for v in values if v is not None and v == v]
    return statistics.median(clean) if clean else None


def summarize(runs: list[Run], case_names: list[str], names: list[str]) -> list[dict[str, Any]]:
    """Median over rounds per (case, server), and per-round ratios to picows and rust-ref."""
    by: dict[tuple[str, str, int], dict[str, Any]] = {
        (r.case, r.server, r.round): r.result for r in runs if r.error is None
    }
    rows = []
    for case in case_names:
        for name in names:
            mine = [r for r in runs if r.case == case and r.server == name and r.error is None]
            errors = [r.error for r in runs if r.case == case and r.server == name and r.error]
            if not mine:
                if errors:
                    rows.append({"case": case, "server": name, "failed": errors[0], "rounds": 0})
                continue

            def med(key: str, results: list[dict[str, Any]]) -> float | None:
                return median([x.get(key) for x in results])

            results = [r.result for r in mine]
            row: dict[str, Any] = {"case": case, "server": name, "rounds": len(mine)}
            for key in (
                "msgs_per_s",
                "p50_us",
                "p99_us",
                "p999_us",
                "server_cpu_us_per_msg",
                "server_cpu_util",
                "client_cpu_util",
                "rss_per_conn_bytes",
                "kernel_mem_per_conn_bytes",
                "kernel_slab_per_conn_bytes",
                "opened",
                "errors",
                "lost",
                "delivery_p50_us",
                "delivery_p99_us",
                "other_cpu_util",
            ):
                row[key] = med(key, results)
            for ref in ("picows", "rust-ref"):
                ratios = []
                for r in mine:
                    other = by.get((case, ref, r.round))
                    if other and other.get("msgs_per_s"):
                        ratios.append(r.result["msgs_per_s"] / other["msgs_per_s"])
                row[f"vs_{ref}"] = median(ratios)
            if errors:
                row["failed_rounds"] = len(errors)
            rows.append(row)
    return rows


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "rust", "python", "Cargo.toml"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if commit and dirty:
        commit += " with uncommitted changes"
    versions = []
    for pkg in ("picows", "websockets", "aiohttp", "uvloop", "granian", "socketify"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": nproc,
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "peers": ", ".join(versions),
    }


def markdown(
    rows: list[dict[str, Any]],
    runs: list[Run],
    info: dict[str, str],
    profile: str,
    notes: list[str],
    args: argparse.Namespace,
) -> str:
    out = [
        f"## Benchmark results ({profile})",
        "",
        f"Measured {info['date']} on {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}, sockworker at {info['commit']}. Peers: {info['peers']}.",
        "",
        f"Server on CPU {SERVER_CPU}, load generator on CPU {LOADGEN_CPU}; {args.rounds} "
        f"interleaved rounds of {args.duration:g} s (after {args.warmup:g} s warm-up) each; "
        "medians over rounds. Ratios are msgs/s over the same round's picows or rust-ref figure "
        "(median over rounds; > 1 is faster). For broadcast, msgs/s counts deliveries and the "
        "latency is publish to last delivery; for handshake, one message is one connection opened, "
        "echoed once and closed; for idle, msgs/s is connections opened per second.",
        "",
        "| scenario | server | msgs/s | p50 µs | p99 µs | p99.9 µs | CPU µs/msg "
        "| vs picows | vs rust-ref |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    saturated = False
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['case']} | {r['server']} | failed: {r['failed'][:80]} |||||||")
            continue
        mark = ""
        if (r.get("client_cpu_util") or 0) > 0.9:
            mark = " †"
            saturated = True
        out.append(
            f"| {r['case']} | {r['server']} | {fmt(r['msgs_per_s'])}{mark} | {fmt(r['p50_us'])} "
            f"| {fmt(r['p99_us'])} | {fmt(r['p999_us'])} | {fmt(r['server_cpu_us_per_msg'])} "
            f"| {fmt(r['vs_picows'], 2)} | {fmt(r['vs_rust-ref'], 2)} |"
        )
    if saturated:
        out += [
            "",
            "† the load generator used over 90% of its core: that figure is a lower bound for "
            "the server.",
        ]
    idle = [r for r in rows if r["case"].startswith("idle") and "failed" not in r]
    if idle:
        out += [
            "",
            "Idle connections, per connection, after holding them idle for 2 s: server memory "
            "(VmRSS of the server's process tree), kernel TCP buffer memory (/proc/net/sockstat "
            "`mem`: data queued in socket buffers, near 0 for idle sockets) and kernel slab "
            "(/proc/meminfo `Slab`: socket structures; both ends of each loopback connection, "
            "so it includes the client's half).",
            "",
            "| scenario | server | opened | RSS bytes/conn | TCP buffers bytes/conn "
            "| slab bytes/conn (2 ends) | conn/s |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for r in idle:
            out.append(
                f"| {r['case']} | {r['server']} | {fmt(r['opened'])} "
                f"| {fmt(r['rss_per_conn_bytes'])} | {fmt(r['kernel_mem_per_conn_bytes'])} "
                f"| {fmt(r['kernel_slab_per_conn_bytes'])} | {fmt(r['msgs_per_s'])} |"
            )
    out += [
        "",
        "Each round: load average (1, 5, 15 min) and the cores kept busy by other work just "
        "before it (bg), then the most CPU any other work used during one of its measurements "
        "(other, in cores, from /proc/stat less the server and the load generator; loopback "
        "networking done in interrupt context shows up here too).",
        "",
    ]
    by_case: dict[str, dict[int, list[Run]]] = {}
    for r in runs:
        by_case.setdefault(r.case, {}).setdefault(r.round, []).append(r)
    for case, rounds in by_case.items():
        parts = []
        for rnd, rs in rounds.items():
            la = rs[0].loadavg
            bg = rs[0].background
            others = [x.result.get("other_cpu_util") for x in rs]
            other = max((o for o in others if o is not None), default=None)
            loads = f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
            parts.append(f"r{rnd}: {loads}, bg {fmt(bg, 2)}, other {fmt(other, 2)}")
        out.append(f"- {case}: " + "; ".join(parts))
    retried = [r for r in runs if r.attempts > 1]
    disturbed = [r for r in runs if (r.result.get("other_cpu_util") or 0) > DISTURBED]
    if retried:
        notes.append(
            f"{len(retried)} measurement(s) were taken again because other work used over "
            f"{DISTURBED} cores meanwhile"
        )
    for r in disturbed:
        notes.append(
            f"{r.case} / {r.server} round {r.round}: still disturbed after {r.attempts} attempts "
            f"(other work: {r.result['other_cpu_util']:.2f} cores)"
        )
    for r in runs:
        if r.error is None and r.result.get("errors"):
            notes.append(
                f"{r.case} / {r.server} round {r.round}: {r.result['errors']} error(s), first: "
                f"{str(r.result.get('first_error'))[:120]}"
            )
    failures = [r for r in runs if r.error]
    if failures or notes:
        out += ["", "Notes:", ""]
        out += [f"- {n}" for n in notes]
        out += [f"- {r.case} / {r.server} round {r.round}: {r.error}" for r in failures[:20]]
    return "\n".join(out) + "\n"


def chart(rows: list[dict[str, Any]], names: list[str], case_names: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    present = [n for n in names if any(r["server"] == n and "failed" not in r for r in rows)]
    if not present:
        return
    width = 0.8 / len(present)
    fig, ax = plt.subplots(figsize=(max(9.0, 1.1 * len(case_names) + 3), 5.5))
    for i, name in enumerate(present):
        values = []
        for case in case_names:
            match = [r for r in rows if r["case"] == case and r["server"] == name]
            values.append(match[0].get("msgs_per_s") or 0 if match else 0)
        xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(case_names))]
        ax.bar(xs, values, width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("messages per second (log scale; idle: connections/s)")
    ax.set_xticks(range(len(case_names)))
    ax.set_xticklabels(case_names, rotation=30, ha="right", fontsize=8)
    ax.set_title("sockworker vs peers: median msgs/s (server on 1 core)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(table: str) -> None:
    readme = BENCH / "README.md"
    if not readme.exists():
        return
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    # The table's own heading sits under the README's "Latest results".
    table = re.sub(r"^## ", "### ", table, flags=re.M)
    readme.write_text(f"{head}{README_START}\n{table}{README_END}{tail}")


def raise_nofile() -> None:
    """Servers inherit the limit: let them hold the idle scenario's sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1 << 20, 262_144, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
            return
        except (ValueError, OSError):
            continue


def build_loadgen(no_build: bool) -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    out = target / "release"
    if not no_build:
        cargo = os.environ.get("CARGO", "cargo")
        cmd = [cargo, "build", "--release", "--quiet", "-p", "loadgen", "--bins"]
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=1800)
    for binary in ("loadgen", "echo_ref"):
        if not (out / binary).exists():
            sys.exit(f"{out / binary} is missing: build it with `cargo build --release -p loadgen`")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pingpong and pipeline at 64 B, idle")
    ap.add_argument("--servers", help=f"comma-separated, from {','.join(ALL_SERVERS)}")
    ap.add_argument("--cases", help="only cases whose name contains one of these (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, help="measured seconds per run (quick 3, full 2)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--idle", type=int, default=10_000, help="connections of the idle scenario")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the Python peers")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-build", action="store_true", help="use the loadgen binaries as built")
    ap.add_argument("--no-pin", action="store_true", help="do not pin (machines with one CPU)")
    ap.add_argument(
        "--baseline",
        type=Path,
        help=f"also measure, as {BASELINE}, the sockworker package in DIR/sockworker (with its "
        "built extension; examples from DIR/examples): another build, in the same rounds",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"measure again when other work used over {DISTURBED} cores meanwhile",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each round, wait up to this many seconds for other work to stop",
    )
    ap.add_argument(
        "--extra-time",
        type=float,
        help="seconds all waits for quiet and repeated measurements may add to the run "
        "(default: quick 60, full 300)",
    )
    ap.add_argument(
        "--update-readme",
        choices=("auto", "yes", "no"),
        default="auto",
        help="put the table into bench/README.md (auto: after a full run of every server)",
    )
    args = ap.parse_args()
    profile = "quick" if args.quick else "full"
    args.rounds = max(1, min(args.rounds, 50))
    if args.duration is None:
        args.duration = 3.0 if args.quick else 2.0
    if args.extra_time is None:
        args.extra_time = 60.0 if args.quick else 300.0
    wanted = (args.servers or ",".join(QUICK_SERVERS if args.quick else ALL_SERVERS)).split(",")
    wanted = [w.strip() for w in wanted if w.strip()]
    if args.baseline is not None and BASELINE not in wanted:
        wanted.insert(1, BASELINE)
    unknown = [w for w in wanted if w not in [*ALL_SERVERS, BASELINE]]
    if unknown:
        ap.error(f"unknown servers {unknown}; known: {ALL_SERVERS}")
    pinned = not args.no_pin
    if pinned and (os.cpu_count() or 1) < 2:
        print("fewer than 2 CPUs: running unpinned", file=sys.stderr)
        pinned = False
    if pinned and not shutil.which("taskset"):
        sys.exit("taskset not found (util-linux); use --no-pin")
    raise_nofile()
    loadgen_dir = build_loadgen(args.no_build)
    all_cases = cases(profile, args.idle)
    if args.cases:
        keys = [k.strip() for k in args.cases.split(",")]
        all_cases = [c for c in all_cases if any(k in c.name for k in keys)]
    snapshot = None
    built = list((ROOT / "python" / "sockworker").glob("_native*.so"))
    if any(name.startswith("sockworker") for name in wanted) and built:
        snapshot = snapshot_sockworker(Path(tempfile.mkdtemp(prefix="sockworker-bench-")))
        atexit.register(shutil.rmtree, snapshot, ignore_errors=True)
    table = servers(args.python, loadgen_dir, wanted, snapshot, args.baseline)
    notes = []
    for s in table.values():
        if s.missing:
            print(f"skipping {s.name}: {s.missing}", file=sys.stderr)
            notes.append(f"{s.name} skipped: {s.missing}")
    runnable = [s for s in table.values() if not s.missing]
    no_bc = [s.name for s in runnable if s.broadcast is None]
    if no_bc and any(c.broadcast for c in all_cases):
        notes.append(f"no broadcast app for {', '.join(no_bc)}: broadcast not measured for it")

    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "raw"
    raw.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    jsonl = raw / f"{profile}-{stamp}.jsonl"
    logs = {s.name: (raw / f"{profile}-{stamp}-{s.name}.log").open("ab") for s in runnable}
    started = time.monotonic()
    runs: list[Run] = []
    total = args.rounds * sum(
        1 for c in all_cases for s in runnable if (s.broadcast if c.broadcast else s.echo)
    )
    done = 0
    # Time spent waiting for quiet and measuring again, bounded by --extra-time.
    extra = 0.0

    def quiet() -> float | None:
        nonlocal extra
        if args.quiet_wait <= 0 or extra >= args.extra_time:
            return None
        t = time.monotonic()
        load = wait_for_quiet(min(args.quiet_wait, args.extra_time - extra))
        extra += time.monotonic() - t
        return load

    with jsonl.open("w") as sink:
        for case in all_cases:
            for rnd in range(1, args.rounds + 1):
                la = os.getloadavg()
                bg = quiet()
                for s in runnable:
                    if (s.broadcast if case.broadcast else s.echo) is None:
                        continue
                    run = Run(case.name, s.name, rnd, (la[0], la[1], la[2]), bg)
                    # A measurement disturbed by other work is taken again (bounded).
                    for attempt in range(1 + max(0, args.retries)):
                        run.attempts = attempt + 1
                        t_attempt = time.monotonic()
                        try:
                            result = measure(
                                s,
                                case,
                                loadgen_dir / "loadgen",
                                args.duration,
                                args.warmup,
                                pinned,
                                logs[s.name],
                            )
                        except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as e:
                            if not run.result:  # else keep the earlier, disturbed, measurement
                                run.error = str(e)[:300]
                            break
                        if attempt > 0:
                            extra += time.monotonic() - t_attempt
                        other = result.get("other_cpu_util") or 0.0
                        best = run.result.get("other_cpu_util")
                        if best is None or other < best:
                            run.result = result
                        if other <= DISTURBED:
                            break
                        if attempt < args.retries and extra < args.extra_time:
                            print(
                                f"    {case.name} / {s.name}: other work used {other:.2f} cores "
                                "during the measurement; measuring again",
                                flush=True,
                            )
                            quiet()
                        else:
                            break
                    runs.append(run)
                    done += 1
                    sink.write(json.dumps(run.__dict__) + "\n")
                    sink.flush()
                    r = run.result
                    status = (
                        f"{r.get('msgs_per_s', 0):>12,.0f} msgs/s"
                        f"  p50 {r.get('p50_us') or 0:>8.1f} µs"
                        f"  cpu {r.get('server_cpu_us_per_msg') or 0:>7.2f} µs/msg"
                        if run.error is None
                        else f"FAILED: {run.error}"
                    )
                    elapsed = time.monotonic() - started
                    print(
                        f"[{elapsed:6.0f}s {done:4}/{total}] {case.name:<22} r{rnd} "
                        f"{s.name:<11} {status}",
                        flush=True,
                    )
    for f in logs.values():
        f.close()

    names = [s.name for s in runnable]
    case_names = [c.name for c in all_cases]
    rows = summarize(runs, case_names, names)
    info = machine()
    info["profile"] = profile
    info["elapsed_s"] = f"{time.monotonic() - started:.0f}"
    notes.insert(
        0,
        f"{profile} profile, {info['elapsed_s']} s in all, of which {extra:.0f} s went to "
        "waiting for other work to stop and measuring again",
    )
    md = markdown(rows, runs, info, profile, notes, args)
    for name in ("latest", profile):
        (args.out / f"{name}.md").write_text(md)
        (args.out / f"{name}.json").write_text(
            json.dumps(
                {"machine": info, "rows": rows, "runs": [r.__dict__ for r in runs]},
                indent=1,
            )
        )
        chart(rows, names, case_names, args.out / f"{name}.png")
    print()
    print(md)
    readme = args.update_readme == "yes" or (
        args.update_readme == "auto" and profile == "full" and not args.servers and not args.cases
    )
    if readme:
        update_readme(md)
    print(f"wrote {args.out / 'latest.md'}, latest.png, latest.json; raw runs in {jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
