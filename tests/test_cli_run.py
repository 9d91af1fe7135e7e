"""End to end: the real ``musetalk-job run`` as a subprocess, against real servers on loopback
(fault-injecting HTTP, moto S3 with presigned URLs) and, where a job renders, the real engine
with tiny random weights (tests/conftest.py fixtures).

Checked for every failure: the exit code, exactly one ``error[<code>]: ...`` line on stderr,
the manifest as the last stdout line, no output object, no workspace left behind, and no
presigned signature or secret key anywhere in stdout, stderr or the manifest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from loopback import FaultServer, MotoS3

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "musetalk_job"
ENGINE_STAGES = {"load", "decode", "landmarks", "latents", "audio", "generate", "blend", "encode"}
FFMPEG = shutil.which("ffmpeg")

# Jobs that render need the engine (other engineers' modules); they run as soon as it exists.
needs_engine = pytest.mark.skipif(
    not (PKG / "pipeline.py").exists() or not (PKG / "media.py").exists(),
    reason="musetalk_job.pipeline / media are not in the tree yet",
)


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "musetalk-job"
    return [str(script)] if script.exists() else [sys.executable, "-m", "musetalk_job"]


def _env(extra: dict[str, str]) -> dict[str, str]:
    """A clean environment: no inherited job or MUSETALK_ variables, JSON logs, offline hub."""
    seed_names = {"VIDEO_URL", "AUDIO_URL", "OUTPUT_URL", "OUTPUT_PATH", "JOB_ID", "JOB_FILE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSETALK_") and k not in seed_names}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MUSETALK_LOG_FORMAT": "json", "MUSETALK_DEVICE": "cpu"})
    env.update(extra)
    return env


class Run:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        self.manifest = json.loads(lines[-1]) if lines else None

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error[")]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> Run:
    proc = subprocess.run(_cli() + ["run", *args], env=_env(env), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return Run(proc)


def assert_failed(run: Run, code: int, *, secrets: tuple[str, ...] = ()) -> None:
    assert run.rc == code, (run.rc, run.stderr[-3000:])
    errors = run.error_lines()
    assert len(errors) == 1 and errors[0].startswith(f"error[{code}]: "), run.stderr[-3000:]
    assert run.manifest is not None and run.manifest["exit_code"] == code and run.manifest["error"]["code"] == code
    for secret in secrets:
        assert secret not in run.stdout and secret not in run.stderr


def _signature(url: str) -> str:
    query = parse_qs(urlsplit(url).query)
    return (query.get("X-Amz-Signature") or query["Signature"])[0]


def _ffprobe(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,codec_type,duration:format=duration", "-of", "json",
         str(path)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _duration(path: Path) -> float:
    return float(_ffprobe(path)["format"]["duration"])


def assert_h264_aac(path: Path, expected_s: float) -> None:
    info = _ffprobe(path)
    codecs = {s["codec_type"]: s["codec_name"] for s in info["streams"]}
    assert codecs == {"video": "h264", "audio": "aac"}, codecs
    assert abs(float(info["format"]["duration"]) - expected_s) < 0.2, (info, expected_s)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http():
    server = FaultServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3():
    server = MotoS3().start()
    server.client().create_bucket(Bucket="media")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_media(tmp_path_factory) -> dict[str, Path]:
    """Media made by ffmpeg for runs that fail before the engine (no engine modules needed)."""
    if FFMPEG is None:
        pytest.skip("ffmpeg is required")
    root = tmp_path_factory.mktemp("cli-media")
    video, audio = root / "v.mp4", root / "a.wav"
    subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-t", "1",
                    "-pix_fmt", "yuv420p", "-c:v", "libx264", str(video)], check=True)
    subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=16000", "-t", "1",
                    str(audio)], check=True)
    return {"video": video, "audio": audio}


# --- usage ---------------------------------------------------------------------------------


def test_help_and_version():
    out = subprocess.run(_cli() + ["run", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--video", "--audio", "--output", "--job-id", "--job", "--landmarks", "--batch-size", "--boxes",
                 "--skip-existing", "--keep-workdir", "--models-dir", "--workdir", "--on-finish", "--log-format"):
        assert flag in out.stdout
    version = subprocess.run(_cli() + ["--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("musetalk-job ")


def test_invalid_spec_is_exit_2_naming_every_field(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"video": "v.mp4", "audio": "a.wav", "output": "o.mp4", "colour": "red", "fps": 0}))
    run = run_cli(["--job", str(job), "--landmarks", "openpose"], {"MUSETALK_BATCH_SIZE": "many"})
    assert_failed(run, 2)
    for name in ("colour", "fps", "landmarks", "batch_size"):
        assert name in run.error_lines()[0]


def test_unknown_musetalk_env_warns(tmp_path, small_media):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"done before")
    run = run_cli(["--video", str(small_media["video"]), "--audio", str(small_media["audio"]), "--output", str(out),
                   "--skip-existing"], {"MUSETALK_BACTH_SIZE": "4"})
    assert run.rc == 0 and "MUSETALK_BACTH_SIZE" in run.stderr and run.manifest["status"] == "skipped"


# --- input faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route,code",
    [("/status404/v.mp4", 3), ("/status403/v.mp4", 3), ("/status401/v.mp4", 3), ("/status500/v.mp4", 4),
     ("/drop/v.mp4", 4)],
)
def test_input_faults_exit_codes(tmp_path, http, small_media, route, code):
    out = tmp_path / "out.mp4"
    workspace = tmp_path / "ws"
    url = http.url(route + "?X-Amz-Signature=FAULTSECRET123&X-Amz-Credential=KEYID")
    run = run_cli(["--audio", str(small_media["audio"]), "--output", str(out), "--io-retries", "1",
                   "--workdir", str(workspace), "--models-dir", str(tmp_path / "no-models")],
                  {"VIDEO_URL": url, "JOB_ID": "fault", "MUSETALK_RETRY_BASE_S": "0.01"})
    assert_failed(run, code, secrets=("FAULTSECRET123", "KEYID"))
    assert not out.exists() and not Path(str(out) + ".json").exists()
    assert not (workspace / "job_fault").exists()
    assert run.manifest["inputs"]["video"].endswith("/v.mp4?<redacted>")


def test_transient_500_then_ok_reaches_the_next_stage(tmp_path, http, small_media):
    """500 once, then 200: the retry fetches the file and the job moves on (here to a
    deliberately missing audio file, so no engine is needed)."""
    http.files["cli-v.mp4"] = small_media["video"].read_bytes()
    run = run_cli(["--video", http.url("/fail500x1/cli-v.mp4"), "--audio", str(tmp_path / "missing.wav"),
                   "--output", str(tmp_path / "o.mp4"), "--workdir", str(tmp_path / "ws")],
                  {"MUSETALK_RETRY_BASE_S": "0.01"})
    assert_failed(run, 3)
    assert http.hits["/fail500x1/cli-v.mp4"] == 2 and "missing.wav" in run.error_lines()[0]


def test_s3_missing_object_is_exit_3(tmp_path, s3, small_media):
    run = run_cli(["--video", "s3://media/in/absent.mp4", "--audio", str(small_media["audio"]),
                   "--output", "s3://media/out/absent.mp4"], s3.env)
    assert_failed(run, 3, secrets=(s3.env["AWS_SECRET_ACCESS_KEY"],))
    listed = s3.client().list_objects_v2(Bucket="media", Prefix="out/absent")
    assert listed.get("KeyCount", 0) == 0


def test_skip_existing_s3_output(tmp_path, s3, small_media):
    s3.client().put_object(Bucket="media", Key="out/exists.mp4", Body=b"old")
    run = run_cli([], {**s3.env, "VIDEO_URL": "s3://media/never/read.mp4", "AUDIO_URL": str(small_media["audio"]),
                       "OUTPUT_URL": "s3://media/out/exists.mp4", "MUSETALK_SKIP_EXISTING": "1"})
    assert run.rc == 0 and run.manifest["status"] == "skipped" and run.error_lines() == []
    assert s3.client().get_object(Bucket="media", Key="out/exists.mp4")["Body"].read() == b"old"


# --- signals -------------------------------------------------------------------------------


class Started:
    """A running CLI subprocess whose stderr is collected by a thread (JSON log lines)."""

    def __init__(self, proc: subprocess.Popen, lines: list[str], engine_started: threading.Event,
                 pump: threading.Thread) -> None:
        self.proc, self.lines, self.engine_started, self._pump = proc, lines, engine_started, pump

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for exit; return (rc, stdout, stderr)."""
        rc = self.proc.wait(timeout=timeout)
        stdout = self.proc.stdout.read()
        self._pump.join(10)
        return rc, stdout, "".join(self.lines)


def _start(args: list[str], env: dict[str, str]) -> Started:
    proc = subprocess.Popen(_cli() + ["run", *args], env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    lines: list[str] = []
    engine_started = threading.Event()

    def pump() -> None:
        for line in proc.stderr:
            lines.append(line)
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("stage") in ENGINE_STAGES:
                engine_started.set()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return Started(proc, lines, engine_started, thread)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_stuck_download(tmp_path, http, small_media, sig, code):
    """The job thread is blocked in a socket read (1 byte every 2 s): the main thread must
    still stop the process within 5 s, clean the workspace and upload nothing."""
    http.files["slow.mp4"] = b"x" * 64
    http.slow_delay = 2.0
    out = tmp_path / "out.mp4"
    workspace = tmp_path / "ws"
    job = _start(["--video", http.url("/slow/slow.mp4?X-Amz-Signature=SLOWSECRET"), "--audio",
                  str(small_media["audio"]), "--output", str(out), "--workdir", str(workspace), "--job-id", "slow"], {})
    deadline = time.monotonic() + 30
    while not (workspace / "job_slow" / "inputs" / "video.mp4").exists():
        assert time.monotonic() < deadline and job.proc.poll() is None, "".join(job.lines)
        time.sleep(0.05)
    time.sleep(0.3)
    t0 = time.monotonic()
    job.proc.send_signal(sig)
    rc = job.proc.wait(timeout=15)
    elapsed = time.monotonic() - t0
    rc, stdout, stderr = job.finish(5)
    assert rc == code and elapsed < 5.0, (rc, elapsed)
    assert not out.exists() and not (workspace / "job_slow").exists()
    manifest = json.loads(stdout.strip().splitlines()[-1])
    assert manifest["exit_code"] == code and manifest["status"] == "cancelled"
    assert f"error[{code}]:" in stderr and "SLOWSECRET" not in stderr + stdout


def test_on_finish_idle_waits_for_sigterm(tmp_path, small_media):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"x")
    job = _start(["--video", str(small_media["video"]), "--audio", str(small_media["audio"]),
                  "--output", str(out), "--skip-existing", "--on-finish", "idle"], {})
    first = job.proc.stdout.readline()  # the manifest is printed before idling
    assert json.loads(first)["status"] == "skipped"
    time.sleep(1.0)
    assert job.proc.poll() is None, "idle must keep the process alive"
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish(10)[0] == 0


# --- full jobs with the real engine ---------------------------------------------------------
# CPU time matters here (CI has 2 cores): renders use 0.8 s of the speech fixture (20 output
# frames); the flags run uses a single face image.


@pytest.fixture(scope="module")
def short_speech(speech_wav, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("short") / "speech-0.8s.wav"
    subprocess.run([FFMPEG or "ffmpeg", "-loglevel", "error", "-i", str(speech_wav), "-t", "0.8", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def face_png(tmp_path_factory) -> Path:
    from musetalk_job.samples import make_face_image

    return make_face_image(tmp_path_factory.mktemp("img") / "face.png", size=(320, 240))


@needs_engine
@pytest.mark.slow
def test_env_only_s3_job(tmp_path, s3, tiny_models_dir, face_video, short_speech):
    client = s3.client()
    client.upload_file(str(face_video), "media", "in/face.mp4")
    client.upload_file(str(short_speech), "media", "in/speech.wav")
    audio_url = client.generate_presigned_url("get_object", Params={"Bucket": "media", "Key": "in/speech.wav"},
                                              ExpiresIn=600)
    workspace = tmp_path / "ws"
    run = run_cli([], {**s3.env, "VIDEO_URL": "s3://media/in/face.mp4", "AUDIO_URL": audio_url,
                       "OUTPUT_PATH": "s3://media/out/env.mp4", "JOB_ID": "envjob", "MUSETALK_LANDMARKS": "cascade",
                       "MUSETALK_MODELS_DIR": str(tiny_models_dir), "MUSETALK_WORKDIR": str(workspace)})
    assert run.rc == 0, run.stderr[-4000:]
    local = tmp_path / "env.mp4"
    client.download_file("media", "out/env.mp4", str(local))
    assert_h264_aac(local, _duration(short_speech))
    stored = json.loads(client.get_object(Bucket="media", Key="out/env.mp4.json")["Body"].read())
    assert stored == run.manifest and stored["job_id"] == "envjob" and stored["status"] == "succeeded"
    assert stored["frames"] > 0 and stored["fps"] == 25.0 and stored["device"] == "cpu"
    secret = _signature(audio_url)
    for text in (run.stdout, run.stderr, json.dumps(stored)):
        assert secret not in text and s3.env["AWS_SECRET_ACCESS_KEY"] not in text
    assert not (workspace / "job_envjob").exists()


@needs_engine
@pytest.mark.slow
def test_job_file_with_boxes(tmp_path, tiny_models_dir, face_video, short_speech):
    from musetalk_job.landmarks.boxes import write_boxes_file
    from musetalk_job.media import probe

    n = probe(face_video).n_frames
    boxes = tmp_path / "boxes.json"
    write_boxes_file(boxes, [(100, 60, 220, 200)] * n)
    out = tmp_path / "results" / "file.mp4"
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"video": str(face_video), "audio": str(short_speech), "output": str(out),
                               "boxes": str(boxes), "job_id": "filejob", "batch_size": 4}))
    run = run_cli(["--job", str(job), "--models-dir", str(tiny_models_dir), "--workdir", str(tmp_path / "ws")],
                  {"MUSETALK_BATCH_SIZE": "2"})
    assert run.rc == 0, run.stderr[-4000:]
    assert_h264_aac(out, _duration(short_speech))
    manifest = json.loads(Path(str(out) + ".json").read_text())
    assert manifest == run.manifest and manifest["batch_size"] == 4  # file beats env
    assert "landmarks" not in manifest["stage_seconds"] or manifest["stage_seconds"]["landmarks"] < 0.5


@needs_engine
def test_run_loads_the_models_while_the_inputs_download(tmp_path, tiny_models_dir, face_video, short_speech):
    """The video's last bytes are held back until the CLI logs "models loaded": the job can only
    finish (within the gate's 120 s) if the models load while the download is still running."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from musetalk_job.landmarks.boxes import write_boxes_file
    from musetalk_job.media import probe

    data = face_video.read_bytes()
    loaded = threading.Event()
    released_by: list[str] = []

    class Gate(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            # below the client's 60 s read timeout: a load that never logs fails this test, not the job
            released_by.append("models loaded" if loaded.wait(50) else "timeout")
            self.wfile.write(data[len(data) // 2 :])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gate)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    boxes = tmp_path / "boxes.json"
    write_boxes_file(boxes, [(100, 60, 220, 200)] * probe(face_video).n_frames)
    out = tmp_path / "out.mp4"
    args = ["run", "--video", f"http://127.0.0.1:{server.server_address[1]}/v.mp4", "--audio", str(short_speech),
            "--boxes", str(boxes), "--output", str(out), "--models-dir", str(tiny_models_dir),
            "--workdir", str(tmp_path / "ws"), "--batch-size", "4"]
    proc = subprocess.Popen(_cli() + args, env=_env({}), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if '"models loaded in' in line:
                loaded.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Not communicate(): it would read stderr too, racing the reader thread for its lines.
    killer = threading.Timer(300, proc.kill)
    killer.start()
    try:
        stdout = proc.stdout.read()
        proc.wait()
    finally:
        killer.cancel()
        server.shutdown()
    reader.join(10)
    log = "".join(lines)[-6000:]
    assert released_by == ["models loaded"], log  # loaded while the download waited
    assert proc.returncode == 0, log
    manifest = json.loads(stdout.strip().splitlines()[-1])
    assert manifest["stage_seconds"].get("load", 0.0) < 1.0  # the job found them (nearly) ready
    assert_h264_aac(out, _duration(short_speech))


@needs_engine
def test_an_input_error_while_the_models_load_exits_with_its_code(tmp_path, tiny_models_dir, face_video):
    """The audio is missing: the job fails at once (exit 3) while the background load of real
    models is still running; the process leaves with exit 3, its one error line and manifest,
    and no traceback from the interrupted load."""
    run = run_cli(["--video", str(face_video), "--audio", str(tmp_path / "missing.wav"), "--output",
                   str(tmp_path / "o.mp4"), "--models-dir", str(tiny_models_dir), "--workdir", str(tmp_path / "ws")], {})
    assert_failed(run, 3)
    assert "missing.wav" in run.error_lines()[0] and "Traceback" not in run.stderr
    assert "load" not in run.manifest["stage_seconds"]


@needs_engine
@pytest.mark.slow
def test_flags_with_presigned_put(tmp_path, s3, tiny_models_dir, face_png, short_speech):
    client = s3.client()
    put_url = client.generate_presigned_url("put_object", Params={"Bucket": "media", "Key": "out/flags.mp4"},
                                            ExpiresIn=600)
    run = run_cli(["--video", str(face_png), "--audio", str(short_speech), "--output", put_url, "--landmarks", "cascade",
                   "--fps", "25", "--models-dir", str(tiny_models_dir), "--job-id", "flagjob"], s3.env)
    assert run.rc == 0, run.stderr[-4000:]
    local = tmp_path / "flags.mp4"
    client.download_file("media", "out/flags.mp4", str(local))
    assert_h264_aac(local, _duration(short_speech))
    secret = _signature(put_url)
    assert secret not in run.stdout and secret not in run.stderr
    assert run.manifest["output"].endswith("/out/flags.mp4?<redacted>")


@needs_engine
@pytest.mark.slow
def test_missing_models_is_exit_5(tmp_path, face_video, speech_wav):
    out = tmp_path / "o.mp4"
    run = run_cli(["--video", str(face_video), "--audio", str(speech_wav), "--output", str(out), "--landmarks", "cascade",
                   "--models-dir", str(tmp_path / "empty"), "--workdir", str(tmp_path / "ws"), "--job-id", "nomodels"], {})
    assert_failed(run, 5)
    assert not out.exists() and not (tmp_path / "ws" / "job_nomodels").exists()


@needs_engine
@pytest.mark.slow
def test_no_audio_input_is_exit_3_before_models(tmp_path, face_video):
    run = run_cli(["--video", str(face_video), "--audio", str(face_video), "--output", str(tmp_path / "o.mp4"),
                   "--models-dir", str(tmp_path / "empty")], {})
    assert_failed(run, 3)  # probe fails first; the missing models are never looked at
    assert "audio" in run.error_lines()[0]


@needs_engine
@pytest.mark.slow
def test_sigterm_mid_engine(tmp_path, s3, tiny_models_dir, face_video, speech_wav):
    out_key = "out/sigterm.mp4"
    workspace = tmp_path / "ws"
    job = _start(
        ["--video", str(face_video), "--audio", str(speech_wav), "--output", f"s3://media/{out_key}",
         "--landmarks", "cascade", "--models-dir", str(tiny_models_dir), "--workdir", str(workspace),
         "--job-id", "sigterm", "--batch-size", "1"], s3.env)
    assert job.engine_started.wait(120), "".join(job.lines)[-3000:]
    assert job.proc.poll() is None, "the job ended before the signal could be sent"
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    rc = job.proc.wait(timeout=20)
    elapsed = time.monotonic() - t0
    rc, stdout, stderr = job.finish(5)
    assert rc == 143 and elapsed < 5.0, (rc, elapsed, stderr[-2000:])
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "cancelled"
    assert s3.client().list_objects_v2(Bucket="media", Prefix=out_key).get("KeyCount", 0) == 0
    assert not (workspace / "job_sigterm").exists()


def test_on_finish_idle_after_a_failed_job_keeps_the_exit_code():
    job = _start(["--video", "v.mp4", "--on-finish", "idle"], {})  # audio/output missing: exit 2
    manifest = json.loads(job.proc.stdout.readline())
    assert manifest["exit_code"] == 2
    time.sleep(0.5)
    assert job.proc.poll() is None
    job.proc.send_signal(signal.SIGINT)
    rc, _, stderr = job.finish(10)
    assert rc == 2 and stderr.count("error[2]:") == 1


def test_stop_group_without_salad_api_is_a_clear_usage_error(monkeypatch):
    """--on-finish stop-group needs musetalk_job.salad.api.stop_own_group; when it cannot be
    imported the run fails up front (exit 2) instead of after the job."""
    from musetalk_job.errors import SpecError
    from musetalk_job.runner_cli import _stop_group_function

    monkeypatch.setitem(sys.modules, "musetalk_job.salad.api", None)  # makes the import fail
    with pytest.raises(SpecError) as info:
        _stop_group_function()
    assert info.value.exit_code == 2 and "stop-group" in info.value.message and "salad.api" in info.value.message
