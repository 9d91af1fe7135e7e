#!/usr/bin/env python3
"""The video encoder alone (CPU): frames/s and file size of ``VideoWriter`` per preset, number of
parallel libx264 segments and input kind (RGB, converted by swscale in the writer; or I420,
converted beforehand as the engine does on the GPU).

    python bench/encoder_bench.py [--frames 250] [--presets medium veryfast] [--workers 1 2 4 8] > encoder.json

Frames: 1280x720 views of ``skimage.data.astronaut()`` panned a few pixels per frame (real image
content, motion for the encoder to find). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def make_frames(n: int, width: int = 1280, height: int = 720) -> np.ndarray:
    import cv2
    from skimage import data

    big = cv2.resize(data.astronaut(), (width + 4 * n, height + 2 * n), interpolation=cv2.INTER_CUBIC)
    return np.stack([big[i : i + height, 3 * i : 3 * i + width] for i in range(n)])


def run(frames: np.ndarray, i420: np.ndarray | None, preset: str, workers: int, out: Path) -> dict[str, Any]:
    from musetalk_job.media import VideoWriter

    n, h, w = frames.shape[:3]
    t = time.perf_counter()
    with VideoWriter(out, width=w, height=h, fps=25, preset=preset, workers=workers) as writer:
        for start in range(0, n, 64):  # the engine hands over batches of 64
            if i420 is not None:
                writer.write_i420(i420[start : start + 64])
            else:
                writer.write(frames[start : start + 64])
    s = time.perf_counter() - t
    return {"seconds": round(s, 3), "fps": round(n / s, 1), "bytes": out.stat().st_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=250)
    p.add_argument("--presets", nargs="+", default=["medium", "veryfast"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()

    import torch

    from musetalk_job.colour import rgb_to_i420
    from musetalk_job.media import DEFAULT_SEGMENT_FRAMES, default_encoder_workers

    frames = make_frames(args.frames)
    t = time.perf_counter()
    i420 = rgb_to_i420(torch.from_numpy(frames)).numpy()
    report: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "frames": int(frames.shape[0]),
        "size": [int(frames.shape[2]), int(frames.shape[1])],
        "default_workers": default_encoder_workers(),
        "segment_frames": DEFAULT_SEGMENT_FRAMES,
        "cpu_rgb_to_i420_torch_ms_per_frame": round((time.perf_counter() - t) / frames.shape[0] * 1e3, 3),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="encoder-bench-") as tmp:
        for preset in args.presets:
            for workers in args.workers:
                kinds = ["i420", "rgb"] if workers in (1, report["default_workers"]) else ["i420"]
                for kind in kinds:
                    try:
                        r = run(frames, i420 if kind == "i420" else None, preset, workers, Path(tmp) / "o.mp4")
                    except Exception as exc:  # report, keep going
                        r = {"error": f"{type(exc).__name__}: {exc}"}
                    r.update(preset=preset, workers=workers, input=kind)
                    report["runs"].append(r)
                    print(json.dumps(r), file=sys.stderr)
    one = {(r["preset"]): r["bytes"] for r in report["runs"] if r.get("workers") == 1 and r.get("input") == "i420" and "bytes" in r}
    for r in report["runs"]:
        if "bytes" in r and r["preset"] in one:
            r["size_vs_one_stream"] = round(r["bytes"] / one[r["preset"]], 3)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
