"""What counts as the user's mistake, and the exit codes: one place for every command and rank.

    try: ...
    except Exception as e:
        code = exit_code(e)          # EXIT_USER (2) for our own checks' errors, EXIT_BUG (1) otherwise

Only errors our own code raises are the user's: a `ValueError`/`OSError` raised in a `launcher` frame (a check
that names the key, file or row), or a `UserError` (a check that wraps a third party's detail). The same
`ValueError` raised inside transformers or DeepSpeed is not the user's mistake (the user chose nothing there):
it is reported as an internal error, with its traceback.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_BUG = 1  # an internal error: the traceback is the useful part
EXIT_USER = 2  # a user's mistake, named on one line: a retry would fail again
EXIT_PREEMPTED = 75  # stopped on a signal with a checkpoint saved (EX_TEMPFAIL): requeue
EXIT_INTERRUPTED = 130  # Ctrl-C before any rank trained

PACKAGE = Path(__file__).resolve().parent


class UserError(ValueError):
    """A user's mistake whose message is the whole story (one line, no traceback)."""


def raised_by_us(e: BaseException) -> bool:
    """Whether the innermost frame of `e`'s traceback is in this package."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, UserError) or (isinstance(e, (ValueError, OSError)) and raised_by_us(e))


def exit_code(e: BaseException) -> int:
    return EXIT_USER if is_user_error(e) else EXIT_BUG
