#!/usr/bin/env python3
"""Where the GPU's time goes during one W1 job: busy, idle, and per CUDA stream.

    python bench/probes/gpu_timeline.py --out timeline.json [--compile regional] [--preset veryfast] [--dwpose 1]

Writes full-size random weights when missing (as ``bench.py``), loads the pipeline, compiles it
when asked, runs W1 once to warm up, then runs it again under ``torch.profiler`` and reads the
kernel events of its Chrome trace:

- ``window``: from the first to the last GPU kernel of the job; ``busy_s`` is the union of every
  kernel's interval (any stream), ``idle_s`` the rest; ``idle_gaps`` counts the gaps by length;
  ``busy_per_100ms`` the busy share of each 100 ms of it (where in the job the GPU waits).
- ``streams``: kernel seconds and kernel count per stream (the engine's main stream, the blend
  masks' side stream, the colour conversion's), with each stream's first and last kernel.
- ``top_kernels``: the kernels with the most device time (name, calls, seconds).

The profiler slows the host side a little; the figures are about the GPU's occupancy, not the
job's wall time (``wall_s`` is reported for reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def kernel_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def union_busy(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Total covered length of ``intervals`` (µs) and the gaps between covered runs."""
    busy = 0.0
    gaps: list[float] = []
    end = None
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None:
                gaps.append(a - end)
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy, gaps


def busy_per_bin(intervals: list[tuple[float, float]], t0: float, t1: float, width: float = 1e5) -> list[float]:
    """The share of each ``width`` µs bin of ``[t0, t1]`` (default 100 ms) in which some kernel ran."""
    n = max(1, int((t1 - t0) // width) + 1)
    busy = [0.0] * n
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    for a, b in merged:
        while a < b:
            k = int((a - t0) // width)
            edge = min(b, t0 + (k + 1) * width)
            busy[k] += edge - a
            a = edge
    return [round(min(1.0, x / width), 3) for x in busy]


def summarize(events: list[dict[str, Any]], top: int = 25) -> dict[str, Any]:
    if not events:
        return {"error": "no GPU events in the trace"}
    iv = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events]
    t0, t1 = min(a for a, _ in iv), max(b for _, b in iv)
    busy, gaps = union_busy(iv)
    per_stream: dict[str, dict[str, float]] = defaultdict(lambda: {"seconds": 0.0, "events": 0, "first_s": 1e18, "last_s": 0.0})
    per_name: dict[str, dict[str, float]] = defaultdict(lambda: {"seconds": 0.0, "calls": 0})
    for e in events:
        args = e.get("args") or {}
        s = per_stream[str(args.get("stream", e.get("tid")))]
        s["seconds"] += float(e.get("dur", 0)) / 1e6
        s["events"] += 1
        s["first_s"] = min(s["first_s"], (float(e["ts"]) - t0) / 1e6)
        s["last_s"] = max(s["last_s"], (float(e["ts"]) + float(e.get("dur", 0)) - t0) / 1e6)
        n = per_name[str(e.get("name", "?"))[:100]]
        n["seconds"] += float(e.get("dur", 0)) / 1e6
        n["calls"] += 1
    buckets = {"<10us": 0.0, "10-100us": 0.0, "0.1-1ms": 0.0, "1-10ms": 0.0, ">=10ms": 0.0}
    counts = dict.fromkeys(buckets, 0)
    for g in gaps:
        key = "<10us" if g < 10 else "10-100us" if g < 100 else "0.1-1ms" if g < 1000 else "1-10ms" if g < 10000 else ">=10ms"
        buckets[key] += g / 1e6
        counts[key] += 1
    names = sorted(per_name.items(), key=lambda kv: -kv[1]["seconds"])[:top]
    return {
        "window_s": round((t1 - t0) / 1e6, 6),
        "busy_s": round(busy / 1e6, 6),
        "idle_s": round((t1 - t0 - busy) / 1e6, 6),
        "idle_gaps_seconds": {k: round(v, 4) for k, v in buckets.items()},
        "idle_gaps_count": counts,
        "busy_per_100ms": busy_per_bin(iv, t0, t1),
        "streams": {k: {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()} for k, v in per_stream.items()},
        "top_kernels": [{"name": k, "calls": int(v["calls"]), "seconds": round(v["seconds"], 4)} for k, v in names],
    }


def main(argv: list[str] | None = None) -> int:
    import bench as B

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.probe_arguments(p)
    p.add_argument("--preset", default="veryfast")
    p.add_argument("--dwpose", type=int, default=0, choices=(0, 1),
                   help="detect the faces with DWPose (the boxes file's boxes, as bench.py --dwpose-w1) instead of reading them")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    pipe, video, audio, boxes, info, work = B.probe_setup(args, "gpu-timeline-")
    cuda = args.device.startswith("cuda")
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **info, "preset": args.preset,
                              "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if cuda else "cpu"}
    report["landmarks"] = "dwpose" if args.dwpose else "boxes file"
    job_args: dict[str, Any] = {"preset": args.preset}
    with contextlib.ExitStack() as stack:
        if args.dwpose:
            from musetalk_job.landmarks.dwpose import DWPoseDetector

            pipe.detector("dwpose").warmup()
            stack.enter_context(B.patched(DWPoseDetector, "detect", B.dwpose_known_boxes(video, boxes)))
            job_args["landmarks"], boxes = "dwpose", None
        B.w1_run(pipe, video, audio, boxes, work, "warm-up", **job_args)
        report["plain_run"] = B.w1_run(pipe, video, audio, boxes, work, "plain", **job_args)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            run = B.w1_run(pipe, video, audio, boxes, work, "profiled", **job_args)
    report["profiled_run"] = {k: run[k] for k in ("wall_s", "output_fps", "stage_seconds", "detail")}
    trace_path = work / "trace.json"
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    report["timeline"] = summarize(kernel_events(trace))
    args.out.write_text(json.dumps(report, indent=1))
    tl = report["timeline"]
    print(f"window {tl.get('window_s')} s, busy {tl.get('busy_s')} s, idle {tl.get('idle_s')} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
