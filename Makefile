# sockworker: every set-up step lives here, so a fresh machine needs only `make demo` / `make test`.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CARGO ?= cargo
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

RUST_SOURCES := $(shell find rust -name '*.rs' -o -name '*.html' -o -name Cargo.toml) Cargo.toml pyproject.toml
# A venv with nothing but the wheel in it, for the smoke test.
WHEEL_VENV := target/wheel-venv

.PHONY: help build demo cluster-demo demo-echo test test-rust test-python test-wheel wheel docs lint stubtest fmt clean browser-deps postgres-deps

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.deps: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# One list of packages, pyproject's: the runtime dependencies and the test, lint and docs extras.
	$(VENV)/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		x = p["optional-dependencies"]; print("\n".join(p["dependencies"] + x["test"] + x["lint"] + x["docs"]))' \
		> $(VENV)/requirements.txt
	$(PIP) install --quiet "maturin>=1.7,<2" -r $(VENV)/requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(RUST_SOURCES)
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

build: $(VENV)/.built ## create .venv and build the extension in release mode (sockworker lands in .venv/bin)

demo: build ## build, then serve the chat example (examples/chat.py) on 127.0.0.1:8787
	@echo "sockworker chat demo: open http://127.0.0.1:8787/room/lobby in two browser tabs; Ctrl-C stops it."
	$(VENV)/bin/sockworker serve examples.chat:app --host 127.0.0.1 --port 8787

cluster-demo: build postgres-deps ## build, then PostgreSQL and 3 nodes serving the chat on 127.0.0.1:8787-8789
	@echo "sockworker cluster demo: open http://127.0.0.1:8787/room/lobby and http://127.0.0.1:8788/room/lobby; Ctrl-C stops it."
	$(PY) -m examples.cluster_demo

demo-echo: build ## build, then serve examples/echo.py (echoes every message) on 127.0.0.1:8787
	@echo "sockworker echo demo: ws://127.0.0.1:8787/ echoes every message; Ctrl-C stops it."
	@echo "  try: $(PY) -m websockets ws://127.0.0.1:8787/"
	$(VENV)/bin/sockworker serve examples.echo:app --host 127.0.0.1 --port 8787

test: build test-rust test-python test-wheel ## build, then run cargo test, pytest and the wheel's smoke test

test-rust:
	$(CARGO) test --release -p sockworker-core

# The suite runs twice: in the single-thread mode (the application thread does the socket I/O)
# and with two I/O threads beside it.
test-python: build postgres-deps
	SOCKWORKER_IO_THREADS=0 $(PY) -m pytest tests
	SOCKWORKER_IO_THREADS=2 $(PY) -m pytest tests

wheel: $(VENV)/.deps ## build the abi3 wheel (CPython 3.11 and later) into dist/
	rm -f dist/sockworker-*.whl
	$(VENV)/bin/maturin build --release --out dist --quiet

test-wheel: wheel ## install the wheel into a clean venv and serve an echo app from it
	rm -rf $(WHEEL_VENV)
	python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet dist/sockworker-*-abi3-*.whl
	@# From outside the source tree, so that only the installed package can be imported.
	cd $(WHEEL_VENV) && bin/python $(abspath tests/wheel_smoke.py)

browser-deps: ## install Debian's chromium and chromium-driver for the browser test (needs root)
	@command -v chromedriver >/dev/null && command -v chromium >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# tests/postgres.py runs a throwaway cluster from these binaries; a no-op where they are installed.
postgres-deps: ## install Debian's postgresql (initdb, pg_ctl) for the cluster tests when missing (needs root)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		if [ "$$(id -u)" != 0 ]; then \
			echo "make postgres-deps: no initdb in /usr/lib/postgresql/*/bin or on PATH; run it as root" \
				"to apt-get install Debian's postgresql, or install PostgreSQL's server binaries yourself" >&2; \
			exit 1; \
		else \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
		fi

docs: $(VENV)/.deps ## build the documentation site into target/site (mkdocs --strict: a warning fails)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

lint: $(VENV)/.deps ## rustfmt --check, clippy -D warnings, ruff, mypy --strict, stubtest of the native module
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests examples bench conformance
	$(VENV)/bin/ruff format --check python tests examples bench conformance
	$(VENV)/bin/mypy
	$(MAKE) --no-print-directory stubtest

stubtest: build ## the type stub of sockworker._native against the built module
	$(PY) -m mypy.stubtest --ignore-disjoint-bases --allowlist python/sockworker/_native.stubtest-allowlist sockworker._native

fmt: $(VENV)/.deps ## format Rust and Python
	$(CARGO) fmt --all
	$(VENV)/bin/ruff format python tests examples bench
	$(VENV)/bin/ruff check --fix python tests examples bench

clean: ## remove build output and the venv
	rm -rf target dist $(VENV) python/sockworker/*.so

-include bench/bench.mk

# -- conformance: the Autobahn|Testsuite fuzzing client (Python 2.7 only) against conformance/echo.py
# Python 2.7 comes from pyenv where the machine has it (these do), else from PATH.
PY27 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/2.7*/bin/python2.7) $(shell command -v python2.7 2>/dev/null))
AUTOBAHN := .conformance/autobahn
CONFORMANCE_CASES ?= 1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*,12.*,13.*

$(AUTOBAHN)/.installed:
	@test -n "$(PY27)" || { echo "make conformance needs Python 2.7 (autobahntestsuite runs on nothing newer)"; exit 1; }
	@# virtualenv before 20.22 still makes Python 2.7 environments.
	$(PIP) install --quiet "virtualenv<20.22"
	$(VENV)/bin/virtualenv --quiet -p $(PY27) $(AUTOBAHN)
	$(AUTOBAHN)/bin/pip install --quiet --disable-pip-version-check autobahntestsuite==25.10.1
	touch $@

.PHONY: conformance
conformance: build $(AUTOBAHN)/.installed ## run the Autobahn|Testsuite fuzzing client against an echo app; summary per case group
	$(PY) conformance/run.py --wstest $(AUTOBAHN)/bin/wstest --cases '$(CONFORMANCE_CASES)'

# -- fuzzing: cargo fuzz (libFuzzer) on the core's parsers; works on the stable toolchain with
# --sanitizer none (the coverage instrumentation needs no nightly flag).
CARGO_FUZZ := .tools/bin/cargo-fuzz
FUZZ_TARGETS := frame_decoder handshake client_response inflater
FUZZ_SECONDS ?= 60

$(CARGO_FUZZ):
	$(CARGO) install --quiet --locked cargo-fuzz --version 0.13.2 --root .tools

.PHONY: fuzz fuzz-smoke
fuzz-smoke: $(CARGO_FUZZ) ## run each fuzz target for FUZZ_SECONDS (60) on the committed corpus
	cd fuzz && ../$(CARGO_FUZZ) build -s none --release
	@for target in $(FUZZ_TARGETS); do \
		echo "fuzzing $$target for $(FUZZ_SECONDS) s"; \
		(cd fuzz && ../$(CARGO_FUZZ) run -s none --release $$target -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=8192 -print_final_stats=1 2>&1 | tail -12) \
			|| exit 1; \
	done

fuzz: ## long fuzzing in the background at nice 19: FUZZ_SECONDS per target (default 3600), logs in fuzz/logs
	$(MAKE) --no-print-directory $(CARGO_FUZZ)
	cd fuzz && ../$(CARGO_FUZZ) build -s none --release
	mkdir -p fuzz/logs
	@for target in $(FUZZ_TARGETS); do \
		(cd fuzz && nice -n 19 ../$(CARGO_FUZZ) run -s none --release $$target -- \
			-max_total_time=$${FUZZ_LONG:-3600} -max_len=8192 -print_final_stats=1 \
			> logs/$$target.log 2>&1 &); \
	done
	@echo "fuzzing $(FUZZ_TARGETS) in the background; see fuzz/logs/"

.PHONY: soak
soak: build ## churn soak (not CI): 10,000 sockets opened, idled, reset, 10 cycles; RSS and descriptors per cycle
	$(PY) bench/soak.py
