"""rmae: fast, faithful R-MAE (Regions Meet Masked Autoencoders) pre-training."""

import os

__version__ = "0.1.0"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
