"""Exit codes and the exceptions that carry them.

Contract (documented in the README; other tools rely on these numbers):

====  =====================================================================
code  meaning
====  =====================================================================
0     success, or skipped because the output already exists
2     invalid job spec or command-line usage
3     bad input media, permanent (unreadable, no stream, no face, over a limit,
      URL refused, 401/403/404 on an input)
4     transient I/O failure after retries (download, upload, network)
5     models missing or corrupt
6     runtime failure (GPU out of memory after fallback, CUDA error, internal error)
130   interrupted by SIGINT
143   terminated by SIGTERM
====  =====================================================================

Every failure is reported as one line ``error[<code>]: <message>`` on stderr; the
message names the field or file, what was wrong and what to do.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SPEC = 2
EXIT_INPUT = 3
EXIT_TRANSIENT = 4
EXIT_MODELS = 5
EXIT_RUNTIME = 6
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

RETRYABLE_CODES = frozenset({EXIT_TRANSIENT, EXIT_RUNTIME})


class JobError(Exception):
    """Base class: a failure with an exit code and a one-line, actionable message."""

    exit_code: int = EXIT_RUNTIME

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def retryable(self) -> bool:
        """Whether running the same job again may succeed."""
        return self.exit_code in RETRYABLE_CODES

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        return f"error[{self.exit_code}]: {text}"


class SpecError(JobError):
    """The job spec or the command line is invalid (exit 2)."""

    exit_code = EXIT_SPEC


class InputMediaError(JobError):
    """An input is permanently unusable: unreadable, missing stream, no face, over a limit (exit 3)."""

    exit_code = EXIT_INPUT


class TransientIOError(JobError):
    """Download/upload/network failed after retries; a retry later may succeed (exit 4)."""

    exit_code = EXIT_TRANSIENT


class ModelsError(JobError):
    """A model file is missing or corrupt (exit 5). The message names the file and the fix."""

    exit_code = EXIT_MODELS


class EngineRuntimeError(JobError):
    """GPU out of memory after fallback, CUDA error, or an internal error (exit 6)."""

    exit_code = EXIT_RUNTIME


class Cancelled(JobError):
    """The job was stopped by a signal (exit 130 for SIGINT, 143 for SIGTERM)."""

    exit_code = EXIT_SIGTERM
