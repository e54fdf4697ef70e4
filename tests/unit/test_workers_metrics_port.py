"""``--workers N`` with a metrics port: each worker gets one of its own (the port plus its
index), else the second worker would fail on a port in use. The workers are not started: the
command lines ``sockworker.workers.Workers`` would run are looked at."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pytest
from sockworker import cli, workers


class Recorded:
    argvs: ClassVar[list[list[str]]] = []

    def __init__(self, argvs: Sequence[Sequence[str]], shutdown_timeout: float) -> None:
        Recorded.argvs = [list(argv) for argv in argvs]

    def run(self) -> int:
        return 0


def ports_of(argvs: list[list[str]]) -> list[str]:
    return [argv[len(argv) - argv[::-1].index("--metrics-port")] for argv in argvs]


@pytest.mark.parametrize(
    ("given", "expected"), [("9100", ["9100", "9101", "9102"]), ("0", ["0"] * 3)]
)
def test_each_worker_gets_a_metrics_port_of_its_own(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: list[str]
) -> None:
    monkeypatch.setattr(workers, "Workers", Recorded)
    argv = ["serve", "tests.apps.observed:app", "--cluster", "postgresql://x@localhost/x"]
    assert cli.main([*argv, "--workers", "3", "--port", "8787", "--metrics-port", given]) == 0
    assert ports_of(Recorded.argvs) == expected
    for child in Recorded.argvs:
        assert child.count("--metrics-port") == 1
