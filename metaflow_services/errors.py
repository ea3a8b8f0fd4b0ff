"""The project's one error type and its exit codes.

Every failure a user can act on is a ``ServicesError`` (or a subclass named
after where it comes from): *what* failed and *fix*, what to do. Commands print
it as one line and exit with its ``exit_code``; a traceback only with
--verbose. Subclasses set the exit code that fits the failure, so scripts can
tell bad input from a failed operation without parsing messages.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1        # an operation failed: a remote command, a build, a run, a check
    USAGE = 2         # bad input: an option, a flow file, an argument (nothing was changed)
    UNREACHABLE = 3   # a host or service could not be reached or refused the login
    INTERRUPTED = 130  # Ctrl-C (as shells report SIGINT)


class ServicesError(Exception):
    """A failure the user can act on: *what* failed and *fix*, what to do."""

    exit_code = ExitCode.FAILED

    def __init__(self, what, fix=""):
        super().__init__(what)
        self.what = what
        self.fix = fix

    def line(self):
        """The one line a command prints for it."""
        return "%s; what to do: %s" % (self.what, self.fix) if self.fix else str(self.what)
