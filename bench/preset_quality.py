#!/usr/bin/env python3
"""Size and quality of the H.264 output per libx264 preset and CRF (CPU only).

    python bench/preset_quality.py [--frames 250] [--presets medium fast veryfast ultrafast] \
        [--crfs 18] [--segments 4] > presets.json

Encodes the 1280x720 sample face video (``samples``: the astronaut portrait panning slowly, as
``bench.py make-media`` makes for W1) with ``VideoWriter`` for each preset x CRF, decodes it and
compares it with the frames it was given: PSNR over Y and over RGB, SSIM on Y (a subset of
frames), bytes and bits per pixel, encode seconds (of this machine: compare speeds on the GPU
host, ``encoder_bench.py``). ``--segments N`` adds, for the first CRF, the segment-parallel
writer (N workers, 50-frame segments) so the size cost of its extra IDR frames is in the same
table. Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def make_frames(n: int, width: int = 1280, height: int = 720, fps: float = 25.0) -> np.ndarray:
    from musetalk_job.samples import _astronaut, _face_frame

    src = _astronaut()
    return np.stack([_face_frame(src, width, height, i / fps) for i in range(n)])


def _luma(rgb: np.ndarray) -> np.ndarray:
    # BT.601 luma on 0..255 (full scale), for PSNR/SSIM of the picture as seen
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure(frames: np.ndarray, preset: str, crf: int, out: Path, workers: int = 1,
            ssim_every: int = 10) -> dict[str, Any]:
    from skimage.metrics import structural_similarity

    from musetalk_job.media import VideoWriter, read_frames

    n, h, w = frames.shape[:3]
    t = time.perf_counter()
    with VideoWriter(out, width=w, height=h, fps=25, preset=preset, crf=crf, workers=workers,
                     segment_frames=50) as writer:
        for start in range(0, n, 64):
            writer.write(frames[start : start + 64])
    seconds = time.perf_counter() - t
    dec = read_frames(out).frames
    assert dec.shape == frames.shape, (dec.shape, frames.shape)
    y_src, y_dec = _luma(frames.astype(np.float32)), _luma(dec.astype(np.float32))
    ssim = [structural_similarity(y_src[i], y_dec[i], data_range=255.0) for i in range(0, n, ssim_every)]
    size = out.stat().st_size
    return {
        "preset": preset, "crf": crf, "workers": workers,
        "bytes": size, "bits_per_pixel": round(size * 8 / (n * h * w), 4),
        "psnr_y_db": round(_psnr(y_src, y_dec), 3), "psnr_rgb_db": round(_psnr(frames, dec), 3),
        "ssim_y": round(float(np.mean(ssim)), 5),
        "encode_s_this_machine": round(seconds, 2),
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=250)
    p.add_argument("--presets", nargs="+", default=["medium", "fast", "veryfast", "ultrafast"])
    p.add_argument("--crfs", type=int, nargs="+", default=[18])
    p.add_argument("--segments", type=int, default=4, help="also the segment-parallel writer (0: skip)")
    args = p.parse_args(argv)

    frames = make_frames(args.frames)
    report: dict[str, Any] = {"python": platform.python_version(), "frames": args.frames,
                              "size": [1280, 720], "content": "samples._face_frame (astronaut, panning)", "runs": []}
    with tempfile.TemporaryDirectory(prefix="musetalk-presets-") as tmp:
        for crf in args.crfs:
            for preset in args.presets:
                runs = [1] + ([args.segments] if args.segments > 1 and crf == args.crfs[0] else [])
                for workers in runs:
                    r = measure(frames, preset, crf, Path(tmp) / f"{preset}-{crf}-{workers}.mp4", workers)
                    print(f"{preset} crf {crf} workers {workers}: {r}", file=sys.stderr)
                    report["runs"].append(r)
    ref = next((r for r in report["runs"] if r["preset"] == "medium" and r["crf"] == args.crfs[0]
                and r["workers"] == 1), None)
    if ref:
        for r in report["runs"]:
            r["size_vs_medium"] = round(r["bytes"] / ref["bytes"], 3)
            r["psnr_y_vs_medium_db"] = round(r["psnr_y_db"] - ref["psnr_y_db"], 3)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
