"""Packaging: a source distribution holds everything the extension build needs (``python -m build`` makes
the wheel from the sdist, not from the checkout)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_source_distribution_holds_every_csrc_file(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("csrc", "kernels", "rmae"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=source,
                   check=True, capture_output=True)
    (archive,) = (tmp_path / "dist").glob("rmae-*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    needed = {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".hpp", ".h")}
    assert needed <= shipped, f"missing from the sdist: {sorted(needed - shipped)}"
    assert "rmae/configs/default.yaml" in shipped
