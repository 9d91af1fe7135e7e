"""Run one job: fetch → probe → engine → upload, with a manifest and an exit code.

Contract
--------
- ``run_job(spec, settings, *, engines, reporter=None, cancel=None) -> JobOutcome``
  never raises for job failures: every failure becomes ``JobOutcome(exit_code, manifest,
  error)`` with the codes of ``errors.py``. Nothing is written at the output location unless
  the job succeeded; the output is published atomically, then the manifest
  (``spec.manifest_location()``). The workspace ``settings.workdir_for(job_id)`` is removed
  at the end unless ``spec.keep_workdir``.
- Inputs are fetched (boxes file included) and probed with ``media.probe`` (video stream
  present, audio present, duration/resolution within the spec's limits) *before* the job asks
  for the models: an input error is reported as such even when the models are missing.
  ``spec.skip_existing`` with an existing output → exit 0, no work.
- ``EngineCache(settings).get(version, fp16=None)`` loads a ``Pipeline`` once per
  (version, precision) per process; the worker shares one cache across jobs.
  ``EngineCache.warm_early()``, called by the entry points before anything imports torch, starts
  reading the library files a load imports; ``EngineCache.start_loading(version, fp16=...)`` loads
  on a background thread (``musetalk-job run`` calls it before the job, so the models load while
  the inputs download; ``run_job``'s own ``get`` then waits only for the rest).
- ``cancel`` (a ``threading.Event``; a ``CancelToken`` carries the exit code 130/143) is
  passed to every transfer and to the engine; ``spec.job_timeout_s`` stops the job with
  exit 6.
- The manifest (JSON-serialisable dict) holds the job id, redacted inputs/output, frames,
  fps, duration, seconds per stage, versions, device, status and error.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from . import __version__, storage
from .errors import (
    EXIT_OK,
    EXIT_SIGTERM,
    Cancelled,
    EngineRuntimeError,
    InputMediaError,
    JobError,
)
from .job import JobSpec, Settings
from .storage import TransferPolicy, redact_text, redact_url

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "musetalk-job/result"


class CancelToken(threading.Event):
    """A cancel event that remembers why it was set (exit code 130 SIGINT / 143 SIGTERM)."""

    def __init__(self) -> None:
        super().__init__()
        self.exit_code: int = EXIT_SIGTERM
        self.reason: str = ""

    def cancel(self, exit_code: int = EXIT_SIGTERM, reason: str = "terminated") -> None:
        if not self.is_set():
            self.exit_code = exit_code
            self.reason = reason
        self.set()


@dataclasses.dataclass
class JobOutcome:
    exit_code: int
    manifest: dict[str, Any]
    error: Optional[JobError] = None

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK


# ---------------------------------------------------------------------------------------
# Engine cache


LOAD_THREAD = "engine-load"  # the name of EngineCache.start_loading's threads


def background_loads_running() -> bool:
    """Whether an ``EngineCache.start_loading`` thread of this process is still loading."""
    return any(t.name == LOAD_THREAD and t.is_alive() for t in threading.enumerate())


class EngineCache:
    """One loaded ``Pipeline`` per (version, precision), kept for the life of the process.

    ``factory(models_dir, device=..., dtype=..., version=...)`` defaults to
    ``musetalk_job.pipeline.Pipeline.from_models_dir``.
    """

    def __init__(self, settings: Settings, factory: Optional[Callable[..., Any]] = None) -> None:
        self.settings = settings
        self._factory = factory
        self._engines: dict[tuple[str, Optional[bool]], Any] = {}
        self._lock = threading.Lock()  # held for a whole load
        self._state = threading.Lock()  # the background loads' bookkeeping (never held for long)
        self._loading: dict[tuple[str, Optional[bool]], threading.Thread] = {}
        self._failed: dict[tuple[str, Optional[bool]], JobError] = {}
        self.load_seconds: dict[tuple[str, Optional[bool]], float] = {}

    def _default_factory(self) -> Callable[..., Any]:
        try:
            from .pipeline import Pipeline
        except ImportError as exc:
            raise EngineRuntimeError(
                f"the engine could not be imported ({exc}); reinstall musetalk-job with its dependencies"
            ) from exc
        return Pipeline.from_models_dir

    def get(self, version: str = "v15", *, fp16: Optional[bool] = None) -> Any:
        key = (version, fp16)
        with self._lock:  # a background load of this key in progress holds it: wait for it
            engine = self._engines.get(key)
            if engine is not None:
                return engine
            with self._state:
                failed = self._failed.pop(key, None)
            if failed is not None:
                raise failed  # what the background load hit; not loaded a second time
            factory = self._factory or self._default_factory()
            dtype = None
            if fp16 is not None:
                import torch

                dtype = torch.float16 if fp16 else torch.float32
            t0 = time.monotonic()
            try:
                engine = factory(Path(self.settings.models_dir), device=self.settings.device, dtype=dtype, version=version)
            except JobError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. CUDA init errors
                raise EngineRuntimeError(
                    f"loading the models from {self.settings.models_dir} failed: {type(exc).__name__}: {exc}; "
                    "run `musetalk-job doctor` to check the GPU and the models"
                ) from exc
            self.load_seconds[key] = time.monotonic() - t0
            self._engines[key] = engine
            return engine

    def loaded(self) -> list[tuple[str, Optional[bool]]]:
        return list(self._engines)

    def start_loading(self, version: str = "v15", *, fp16: Optional[bool] = None) -> Optional[threading.Thread]:
        """``get(version, fp16=fp16)`` on a background daemon thread, now: ``musetalk-job run``
        loads the models while the job downloads and probes its inputs, and the job's own ``get``
        then finds them loaded or waits for the rest of that load. A failure is kept and raised by
        the next ``get`` of that key (one attempt, one message). Returns the thread, or None when
        that key is loaded or loading already. ``loading()`` says whether one still runs."""
        key = (version, fp16)
        with self._state:
            if key in self._engines or key in self._loading:
                return None
            thread = threading.Thread(target=self._load_in_background, args=key, name=LOAD_THREAD, daemon=True)
            self._loading[key] = thread
        thread.start()
        return thread

    def _load_in_background(self, version: str, fp16: Optional[bool]) -> None:
        try:
            self.get(version, fp16=fp16)
        except JobError as exc:
            with self._state:
                self._failed[(version, fp16)] = exc
        except BaseException as exc:  # noqa: BLE001 - get wraps load errors; anything else is kept the same way
            with self._state:
                self._failed[(version, fp16)] = EngineRuntimeError(
                    f"loading the models failed: {type(exc).__name__}: {exc}")
        finally:
            with self._state:
                self._loading.pop((version, fp16), None)

    def loading(self) -> bool:
        """A ``start_loading`` load is still running."""
        with self._state:
            return bool(self._loading)

    def warm_early(self) -> int:
        """Called by the entry points before anything imports torch: the library files the load
        will import start coming off the disk (``models.fastio.warm_early``). Advisory: returns
        the files started, 0 when off (``MUSETALK_PREFETCH=0``), with an injected factory or
        once an engine is loaded."""
        if self._factory is not None or self._engines:
            return 0
        from .models import fastio  # standard library only

        return fastio.warm_early()


# ---------------------------------------------------------------------------------------
# Job stop: external cancel or timeout


class _JobStop(threading.Event):
    """Set when the caller's ``cancel`` is set or the job's deadline passes."""

    def __init__(self, cancel: Optional[threading.Event], timeout_s: Optional[float]) -> None:
        super().__init__()
        self.outer = cancel
        self.timed_out = False
        self.timeout_s = timeout_s
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if cancel is not None or timeout_s is not None:
            self._thread = threading.Thread(target=self._watch, name="job-stop", daemon=True)
            self._thread.start()

    @property
    def exit_code(self) -> int:
        return getattr(self.outer, "exit_code", EXIT_SIGTERM)

    def is_set(self) -> bool:
        if not super().is_set() and self.outer is not None and self.outer.is_set():
            self.set()
        return super().is_set()

    def _watch(self) -> None:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while not self._done.wait(0.05):
            if self.outer is not None and self.outer.is_set():
                self.set()
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.timed_out = True
                self.set()
                return

    def close(self) -> None:
        self._done.set()


# ---------------------------------------------------------------------------------------
# Manifest


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _versions() -> dict[str, Any]:
    versions: dict[str, Any] = {"musetalk_job": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "av"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", None)
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    return versions


def base_manifest(spec: Optional[JobSpec], settings: Optional[Settings] = None) -> dict[str, Any]:
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "job_id": spec.job_id if spec else None}
    if spec is not None:
        manifest["inputs"] = {
            "video": redact_url(spec.video),
            "audio": redact_url(spec.audio),
            "boxes": redact_url(spec.boxes),
        }
        manifest["output"] = redact_url(spec.output)
        manifest["manifest"] = redact_url(spec.manifest_location())
        manifest["model_version"] = spec.version
    if settings is not None:
        manifest["device"] = settings.device or "auto"
    manifest.update({"status": None, "exit_code": None, "error": None})
    return manifest


def failure_manifest(error: JobError, spec: Optional[JobSpec] = None, manifest: Optional[dict] = None) -> dict[str, Any]:
    """The manifest printed for a job that failed (also used before a spec exists)."""
    manifest = dict(manifest) if manifest else base_manifest(spec)
    manifest["status"] = "cancelled" if isinstance(error, Cancelled) else "failed"
    manifest["exit_code"] = error.exit_code
    manifest["error"] = {
        "code": error.exit_code,
        "type": type(error).__name__,
        "message": redact_text(error.message),
        "retryable": error.retryable,
    }
    manifest.setdefault("finished_at", _now())
    manifest.setdefault("versions", _versions())
    return manifest


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return round(value, 4)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------
# Probing


def check_inputs(video: Path, audio: Path, spec: JobSpec) -> dict[str, Any]:
    """Probe both inputs and enforce the spec's limits; returns the probe info for the manifest."""
    from . import media

    vinfo = media.probe(video)
    if not getattr(vinfo, "has_video", False):
        raise InputMediaError(
            f"video: {redact_url(spec.video)} has no video stream; send a video file or a single image of a face"
        )
    width, height = int(vinfo.width or 0), int(vinfo.height or 0)
    if max(width, height) > spec.max_side_px:
        raise InputMediaError(
            f"video: {redact_url(spec.video)} is {width}x{height}, larger than max_side_px={spec.max_side_px}; "
            "downscale it or raise max_side_px"
        )
    if vinfo.kind == "video" and (vinfo.duration_s or 0) > spec.max_duration_s:
        raise InputMediaError(
            f"video: {redact_url(spec.video)} lasts {vinfo.duration_s:.1f} s, over max_duration_s={spec.max_duration_s:g}; "
            "cut it or raise max_duration_s"
        )
    ainfo = media.probe(audio)
    audio_s = getattr(ainfo, "audio_duration_s", None) or 0.0
    if not getattr(ainfo, "has_audio", False) or audio_s <= 0:
        raise InputMediaError(
            f"audio: {redact_url(spec.audio)} has no decodable audio (0 samples); "
            "send a speech file (wav, mp3, m4a, ...) or a video with an audio track"
        )
    if audio_s > spec.max_duration_s:
        raise InputMediaError(
            f"audio: {redact_url(spec.audio)} lasts {audio_s:.1f} s, over max_duration_s={spec.max_duration_s:g}; "
            "split it or raise max_duration_s"
        )
    return {"video": _jsonable(vinfo), "audio": _jsonable(ainfo)}


# ---------------------------------------------------------------------------------------
# The job


def transfer_policy(spec: JobSpec, settings: Settings) -> TransferPolicy:
    return TransferPolicy(
        max_bytes=int(spec.max_input_mb * 1e6),
        timeout_s=spec.io_timeout_s,
        retries=spec.io_retries,
        retry_base_s=settings.retry_base_s,
        allowed_local_dirs=settings.allowed_local_dirs,
        refuse_private_addresses=settings.refuse_private_addresses,
    )


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_job(
    spec: JobSpec,
    settings: Settings,
    *,
    engines: EngineCache,
    reporter: Any = None,
    cancel: Optional[threading.Event] = None,
) -> JobOutcome:
    """Run one job end to end; see the module docstring for the contract."""
    t_start = time.monotonic()
    manifest = base_manifest(spec, settings)
    manifest["started_at"] = _now()
    stage_seconds: dict[str, float] = {}
    policy = transfer_policy(spec, settings)
    workdir = settings.workdir_for(spec.job_id)
    stop = _JobStop(cancel, spec.job_timeout_s)
    progress = reporter.progress if reporter is not None else None

    def event(message: str, **fields: Any) -> None:
        if reporter is not None:
            reporter.event(message, **fields)
        else:
            log.info(message)

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        if reporter is not None:
            reporter.stage(stage)
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.monotonic() - t0
            if stage in ("probe", "upload") and reporter is not None:
                reporter.progress(stage, 1, 1)

    def check_stop() -> None:
        if stop.is_set():
            raise Cancelled("the job was stopped", exit_code=stop.exit_code)

    error: Optional[JobError] = None
    created_workdir = False
    try:
        event(f"job {spec.job_id}: {redact_url(spec.video)} + {redact_url(spec.audio)} -> {redact_url(spec.output)}")
        check_stop()
        if spec.skip_existing and storage.exists(spec.output, policy):
            event(f"output {redact_url(spec.output)} already exists; skipping (skip_existing)", status="skipped")
            manifest.update(status="skipped", exit_code=EXIT_OK)
            return JobOutcome(EXIT_OK, _finish(manifest, stage_seconds, t_start), None)

        # Workspace (a stale one from a lost run of the same id is replaced).
        try:
            remove_workdir(workdir)
            (workdir / "inputs").mkdir(parents=True)
            created_workdir = True
        except OSError as exc:
            raise EngineRuntimeError(
                f"cannot create the job workspace {workdir}: {exc.strerror}; check --workdir and free disk space"
            ) from None

        def fetch_one(url: str, name: str, what: str) -> Path:
            check_stop()

            def byte_progress(done: int, total: int) -> None:
                if reporter is not None:
                    reporter.progress("fetch", done, total)

            return storage.fetch(url, workdir / "inputs" / name, policy, cancel=stop, what=what, progress=byte_progress)

        def fetch_all() -> tuple[Path, Path, Optional[Path]]:
            video = fetch_one(spec.video, "video" + storage.suffix_of(spec.video), "video")
            audio = fetch_one(spec.audio, "audio" + storage.suffix_of(spec.audio), "audio")
            boxes = fetch_one(spec.boxes, "boxes.json", "boxes") if spec.boxes else None
            return video, audio, boxes

        video, audio, boxes = timed("fetch", fetch_all)
        check_stop()
        manifest["media"] = timed("probe", lambda: check_inputs(video, audio, spec))
        check_stop()

        t_load = time.monotonic()
        if reporter is not None:
            reporter.stage("load")
        engine = engines.get(spec.version, fp16=spec.fp16)
        load_s = time.monotonic() - t_load
        if load_s > 0.01:
            stage_seconds["load"] = load_s
        check_stop()

        out_local = workdir / "output.mp4"
        t_engine = time.monotonic()
        result = engine.run(video, audio, out_local, spec.engine_options(boxes), progress=progress, cancel=stop)
        engine_s = time.monotonic() - t_engine
        check_stop()
        if not out_local.is_file() or out_local.stat().st_size == 0:
            raise EngineRuntimeError("the engine finished without writing the output video; this is a bug, please report it")

        stats = result.stats() if hasattr(result, "stats") else {}
        engine_stages = stats.pop("stage_seconds", {}) or {}
        stage_seconds.update(engine_stages)
        if not engine_stages:
            stage_seconds["engine"] = engine_s
        manifest.update(stats)

        timed("upload", lambda: storage.upload(out_local, spec.output, policy, cancel=stop, what="output"))
        manifest.update(status="succeeded", exit_code=EXIT_OK)
        final = _finish(manifest, stage_seconds, t_start)
        manifest_url = spec.manifest_location()
        if manifest_url:
            try:
                storage.upload_bytes(_dumps(final).encode(), manifest_url, policy, what="manifest")
            except JobError as exc:  # the video is published; a missing manifest must not fail the job
                log.warning("could not write the manifest to %s: %s", redact_url(manifest_url), exc.message)
        event(f"job {spec.job_id} done: {redact_url(spec.output)}", status="succeeded")
        return JobOutcome(EXIT_OK, final, None)
    except Cancelled as exc:
        if stop.timed_out:
            error = EngineRuntimeError(
                f"the job exceeded job_timeout_s={spec.job_timeout_s:g} and was stopped; raise job_timeout_s or "
                "send shorter inputs"
            )
        else:
            error = Cancelled(
                f"the job was stopped by {getattr(cancel, 'reason', '') or 'a signal'}; nothing was uploaded",
                exit_code=getattr(cancel, "exit_code", exc.exit_code),
            )
    except JobError as exc:
        error = exc
        if stop.is_set() and not stop.timed_out:
            error = Cancelled("the job was stopped by a signal; nothing was uploaded", exit_code=stop.exit_code)
    except MemoryError:
        error = EngineRuntimeError("out of host memory; use a machine with more RAM or shorter inputs")
    except Exception as exc:  # noqa: BLE001 - anything else is an internal failure (exit 6)
        if stop.is_set():
            error = Cancelled("the job was stopped by a signal; nothing was uploaded", exit_code=stop.exit_code)
        else:
            log.exception("internal error in job %s", spec.job_id)
            error = EngineRuntimeError(f"internal error: {type(exc).__name__}: {redact_text(str(exc))[:300]}")
    finally:
        stop.close()
        if reporter is not None:
            reporter.close()
        if created_workdir and not spec.keep_workdir:
            remove_workdir(workdir)
    assert error is not None
    log.error("job %s failed (exit %d, %s): %s", spec.job_id, error.exit_code, type(error).__name__, error.message)
    manifest = _finish(manifest, stage_seconds, t_start)
    return JobOutcome(error.exit_code, failure_manifest(error, spec, manifest), error)


def _finish(manifest: dict[str, Any], stage_seconds: dict[str, float], t_start: float) -> dict[str, Any]:
    manifest["stage_seconds"] = {k: round(v, 4) for k, v in stage_seconds.items()}
    manifest["total_s"] = round(time.monotonic() - t_start, 4)
    manifest["finished_at"] = _now()
    manifest["versions"] = _versions()
    return _jsonable(manifest)


def _dumps(manifest: dict[str, Any]) -> str:
    import json

    return json.dumps(manifest, separators=(",", ":"), sort_keys=False)


def manifest_line(manifest: dict[str, Any]) -> str:
    """The manifest as one JSON line, redacted (what the CLI prints last on stdout)."""
    return redact_text(_dumps(manifest))


__all__ = [
    "CancelToken",
    "EngineCache",
    "JobOutcome",
    "run_job",
    "check_inputs",
    "base_manifest",
    "failure_manifest",
    "manifest_line",
    "transfer_policy",
]
