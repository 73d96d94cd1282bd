"""One-paragraph errors for the command line instead of long tracebacks.

:func:`friendly_errors` wraps a CLI run: the errors a user can cause (a bad value, a missing
file, a wrong checkpoint, a Lightning misconfiguration) are printed to stderr as one paragraph
and end the process with exit code 2 (:data:`USAGE_EXIT_CODE`); a non-finite loss stopped by
:class:`~lit_divnorm.callbacks.NonFiniteDetector` exits with 3. Set the environment variable
``LIT_DIVNORM_TRACEBACK=1`` to get the full traceback instead. Anything else (a bug) keeps
Python's traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lit_divnorm.callbacks import NonFiniteError

USAGE_EXIT_CODE = 2
NON_FINITE_EXIT_CODE = 3
TRACEBACK_VARIABLE = "LIT_DIVNORM_TRACEBACK"
USER_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    MisconfigurationException,
)
MAX_MESSAGE_CHARS = 1500


def one_paragraph(error: BaseException) -> str:
    """``"<Type>: <message>"`` on one line (whitespace runs collapsed), at most ~1500 chars."""
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    text = re.sub(r"\s+", " ", message).strip() or "(no message)"
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}"


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn user errors raised inside the block into one stderr paragraph and ``SystemExit``."""
    if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
        yield
        return
    try:
        yield
    except NonFiniteError as error:
        _report(error, "training stopped", NON_FINITE_EXIT_CODE)
    except USER_ERRORS as error:
        _report(error, "error", USAGE_EXIT_CODE)


def _report(error: BaseException, label: str, code: int) -> None:
    print(
        f"lit-divnorm: {label}: {one_paragraph(error)} "
        f"(set {TRACEBACK_VARIABLE}=1 for the traceback)",
        file=sys.stderr,
    )
    raise SystemExit(code) from None
