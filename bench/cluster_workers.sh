#!/usr/bin/env bash
# `--workers 2` against one node on this machine: the Rust load generator's ping-pong, 100
# connections, each on a room of its own (`room=peer`: owned by the worker that accepted it, so
# nothing is forwarded), rounds interleaved. The load generator shares the two cores with the
# nodes (nothing is pinned): read the figures as what this machine gives, not as scaling.
#     bench/cluster_workers.sh DSN [ROUNDS]     (DSN: an empty PostgreSQL database to use)
set -euo pipefail
cd "$(dirname "$0")/.."
DSN=$1
ROUNDS=${2:-3}
PORT=18900
for round in $(seq 1 "$ROUNDS"); do
  for n in 1 2; do
    data=$(mktemp -d)
    .venv/bin/python -m sockworker serve bench.apps.cluster_bench:app --port $PORT --data-dir "$data" \
      --cluster "$DSN" --workers $n --io-threads 0 --no-metering --log-level warning &
    sup=$!
    for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/?mode=echo&room=x" && break; sleep 0.1; done
    rate=$(target/release/loadgen pingpong --url "ws://127.0.0.1:$PORT/?room=peer&mode=echo" -c 100 -d 8 \
      | grep -o '"msgs_per_s":[0-9]*' | cut -d: -f2)
    echo "round $round workers $n msgs/s $rate"
    kill $sup; wait $sup || true
    rm -rf "$data"
  done
done
