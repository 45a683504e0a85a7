"""One-line user errors: what was wrong and where it came from."""

import sys
from collections.abc import Callable
from functools import wraps


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing stored is touched."""


def exit_on_user_error(fn: Callable) -> Callable:
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
