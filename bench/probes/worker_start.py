#!/usr/bin/env python3
"""``musetalk-job serve`` as a node runs it: process start → started, then W1 jobs over HTTP.

    python bench/probes/worker_start.py --models-dir /tmp/m --media .bench/media --out worker.json  # H200
    python bench/probes/worker_start.py --models-dir /tmp/tiny --size tiny --device cpu --jobs 1 \\
        --media .bench/media --out w.json                                                         # smoke

Starts the real worker (``python -m musetalk_job serve --port 0 --allow-dir <media> --allow-dir
<out>``; random weights at ``--size`` are written into ``--models-dir`` first when it is empty, and
the fp16 fast copies made on a GPU), polls ``/health/startup`` every 50 ms and reports the seconds
from spawn to "started" with the worker's own start-up log lines (models loaded, warm-up, warm-up
job). Then it POSTs W1 (the media's video, speech and boxes file; x264 ``--preset``, the engine's
``medium`` by default) ``--jobs`` times and reports each job's wall seconds, HTTP status and the
result's stage seconds; finally SIGTERM and the exit code. The page cache is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # noqa: E402 - bench/bench.py: the media's names, trimmed_audio
import report  # noqa: E402 - bench/probes/report.py, beside this script


def _log(msg: str) -> None:
    print(f"[worker_start {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--media", default=str(ROOT / ".bench" / "media"))
    p.add_argument("--size", choices=("tiny", "full"), default="full")
    p.add_argument("--device", default=None)
    p.add_argument("--preset", default="medium")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--audio-seconds", type=float, default=0.0, help="smoke: that much of the speech (default: all 30 s)")
    p.add_argument("--work", default="/tmp/worker-start")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for start-up and for each job")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from musetalk_job.models import layout

    models = Path(args.models_dir).resolve()
    if not (models / layout.UNET["v15"][0]).is_file():
        from musetalk_job.models.random_weights import write_random_weights

        _log(f"writing {args.size} random weights to {models}")
        write_random_weights(models, size=args.size, version="v15", seed=0)
    if args.device != "cpu":
        import torch

        if torch.cuda.is_available():
            from musetalk_job import weights

            if not weights.fast_copy_valid(models, "unet-v15"):
                _log("converting (convert-weights)")
                weights.convert_weights(models, version="v15", dtype="fp16", landmarks="dwpose")
    media = Path(args.media).resolve()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    speech = media / b.AUDIO_NAME
    if args.audio_seconds > 0:
        speech = b.trimmed_audio(speech, work / "speech.wav", args.audio_seconds)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSETALK_", "SALAD_"))}
    env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1", "MUSETALK_LOG_FORMAT": "json", "MUSETALK_MODELS_DIR": str(models),
                "MUSETALK_WORKSPACE_ROOT": str(work / "ws"), "MUSETALK_AVATAR_CACHE": ""})
    if args.device:
        env["MUSETALK_DEVICE"] = args.device
    argv = [sys.executable, "-m", "musetalk_job", "serve", "--port", "0", "--host", "127.0.0.1",
            "--allow-dir", str(media), "--allow-dir", str(work)]
    t_spawn = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    port: list[int] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((round(time.monotonic() - t_spawn, 3), line.rstrip()))
            if not port and '"event": "listening"' in line:
                port.append(json.loads(line)["port"])

    threading.Thread(target=read, daemon=True).start()
    result: dict[str, Any] = {"preset": args.preset, "jobs": []}
    try:
        deadline = time.monotonic() + args.timeout
        while not port or _get(f"http://127.0.0.1:{port[0]}/health/startup") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("worker_start: the worker did not start:\n" + "\n".join(x for _, x in lines[-30:]))
            time.sleep(0.05)
        result["spawn_to_started_s"] = round(time.monotonic() - t_spawn, 3)
        _log(f"started in {result['spawn_to_started_s']:.2f}s")
        base = f"http://127.0.0.1:{port[0]}"
        for i in range(args.jobs):
            job = {"video": str(media / b.VIDEO_NAME), "audio": str(speech), "boxes": str(media / b.BOXES_NAME), "output": str(work / f"out{i}.mp4"), "preset": args.preset,
                   "job_id": f"w1-{i}"}
            t = time.monotonic()
            status, body = _post(base + "/jobs", job, args.timeout)
            wall = round(time.monotonic() - t, 3)
            manifest = body.get("manifest") if isinstance(body.get("manifest"), dict) else {}
            result["jobs"].append({"wall_s": wall, "status": status, "exit_code": body.get("exit_code"),
                                   "stage_seconds": manifest.get("stage_seconds"), "body_keys": sorted(body)})
            _log(f"job {i + 1}: HTTP {status} in {wall:.3f}s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["exit_code"] = proc.wait()
        wanted = ("models loaded", "warm-up", "load", "serving")
        result["log"] = [[t, line] for t, line in lines
                         if any(w in line for w in wanted) and '"progress"' not in line][:40]
    text = report.write(result, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
