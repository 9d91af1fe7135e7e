#!/usr/bin/env python3
"""The first job after start-up against the next, with and without ``Pipeline.warmup_job()``.

    python bench/probes/first_job.py --models-dir /tmp/m --media .bench/media --out first.json   # H200
    python bench/probes/first_job.py --models-dir /tmp/tiny --size tiny --device cpu \\
        --media .bench/media --rounds 1 --frames 2 --out f.json                                  # smoke

Each variant runs in a fresh process, as a worker starts: ``Pipeline.from_models_dir`` (random
weights at ``--size`` written into ``--models-dir`` first when it is empty), ``warmup()``, and for
``job`` also ``warmup_job()`` at the video's frame size; then W1 (the media's video, speech and
boxes file, x264 ``--preset``) ``--jobs`` times. Variants alternate over ``--rounds``. Reported per
process: the start-up seconds and, per job, the wall seconds, stage seconds and the engine's
detail (encoder and mask waits); the MP4s' hashes show that both variants write the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # noqa: E402 - bench/bench.py: the media's names, trimmed_audio
import report  # noqa: E402 - bench/probes/report.py, beside this script

VARIANTS = ("warmup", "job")


def _log(msg: str) -> None:
    print(f"[first_job {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch

    from musetalk_job.media import probe
    from musetalk_job.options import EngineOptions
    from musetalk_job.pipeline import Pipeline

    media = Path(args.media)
    video, audio, boxes = media / b.VIDEO_NAME, media / b.AUDIO_NAME, media / b.BOXES_NAME
    info = probe(video)
    t0 = time.perf_counter()
    pipe = Pipeline.from_models_dir(args.models_dir, device=args.device)
    pipe.avatar_cache = None  # every job is a first one for its video
    load_s = time.perf_counter() - t0
    warmup_s = pipe.warmup() if pipe.device.type == "cuda" else 0.0
    job_s = (pipe.warmup_job(frame_size=(info.width, info.height), seconds=args.warmup_seconds, preset=args.preset)
             if args.variant == "job" else 0.0)
    out: dict[str, Any] = {"variant": args.variant, "load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3),
                           "warmup_job_s": round(job_s, 3), "jobs": []}
    with tempfile.TemporaryDirectory(prefix="first-job-out-") as tmp:
        if args.frames:  # smoke runs: a short piece of the speech
            audio = b.trimmed_audio(audio, Path(tmp) / "speech.wav", args.frames / 25.0)
        for i in range(args.jobs):
            target = Path(tmp) / f"out{i}.mp4"
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            result = pipe.run(video, audio, target, EngineOptions(boxes_file=boxes, preset=args.preset))
            wall = time.perf_counter() - t
            out["jobs"].append({
                "wall_s": round(wall, 3),
                "frames": result.frames,
                "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
                "detail": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in pipe.last_timings.items()},
                "sha256": hashlib.sha256(target.read_bytes()).hexdigest()[:16],
            })
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--media", default=str(ROOT / ".bench" / "media"))
    p.add_argument("--size", choices=("tiny", "full"), default="full", help="random weights written when the dir is empty")
    p.add_argument("--device", default=None)
    p.add_argument("--preset", default="medium", help="x264 preset of the jobs (default medium, the engine's)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="W1 jobs per process (default 2: the first and the next)")
    p.add_argument("--frames", type=int, default=0, help="smoke: output frames per job (default: W1's 30 s of speech)")
    p.add_argument("--warmup-seconds", type=float, default=2.0, help="length of the warm-up job (default 2.0, the worker's)")
    p.add_argument("--out", default=None)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    from musetalk_job.models import layout

    models = Path(args.models_dir)
    if not (models / layout.UNET["v15"][0]).is_file():
        from musetalk_job.models.random_weights import write_random_weights

        _log(f"writing {args.size} random weights to {models}")
        write_random_weights(models, size=args.size, version="v15", seed=0)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant,
                    "--models-dir", str(models), "--media", args.media, "--preset", args.preset,
                    "--jobs", str(args.jobs), "--frames", str(args.frames), "--warmup-seconds", str(args.warmup_seconds)]
            if args.device:
                argv += ["--device", args.device]
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-4000:])
                raise SystemExit(f"first_job: {variant} child failed with exit {res.returncode}")
            run = json.loads(res.stdout.strip().splitlines()[-1])
            runs[variant].append(run)
            _log(f"round {r + 1} {variant}: warmup {run['warmup_s']:.2f}s + job {run['warmup_job_s']:.2f}s; jobs "
                 + ", ".join(f"{j['wall_s']:.3f}s" for j in run["jobs"]))
    summary = {
        v: {
            "first_job_median_s": statistics.median(run["jobs"][0]["wall_s"] for run in rs),
            "next_job_median_s": statistics.median(run["jobs"][-1]["wall_s"] for run in rs) if args.jobs > 1 else None,
            "warmup_job_median_s": statistics.median(run["warmup_job_s"] for run in rs),
        }
        for v, rs in runs.items() if rs
    }
    hashes = sorted({j["sha256"] for rs in runs.values() for run in rs for j in run["jobs"]})
    result = {"preset": args.preset, "rounds": args.rounds, "summary": summary, "same_bytes": len(hashes) == 1,
              "runs": runs}
    report.write(result, args.out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
