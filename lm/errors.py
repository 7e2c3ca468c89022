"""One exception type for user-facing failures.

Entry points (decorated with `cli`) turn it into its message on a single line and exit status 2, so a bad
path or an incompatible checkpoint never ends in a traceback or a half-written run directory.
"""

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (path, model, configuration); the message is shown verbatim."""


def cli(main: Callable[..., int]) -> Callable[..., int]:
    """Decorator for entry points: a UserError raised anywhere in `main` becomes one `error:` line
    on stderr and exit status 2, the same for every command of the toolkit."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped
