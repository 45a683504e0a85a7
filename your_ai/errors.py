"""One-line user errors: what was wrong and where it came from."""

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


def exit_on_user_error(fn: Callable) -> Callable:
    """A command: a UserError ends it with one line and status 2. Under Hydra its console is
    also written to the job's log, and a refused command leaves no run directory behind."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        job = joblog.current()
        with joblog.console_to_log(job):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
        joblog.remove_if_unused(job)
        sys.exit(2)

    return wrapper
