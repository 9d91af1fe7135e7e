"""runner.run_job at unit level: the runner's contract with a small engine that honours the
engine interface (ffmpeg mux of the inputs), real media made by ffmpeg, real HTTP on loopback.
The real MuseTalk engine is exercised end to end in tests/test_cli_run.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from loopback import FaultServer
from musetalk_job.errors import ModelsError
from musetalk_job.job import Settings, parse_job
from musetalk_job.options import EngineOptions, Result
from musetalk_job.runner import CancelToken, EngineCache, manifest_line, run_job

FFMPEG = shutil.which("ffmpeg")
# The probe lives in the engine's media module (another engineer's); these tests run as soon as it exists.
needs_media = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[1] / "src" / "musetalk_job" / "media.py").exists(),
    reason="musetalk_job.media (probe) is not in the tree yet",
)
pytestmark = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg is required (apt-get install ffmpeg)")


def _ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    video = root / "clip.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-t", "1", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(video))
    audio = root / "tone.wav"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000", "-t", "0.8", str(audio))
    big = root / "big.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=640x480:rate=25", "-t", "0.2", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(big))
    return {"video": video, "audio": audio, "big": big}


class MuxEngine:
    """Implements ``Pipeline.run``'s contract: writes an H.264/AAC MP4, reports progress,
    checks ``cancel``. ``delay`` makes it slow so cancellation can be observed."""

    def __init__(self, version: str, fail: Exception | None = None, delay: float = 0.0) -> None:
        self.version = version
        self.fail = fail
        self.delay = delay
        self.calls: list[EngineOptions] = []

    def run(self, video, audio, output, options: EngineOptions, progress=None, cancel=None) -> Result:
        from musetalk_job.errors import Cancelled

        self.calls.append(options)
        assert Path(video).is_file() and Path(audio).is_file()
        for i in range(10):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            if progress:
                progress("generate", i + 1, 10)
            time.sleep(self.delay / 10)
        if self.fail is not None:
            raise self.fail
        _ffmpeg("-i", str(video), "-i", str(audio), "-map", "0:v", "-map", "1:a", "-c:v", "libx264",
                "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(output))
        return Result(output=Path(output), frames=20, fps=25.0, duration_s=0.8, input_frames=25, frames_with_face=25,
                      width=160, height=120, stage_seconds={"generate": 0.1, "encode": 0.05})


class Factory:
    def __init__(self, **engine_kwargs) -> None:
        self.loads: list[tuple] = []
        self.engine_kwargs = engine_kwargs
        self.engines: list[MuxEngine] = []

    def __call__(self, models_dir, *, device=None, dtype=None, version="v15"):
        self.loads.append((models_dir, device, dtype, version))
        engine = MuxEngine(version, **self.engine_kwargs)
        self.engines.append(engine)
        return engine


def _settings(tmp_path: Path) -> Settings:
    return Settings(models_dir=tmp_path / "models", workspace_root=tmp_path / "ws", retry_base_s=0.01, device="cpu")


def _spec(media, out: Path, **extra):
    return parse_job({"video": str(media["video"]), "audio": str(media["audio"]), "output": str(out), "job_id": "t1", **extra})


def _assert_clean(tmp_path: Path, out: Path) -> None:
    assert not out.exists() and not Path(str(out) + ".json").exists()
    assert not (tmp_path / "ws" / "job_t1").exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]


def _probe_duration(path: Path) -> tuple[str, str, float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,codec_type:format=duration",
                          "-of", "json", str(path)], check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    codecs = {s["codec_type"]: s["codec_name"] for s in info["streams"]}
    return codecs.get("video", ""), codecs.get("audio", ""), float(info["format"]["duration"])


def test_engine_cache_loads_once_per_version(tmp_path):
    factory = Factory()
    cache = EngineCache(_settings(tmp_path), factory=factory)
    a = cache.get("v15")
    assert cache.get("v15") is a
    b = cache.get("v1")
    assert b is not a and [load[3] for load in factory.loads] == ["v15", "v1"]
    assert factory.loads[0][0] == tmp_path / "models" and factory.loads[0][1] == "cpu"


def test_engine_cache_warms_early_only_for_the_real_loader_before_a_load(tmp_path, tiny_models_dir, monkeypatch):
    import json

    from musetalk_job.models import fastio

    manifest = tmp_path / "warm.json"
    manifest.write_text(json.dumps({"env": fastio._env_key(), "files": [{"path": str(tmp_path), "dir": True}]}))
    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", str(manifest))
    monkeypatch.setattr(fastio, "_WARMED", [])
    monkeypatch.setattr(fastio, "WARM_PROCESS", False)
    assert EngineCache(_settings(tmp_path), factory=Factory()).warm_early() == 0  # not the real loader
    settings = _settings(tmp_path)
    settings.models_dir = tiny_models_dir
    cache = EngineCache(settings)
    assert cache.warm_early() == 1
    cache.get("v15")  # the load does not warm it again (nor record a manifest: this one is current)
    assert fastio._WARMED == [1] and cache.warm_early() == 0


def test_engine_cache_start_loading_loads_once_in_the_background_and_keeps_a_failure(tmp_path):
    gate = threading.Event()
    calls: list[str] = []

    def slow(models_dir, **kw):
        calls.append(kw["version"])
        assert gate.wait(10)
        if kw["version"] == "v1":
            raise ModelsError("models dir x: the v1 UNet is missing")
        return MuxEngine(kw["version"])

    cache = EngineCache(_settings(tmp_path), factory=slow)
    thread = cache.start_loading("v15")
    assert thread is not None and thread.daemon and cache.loading()
    assert cache.start_loading("v15") is None  # loading already
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(cache.get("v15")))
    waiter.start()  # the job's get waits for the background load instead of loading again
    time.sleep(0.05)
    assert not got
    gate.set()
    thread.join(10)
    waiter.join(10)
    assert not cache.loading() and calls == ["v15"] and got[0] is cache.get("v15")
    assert cache.start_loading("v15") is None  # loaded
    cache.start_loading("v1").join(10)
    with pytest.raises(ModelsError, match="v1 UNet is missing"):
        cache.get("v1")
    assert calls == ["v15", "v1"]  # the background failure was raised, not loaded a second time


def test_engine_cache_wraps_unexpected_load_errors(tmp_path):
    def broken(models_dir, **kw):
        raise RuntimeError("CUDA error: no kernel image")

    from musetalk_job.errors import EngineRuntimeError

    with pytest.raises(EngineRuntimeError, match="CUDA error"):
        EngineCache(_settings(tmp_path), factory=broken).get("v15")


def test_skip_existing_does_no_work(tmp_path, media):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    factory = Factory()
    spec = _spec(media, out, skip_existing=True, video="https://127.0.0.1:9/never-fetched.mp4")
    outcome = run_job(spec, _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=factory))
    assert outcome.exit_code == 0 and outcome.manifest["status"] == "skipped" and outcome.error is None
    assert out.read_bytes() == b"previous result" and factory.loads == []
    assert not (tmp_path / "ws").exists()


@needs_media
def test_success_publishes_output_and_manifest(tmp_path, media):
    out = tmp_path / "results" / "out.mp4"
    factory = Factory()
    spec = _spec(media, out, landmarks="cascade", batch_size=4, extra_margin=12)
    outcome = run_job(spec, _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=factory))
    assert outcome.exit_code == 0, outcome.error
    vcodec, acodec, duration = _probe_duration(out)
    assert (vcodec, acodec) == ("h264", "aac") and 0.6 < duration < 1.1
    opts = factory.engines[0].calls[0]
    assert (opts.landmarks, opts.batch_size, opts.extra_margin, opts.boxes_file) == ("cascade", 4, 12, None)
    manifest = json.loads(Path(str(out) + ".json").read_text())
    assert manifest == outcome.manifest
    assert manifest["status"] == "succeeded" and manifest["exit_code"] == 0 and manifest["job_id"] == "t1"
    assert manifest["frames"] == 20 and manifest["fps"] == 25.0
    assert {"fetch", "probe", "generate", "encode", "upload"} <= set(manifest["stage_seconds"])
    assert manifest["media"]["video"]["width"] == 160 and manifest["versions"]["musetalk_job"]
    assert not (tmp_path / "ws" / "job_t1").exists()
    assert json.loads(manifest_line(manifest)) == manifest


@needs_media
def test_http_inputs_and_boxes_are_fetched(tmp_path, media):
    server = FaultServer().start()
    try:
        server.files["v.mp4"] = media["video"].read_bytes()
        server.files["a.wav"] = media["audio"].read_bytes()
        server.files["boxes.json"] = json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": []}).encode()
        out = tmp_path / "out.mp4"
        factory = Factory()
        spec = parse_job({"video": server.url("/fail500x1/v.mp4?X-Amz-Signature=TOPSECRET"), "audio": server.url("/ok/a.wav"),
                          "boxes": server.url("/ok/boxes.json"), "output": str(out), "job_id": "t1", "keep_workdir": True})
        outcome = run_job(spec, _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=factory))
        assert outcome.exit_code == 0, outcome.error
        boxes_file = factory.engines[0].calls[0].boxes_file
        assert boxes_file is not None and boxes_file.name == "boxes.json"
        assert (tmp_path / "ws" / "job_t1" / "inputs" / "video.mp4").is_file()  # kept with keep_workdir
        text = json.dumps(outcome.manifest)
        assert "TOPSECRET" not in text and "?<redacted>" in outcome.manifest["inputs"]["video"]
    finally:
        server.stop()


@pytest.mark.parametrize("route,code", [("/status404/v.mp4", 3), ("/status403/v.mp4", 3), ("/status500/v.mp4", 4),
                                        ("/drop/v.mp4", 4)])
def test_fetch_failures_map_to_exit_codes(tmp_path, media, route, code):
    server = FaultServer().start()
    try:
        out = tmp_path / "out.mp4"
        factory = Factory()
        spec = parse_job({"video": server.url(route + "?sig=HIDE"), "audio": str(media["audio"]), "output": str(out),
                          "job_id": "t1", "io_retries": 1})
        outcome = run_job(spec, _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=factory))
    finally:
        server.stop()
    assert outcome.exit_code == code and outcome.error is not None
    assert outcome.manifest["status"] == "failed" and outcome.manifest["error"]["code"] == code
    assert "HIDE" not in json.dumps(outcome.manifest) and "HIDE" not in outcome.error.one_line()
    assert factory.loads == []  # models never touched
    _assert_clean(tmp_path, out)


def test_missing_local_input_is_exit_3(tmp_path, media):
    out = tmp_path / "out.mp4"
    spec = _spec(media, out, audio=str(tmp_path / "missing.wav"))
    outcome = run_job(spec, _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=Factory()))
    assert outcome.exit_code == 3 and "missing.wav" in outcome.error.message and "audio" in outcome.error.message
    _assert_clean(tmp_path, out)


@needs_media
def test_probe_rejects_bad_inputs_before_models(tmp_path, media):
    factory = Factory()
    engines = EngineCache(_settings(tmp_path), factory=factory)
    out = tmp_path / "out.mp4"
    silent = run_job(_spec(media, out, audio=str(media["video"])), _settings(tmp_path), engines=engines)
    assert silent.exit_code == 3 and "audio" in silent.error.message
    large = run_job(_spec(media, out, video=str(media["big"]), max_side_px=320), _settings(tmp_path), engines=engines)
    assert large.exit_code == 3 and "max_side_px" in large.error.message
    long = run_job(_spec(media, out, max_duration_s=0.5), _settings(tmp_path), engines=engines)
    assert long.exit_code == 3 and "max_duration_s" in long.error.message
    assert factory.loads == []
    _assert_clean(tmp_path, out)


@needs_media
def test_models_error_is_exit_5(tmp_path, media):

    def missing(models_dir, **kw):
        raise ModelsError(f"missing {models_dir}/musetalkV15/unet.pth; run `musetalk-job download-weights`")

    out = tmp_path / "out.mp4"
    outcome = run_job(_spec(media, out), _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=missing))
    assert outcome.exit_code == 5 and "unet.pth" in outcome.manifest["error"]["message"]
    _assert_clean(tmp_path, out)


@needs_media
def test_engine_crash_is_exit_6_and_nothing_published(tmp_path, media):
    out = tmp_path / "out.mp4"
    factory = Factory(fail=RuntimeError("index out of range"))
    outcome = run_job(_spec(media, out), _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=factory))
    assert outcome.exit_code == 6 and "internal error" in outcome.error.message and outcome.error.retryable
    _assert_clean(tmp_path, out)


@needs_media
def test_cancel_mid_engine(tmp_path, media):
    out = tmp_path / "out.mp4"
    token = CancelToken()
    factory = Factory(delay=5.0)
    threading.Timer(0.5, token.cancel, kwargs={"exit_code": 130, "reason": "SIGINT"}).start()
    t0 = time.monotonic()
    outcome = run_job(_spec(media, out), _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=factory),
                      cancel=token)
    assert time.monotonic() - t0 < 3
    assert outcome.exit_code == 130 and outcome.manifest["status"] == "cancelled"
    _assert_clean(tmp_path, out)


def test_cancel_before_start(tmp_path, media):
    token = CancelToken()
    token.cancel(143, "SIGTERM")
    out = tmp_path / "out.mp4"
    factory = Factory()
    outcome = run_job(_spec(media, out), _settings(tmp_path), engines=EngineCache(_settings(tmp_path), factory=factory),
                      cancel=token)
    assert outcome.exit_code == 143 and factory.loads == []
    _assert_clean(tmp_path, out)


@needs_media
def test_job_timeout_is_exit_6(tmp_path, media):
    out = tmp_path / "out.mp4"
    outcome = run_job(_spec(media, out, job_timeout_s=0.5), _settings(tmp_path),
                      engines=EngineCache(_settings(tmp_path), factory=Factory(delay=5.0)))
    assert outcome.exit_code == 6 and "job_timeout_s" in outcome.error.message
    _assert_clean(tmp_path, out)
