"""Runs the Autobahn|Testsuite fuzzing client against the echo app (`make conformance`).

Starts `sockworker serve conformance.echo:app` on a free port, points `wstest -m fuzzingclient`
at it, then prints the outcome per case group and exits non-zero unless every case passed
strictly (OK, or INFORMATIONAL where the suite only informs) with a clean close.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSING = {"OK", "INFORMATIONAL"}


def start_server() -> tuple[subprocess.Popen[str], int]:
    server = subprocess.Popen(
        [sys.executable, "-m", "sockworker", "serve", "conformance.echo:app", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert server.stdout is not None
    deadline = time.monotonic() + 30
    for line in server.stdout:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:
            # Keep reading its log, so the pipe never fills and stalls it.
            threading.Thread(target=server.stdout.read, daemon=True).start()
            return server, int(match.group(1))
        if time.monotonic() > deadline:
            break
    server.kill()
    raise SystemExit("conformance: the echo server did not start")


def summarize(index: Path, agent: str) -> bool:
    results = json.loads(index.read_text())[agent]
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    bad = []
    for case, result in results.items():
        group = case.split(".")[0]
        behavior, close = result["behavior"], result["behaviorClose"]
        if behavior in PASSING and close in PASSING:
            groups[group]["passed"] += 1
        elif behavior == "NON-STRICT" and close in PASSING | {"NON-STRICT"}:
            groups[group]["non-strict"] += 1
            bad.append((case, behavior, close))
        else:
            groups[group]["failed"] += 1
            bad.append((case, behavior, close))
    total: Counter[str] = Counter()
    print(f"{'group':>6} {'cases':>6} {'passed':>7} {'failed':>7} {'non-strict':>11}")
    for group in sorted(groups, key=int):
        counts = groups[group]
        total.update(counts)
        print(
            f"{group:>6} {sum(counts.values()):>6} {counts['passed']:>7} {counts['failed']:>7} "
            f"{counts['non-strict']:>11}"
        )
    print(
        f"{'all':>6} {sum(total.values()):>6} {total['passed']:>7} {total['failed']:>7} "
        f"{total['non-strict']:>11}"
    )
    for case, behavior, close in sorted(bad):
        print(f"  {case}: {behavior} (close: {close})")
    return not bad


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wstest", required=True, help="the wstest command of autobahntestsuite")
    parser.add_argument("--cases", default="1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*")
    parser.add_argument("--outdir", default=str(ROOT / "conformance" / "reports"))
    args = parser.parse_args()
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    server, port = start_server()
    try:
        spec = {
            "outdir": str(outdir),
            "servers": [{"agent": "sockworker", "url": f"ws://127.0.0.1:{port}"}],
            "cases": args.cases.split(","),
            "exclude-cases": [],
            "exclude-agent-cases": {},
        }
        config = outdir / "fuzzingclient.json"
        config.write_text(json.dumps(spec, indent=2))
        # wstest prints a line per case: kept out of the output, in the reports directory.
        with (outdir / "wstest.log").open("w") as log:
            status = subprocess.run(
                [str(Path(args.wstest).resolve()), "-m", "fuzzingclient", "-s", str(config)],
                cwd=outdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode
        if status != 0:
            print(f"conformance: wstest exited with {status}; see {outdir / 'wstest.log'}")
            return 1
    finally:
        server.terminate()
        server.wait(30)
    print(f"Autobahn|Testsuite fuzzingclient, cases {args.cases} (reports in {outdir}):")
    return 0 if summarize(outdir / "index.json", "sockworker") else 1


if __name__ == "__main__":
    sys.exit(main())
