"""How many cores this process may use (its own module: importable even where ``rmae`` resolves to a namespace
package, e.g. from the folder that holds a clone named ``rmae``)."""
import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
