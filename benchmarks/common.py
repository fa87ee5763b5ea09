"""What every benchmark prints about the machine it ran on (imported by the bench_*.py scripts)."""
from __future__ import annotations

import platform

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


def write_report(path, result: dict, table: str) -> None:
    """Writes ``path`` with suffixes .json (the figures) and .md (the table), creating the folder."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(table.rstrip("\n") + "\n")


# The bundled photos the data and preprocessing benchmarks turn into 640×480 JPEGs (rmae's sample set names).
SAMPLE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "stereo_motorcycle:0"]


def photo_640x480(n: int):
    """The n-th bundled photo (cycling through SAMPLE_PHOTOS) as a 640×480 RGB PIL image (bicubic)."""
    from PIL import Image

    from rmae.data.sources import _load_sample_image

    rgb = _load_sample_image(SAMPLE_PHOTOS[n % len(SAMPLE_PHOTOS)])
    return Image.fromarray(rgb).resize((640, 480), Image.BICUBIC)
