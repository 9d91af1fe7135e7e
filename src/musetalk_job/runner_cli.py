"""``musetalk-job run``: one job in, one MP4 out.

Contract
--------
- Configuration: job fields from env vars < JSON job file (``--job``/``JOB_FILE``) < flags
  (see ``job.py`` and docs/job-spec.md); process settings from flags or ``MUSETALK_*`` env.
- stdout: exactly one line, the JSON result manifest (also on failure). stderr: logs /
  progress, and on failure one line ``error[<code>]: <message>``. Exit codes: errors.py.
- Signals: SIGTERM/SIGINT handlers are installed first thing. The job runs in a worker
  thread so the main thread always handles signals promptly: it sets the cancel token
  (the job stops at its next check, uploads nothing and cleans its workspace) and, if the
  job has not stopped after ``stop_grace_s`` (default 3 s; a second signal: at once), the
  main thread removes the workspace, prints the error line and manifest and ``os._exit``s
  with 143 (SIGTERM) / 130 (SIGINT).
- ``--on-finish exit|idle|stop-group`` (env ``MUSETALK_ON_FINISH``): ``exit`` returns the
  job's exit code; ``idle`` then waits for SIGTERM/SIGINT and exits with the job's code
  (for platforms that restart exited containers); ``stop-group`` calls
  ``musetalk_job.salad.api.stop_own_group()`` and then idles.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

from .errors import EXIT_SIGINT, EXIT_SIGTERM, Cancelled, JobError, SpecError

log = logging.getLogger(__name__)

EPILOG = """\
Job fields come from environment variables < a JSON job file (--job FILE or JOB_FILE) < flags.
Env names: VIDEO_URL, AUDIO_URL, OUTPUT_URL (or OUTPUT_PATH), JOB_ID, MUSETALK_<FIELD>.
URL forms: local path, file://, http(s):// (presigned), s3:// (AWS_ENDPOINT_URL for R2/MinIO),
gs://, az:// / abfs://. The last stdout line is the JSON result manifest.
Exit codes: 0 ok/skipped, 2 bad spec, 3 bad input, 4 transient I/O, 5 models, 6 runtime,
130 SIGINT, 143 SIGTERM. Full table: docs/job-spec.md.
"""


def register(subparsers: Any) -> None:
    from .job import SETTINGS_CHOICES, SETTINGS_SOURCES, add_job_arguments

    parser = subparsers.add_parser(
        "run",
        help="run one job: face video + speech in, lip-synced MP4 out",
        description="Run one MuseTalk lip-sync job and exit with its code (see docs/job-spec.md).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(parser)
    group = parser.add_argument_group("process settings (flag or env; not job fields)")
    for name, (env, flag, helptext) in SETTINGS_SOURCES.items():
        choices = SETTINGS_CHOICES.get(name)
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
        group.add_argument(flag, dest="setting_" + name, default=None, metavar=metavar, help=f"{helptext} [env {env}]")
    parser.set_defaults(func=main)


class _Signals:
    """Installs SIGTERM/SIGINT handlers that only record the signal.

    The handler takes no lock (setting an Event from a handler can deadlock when the main
    thread holds that Event's lock); the main loop turns the record into a cancel."""

    def __init__(self) -> None:
        self.first_at: Optional[float] = None
        self.signum: Optional[int] = None
        self.count = 0
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.signum = signum
        self.count += 1

    def forward(self, token: Any) -> bool:
        """Cancel ``token`` if a signal arrived; returns whether one did."""
        if self.signum is None:
            return False
        if not token.is_set():
            name = signal.Signals(self.signum).name
            token.cancel(EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM, name)
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _print_result(manifest: dict[str, Any], error: Optional[JobError]) -> None:
    from .runner import manifest_line
    from .storage import redact_text

    if error is not None:
        sys.stderr.write(redact_text(error.one_line()) + "\n")
        sys.stderr.flush()
    sys.stdout.write(manifest_line(manifest) + "\n")
    sys.stdout.flush()


def _fail(error: JobError, spec: Any = None) -> int:
    from .runner import failure_manifest

    _print_result(failure_manifest(error, spec), error)
    return error.exit_code


def _stop_group_function() -> Callable[[], Any]:
    try:
        from .salad import api
    except ImportError as exc:
        raise SpecError(
            f"--on-finish stop-group needs musetalk_job.salad.api, which cannot be imported ({exc}); "
            "use --on-finish exit or idle, or install the full package"
        ) from None
    fn = getattr(api, "stop_own_group", None)
    if fn is None:
        raise SpecError(
            "--on-finish stop-group needs musetalk_job.salad.api.stop_own_group, which this version lacks; "
            "use --on-finish exit or idle"
        )
    return fn


def main(args: argparse.Namespace) -> int:
    from .runner import CancelToken, background_loads_running

    signals = _Signals()
    token = CancelToken()
    try:
        code = _main(args, token, signals)
    finally:
        signals.restore()
    if background_loads_running():
        # The job ended before it needed the models (an input error, skip_existing) while they
        # were still loading in the background: leave now rather than have the interpreter shut
        # down around a thread inside torch/CUDA initialisation. Everything is reported already.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _signal_error(token: Any) -> Cancelled:
    return Cancelled(
        f"stopped by {token.reason or 'a signal'} before the job finished; nothing was uploaded",
        exit_code=token.exit_code,
    )


def _main(args: argparse.Namespace, token: Any, signals: _Signals) -> int:
    from .job import SETTINGS_SOURCES, job_flags_from_args, load_job, load_settings, unknown_env_warnings
    from .logs import setup_logging

    setting_flags = {name: getattr(args, "setting_" + name, None) for name in SETTINGS_SOURCES}
    try:
        settings = load_settings(os.environ, setting_flags)
    except SpecError as exc:
        setup_logging("auto")
        return _fail(exc)
    setup_logging(settings.log_format)
    for warning in unknown_env_warnings(os.environ):
        log.warning(warning)
    try:
        stop_group = _stop_group_function() if settings.on_finish == "stop-group" else None
    except SpecError as exc:
        return _fail(exc)
    try:
        loaded = load_job(env=os.environ, job_file=args.job, flags=job_flags_from_args(args))
    except SpecError as exc:
        return _after_job(_fail(exc), settings, stop_group, token, signals)
    spec = loaded.spec
    setup_logging(settings.log_format, spec.job_id)
    if signals.forward(token):
        return _fail(_signal_error(token), spec)
    exit_code = _run_in_thread(spec, settings, token, signals)
    return _after_job(exit_code, settings, stop_group, token, signals)


def _run_in_thread(spec: Any, settings: Any, token: Any, signals: _Signals) -> int:
    """Run the job in a worker thread so the main thread stays free for signals; print the
    result; return the exit code. Exits the process if the job ignores a stop request."""
    from . import storage
    from .logs import make_reporter
    from .runner import EngineCache, failure_manifest, remove_workdir, run_job

    reporter = make_reporter(settings.log_format, spec.job_id)
    engines = EngineCache(settings)
    engines.warm_early()  # the libraries the load imports come off the disk from now
    from .models import fastio

    if fastio.early_start_enabled():
        engines.start_loading(spec.version, fp16=spec.fp16)  # the models load while the inputs download
    holder: dict[str, Any] = {}

    def target() -> None:
        try:
            holder["outcome"] = run_job(spec, settings, engines=engines, reporter=reporter, cancel=token)
        except BaseException as exc:  # noqa: BLE001 - run_job should not raise; report if it does
            holder["exc"] = exc

    thread = threading.Thread(target=target, name=f"job-{spec.job_id}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if signals.forward(token) and thread.is_alive():
            overdue = time.monotonic() - (signals.first_at or 0.0) > settings.stop_grace_s
            if overdue or signals.count > 1:
                # The job is inside a long call (engine, socket read): clean up and leave now.
                storage.remove_partial_uploads()
                if not spec.keep_workdir:
                    remove_workdir(settings.workdir_for(spec.job_id))
                error = _signal_error(token)
                log.error("job %s did not stop within %.1f s; exiting now", spec.job_id, settings.stop_grace_s)
                _print_result(failure_manifest(error, spec), error)
                os._exit(error.exit_code)

    if "exc" in holder:
        from .errors import EngineRuntimeError

        log.error("internal error", exc_info=holder["exc"])
        return _fail(EngineRuntimeError(f"internal error: {type(holder['exc']).__name__}"), spec)
    outcome = holder["outcome"]
    _print_result(outcome.manifest, outcome.error)
    return outcome.exit_code


def _after_job(exit_code: int, settings: Any, stop_group: Optional[Callable[[], Any]], token: Any,
               signals: _Signals) -> int:
    """``--on-finish``: exit now, or (idle / stop-group) stay up until a signal so that a
    platform restarting exited containers does not run the job again."""
    if settings.on_finish == "exit" or signals.forward(token):
        return exit_code
    if stop_group is not None:
        try:
            log.info("on-finish stop-group: asking SaladCloud to stop this container group")
            stop_group()
        except Exception as exc:  # noqa: BLE001 - the job result is already out; keep idling
            log.error("on-finish stop-group failed: %s: %s; idling instead", type(exc).__name__, exc)
    log.info("on-finish %s: job done (exit %d); idling until SIGTERM/SIGINT", settings.on_finish, exit_code)
    while not signals.forward(token):
        time.sleep(0.2)
    return exit_code
