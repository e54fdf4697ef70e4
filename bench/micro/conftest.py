"""pytest-benchmark settings for the micro-benchmarks (they are not part of `make test`)."""
