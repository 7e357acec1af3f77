"""Command-line entry points: each module parses absl flags and makes one library call through ``cli.run``.

Ctrl-C while a command is still importing, parsing or building (before a training run installs its own SIGINT
handling, ``training/reliability.py``) exits with status 130 and one line instead of a traceback.
"""

import signal
import sys

EXIT_INTERRUPTED = 130


def _interrupted(signum: int, frame: object) -> None:
    print("interrupted (Ctrl-C); exiting", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)
