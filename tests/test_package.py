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


def test_entry_points_are_the_quiet_loaders():
    """pyproject's console scripts start through rmae.cli, which makes a Ctrl-C while torch loads quiet."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli
        import tomli as tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rmae-train": "rmae.cli:train", "rmae-preprocess": "rmae.cli:preprocess",
                       "rmae-export": "rmae.cli:export"}


def test_ctrl_c_while_a_command_loads_is_one_line_and_status_130():
    """Importing torch takes seconds; a Ctrl-C then printed a traceback from inside it. Through ``python -m`` and
    through the console scripts' rmae.cli, it is one line and exit status 130; main() gets Python's usual
    KeyboardInterrupt back (its own handling)."""
    import signal
    import time

    from rmae import cli

    for args in (["-m", "rmae.train", "--print-config"], ["-m", "rmae.export", "--help"],
                 ["-c", "import sys; from rmae.cli import train; sys.exit(train())", "--print-config"]):
        process = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        time.sleep(0.5)  # python has started (tens of ms), torch is still loading (seconds)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130 and err.strip() == cli.LOADING_INTERRUPTED.strip(), (args, err)
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        cli.quiet_ctrl_c_while_loading()
        assert signal.getsignal(signal.SIGINT) is cli._exit_quietly
        cli.ctrl_c_as_usual()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored (a background job): left ignored
        cli.quiet_ctrl_c_while_loading()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
