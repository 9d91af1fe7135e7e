#!/usr/bin/env python3
"""The video encoder alone (CPU): frames/s and file size of ``VideoWriter`` per preset, number of
parallel libx264 segments (``workers``) and input kind (``rgb``: converted by swscale in the
writer; ``i420``: converted beforehand by ``colour.rgb_to_i420``, as the engine does on the GPU),
plus the one-stream libx264 ceiling (a bare ``CodecContext`` fed ready I420 frames, all threads,
no muxing, no copies).

    python bench/encoder_bench.py [--frames 400] [--presets medium veryfast] [--workers 1 2 4 8] > encoder.json

Frames: the 1280x720 sample face video (``samples``: the astronaut portrait panning slowly, as
``bench.py make-media`` makes for W1). The default 400 frames split into 8 segments of 50, so 1,
2, 4 and 8 workers all get equal shares. Each configuration runs once after one warm-up run.
Prints one JSON object on stdout (progress lines on stderr); ~40 s on a 16-vCPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import cpu_seconds  # noqa: E402  (bench/bench.py)


def make_frames(n: int, width: int = 1280, height: int = 720, fps: float = 25.0) -> np.ndarray:
    from musetalk_job.samples import _astronaut, _face_frame

    src = _astronaut()
    return np.stack([_face_frame(src, width, height, i / fps) for i in range(n)])


def writer_run(frames: np.ndarray, i420: Optional[np.ndarray], preset: str, workers: int, out: Path,
               segment_frames: Optional[int] = None, segment_threads: Optional[int] = None) -> dict[str, Any]:
    from musetalk_job.media import VideoWriter

    n, h, w = frames.shape[:3]
    t, cpu0 = time.perf_counter(), cpu_seconds()
    with VideoWriter(out, width=w, height=h, fps=25, preset=preset, workers=workers,
                     segment_frames=segment_frames, expected_frames=n, segment_threads=segment_threads) as writer:
        for start in range(0, n, 64):  # the engine hands over batches of 64
            if i420 is not None:
                writer.write_i420(i420[start : start + 64])
            else:
                writer.write(frames[start : start + 64])
    s = time.perf_counter() - t
    cpu = cpu_seconds() - cpu0
    return {"seconds": round(s, 3), "fps": round(n / s, 1), "bytes": out.stat().st_size,
            "cpu_s": round(cpu, 2), "cpu_ms_per_frame": round(cpu / n * 1e3, 2)}


def x264_ceiling(i420: np.ndarray, preset: str) -> dict[str, Any]:
    """One libx264 stream, all CPUs, frames ready in memory: what one encoder can do at most."""
    import av

    n, rows, w = i420.shape
    frames = [av.VideoFrame.from_ndarray(f, format="yuv420p") for f in i420]
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, rows * 2 // 3, "yuv420p"
    ctx.time_base, ctx.framerate = Fraction(1, 25), Fraction(25)
    ctx.options = {"crf": "18", "preset": preset}
    ctx.thread_count = 0
    ctx.open()
    size = 0
    t, cpu0 = time.perf_counter(), cpu_seconds()
    for i, frame in enumerate(frames):
        frame.pts = i
        size += sum(p.size for p in ctx.encode(frame))
    size += sum(p.size for p in ctx.encode(None))
    s = time.perf_counter() - t
    cpu = cpu_seconds() - cpu0
    return {"preset": preset, "seconds": round(s, 3), "fps": round(n / s, 1), "bytes": size,
            "cpu_s": round(cpu, 2), "cpu_ms_per_frame": round(cpu / n * 1e3, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--presets", nargs="+", default=["medium", "veryfast"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--segment-frames", type=int, default=None, help="default: the writer's DEFAULT_SEGMENT_FRAMES")
    p.add_argument("--compare-segment-frames", type=int, nargs="*", default=[100],
                   help="also run the default worker count, I420 input, with these segment lengths")
    p.add_argument("--segment-threads", type=int, nargs="*", default=[],
                   help="also run each worker count > 1, I420 input, with these libx264 threads per segment")
    args = p.parse_args()

    import av
    import torch

    from musetalk_job.colour import rgb_to_i420
    from musetalk_job.media import DEFAULT_SEGMENT_FRAMES, default_encoder_workers

    t = time.perf_counter()
    frames = make_frames(args.frames)
    make_s = time.perf_counter() - t
    t = time.perf_counter()
    i420 = rgb_to_i420(torch.from_numpy(frames)).numpy()
    conv_s = time.perf_counter() - t
    t = time.perf_counter()
    for f in frames[:50]:
        av.VideoFrame.from_ndarray(f, format="rgb24").reformat(
            format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG", interpolation="BICUBIC")
    sws_ms = (time.perf_counter() - t) / min(50, len(frames)) * 1e3
    default_workers = default_encoder_workers()
    report: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyav": av.__version__,
        "torch_threads": torch.get_num_threads(),
        "frames": int(frames.shape[0]),
        "size": [int(frames.shape[2]), int(frames.shape[1])],
        "default_workers": default_workers,
        "segment_frames": args.segment_frames or DEFAULT_SEGMENT_FRAMES,
        "make_frames_s": round(make_s, 2),
        "cpu_rgb_to_i420_torch_ms_per_frame": round(conv_s / len(frames) * 1e3, 3),
        "cpu_swscale_ms_per_frame": round(sws_ms, 3),
        "x264_one_stream_ceiling": [],
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="encoder-bench-") as tmp:
        out = Path(tmp) / "o.mp4"
        writer_run(frames[:64], i420[:64], args.presets[0], max(args.workers), out, 16)  # warm-up
        for preset in args.presets:
            report["x264_one_stream_ceiling"].append(x264_ceiling(i420, preset))
            print(json.dumps(report["x264_one_stream_ceiling"][-1]), file=sys.stderr)
            for workers in args.workers:
                kinds = ["i420", "rgb"] if workers in (1, default_workers) else ["i420"]
                for kind in kinds:
                    try:
                        r = writer_run(frames, i420 if kind == "i420" else None, preset, workers, out, args.segment_frames)
                    except Exception as exc:  # report, keep going
                        r = {"error": f"{type(exc).__name__}: {exc}"}
                    r.update(preset=preset, workers=workers, input=kind)
                    report["runs"].append(r)
                    print(json.dumps(r), file=sys.stderr)
                for threads in args.segment_threads if workers > 1 else []:
                    r = writer_run(frames, i420, preset, workers, out, args.segment_frames, threads)
                    r.update(preset=preset, workers=workers, input="i420", segment_threads=threads)
                    report["runs"].append(r)
                    print(json.dumps(r), file=sys.stderr)
                if workers == default_workers and workers > 1:
                    for seg in args.compare_segment_frames:
                        r = writer_run(frames, i420, preset, workers, out, seg)
                        r.update(preset=preset, workers=workers, input="i420", segment_frames=seg)
                        report["runs"].append(r)
                        print(json.dumps(r), file=sys.stderr)
    one = {r["preset"]: r["bytes"] for r in report["runs"] if r.get("workers") == 1 and r.get("input") == "i420" and "bytes" in r}
    for r in report["runs"]:
        if "bytes" in r and r["preset"] in one:
            r["size_vs_one_stream"] = round(r["bytes"] / one[r["preset"]], 3)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
