"""One exception type for user-facing failures.

Entry points (decorated with `cli`) turn it into its message on a single line and exit status 2, so a bad
path or an incompatible checkpoint never ends in a traceback or a half-written run directory.
"""

import errno
import functools
import signal
import sys
import threading
from typing import Callable


class UserError(Exception):
    """Bad input from the user (path, model, configuration); the message is shown verbatim."""


def out_of_space(e: BaseException) -> bool:
    """A full disk, whether it surfaced as an OSError or as a library's own error (safetensors
    raises SafetensorError with the OS message inside)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def cli(main: Callable[..., int]) -> Callable[..., int]:
    """Decorator for entry points: a UserError raised anywhere in `main` becomes one `error:` line
    on stderr and exit status 2, the same for every command of the toolkit. So does a full disk:
    a 7B checkpoint is 14-28 GB, and the atomic writes have already removed their partial files.
    Ctrl-C and SIGTERM end it with one line saying how many stages are done (lm.progress) and exit
    130 / 143, no traceback."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            # SIGTERM (a scheduler's stop, `kill`, a CI timeout) would otherwise end the process without
            # unwinding, leaving the temporary directories of atomic writes behind.
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, Terminated) as e:  # the atomic writes have removed their temporaries while unwinding
            print(stopped_line(), file=sys.stderr)
            return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)
        except Exception as e:
            if not out_of_space(e):
                raise
            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            print(
                f"error: no space left on device{where}; finished stages are kept, so free some space "
                "(or pick another --runs-dir/--out) and rerun",
                file=sys.stderr,
            )
            return 2
        finally:
            from .progress import take_stopped

            take_stopped()  # a job that ended by an error is not reported by the next one's stop
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapped


class Terminated(BaseException):
    """SIGTERM, raised where the job is so that it unwinds like Ctrl-C (a BaseException, so no
    `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _exit_on_sigterm(signum, frame):
    raise Terminated(signum)


def stopped_line() -> str:
    """The one line an interrupted job leaves: how far it got, and that a rerun continues."""
    from .progress import take_stopped

    job = take_stopped()
    if job is None:
        return "stopped; finished stages are kept, so the same command continues where it stopped"
    return job.stopped_line()
