"""What could not run here is said at the end of every session, not only in ``-ra``'s skip list.

A test that needs something this machine lacks (network for the timm sdist, a GPU) calls
``not_run(reason)``: the test is skipped, a "NOT RUN" section lists it in the terminal summary
whatever the flags, and the reasons are written to ``.cache/not_run.txt`` (rewritten each session).
"""
from pathlib import Path

import pytest

NOT_RUN_FILE = Path(__file__).resolve().parents[2] / ".cache" / "not_run.txt"
_key = pytest.StashKey[list]()


@pytest.fixture
def not_run(request):
    """``not_run(reason)``: record why this test could not run here, then skip it."""

    def skip(reason: str):
        request.config.stash.setdefault(_key, []).append(f"{request.node.nodeid}: {reason}")
        pytest.skip(f"NOT RUN: {reason}")

    return skip


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_key, [])
    if not lines:
        return
    terminalreporter.section("NOT RUN (could not run on this machine; not a pass)", sep="=", yellow=True, bold=True)
    for line in lines:
        terminalreporter.write_line(line)
    NOT_RUN_FILE.parent.mkdir(parents=True, exist_ok=True)
    NOT_RUN_FILE.write_text("\n".join(lines) + "\n")
    terminalreporter.write_line(f"(written to {NOT_RUN_FILE})")
