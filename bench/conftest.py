"""Shared bench set-up: a place for suites to leave lines for the end-of-run summary."""
from __future__ import annotations

import pytest

_KEY = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def bench_report(pytestconfig) -> list[str]:
    """Append lines here; they are printed in the terminal summary, after pytest-benchmark's."""
    return pytestconfig.stash.setdefault(_KEY, [])


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(_KEY, [])
    if lines:
        terminalreporter.section("bench report")
        for line in lines:
            terminalreporter.write_line(line)
