"""``musetalk-job serve``: the HTTP app behind the SaladCloud Job Queue worker.

Contract (the worker binary ``salad-http-job-queue-worker`` POSTs each job's ``input`` to
this server on loopback and stores the response body as the job's output):

- ``POST /jobs`` (path configurable): body = one job in the runner's schema (``JobSpec``),
  header ``Salad-Job-Id`` (used as ``job_id`` when the body has none). One job at a time;
  the models are loaded once at start and stay loaded across jobs.
  * 200 ``{"status": "succeeded", "exit_code": 0, "job_id", "output", "skipped", "manifest"}``
  * 422 ``{"status": "failed", "exit_code": 2|3, "message", "error", "manifest"}`` for
    permanent failures (bad spec, bad media, no face, refused URL): the queue stores the
    body as the output and does not retry. 408/429 are never used for these.
  * 503 for a transient failure (exit 4), a job stopped by SIGTERM, a busy server (a
    second job while one runs) or a server not ready yet; 500 for a runtime or models
    failure (exit 5/6). The queue retries those on another attempt. Exception: exit 5 for
    a model version that is not preloaded (this fleet does not serve it) is 422.
  Bodies are JSON and kept far below the queue's 10 MB output limit.
- ``GET /health/startup`` 200 once the models are loaded and the node check passed;
  ``/health/ready`` 200 while the server can take jobs (also while one runs), 503 after a
  models failure or once stopping; ``/health/live`` 200 unless the models broke. Probes are
  answered from their own threads, within milliseconds while a job runs.
- URL policy: local paths and ``file://`` are refused unless under a directory allowed by
  ``--allow-dir`` / ``MUSETALK_ALLOWED_DIRS`` (``os.pathsep``-separated); http(s) URLs
  resolving to loopback, link-local or metadata addresses are refused. Binds 127.0.0.1 by
  default (``--host`` / ``MUSETALK_SERVE_HOST``, ``--port`` / ``MUSETALK_SERVE_PORT``).
- SaladCloud node checks (skipped outside SaladCloud): after loading, CUDA must work and
  ``--min-free-vram-gb`` must be free, else the server asks IMDS to reallocate the
  instance and exits 6; the deletion cost is raised while a job runs.
- SIGTERM/SIGINT: the running job is cancelled (nothing is uploaded; its request gets 503),
  then the process exits 143/130; after ``stop_grace_s`` it exits at once.
- Exit codes: 5 when the models cannot be loaded at start, 6 when the node is unfit,
  2 for bad settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from .errors import (
    EXIT_INPUT,
    EXIT_MODELS,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SPEC,
    EXIT_TRANSIENT,
    EngineRuntimeError,
    JobError,
    SpecError,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_PATH = "/jobs"
MAX_BODY_BYTES = 1 << 20  # a job spec is a few hundred bytes of URLs and knobs
MAX_RESPONSE_BYTES = 1 << 20  # the queue accepts 10 MB; stay far below
SERVE_ENV = {
    "host": "MUSETALK_SERVE_HOST",
    "port": "MUSETALK_SERVE_PORT",
    "path": "MUSETALK_SERVE_PATH",
    "allow_dir": "MUSETALK_ALLOWED_DIRS",
    "preload": "MUSETALK_SERVE_PRELOAD",
    "preload_landmarks": "MUSETALK_SERVE_LANDMARKS",
    "min_free_vram_gb": "MUSETALK_MIN_FREE_VRAM_GB",
}
# Read by docker/entrypoint.sh, not by Python.
ENTRYPOINT_ENV = frozenset({"MUSETALK_MODE", "MUSETALK_FETCH_WEIGHTS", "MUSETALK_QUEUE_WORKER"})
STATUS_FOR_EXIT = {
    EXIT_OK: 200,
    EXIT_SPEC: 422,
    EXIT_INPUT: 422,
    EXIT_TRANSIENT: 503,
    EXIT_MODELS: 500,
    EXIT_RUNTIME: 500,
    EXIT_SIGINT: 503,
    EXIT_SIGTERM: 503,
}


def register(subparsers: Any) -> None:
    from .job import SETTINGS_CHOICES, SETTINGS_SOURCES

    parser = subparsers.add_parser(
        "serve",
        help="HTTP worker for the SaladCloud Job Queue (models stay loaded across jobs)",
        description="Serve jobs over HTTP on loopback for the SaladCloud Job Queue worker (see docs/salad.md).",
    )
    parser.add_argument("--host", default=None, help=f"bind address (default {DEFAULT_HOST}) [env {SERVE_ENV['host']}]")
    parser.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT}) [env {SERVE_ENV['port']}]")
    parser.add_argument("--path", default=None, help=f"job path (default {DEFAULT_PATH}) [env {SERVE_ENV['path']}]")
    parser.add_argument("--allow-dir", action="append", default=None, metavar="DIR",
                        help=f"allow local paths / file:// under DIR (repeatable; default: none) [env {SERVE_ENV['allow_dir']}]")
    parser.add_argument("--preload", default=None, metavar="VERSIONS",
                        help=f"model versions loaded at start, comma-separated; '' loads on the first job (default v15) "
                        f"[env {SERVE_ENV['preload']}]")
    parser.add_argument("--preload-landmarks", default=None, metavar="{dwpose,cascade,none}",
                        help=f"landmark detector loaded at start (default dwpose) [env {SERVE_ENV['preload_landmarks']}]")
    parser.add_argument("--min-free-vram-gb", type=float, default=None,
                        help=f"VRAM that must be free after loading (default 2) [env {SERVE_ENV['min_free_vram_gb']}]")
    group = parser.add_argument_group("process settings (flag or env; see musetalk-job run --help)")
    for name, (env, flag, helptext) in SETTINGS_SOURCES.items():
        if name == "on_finish":
            continue
        choices = SETTINGS_CHOICES.get(name)
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
        group.add_argument(flag, dest="setting_" + name, default=None, metavar=metavar, help=f"{helptext} [env {env}]")
    parser.set_defaults(func=main)


# ---------------------------------------------------------------------------------------
# Options


class ServeOptions:
    """Server options from flags > env > defaults."""

    def __init__(self, args: argparse.Namespace, env: Any) -> None:
        def pick(name: str, default: Any) -> Any:
            value = getattr(args, name, None)
            if value is not None:
                return value
            raw = env.get(SERVE_ENV[name])
            return raw if raw not in (None, "") else default

        self.host: str = str(pick("host", DEFAULT_HOST))
        try:
            self.port = int(pick("port", DEFAULT_PORT))
            self.min_free_vram_gb = float(pick("min_free_vram_gb", 2.0))
        except ValueError as exc:
            raise SpecError(f"serve: {exc}; --port must be an integer and --min-free-vram-gb a number") from None
        if not 0 <= self.port <= 65535:
            raise SpecError(f"serve: port {self.port} is out of range 0-65535")
        self.path: str = "/" + str(pick("path", DEFAULT_PATH)).lstrip("/")
        dirs = pick("allow_dir", [])
        if isinstance(dirs, str):
            dirs = [d for d in dirs.split(os.pathsep) if d]
        self.allowed_dirs = [Path(d).expanduser().resolve() for d in dirs]
        self.preload = [v.strip() for v in str(pick("preload", "v15")).split(",") if v.strip()]
        bad = [v for v in self.preload if v not in ("v15", "v1")]
        if bad:
            raise SpecError(f"serve: --preload {','.join(bad)} is not a model version; use v15 and/or v1")
        self.landmarks = str(pick("preload_landmarks", "dwpose"))
        if self.landmarks not in ("dwpose", "cascade", "none"):
            raise SpecError(f"serve: --preload-landmarks {self.landmarks!r} must be dwpose, cascade or none")


# ---------------------------------------------------------------------------------------
# Server state


class WorkerState:
    def __init__(self, settings: Any, options: ServeOptions, imds: Any) -> None:
        from .runner import EngineCache

        self.settings = settings
        self.options = options
        self.imds = imds
        self.engines = EngineCache(settings)
        self.started = threading.Event()
        self.fatal: Optional[JobError] = None  # set when the start-up failed
        self.broken: Optional[str] = None  # models failed during a job: not ready any more
        self.stopping = False
        self.job_lock = threading.Lock()
        self.current_token: Any = None
        self.current_job: Optional[str] = None
        self.jobs_done = 0
        self.on_gpu = False  # the node check found a working CUDA device

    # -- start-up (runs in its own thread) ----------------------------------------------

    def start_up(self) -> None:
        from .salad import imds as imds_mod

        try:
            t0 = time.monotonic()
            for version in self.options.preload:
                engine = self.engines.get(version)
                if self.options.landmarks != "none" and hasattr(engine, "detector"):
                    engine.detector(self.options.landmarks)
                device = getattr(engine, "device", None)
                if getattr(device, "type", None) == "cuda" and hasattr(engine, "warmup"):
                    # First-use CUDA costs (kernel selection, allocator growth) are paid here,
                    # before the node reports ready, not by the first job.
                    seconds = engine.warmup()
                    log.info("warm-up: %.1f s (torch.compile %s, CUDA graphs %s)", seconds,
                             "on" if getattr(engine, "compiled", False) else "off",
                             "on" if getattr(engine, "cuda_graphs", False) else "off")
                    if hasattr(engine, "warmup_job"):
                        # and what only a whole job sets up (pools, pinned buffers, the encoder and
                        # muxer, the composite's kernels): the first job then runs as fast as the next
                        try:
                            log.info("warm-up job: %.1f s", engine.warmup_job())
                        except Exception as exc:  # noqa: BLE001 - an optimisation: serve without it
                            log.warning("warm-up job failed (%s: %s); the first job will pay its set-up",
                                        type(exc).__name__, exc)
            log.info("models loaded and warmed up in %.1f s (%s)", time.monotonic() - t0, ", ".join(self.options.preload))
            problem = imds_mod.check_gpu(self.settings.device, int(self.options.min_free_vram_gb * 2**30))
            if problem and (self.imds is not None or (self.settings.device or "").startswith("cuda")):
                if self.imds is not None:
                    log.error("node check failed (%s); asking SaladCloud to reallocate this instance", problem)
                    imds_mod.quietly(self.imds.reallocate, f"musetalk-job: {problem}")
                raise EngineRuntimeError(f"this node cannot run jobs: {problem}")
            if problem:
                log.warning("no usable GPU (%s); serving on %s", problem, self.settings.device or "cpu")
            self.on_gpu = problem is None and not (self.settings.device or "").startswith("cpu")
            if self.imds is not None:
                imds_mod.quietly(self.imds.set_deletion_cost, imds_mod.IDLE_DELETION_COST)
            self.started.set()
        except JobError as exc:
            self.fatal = exc
        except Exception as exc:  # noqa: BLE001 - report, exit with code 6
            self.fatal = EngineRuntimeError(f"start-up failed: {type(exc).__name__}: {exc}")

    def recheck_gpu(self) -> None:
        """After a runtime failure on a GPU node: if CUDA itself no longer works, stop taking
        jobs and ask SaladCloud to move this instance (a broken GPU would fail every job)."""
        from .salad import imds as imds_mod

        if not self.on_gpu:
            return
        problem = imds_mod.check_gpu(self.settings.device, 0)
        if problem:
            self.broken = problem
            log.error("GPU check after a failed job: %s; reporting not ready", problem)
            if self.imds is not None:
                imds_mod.quietly(self.imds.reallocate, f"musetalk-job: {problem}")

    @property
    def ready(self) -> bool:
        return self.started.is_set() and self.broken is None and not self.stopping

    # -- one job ------------------------------------------------------------------------

    def run(self, body: bytes, header_job_id: Optional[str]) -> tuple[int, dict[str, Any]]:
        """Run one job from a request body; returns (HTTP status, JSON body)."""
        from .job import JOB_ID_PATTERN, parse_job
        from .logs import make_reporter
        from .runner import CancelToken, run_job
        from .salad import imds as imds_mod

        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self.failure(SpecError(f"the job body is not valid JSON ({exc}); send one JSON object with the job fields"))
        if isinstance(data, dict) and "job_id" not in data and header_job_id:
            import re

            if re.fullmatch(JOB_ID_PATTERN, header_job_id):
                data = {**data, "job_id": header_job_id}
        try:
            spec = parse_job(data)
        except SpecError as exc:
            return self.failure(exc)
        token = CancelToken()
        self.current_token, self.current_job = token, spec.job_id
        if self.stopping:
            token.cancel(EXIT_SIGTERM, "SIGTERM")
        try:
            reporter = make_reporter(self.settings.log_format, spec.job_id)
            with imds_mod.busy(self.imds):
                outcome = run_job(spec, self.settings, engines=self.engines, reporter=reporter, cancel=token)
        finally:
            self.current_token, self.current_job = None, None
        self.jobs_done += 1
        if outcome.exit_code == EXIT_MODELS and self.options.preload and spec.version not in self.options.preload:
            # A version this fleet does not serve: the job's fault, not the node's. Answer 422 so the
            # queue does not retry it on (and break) other nodes.
            assert outcome.error is not None
            status, payload = self.failure(outcome.error, outcome.manifest)
            payload.update(status="failed", retryable=False, message=payload["message"] + (
                f" (this worker serves model version(s) {', '.join(self.options.preload)}; "
                f"send version {spec.version} jobs to a fleet started with --preload {spec.version})"))
            return 422, payload
        if outcome.exit_code == EXIT_MODELS:
            self.broken = outcome.error.message if outcome.error else "models failed"
            log.error("models failed during job %s; this server reports not ready from now on", spec.job_id)
        elif outcome.exit_code == EXIT_RUNTIME:
            self.recheck_gpu()
        if outcome.error is not None:
            return self.failure(outcome.error, outcome.manifest)
        manifest = outcome.manifest
        return 200, {
            "status": "succeeded",
            "exit_code": EXIT_OK,
            "job_id": spec.job_id,
            "output": manifest.get("output"),
            "skipped": manifest.get("status") == "skipped",
            "manifest": manifest,
        }

    def failure(self, error: JobError, manifest: Optional[dict[str, Any]] = None) -> tuple[int, dict[str, Any]]:
        from .runner import failure_manifest
        from .storage import redact_text

        manifest = manifest if manifest is not None else failure_manifest(error)
        status = STATUS_FOR_EXIT.get(error.exit_code, 500)
        return status, {
            "status": "failed" if status == 422 else "error",
            "exit_code": error.exit_code,
            "job_id": manifest.get("job_id"),
            "message": redact_text(error.one_line()),
            "retryable": status != 422,
            "error": manifest.get("error"),
            "manifest": manifest,
        }


def encode_body(body: dict[str, Any]) -> bytes:
    """JSON bytes, redacted, trimmed to stay under ``MAX_RESPONSE_BYTES``."""
    from .storage import redact_text

    data = redact_text(json.dumps(body, separators=(",", ":"))).encode()
    if len(data) > MAX_RESPONSE_BYTES and "manifest" in body:
        slim = dict(body)
        slim["manifest"] = {k: v for k, v in body["manifest"].items() if k not in ("media",)}
        data = redact_text(json.dumps(slim, separators=(",", ":"))).encode()
        if len(data) > MAX_RESPONSE_BYTES:
            slim.pop("manifest")
            data = redact_text(json.dumps(slim, separators=(",", ":"))).encode()
    return data


def make_handler(state: WorkerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "musetalk-job"
        sys_version = ""

        def log_message(self, fmt: str, *args: Any) -> None:  # no access log: paths carry nothing useful
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = encode_body(body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:  # the caller went away (worker stopped); nothing to do
                self.close_connection = True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health/startup":
                ok = state.started.is_set()
                self._send(200 if ok else 503, {"started": ok, "loading": state.fatal is None and not ok})
            elif path == "/health/ready":
                ok = state.ready
                self._send(200 if ok else 503, {"ready": ok, "busy": state.current_job is not None,
                                               "broken": state.broken is not None, "stopping": state.stopping})
            elif path == "/health/live":
                ok = state.broken is None
                self._send(200 if ok else 503, {"live": ok, "jobs_done": state.jobs_done})
            else:
                self._send(404, {"status": "error", "message": f"no route GET {path}"})

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            length = int(self.headers.get("Content-Length") or 0)
            if path != state.options.path:
                self._drain(length)
                return self._send(404, {"status": "error", "message": f"no route POST {path}; jobs go to {state.options.path}"})
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                status, body = state.failure(SpecError(f"the job body is {length} bytes; a job spec is at most {MAX_BODY_BYTES}"))
                return self._send(status, body)
            body = self.rfile.read(length) if length else b""
            if not state.ready:
                why = "stopping" if state.stopping else "models failed" if state.broken else "models are still loading"
                return self._send(503, {"status": "error", "message": f"not ready ({why}); retry later", "retryable": True})
            if not state.job_lock.acquire(blocking=False):
                return self._send(503, {"status": "error", "retryable": True,
                                        "message": f"busy with job {state.current_job}; one job at a time"})
            try:
                status, payload = state.run(body, self.headers.get("Salad-Job-Id"))
            except Exception as exc:  # noqa: BLE001 - run_job does not raise; be safe anyway
                log.exception("internal error while serving a job")
                status, payload = state.failure(EngineRuntimeError(f"internal error: {type(exc).__name__}"))
            finally:
                state.job_lock.release()
            self._send(status, payload)

        def _drain(self, length: int) -> None:
            if 0 < length <= MAX_BODY_BYTES:
                self.rfile.read(length)
            elif length:
                self.close_connection = True

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error from %s", client_address, exc_info=True)


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    if ":" in host:
        import socket

        class _Server6(_Server):
            address_family = socket.AF_INET6

        return _Server6
    return _Server


# ---------------------------------------------------------------------------------------
# Entry point


def main(args: argparse.Namespace) -> int:
    from .job import SETTINGS_SOURCES, load_settings, unknown_env_warnings
    from .logs import setup_logging
    from .salad.imds import Imds

    # Signals first: only record them; the main loop acts.
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        flags = {name: getattr(args, "setting_" + name, None) for name in SETTINGS_SOURCES if name != "on_finish"}
        try:
            settings = load_settings(os.environ, flags)
            options = ServeOptions(args, os.environ)
        except SpecError as exc:
            setup_logging("auto")
            sys.stderr.write(exc.one_line() + "\n")
            return exc.exit_code
        settings.allowed_local_dirs = list(options.allowed_dirs)
        settings.refuse_private_addresses = True
        setup_logging(settings.log_format)
        for warning in unknown_env_warnings(os.environ):
            if not any(f" {name} " in warning for name in (*SERVE_ENV.values(), *ENTRYPOINT_ENV)):
                log.warning(warning)
        state = WorkerState(settings, options, Imds.detect())
        if options.preload:
            state.engines.warm_early()  # before anything imports torch
        try:
            server = _server_class(options.host)((options.host, options.port), make_handler(state))
        except OSError as exc:
            err = SpecError(f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}; choose another --port")
            sys.stderr.write(err.one_line() + "\n")
            return err.exit_code
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        log.info("serving on http://%s:%d (jobs: POST %s)", options.host, port, options.path)
        sys.stderr.write(json.dumps({"event": "listening", "host": options.host, "port": port}) + "\n")
        sys.stderr.flush()
        loader = threading.Thread(target=state.start_up, name="load", daemon=True)
        loader.start()
        return _wait(state, server, received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(state: WorkerState, server: ThreadingHTTPServer, received: list[int]) -> int:
    announced = False
    while True:
        time.sleep(0.05)
        if state.fatal is not None:
            sys.stderr.write(state.fatal.one_line() + "\n")
            sys.stderr.flush()
            server.shutdown()
            return state.fatal.exit_code
        if state.started.is_set() and not announced:
            announced = True
            log.info("ready for jobs")
        if received:
            return _stop(state, server, received[0])


def _stop(state: WorkerState, server: ThreadingHTTPServer, signum: int) -> int:
    """Cancel the running job, give it ``stop_grace_s`` to clean up and answer, then exit."""
    from . import storage
    from .runner import remove_workdir

    code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
    name = signal.Signals(signum).name
    state.stopping = True
    token, job_id = state.current_token, state.current_job
    if token is not None:
        log.info("%s: cancelling job %s", name, job_id)
        token.cancel(code, name)
    deadline = time.monotonic() + state.settings.stop_grace_s
    while time.monotonic() < deadline:
        if state.job_lock.acquire(timeout=0.05):
            state.job_lock.release()
            time.sleep(0.1)  # let the handler write the 503 answer
            server.shutdown()
            return code
    log.error("job %s did not stop within %.1f s; exiting now", job_id, state.settings.stop_grace_s)
    storage.remove_partial_uploads()
    if job_id:
        remove_workdir(state.settings.workdir_for(job_id))
    sys.stderr.flush()
    os._exit(code)
