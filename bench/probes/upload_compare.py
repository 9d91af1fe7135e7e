#!/usr/bin/env python3
"""W1 warm with the frames uploaded in the background (``Pipeline.early_upload``) and without,
alternating in one process; wall time, stages and whether the output files are identical.

    python bench/probes/upload_compare.py --out upload.json [--compile regional] [--preset veryfast] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--media", type=Path, default=ROOT / ".bench" / "media")
    p.add_argument("--models", type=Path, default=Path("/tmp/musetalk-bench-models"))
    p.add_argument("--compile", default="")
    p.add_argument("--preset", default="veryfast")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--audio-seconds", type=float, default=None)
    args = p.parse_args(argv)

    import torch

    import bench as B
    from musetalk_job.models.random_weights import write_random_weights
    from musetalk_job.pipeline import Pipeline

    if not (args.media / B.VIDEO_NAME).exists():
        B.make_media(args.media)
    video, audio, boxes = args.media / B.VIDEO_NAME, args.media / B.AUDIO_NAME, args.media / B.BOXES_NAME
    work = Path(tempfile.mkdtemp(prefix="upload-compare-"))
    if args.audio_seconds:
        audio = B.trimmed_audio(audio, work / "speech.wav", args.audio_seconds)
    if not (args.models / "musetalkV15" / "unet.pth").exists():
        write_random_weights(args.models, size=args.size, version="v15", seed=0)
    cuda = args.device.startswith("cuda")
    pipe = Pipeline.from_models_dir(args.models, device=args.device, dtype="fp16" if cuda else None, version="v15")
    pipe.warmup()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": args.preset,
                              "compile": args.compile or "eager", "gpu": torch.cuda.get_device_name() if cuda else "cpu"}
    if args.compile:
        from musetalk_job import compiled

        pipe.compiled = compiled.enable(pipe.models, mode=args.compile)
        report["compile_warmup_s"] = round(pipe.warmup(), 1)
    B.w1_run(pipe, video, audio, boxes, work, "warm-up", preset=args.preset)
    runs: dict[str, list[dict[str, Any]]] = {"early": [], "late": []}
    digests: dict[str, set[str]] = {"early": set(), "late": set()}
    for i in range(args.repeats):
        for mode in ("late", "early") if i % 2 else ("early", "late"):
            pipe.early_upload = mode == "early"
            r = B.w1_run(pipe, video, audio, boxes, work, f"{mode}{i}", preset=args.preset)
            digests[mode].add(hashlib.sha256((work / f"w1_{mode}{i}.mp4").read_bytes()).hexdigest())
            runs[mode].append({k: r[k] for k in ("wall_s", "output_fps", "stage_seconds", "detail")})
    pipe.early_upload = True
    report["runs"] = runs
    report["median_wall_s"] = {m: statistics.median(r["wall_s"] for r in v) for m, v in runs.items()}
    report["identical_output"] = len(digests["early"] | digests["late"]) == 1
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("median_wall_s", "identical_output")}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
