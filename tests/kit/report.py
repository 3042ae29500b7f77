"""The errors the tests measured, kept over a run and printed at its end.

Tests take the ``error_log`` fixture (``tests/conftest.py``) and ``record`` what they measured;
``pytest_terminal_summary`` there prints the log after the run, so the numbers show without ``-s``
and without tests whose only job is to print them.
"""

from __future__ import annotations


class ErrorLog:
    """The worst value recorded for each named measurement, in the order first recorded."""

    def __init__(self) -> None:
        self._worst: dict[str, tuple[float, str]] = {}

    def record(self, what: str, value: float, measure: str = "max relative error") -> float:
        """Keep ``value`` for ``what`` (the larger one if ``what`` was recorded before)."""
        old = self._worst.get(what)
        if old is None or value > old[0]:
            self._worst[what] = (value, measure)
        return value

    def lines(self) -> list[str]:
        """One line per measurement: ``what: measure value``."""
        return [f"{what}: {measure} {value:.2e}" for what, (value, measure) in self._worst.items()]
