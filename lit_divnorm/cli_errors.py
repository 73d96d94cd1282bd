"""One-paragraph errors for the command line instead of long tracebacks.

:func:`friendly_errors` wraps a CLI run: the errors a user can cause (a bad value, a missing
file, a wrong checkpoint, a Lightning misconfiguration) are printed to stderr as one paragraph
and end the process with exit code 2 (:data:`USAGE_EXIT_CODE`), and so do command-line
parsing errors (``DivNormCLI`` makes jsonargparse raise them instead of printing its 60-line
usage); a non-finite loss stopped by :class:`~lit_divnorm.callbacks.NonFiniteDetector` exits
with 3, and a run stopped by SIGTERM (which Lightning ends with exit code 0) with 143. Set
the environment variable ``LIT_DIVNORM_TRACEBACK=1`` to get the full traceback instead.
Anything else (a bug) keeps Python's traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_divnorm.callbacks import NonFiniteError
from lit_divnorm.stopping import RunStopped

USAGE_EXIT_CODE = 2
NON_FINITE_EXIT_CODE = 3
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
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


UNION_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
)


def root_cause(error: BaseException) -> BaseException:
    """The innermost user error in ``error``'s ``__cause__`` chain (jsonargparse wraps the
    ``ValueError`` a class raised while being instantiated in its own ``ValueError``)."""
    seen = {id(error)}
    while isinstance(error.__cause__, (*USER_ERRORS, NonFiniteError)) and (
        id(error.__cause__) not in seen
    ):
        error = error.__cause__
        seen.add(id(error))
    return error


def simplify_parser_message(message: str) -> str:
    """Drop jsonargparse's Union bookkeeping (subtypes, the ``None`` alternative, the given
    value) and keep what was wrong, e.g. ``Parser key "model": Problem with given class_path
    '...': Option 'nrom' is not accepted``."""
    kept = []
    for line in message.splitlines():
        text = line.strip()
        if not text or text.startswith(UNION_NOISE):
            continue
        kept.append(text[2:] if text.startswith("- ") else text)
    return " ".join(kept)


def one_paragraph(error: BaseException) -> str:
    """``"<Type>: <message>"`` on one line (whitespace runs collapsed), at most ~1500 chars."""
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    text = re.sub(r"\s+", " ", simplify_parser_message(message)).strip() or "(no message)"
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    if isinstance(error, argparse.ArgumentError):
        return f"{text} (the accepted options: --help)"
    return f"{type(error).__name__}: {text}"


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn user errors raised inside the block into one stderr paragraph and ``SystemExit``."""
    if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
        yield
        return
    try:
        yield
    except RunStopped as stopped:  # last.ckpt at the step it stopped, the run STOPPED
        print(f"lit-divnorm: {stopped}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
    except SIGTERMException:  # Lightning stops at the next batch and raises SystemExit(None)
        print(
            "lit-divnorm: stopped: received SIGTERM; training ended at a batch boundary. "
            "Run the same command with --ckpt_path last to continue from the last checkpoint.",
            file=sys.stderr,
        )
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    except NonFiniteError as error:
        _report(error, "training stopped", NON_FINITE_EXIT_CODE)
    except argparse.ArgumentError as error:
        _report(error, "error", USAGE_EXIT_CODE)
    except USER_ERRORS as error:
        cause = root_cause(error)
        code = NON_FINITE_EXIT_CODE if isinstance(cause, NonFiniteError) else USAGE_EXIT_CODE
        _report(cause, "training stopped" if code == NON_FINITE_EXIT_CODE else "error", code)


def _report(error: BaseException, label: str, code: int) -> None:
    hint = (
        ""
        if isinstance(error, argparse.ArgumentError)
        else f" (set {TRACEBACK_VARIABLE}=1 for the traceback)"
    )
    print(f"lit-divnorm: {label}: {one_paragraph(error)}{hint}", file=sys.stderr)
    raise SystemExit(code) from None
