"""Run logging: console lines, JSON lines (``log.jsonl``), TensorBoard when installed, a tqdm bar.

Only rank 0 writes. Every record is one JSON object per line with at least ``time``; the metric records and most
events also have ``step`` (events before the first update, such as ``start`` or ``config_warning``, have none).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("rmae.train")


class StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (a redirected or replaced stderr, not a closed earlier one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property always follows sys.stderr
        pass


def setup_console(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    if not logger.handlers:
        h = StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False


def _jsonable(v: Any):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Writes metrics to the console, ``log.jsonl`` and (optionally) TensorBoard; no-op off rank 0.

    ``purge_step``: a resumed run's first step; TensorBoard drops the events of that step and later ones that an
    earlier run wrote after its last checkpoint (``log.jsonl`` is trimmed by ``checkpoint.set_aside``)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, tb_dir: str | None = None,
                 purge_step: int | None = None):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "log.jsonl"
        self.jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(tb_dir or run_dir / "tensorboard"), purge_step=purge_step)
            except Exception as e:  # tensorboard not installed
                message = f"tensorboard requested but unavailable ({e}); logging to log.jsonl only"
                logger.warning(message)
                self.log({"event": "config_warning", "message": message}, console=False)

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **{k: _jsonable(v) for k, v in record.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        if self.tb is not None and "step" in rec and "event" not in rec:  # the metric records (an event's numbers
            for k, v in rec.items():  # are no curves: a skipped try's loss would be a second point of its step)
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        if console:
            logger.info(format_record(rec))

    def event(self, event: str, **kw) -> None:
        self.log({"event": event, **kw})

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def format_record(rec: dict) -> str:
    parts = []
    for k, v in rec.items():
        if k == "time":
            continue
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}" if abs(v) < 1e4 else f"{k}={v:.0f}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def progress_bar(total: int, initial: int, enabled: bool, desc: str | None = None, unit: str = "step",
                 every: float = 60.0):
    """Progress over ``total`` units with rate and ETA, on stderr: a tqdm bar on a terminal; where stderr is a file
    or pipe (CI, a slurm .out file) a plain line every ``every`` seconds and at the end instead of carriage-return
    frames; a silent stand-in when not ``enabled``. Each has ``update``, ``set_postfix``, ``close`` and works as
    a context manager."""
    if not enabled:
        return _Null()
    if not _is_terminal(sys.stderr):
        return PlainProgress(total, initial, desc, unit, every)
    from tqdm.auto import tqdm

    # a terminal that reports no width (some CI runners' and docker -t's pseudo-terminals): a fixed one
    width = shutil.get_terminal_size((0, 0)).columns
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=width > 0,
                ncols=None if width > 0 else 100, smoothing=0.1, mininterval=1.0, file=sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class _Null:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress(_Null):
    """Progress as whole lines (``desc: n/total (p%), rate unit/s, elapsed h:mm:ss, ETA h:mm:ss, postfix``), at most
    one per ``every`` seconds, and one at the end."""

    def __init__(self, total: int, initial: int, desc: str | None, unit: str, every: float):
        self.total, self.n, self.start_n = total, initial, initial
        self.desc, self.unit, self.every = desc, unit, every
        self.postfix: dict = {}
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def set_postfix(self, values=None, **kw):
        self.postfix = {**(values or {}), **kw}

    def close(self):
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}s ({100 * self.n / max(self.total, 1):.0f}%)",
                 f"{rate:.3g} {self.unit}/s", f"elapsed {_duration(elapsed)}"]
        if 0 < rate and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(f"{self.desc + ': ' if self.desc else ''}{', '.join(parts)}", file=sys.stderr, flush=True)
