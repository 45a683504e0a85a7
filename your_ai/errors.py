"""One-line user errors: what was wrong and where it came from."""

import signal
import sys
from collections.abc import Callable
from functools import wraps

from your_ai import joblog


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing stored is touched."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line, or its type where it has none: what a
    one-line error quotes of a library's exception."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def terminate(signum, frame) -> None:
    """SIGTERM as Ctrl-C: a command ends through its cleanup (a trial is given back)."""
    raise SystemExit(128 + signum)


# The exit status of a command stopped by Ctrl-C: the shell's own for a process that SIGINT ended.
INTERRUPTED_STATUS = 128 + signal.SIGINT


def exit_on_user_error(fn: Callable) -> Callable:
    """A command: a UserError ends it with one line and status 2, Ctrl-C with one line and
    INTERRUPTED_STATUS once the command's own cleanup has run (a sweep gives its trial back);
    Python would print a traceback. Under Hydra its console is also written to the job's log,
    and a refused command leaves no run directory behind."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        job = joblog.current()
        with joblog.console_to_log(job):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                sys.exit(INTERRUPTED_STATUS)
        joblog.remove_if_unused(job)
        sys.exit(2)

    return wrapper
