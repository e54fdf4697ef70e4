# Benchmarks: `make bench`, `make bench-quick`, `make bench-micro`, `make bench-cluster`
# (see bench/README.md).
# Included by the root Makefile, which defines VENV, PY, PIP, CARGO and the `build` target.

BENCH_DEPS := $(VENV)/.bench-deps

.PHONY: bench bench-quick bench-micro bench-storage bench-cluster

# The peers' pinned versions, into the project's venv. socketify also needs libuv.so.1: as root
# with apt-get it is installed, otherwise the runner skips socketify and says why.
$(BENCH_DEPS): bench/requirements.txt $(VENV)/.deps
	@ldconfig -p | grep -q 'libuv\.so\.1' || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { apt-get install -y -qq libuv1 >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq libuv1 >/dev/null; }; }; } \
		|| echo "bench: libuv1 is not installed; socketify will be skipped"
	$(PIP) install --quiet -r bench/requirements.txt
	touch $@

bench: build $(BENCH_DEPS) ## sockworker vs every peer, all scenarios, then storage (~25 min) -> bench/results/
	$(PY) bench/run.py
	$(PY) bench/storage.py

bench-storage: build $(BENCH_DEPS) ## storage through the stack vs a plain sqlite3 loop, and its memory (~4 min)
	$(PY) bench/storage.py

bench-cluster: build $(BENCH_DEPS) postgres-deps ## nodes on one PostgreSQL: forwarding, broadcast, failover, PG load (~6 min)
	$(PY) bench/cluster.py

bench-quick: build $(BENCH_DEPS) ## pingpong + pipeline at 64 B and idle 10,000 (~3 min) -> bench/results/
	$(PY) bench/run.py --quick

bench-micro: build $(BENCH_DEPS) ## criterion benches of the core and pytest-benchmark of the Python hot path
	@if ls rust/core/benches/*.rs >/dev/null 2>&1; then \
		$(CARGO) bench -p sockworker-core --benches; \
	else \
		echo "bench-micro: missing rust/core/benches/*.rs (criterion: frame encode/decode," \
			"encoding one broadcast frame for N sockets)"; \
	fi
	@if ls bench/micro/test_*.py >/dev/null 2>&1; then \
		$(PY) -m pytest bench/micro --benchmark-only -p no:cacheprovider; \
	else \
		echo "bench-micro: missing bench/micro/test_*.py (pytest-benchmark: dispatching a batch of" \
			"N message events to a def handler, ws.send)"; \
	fi
