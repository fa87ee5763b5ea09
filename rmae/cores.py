"""How many cores this process may use, and how the user named the running command (a module of its own:
importable even where ``rmae`` resolves to a namespace package, e.g. from the folder that holds a clone named
``rmae``)."""
import os
import sys
import time


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


def _cpu_times(cpus: set[int] | None) -> tuple[int, int]:
    """(busy, total) jiffies since boot of the CPUs ``cpus`` (None: all), from /proc/stat (Linux)."""
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
                continue
            fields = [int(v) for v in values]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            busy, total = busy + sum(fields) - idle, total + sum(fields)
    return busy, total


def busy_cores(sample_s: float = 0.3) -> float | None:
    """How many of this process's cores (its CPU affinity) other processes keep busy: the busy share of those
    CPUs over ``sample_s`` seconds (while this process sleeps) and, when the process may use every CPU, the
    1-minute load average, the smaller of the two, so that neither a job that just ended (the average lags) nor
    a moment's pause counts; None where neither can be read."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    readings = []
    if cpus is None or len(cpus) >= (os.cpu_count() or 1):  # (the load average counts the whole host)
        try:
            readings.append(os.getloadavg()[0])
        except (AttributeError, OSError):
            pass
    try:
        busy0, total0 = _cpu_times(cpus)
        time.sleep(sample_s)
        busy1, total1 = _cpu_times(cpus)
        if total1 > total0:
            readings.append((busy1 - busy0) / (total1 - total0) * usable_cores())
    except (OSError, ValueError, IndexError):
        pass
    return min(readings) if readings else None


def threads_beside_other_jobs(threads: int) -> tuple[int, str | None]:
    """Torch threads for a CPU run that has ``threads``, given the cores other processes keep busy
    (``busy_cores``, taken before the run starts): threads that must share a core with another job wait on
    each other at every parallel op (a demo step took 9 s on 2 threads beside one busy job, 0.5 s on 1). Returns
    the count and a note when it is lower, else (threads, None)."""
    busy = busy_cores()
    if busy is None:
        return threads, None
    cores = usable_cores()
    idle = max(1, min(threads, round(cores - busy)))
    if idle >= threads:
        return threads, None
    return idle, (f"note: other jobs keep about {busy:.1f} of this process's {cores} cores busy: training on "
                  f"{idle} torch thread{'s' if idle > 1 else ''} instead of {threads} (OMP_NUM_THREADS=N sets "
                  f"the count)")


def command_name(entry_point: str, module: str) -> str:
    """How the user started this command, for its usage line: the entry point (``rmae-train``) when that is the
    program, else ``python -m <module>``."""
    called_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return entry_point if called_as == entry_point else f"python -m {module}"
