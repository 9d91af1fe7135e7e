"""Logging and progress for jobs: a TTY progress bar or JSON lines, always redacted.

Contract
--------
- ``setup_logging(log_format, job_id=None)`` sends the ``musetalk_job`` logger to stderr,
  as JSON lines (``json``) or plain text (``text``; ``auto`` = text on a TTY, JSON
  otherwise). A ``RedactFilter`` removes query strings, URL user info and known secrets
  from every record.
- ``make_reporter(log_format, job_id)`` returns a ``Reporter``:
  ``stage(name)``, ``progress(stage, done, total)`` (usable as the engine's ``ProgressFn``),
  ``event(message, **fields)`` and ``close()``. On a TTY (``auto``) it draws a tqdm bar per
  named stage; otherwise it writes JSON lines ``{"ts", "level", "job_id", "stage", "done",
  "total", "elapsed_s", "msg"}`` to stderr, throttled to about one line per second per
  stage (first and last always written); ``text`` writes the same as plain lines. stdout is
  left for the result manifest.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import IO, Any, Optional

from .storage import redact_text

LOGGER_NAME = "musetalk_job"
JOB_STAGES = ("fetch", "probe", "load", "decode", "landmarks", "latents", "audio", "generate", "blend", "encode", "upload")


def resolve_format(log_format: str, stream: IO[str] | None = None) -> str:
    """``auto`` → ``tty`` when the stream is a terminal, else ``json``."""
    stream = stream or sys.stderr
    if log_format == "auto":
        return "tty" if _isatty(stream) else "json"
    return log_format


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class RedactFilter(logging.Filter):
    """Rewrites each record's message so no presigned query string or secret is emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not kill logging
            message = str(record.msg)
        record.msg = redact_text(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, job_id: Optional[str] = None) -> None:
        super().__init__()
        self.job_id = job_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or self.job_id
        if job_id:
            entry["job_id"] = job_id
        for key in ("stage", "done", "total", "elapsed_s"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return redact_text(json.dumps(entry, default=str))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def setup_logging(log_format: str = "auto", job_id: Optional[str] = None, stream: IO[str] | None = None) -> logging.Logger:
    """(Re)configure the package logger; idempotent."""
    stream = stream or sys.stderr
    fmt = resolve_format(log_format, stream)
    logger = logging.getLogger(LOGGER_NAME)
    root = logging.getLogger()
    for owner in (logger, root):
        for handler in list(owner.handlers):
            if getattr(handler, "_musetalk", False):
                owner.removeHandler(handler)
    for owner, level in ((logger, logging.NOTSET), (root, logging.WARNING)):
        # Third-party libraries (urllib3, botocore, fsspec) log through the root logger; their
        # warnings can carry URLs, so they get the same redacting handler.
        handler = logging.StreamHandler(stream)
        handler._musetalk = True  # type: ignore[attr-defined]
        handler.setLevel(level)
        handler.addFilter(RedactFilter())
        handler.setFormatter(JsonFormatter(job_id) if fmt == "json" else TextFormatter())
        owner.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class Reporter:
    """Stage progress for one job. Thread-safe; ``progress`` matches ``ProgressFn``."""

    def __init__(self, job_id: str, log_format: str = "auto", stream: IO[str] | None = None, interval_s: float = 1.0):
        self.job_id = job_id
        self.stream = stream or sys.stderr
        self.mode = resolve_format(log_format, self.stream)
        self.interval_s = interval_s
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stage: Optional[str] = None
        self._bar = None
        self._last_emit: dict[str, float] = {}

    # -- public ------------------------------------------------------------------------
    def stage(self, name: str) -> None:
        """Mark the start of a stage (no total known yet)."""
        self.progress(name, 0, 0)

    def progress(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            if self.mode == "tty":
                self._tty(stage, done, total)
                return
            now = time.monotonic()
            last = self._last_emit.get(stage)
            final = total > 0 and done >= total
            if last is not None and not final and now - last < self.interval_s:
                return
            self._last_emit[stage] = now
            self._stage = stage
            if self.mode == "text":
                elapsed = time.monotonic() - self.t0
                count = f"{done}/{total}" if total else "started"
                self._write(f"[{self.job_id}] {stage:<9} {count} ({elapsed:.1f} s)")
            else:
                self._emit("info", "progress", stage=stage, done=done, total=total)

    def event(self, message: str, level: str = "info", **fields: Any) -> None:
        with self._lock:
            if self.mode in ("tty", "text"):
                self._close_bar()
                self._write(f"[{self.job_id}] {message}" if self.mode == "text" else message)
                return
            self._emit(level, message, **fields)

    def close(self) -> None:
        with self._lock:
            self._close_bar()

    # Allow use as the engine's ProgressFn.
    def __call__(self, stage: str, done: int, total: int) -> None:
        self.progress(stage, done, total)

    # -- internals -----------------------------------------------------------------------
    def _write(self, text: str) -> None:
        try:
            self.stream.write(redact_text(text) + "\n")
            self.stream.flush()
        except ValueError:  # stream closed at interpreter exit
            pass

    def _emit(self, level: str, message: str, **fields: Any) -> None:
        entry = {
            "ts": round(time.time(), 3),
            "level": level,
            "job_id": self.job_id,
            "msg": message,
            "elapsed_s": round(time.monotonic() - self.t0, 3),
        }
        entry.update(fields)
        self._write(json.dumps(entry, default=str))

    def _tty(self, stage: str, done: int, total: int) -> None:
        import shutil

        from tqdm import tqdm

        if self._bar is None or self._stage != stage:
            self._close_bar()
            self._stage = stage
            # A pty without a size (e.g. under `script`, some CI runners) reports 0x0, and tqdm
            # then draws nothing: use the fallback size.
            size = shutil.get_terminal_size(fallback=(100, 24))
            self._bar = tqdm(
                total=total or None,
                desc=f"{stage:<9}",
                file=self.stream,
                leave=True,
                ncols=min(size.columns or 100, 120),
                nrows=size.lines or 24,
                unit="it",
            )
        bar = self._bar
        if total and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_reporter(log_format: str, job_id: str, stream: IO[str] | None = None) -> Reporter:
    return Reporter(job_id, log_format, stream)
