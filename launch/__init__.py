"""Command-line entry points: each module parses absl flags and makes one library call through ``cli.run``.

Ctrl-C while a command is still importing (nothing written yet) exits at once with status 130 and one line: some
libraries' import-time ``except:`` clauses would swallow an exception raised there. Once ``main`` runs,
``cli.run`` switches to an exception (so ``finally`` blocks clean up), and a training run installs its own handling
(``training/reliability.py``).

Importing ``vla_foundry_jax`` sets the host allocator to keep freed memory for reuse on the CPU backend
(``vla_foundry_jax.host_memory``); a bad ``VLA_FOUNDRY_KEEP_HOST_MEMORY`` is one error line here.
"""

import os
import signal
import sys
import warnings

EXIT_INTERRUPTED = 130


def _interrupted_while_starting(signum: int, frame: object) -> None:
    print("interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

warnings.filterwarnings("ignore", message="VLA_FOUNDRY_KEEP_HOST_MEMORY")  # reported below as one error line

from vla_foundry_jax import host_memory  # noqa: E402  (after the handler: the package import takes seconds)

try:
    host_memory.setting()  # the package import applied it, or warned about a bad value
except ValueError as exc:  # UsageError
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)
