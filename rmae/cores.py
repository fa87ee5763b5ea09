"""How many cores this process may use, and how the user named the running command (a module of its own:
importable even where ``rmae`` resolves to a namespace package, e.g. from the folder that holds a clone named
``rmae``)."""
import os
import sys


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def command_name(entry_point: str, module: str) -> str:
    """How the user started this command, for its usage line: the entry point (``rmae-train``) when that is the
    program, else ``python -m <module>``."""
    called_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return entry_point if called_as == entry_point else f"python -m {module}"
