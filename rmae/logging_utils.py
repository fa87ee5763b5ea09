"""Run logging: console lines, JSON lines (``log.jsonl``), TensorBoard when installed, a tqdm bar.

Only rank 0 writes. Every record is one JSON object per line with at least ``step`` and ``time``.
"""
from __future__ import annotations

import json
import logging
import math
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
                logger.warning("tensorboard requested but unavailable (%s); logging to log.jsonl only", e)

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


def progress_bar(total: int, initial: int, enabled: bool):
    """tqdm over optimizer steps (its postfix carries img/s and the loss terms), or a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1,
                        mininterval=1.0, file=sys.stderr)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    return _Null()
