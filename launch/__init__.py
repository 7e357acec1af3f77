"""Command-line entry points: each module parses absl flags and makes one library call through ``cli.run``.

Ctrl-C while a command is still importing (nothing written yet) exits at once with status 130 and one line: some
libraries' import-time ``except:`` clauses would swallow an exception raised there. Once ``main`` runs,
``cli.run`` switches to an exception (so ``finally`` blocks clean up), and a training run installs its own handling
(``training/reliability.py``).
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def _interrupted_while_starting(signum: int, frame: object) -> None:
    print("interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
