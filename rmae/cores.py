"""How many cores this process may use, and how the user named the running command (a module of its own:
importable even where ``rmae`` resolves to a namespace package, e.g. from the folder that holds a clone named
``rmae``)."""
import os
import sys


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_per_rank() -> int:
    """This rank's share of the cores: the usable ones over the ranks of its node when a launcher says how many
    (torchrun and the trainer's own spawn: LOCAL_WORLD_SIZE; ranks that share one affinity), else at most
    Slurm's cores per task."""
    cores = usable_cores()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 0)
    if local_ranks > 1:
        return max(1, cores // local_ranks)
    per_task = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)
    return min(cores, per_task) if per_task > 0 else cores


def command_name(entry_point: str, module: str) -> str:
    """How the user started this command, for its usage line: the entry point (``rmae-train``) when that is the
    program, else ``python -m <module>``."""
    called_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return entry_point if called_as == entry_point else f"python -m {module}"
