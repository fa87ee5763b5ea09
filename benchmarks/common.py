"""What every benchmark prints about the machine it ran on (imported by the bench_*.py scripts)."""
from __future__ import annotations

import os
import platform
import time

from rmae.cores import usable_cores


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """CPU model, usable cores, OS and architecture, and the GPU when torch sees one."""
    description = f"{cpu_model()}, {usable_cores()} usable cores, {platform.system()} {platform.machine()}"
    try:
        import torch
    except ImportError:
        return description
    description += f", torch {torch.__version__}"
    if torch.cuda.is_available():
        description += f", {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return description


def round_robin(fns: list, calls: int, sync=None) -> list[list[float]]:
    """Seconds of each of ``calls`` calls of every function in ``fns``, called in turn (one call of each per round),
    so that the machine's drift and other jobs touch all of them alike; ``sync`` (a CUDA synchronize) runs before
    and after each call. Warm-ups are the caller's."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for fn, timed in zip(fns, times):
            if sync is not None:
                sync()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            timed.append(time.perf_counter() - start)
    return times


def provenance() -> dict:
    """When and from what a run's figures come: UTC time, the git commit (with "+changes" for a modified tree), the
    load average before the run, and the versions of the libraries the benchmarks compare against."""
    import datetime
    import subprocess
    from importlib import metadata
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + ("+changes" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    versions = {}
    for name in ("numpy", "scikit-image", "scipy", "pillow", "opencv-contrib-python", "triton"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "commit": commit,
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "versions": versions}


_AT_START = provenance()  # taken when a benchmark imports this module: the load average before its run


def provenance_line(info: dict) -> str:
    """``provenance()`` in words, for the table's header."""
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    return (f"{info['utc']} UTC, commit {info['commit']}, load average {info['load_average']} before the run; "
            f"{versions}")


def write_report(path, result: dict, table: str) -> None:
    """Writes ``path`` with suffixes .json (the figures, with ``provenance()`` from the script's start under "run")
    and .md (the table, with the provenance line first), creating the folder."""
    import json
    from pathlib import Path

    info = result.setdefault("run", _AT_START)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(f"Run: {provenance_line(info)}\n\n" + table.rstrip("\n") + "\n")


# The bundled photos the data and preprocessing benchmarks turn into 640×480 JPEGs (rmae's sample set names).
SAMPLE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "stereo_motorcycle:0"]


def photo_640x480(n: int):
    """The n-th bundled photo (cycling through SAMPLE_PHOTOS) as a 640×480 RGB PIL image (bicubic)."""
    from PIL import Image

    from rmae.data.sources import _load_sample_image

    rgb = _load_sample_image(SAMPLE_PHOTOS[n % len(SAMPLE_PHOTOS)])
    return Image.fromarray(rgb).resize((640, 480), Image.BICUBIC)
