"""Shared bench set-up: a place for suites to leave lines for the end-of-run summary."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels can only run in the interpreter on CPU; set before any kernel is built.
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
