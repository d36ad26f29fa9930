"""Errors a user can act on: the `apa` command line prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem outside the code (input, environment, database state).

    The message names the problem and what to do about it; `apa` prints it as
    `apa <command>: error: <message>` and exits with `exit_code`.
    """

    exit_code: int = 1
    """Process exit status: 2 for input the user must change, 1 for a state that must change."""
