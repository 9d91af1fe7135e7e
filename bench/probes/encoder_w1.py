#!/usr/bin/env python3
"""W1 per engine variant (e.g. the segment encoder's layout), with DWPose, and when its first frame reaches the encoder.

    python bench/probes/encoder_w1.py --compile regional --variant default: \\
        --variant w8t4:encoder_workers=8,encoder_segment_threads=4 --rounds 3 --out enc.json      # H200
    python bench/probes/encoder_w1.py --device cpu --size tiny --models /tmp/tiny --variant default: \\
        --variant w2:encoder_workers=2 --rounds 1 --audio-seconds 0.4 --out e.json                # smoke

A ``veryfast`` W1 is bound by its encoder: the generate loop waits on it, and the job ends an
encoder tail after the loop. So its wall time is about *when the first frame reaches the encoder*
plus *750 frames at the encoder's rate inside the job*. This probe measures both, per variant
(``NAME:ATTR=VALUE,...``: ``Pipeline`` attributes set for its jobs, e.g. ``encoder_workers``,
``encoder_segment_threads``, ``early_log_mel``, ``upload_on_demand``, ``gpu_chunk``; values are integers,
``true``/``false`` or ``none``; ``preset=NAME`` sets the job's x264 preset instead), in one process, the variants rotated over ``--rounds`` after one uncounted job each:

- ``new``: W1 detecting its faces with DWPose (the network's real work; the boxes file's boxes,
  as ``bench.py --dwpose-w1``), no avatar cache;
- ``repeat``: the same video again from the avatar cache (filled once, before the rounds).

Per job: wall seconds, ``first_frame_s`` and ``last_frame_s`` (job start → the first and the
last frames handed to the encoder), ``tail_s`` (last frame → done), the stages, the engine's
detail and the output's hash (an encoder layout changes the bytes only through the last segments'
sizes; the other switches change none).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # noqa: E402 - bench/bench.py: probe_pipeline, w1_run, dwpose_known_boxes
import report  # noqa: E402 - bench/probes/report.py, beside this script


def _log(msg: str) -> None:
    print(f"[encoder_w1 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:ATTR=VALUE,..."`` → the name and the Pipeline attributes to set."""
    name, _, spec = text.partition(":")
    attrs: dict[str, Any] = {}
    for item in (i for i in spec.split(",") if i.strip()):
        key, _, raw = item.partition("=")
        low = raw.strip().lower()
        attrs[key.strip()] = {"true": True, "false": False, "none": None}.get(low, int(low) if low.lstrip("-").isdigit() else raw)
    return name.strip() or "default", attrs


class WriteClock:
    """Records when frames are handed to any ``VideoWriter`` (first and last call of a job)."""

    def __init__(self) -> None:
        self.first: Optional[float] = None
        self.last: Optional[float] = None

    def reset(self) -> None:
        self.first = self.last = None

    def wrap(self, method: Any) -> Any:
        clock = self

        def timed(writer: Any, *a: Any, **k: Any) -> Any:
            now = time.perf_counter()
            if clock.first is None:
                clock.first = now
            out = method(writer, *a, **k)
            clock.last = time.perf_counter()
            return out

        return timed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    b.probe_arguments(p)
    p.add_argument("--preset", default="veryfast")
    p.add_argument("--variant", action="append", default=[], help="NAME:ATTR=VALUE,... (repeatable; default: one run as is)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kinds", default="new,repeat", help="which jobs each round runs: new, repeat or both")
    args = p.parse_args(argv)

    import torch

    from musetalk_job.cache import AvatarCache
    from musetalk_job.cpus import usable_cpus
    from musetalk_job.landmarks.dwpose import DWPoseDetector
    from musetalk_job.media import VideoWriter

    pipe, video, audio, boxes, info, work = b.probe_setup(args, "encoder-w1-")
    cuda = args.device.startswith("cuda")
    det = pipe.detector("dwpose")
    det.warmup()
    variants = dict(parse_variant(v) for v in (args.variant or ["default:"]))
    names = list(variants)
    clock = WriteClock()
    report_: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": b._commit(), **info,
                               "preset": args.preset, "torch": torch.__version__, "cpus": b.host_cpus(), "usable_cpus": usable_cpus(),
                               "variants": {k: {a: str(v) for a, v in attrs.items()} for k, attrs in variants.items()},
                               "runs": {}}
    runs: dict[str, list[dict[str, Any]]] = report_["runs"]

    def job(kind: str, variant: str, label: str) -> dict[str, Any]:
        attrs = dict(variants.get(variant, {}))
        preset = str(attrs.pop("preset", args.preset))  # a job option, not a Pipeline attribute
        saved = {k: getattr(pipe, k) for k in attrs}
        for k, v in attrs.items():
            setattr(pipe, k, v)
        clock.reset()
        try:
            t0 = time.perf_counter()
            run = b.w1_run(pipe, video, audio, None, work, label, landmarks="dwpose", preset=preset)
        finally:
            for k, v in saved.items():
                setattr(pipe, k, v)
        first, last = clock.first or t0, clock.last or t0
        run.update(first_frame_s=round(first - t0, 3), last_frame_s=round(last - t0, 3),
                   tail_s=round(run["wall_s"] - (last - t0), 3))
        _log(f"{kind} {variant}: {run['wall_s']:.3f}s (first frame {run['first_frame_s']:.3f}s, "
             f"last {run['last_frame_s']:.3f}s, encoder wait {run['detail'].get('encoder_wait_s')})")
        return run

    with b.patched(DWPoseDetector, "detect", b.dwpose_known_boxes(video, boxes)), \
            b.patched(VideoWriter, "write_i420", clock.wrap(VideoWriter.write_i420)), \
            b.patched(VideoWriter, "write", clock.wrap(VideoWriter.write)):
        saved_cache = pipe.avatar_cache
        try:
            pipe.avatar_cache = None
            job("new", names[0], "warm-up")  # the first DWPose job of the process: not counted
            for variant in names[1:]:  # a variant's own first-use costs (e.g. a chunk size's compile): not counted
                job("new", variant, f"warm-up {variant}")
            cache = AvatarCache(work / "avatar-cache")
            pipe.avatar_cache = cache
            kinds = [k for k in args.kinds.split(",") if k]
            if "repeat" in kinds:
                job("fill", names[0], "fill")
            for r in range(args.rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for k, variant in enumerate(order):
                    if "new" in kinds:
                        pipe.avatar_cache = None
                        runs.setdefault(f"new|{variant}", []).append(job("new", variant, f"n{r}{k}"))
                    if "repeat" in kinds:
                        pipe.avatar_cache = cache
                        runs.setdefault(f"repeat|{variant}", []).append(job("repeat", variant, f"r{r}{k}"))
        finally:
            pipe.avatar_cache = saved_cache
    summary: dict[str, Any] = {}
    for key, rs in runs.items():
        summary[key] = {m: round(statistics.median(r[m] for r in rs), 3)
                        for m in ("wall_s", "first_frame_s", "last_frame_s", "tail_s", "output_fps")}
        summary[key]["encoder_wait_s"] = round(statistics.median(r["detail"].get("encoder_wait_s", 0.0) for r in rs), 3)
        summary[key]["hashes"] = sorted({r["output_sha256"] for r in rs})
        summary[key]["output_bytes"] = int(statistics.median(r["output_bytes"] for r in rs))
    report_["summary"] = summary
    if cuda:
        report_["gpu"] = torch.cuda.get_device_name()
    report.write(report_, str(args.out))
    for key, s in summary.items():
        print(f"{key:>20}: wall {s['wall_s']:.3f}s ({s['output_fps']} fps) first frame {s['first_frame_s']:.3f}s "
              f"last {s['last_frame_s']:.3f}s tail {s['tail_s']:.3f}s encoder wait {s['encoder_wait_s']:.3f}s {s['output_bytes']} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
