"""User-facing errors: a mistake the user can fix, printed by the CLI as one or two lines.

Raise `UserError` (or a subclass) with a message that says what is wrong, why, and what to
do. The CLI prints `error: <message>` and exits with code 2; `--debug` shows the traceback.
Anything else that escapes a verb is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, configuration or environment (exit code 2)."""

    exit_code = 2
