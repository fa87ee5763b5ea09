"""Console entry points (``rmae-train``, ``rmae-preprocess``, ``rmae-export``), and a quiet Ctrl-C while a
command loads its libraries: importing torch takes seconds, and a Ctrl-C then printed a traceback from inside
it. From the start until the command's ``main`` runs, a Ctrl-C exits with status 130 and one line."""
from __future__ import annotations

import importlib
import os
import signal
import sys

LOADING_INTERRUPTED = "\ninterrupted while loading; nothing was written"


def _exit_quietly(signum, frame):
    # at once: an exception raised inside a C extension's initialisation (torch's) can abort the interpreter,
    # and nothing has been written that would need cleaning up
    print(LOADING_INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)


def quiet_ctrl_c_while_loading() -> None:
    """Until ``ctrl_c_as_usual``: a Ctrl-C exits with status 130 and one line (not where SIGINT is ignored)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_quietly)


def ctrl_c_as_usual() -> None:
    """Python's KeyboardInterrupt again (the commands handle it from their ``main`` on)."""
    if signal.getsignal(signal.SIGINT) is _exit_quietly:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(module: str, entry: str = "main") -> int:
    quiet_ctrl_c_while_loading()
    main = getattr(importlib.import_module(module), entry)
    ctrl_c_as_usual()
    return main()


def train() -> int:
    return _run("rmae.train", "command")


def preprocess() -> int:
    return _run("rmae.preprocess", "command")


def export() -> int:
    return _run("rmae.export")
