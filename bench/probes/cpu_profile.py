#!/usr/bin/env python3
"""Where the CPU goes during a warm W1 job: per-thread CPU seconds and, optionally, py-spy.

    python bench/probes/cpu_profile.py --models DIR --media DIR --out OUT.json \
        [--compile regional] [--presets medium veryfast] [--py-spy PATH --spy-dir DIR [--gil]]

Loads the engine (random full weights are written where ``--models`` has none), optionally
compiles, runs W1 once to warm up, then once per preset while sampling, every 50 ms, the CPU
time of the whole process (``/proc/self/stat``; it keeps the time of threads that have exited,
e.g. libx264's) and of each live thread (``/proc/self/task/*/stat``), named by Python's
``threading`` where the thread is a Python thread. With ``--py-spy`` a py-spy recording of the
same job is written to ``--spy-dir`` (collapsed stacks, one file per preset).

Writes JSON: per preset the job's stage seconds, wall, mean cores busy over the job and over
its generate loop, CPU seconds per thread name, and a 50 ms timeline of cores busy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(stat_path: str) -> float:
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15 of stat)


def _threads() -> dict[int, float]:
    out: dict[int, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = _cpu_of(f"/proc/self/task/{tid}/stat")
        except (OSError, IndexError, ValueError):
            pass
    return out


class Sampler:
    def __init__(self, period: float = 0.05) -> None:
        self.period, self.stop = period, threading.Event()
        self.timeline: list[tuple[float, float]] = []
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.is_set():
            now = _threads()
            for tid, cpu in now.items():
                self.first.setdefault(tid, cpu)
                self.last[tid] = cpu
            for t in threading.enumerate():
                if t.native_id is not None:
                    self.names[t.native_id] = t.name
            self.timeline.append((time.perf_counter() - t0, _cpu_of("/proc/self/stat")))
            self.stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def per_name(self) -> dict[str, float]:
        by: dict[str, float] = defaultdict(float)
        for tid, cpu in self.last.items():
            name = self.names.get(tid, "native (unnamed)")
            name = name.split("_")[0] if name.startswith("ThreadPoolExecutor") else name.rstrip("0123456789_-")
            by[name] += cpu - self.first.get(tid, cpu)
        return {k: round(v, 3) for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v > 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="/tmp/musetalk-bench-models")
    ap.add_argument("--media", type=Path, default=ROOT / ".bench" / "media")
    ap.add_argument("--work", type=Path, default=Path("/tmp/musetalk-cpu-profile"))
    ap.add_argument("--out", default="cpu_profile.json")
    ap.add_argument("--compile", default="")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (tiny weights, 1 s of audio)")
    ap.add_argument("--presets", nargs="+", default=["medium", "veryfast"])
    ap.add_argument("--py-spy", default="", help="path of a py-spy binary: also record the job with it")
    ap.add_argument("--spy-dir", type=Path, default=Path("."))
    ap.add_argument("--gil", action="store_true",
                    help="py-spy samples only the thread holding the GIL (its share of samples: how busy the GIL is)")
    args = ap.parse_args()

    import bench as b  # bench/bench.py: media, random weights, pipeline, W1 run
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    pipe, (video, audio, boxes), info = b.probe_pipeline(
        Path(args.models), args.media, device=args.device, size="full" if cuda else "tiny", compile_mode=args.compile
    )
    if not cuda:
        audio = b.trimmed_audio(audio, args.work / "speech_1s.wav", 1.0)
    report: dict = {"cpus": os.cpu_count(), "compile": args.compile, "runs": {}, "warmup_s": info["warmup_s"]}
    b.w1_run(pipe, video, audio, boxes, args.work, "pre")
    for preset in args.presets:
        spy = None
        if args.py_spy:
            args.spy_dir.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen([args.py_spy, "record", "--pid", str(os.getpid()), "--rate", "200", "--threads",
                                    *(["--gil"] if args.gil else []),
                                    "--format", "raw", "--nonblocking", "--duration", "12",
                                    "-o", str(args.spy_dir / f"spy_{preset}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
        with Sampler() as s:
            run = b.w1_run(pipe, video, audio, boxes, args.work, preset, preset=preset)
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it has
            try:
                _, err = spy.communicate(timeout=30)
                run["py_spy_rc"] = spy.returncode
                run["py_spy_stderr"] = err.decode(errors="replace")[-400:]
            except subprocess.TimeoutExpired:
                spy.kill()
        tl = s.timeline
        wall = tl[-1][0] - tl[0][0] if len(tl) > 1 else 0.0
        busy = (tl[-1][1] - tl[0][1]) if len(tl) > 1 else 0.0
        loop_s = run["detail"].get("generate_loop_s", 0.0)
        enc = run["stage_seconds"].get("encode", 0.0) - run["detail"].get("encoder_wait_s", 0.0)
        # The generate loop is the window that ends `close` seconds before the job ends.
        end = wall - enc
        start = max(0.0, end - loop_s)
        pts = [(t, c) for t, c in tl if start <= t <= end]
        run["cpu"] = {
            "job_cores_busy": round(busy / wall, 2) if wall else None,
            "loop_cores_busy": round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 2) if len(pts) > 1 else None,
            "cpu_s_by_thread": s.per_name(),
            "timeline_cores": [
                [round(tl[i][0], 2), round((tl[i][1] - tl[i - 1][1]) / (tl[i][0] - tl[i - 1][0]), 1)]
                for i in range(1, len(tl)) if tl[i][0] > tl[i - 1][0]
            ],
        }
        report["runs"][preset] = run
        Path(args.out).write_text(json.dumps(report, indent=1))
        if cuda:
            torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
