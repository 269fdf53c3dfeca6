"""One base for every error a user can cause (docs/architecture.md, "Errors").

A :class:`RetinaError` carries a one-line message that names the input at fault and, where there is one, the fix.
Library code raises it (never ``SystemExit``, never ``print``); every console script runs under
:func:`retina_io.cli.console_main`, which turns it into ``PROG: error: MESSAGE`` on stderr and exit code 2, with no
traceback. Each stage keeps its own subclass so that callers can catch one stage's errors, and so that a message
says which stage refused.
"""

from __future__ import annotations


class RetinaError(Exception):
    """A user error: bad paths, bad labels, bad options, a run or dataset that does not fit the request."""

    exit_code = 2

    def one_line(self) -> str:
        """The message on one line (a multi-line message would read as several errors in a log)."""
        return " ".join(str(self).split()) or type(self).__name__


def check_rules(rules: list[tuple[bool, str]], error: type[RetinaError] = RetinaError) -> None:
    """Raise ``error`` with the message of the first ``(holds, message)`` rule that does not hold: how a stage refuses
    an option out of its range before it writes anything."""
    for holds, message in rules:
        if not holds:
            raise error(message)


def at_least(flag: str, value, minimum) -> tuple[bool, str]:
    """The rule "option ``flag`` is unset (None) or at least ``minimum``" (NaN fails)."""
    return value is None or value >= minimum, f"{flag} must be >= {minimum}; got {value}"
