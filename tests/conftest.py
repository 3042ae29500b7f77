"""The run's ``ErrorLog``: a fixture to record measured errors, and their report at the end."""

from __future__ import annotations

import pytest

from tests.kit import ErrorLog

ERROR_LOG = pytest.StashKey[ErrorLog]()


@pytest.fixture(scope="session")
def error_log(pytestconfig: pytest.Config) -> ErrorLog:
    """The ``ErrorLog`` of this run: tests record the errors they measured in it."""
    return pytestconfig.stash.setdefault(ERROR_LOG, ErrorLog())


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Print the recorded errors, if any test recorded one."""
    log = config.stash.get(ERROR_LOG, None)
    if log is None or not log.lines():
        return
    terminalreporter.section("measured errors")
    for line in log.lines():
        terminalreporter.write_line(line)
