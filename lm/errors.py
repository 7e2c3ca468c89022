"""One exception type for user-facing failures.

Entry points catch it and print its message as a single line with a non-zero exit, so a bad
path or an incompatible checkpoint never ends in a traceback or a half-written run directory.
"""


class UserError(Exception):
    """Bad input from the user (path, model, configuration); the message is shown verbatim."""
