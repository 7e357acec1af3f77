"""Entry-point plumbing: every ``launch/`` script runs its ``main`` through :func:`run`.

Expected errors (the project's :class:`~vla_foundry_jax.errors.VLAFoundryError` classes, bad flags and missing or
unreadable files) print ``error: <message>`` on stderr and exit with status 2; ``VLA_FOUNDRY_TRACEBACK=1`` in the
environment shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from absl import app, flags

from vla_foundry_jax.errors import VLAFoundryError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
INTERRUPT_GRACE_S = 10.0
TRACEBACK_ENV = "VLA_FOUNDRY_TRACEBACK"
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def error_line(exc: BaseException) -> str:
    """The line (or short block) printed for an expected error, without gin's "In call to configurable" trail."""
    if isinstance(exc, FILE_ERRORS) and exc.filename is not None:
        return f"error: {exc.strerror or type(exc).__name__}: {exc.filename!r}"
    lines = [ln for ln in str(exc).splitlines() if not ln.strip().startswith("In call to configurable")]
    return "error: " + "\n".join(lines).rstrip()


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad or missing flag reported as ``error: ...`` and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as exc:
        print(f"error: {exc} (--helpshort lists the flags)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def fail(message: str) -> None:
    """Print ``error: message`` and exit 2 (for checks made in a launch script itself)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _interrupted(signum: int, frame: object) -> None:
    print("interrupted (Ctrl-C); exiting", file=sys.stderr, flush=True)
    # ``finally`` blocks run as SystemExit unwinds; then leave before interpreter teardown, which can crash while
    # XLA's compile threads are still running.
    atexit.register(os._exit, EXIT_INTERRUPTED)
    # The SystemExit may be swallowed where the signal lands: a gc callback or ``__del__`` reports it as
    # "unraisable" (exit at once, without its traceback), a library's bare ``except:`` eats it silently (exit a
    # few seconds later). Writes are atomic, so neither leaves anything half-written.
    if getattr(sys.unraisablehook, "func", None) is not _exit_if_interrupt_swallowed:
        sys.unraisablehook = functools.partial(_exit_if_interrupt_swallowed, sys.unraisablehook)
    timer = threading.Timer(INTERRUPT_GRACE_S, os._exit, [EXIT_INTERRUPTED])
    timer.daemon = True
    timer.start()
    raise SystemExit(EXIT_INTERRUPTED)


def _exit_if_interrupt_swallowed(previous_hook: Callable[[Any], None], unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, SystemExit) and unraisable.exc_value.code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    previous_hook(unraisable)


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """``main`` with expected errors turned into ``error: ...`` and exit status 2, and Ctrl-C (until a run installs
    its own handling) into status 130 and one line."""

    def wrapped(argv: list[str]) -> Any:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, _interrupted)
        try:
            return main(argv)
        except (VLAFoundryError, app.UsageError, *FILE_ERRORS) as exc:
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            print(error_line(exc), file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)

    return wrapped


def run(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run(main)`` with the project's error reporting (module docstring)."""
    app.run(guarded(main), flags_parser=parse_flags)
