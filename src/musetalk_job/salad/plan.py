"""Throughput and cost model for lip-sync jobs on SaladCloud (``musetalk-job salad plan``).

Model (docs/salad.md, "Throughput and cost"):

- The benchmark measures ``output_fps``: output video frames produced per second of GPU
  work for one job (decode → encode, models already loaded).
- One job with ``job_seconds`` of output video at ``video_fps`` takes
  ``job_seconds · video_fps / output_fps + overhead_s`` seconds on a GPU (overhead = fetch,
  probe, landmarks warm-up, upload; measured by the same benchmark as the non-engine stages).
- Of each billed GPU-hour a fraction ``utilisation`` does jobs (the rest: cold start,
  interruptions, idle at the queue's tail). So
  ``jobs/GPU-hour = 3600 · utilisation / seconds_per_job`` and
  ``output minutes/GPU-hour = jobs/GPU-hour · job_seconds / 60``.
- ``cost per output minute = price per GPU-hour / output minutes per GPU-hour``;
  ``GPUs for N minutes in T hours = ceil(N / (output minutes per GPU-hour · T))``.

``H200_MEASURED_FPS`` is the benchmark's ``output_fps`` on one H200; it is the default of
``--fps`` once the project's benchmark has been run (None until then: pass ``--fps``).
Consumer GPUs on SaladCloud are slower than an H200: measure ``output_fps`` on the class you
deploy (``bench/``) and pass it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

# The benchmark's ``output_fps`` for W1 on one NVIDIA H200 in the default configuration (2026-11-29,
# commit f0bbad5, bench/results/h200-2026-11-29-run58-default-config.json: warm, no MUSETALK_COMPILE,
# CUDA graphs on, faces detected with DWPose, libx264 medium, 16 vCPUs; 5.94 s). Run 49 (38b1a5e,
# before the encoder layout of run 57) measured 111.3.
H200_MEASURED_FPS: Optional[float] = 126.2

# Per-GPU-hour prices in USD by priority (high, medium, low, batch), from the SaladCloud
# `GET /gpu-classes` snapshot dated 2025-09-22 (docs/salad.md §6). Prices move: pass --price
# or query `musetalk-job salad gpu-classes` for current ones.
PRICE_SNAPSHOT_DATE = "2025-09-22"
PRICES: dict[str, dict[str, float]] = {
    "RTX 5090 (32 GB)": {"high": 0.45, "medium": 0.38, "low": 0.31, "batch": 0.25},
    "RTX 5080 (16 GB)": {"high": 0.42, "medium": 0.335, "low": 0.25, "batch": 0.18},
    "RTX 4090 (24 GB)": {"high": 0.30, "medium": 0.253, "low": 0.207, "batch": 0.16},
    "RTX 4080 (16 GB)": {"high": 0.28, "medium": 0.223, "low": 0.167, "batch": 0.11},
    "RTX 4070 Ti Super (16 GB)": {"high": 0.26, "medium": 0.207, "low": 0.153, "batch": 0.10},
    "RTX 4070 (12 GB)": {"high": 0.22, "medium": 0.17, "low": 0.12, "batch": 0.07},
    "RTX 4060 Ti (16 GB)": {"high": 0.22, "medium": 0.173, "low": 0.127, "batch": 0.08},
    "RTX 3090 Ti (24 GB)": {"high": 0.28, "medium": 0.22, "low": 0.16, "batch": 0.10},
    "RTX 3090 (24 GB)": {"high": 0.25, "medium": 0.197, "low": 0.143, "batch": 0.09},
    "RTX 3080 Ti (12 GB)": {"high": 0.20, "medium": 0.16, "low": 0.12, "batch": 0.08},
    "RTX 3060 (12 GB)": {"high": 0.08, "medium": 0.067, "low": 0.053, "batch": 0.04},
    "RTX A5000 (24 GB)": {"high": 0.25, "medium": 0.197, "low": 0.143, "batch": 0.09},
}
PRIORITIES = ("high", "medium", "low", "batch")


@dataclass(frozen=True)
class Plan:
    output_fps: float
    video_fps: float
    job_seconds: float
    overhead_s: float
    utilisation: float
    realtime_factor: float  # output seconds produced per second of GPU work
    seconds_per_job: float
    jobs_per_gpu_hour: float
    output_minutes_per_gpu_hour: float
    price_per_gpu_hour: Optional[float]
    cost_per_output_minute: Optional[float]
    minutes: Optional[float]
    hours: Optional[float]
    gpus_needed: Optional[int]
    cost_total: Optional[float]

    def as_dict(self) -> dict:
        return asdict(self)


def price_for(gpu_class: str, priority: str) -> float:
    """Snapshot price of a GPU class (name matched ignoring case; a unique prefix is enough)."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r} must be one of {', '.join(PRIORITIES)}")
    key = " ".join(gpu_class.lower().split())
    names = {" ".join(n.lower().split()): n for n in PRICES}
    matches = [names[k] for k in names if k == key] or [names[k] for k in names if k.startswith(key)]
    if len(matches) != 1:
        known = "; ".join(PRICES)
        raise ValueError(f"GPU class {gpu_class!r} {'is ambiguous' if matches else 'is not in the price table'}; known: {known}")
    return PRICES[matches[0]][priority]


def make_plan(
    *,
    output_fps: float,
    video_fps: float = 25.0,
    job_seconds: float = 60.0,
    overhead_s: float = 10.0,
    utilisation: float = 0.85,
    price_per_gpu_hour: Optional[float] = None,
    minutes: Optional[float] = None,
    hours: Optional[float] = None,
) -> Plan:
    """The throughput model above. ``minutes``/``hours``: size a fleet for N output minutes in T hours."""
    for name, value in (("output_fps", output_fps), ("video_fps", video_fps), ("job_seconds", job_seconds)):
        if not value or value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if overhead_s < 0:
        raise ValueError(f"overhead_s must be >= 0, got {overhead_s}")
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    if (minutes is None) != (hours is None):
        raise ValueError("give both the minutes of video and the hours to produce them in, or neither")
    if hours is not None and hours <= 0:
        raise ValueError(f"hours must be > 0, got {hours}")
    if minutes is not None and minutes < 0:
        raise ValueError(f"minutes must be >= 0, got {minutes}")
    seconds_per_job = job_seconds * video_fps / output_fps + overhead_s
    jobs_per_hour = 3600.0 * utilisation / seconds_per_job
    out_min_per_hour = jobs_per_hour * job_seconds / 60.0
    cost_per_min = price_per_gpu_hour / out_min_per_hour if price_per_gpu_hour is not None else None
    gpus = cost_total = None
    if minutes is not None and hours is not None:
        gpus = max(1, math.ceil(minutes / (out_min_per_hour * hours) - 1e-9)) if minutes > 0 else 0
        if price_per_gpu_hour is not None:
            cost_total = minutes / out_min_per_hour * price_per_gpu_hour
    return Plan(
        output_fps=output_fps,
        video_fps=video_fps,
        job_seconds=job_seconds,
        overhead_s=overhead_s,
        utilisation=utilisation,
        realtime_factor=output_fps / video_fps,
        seconds_per_job=seconds_per_job,
        jobs_per_gpu_hour=jobs_per_hour,
        output_minutes_per_gpu_hour=out_min_per_hour,
        price_per_gpu_hour=price_per_gpu_hour,
        cost_per_output_minute=cost_per_min,
        minutes=minutes,
        hours=hours,
        gpus_needed=gpus,
        cost_total=cost_total,
    )


def format_plan(plan: Plan, label: str = "") -> str:
    lines = [
        f"throughput model{(' for ' + label) if label else ''}:",
        f"  output fps (measured)      {plan.output_fps:.1f} frames/s = {plan.realtime_factor:.2f}x real time at {plan.video_fps:g} fps",
        f"  one job                    {plan.job_seconds:g} s of video -> {plan.seconds_per_job:.1f} s of GPU time "
        f"(incl. {plan.overhead_s:g} s overhead)",
        f"  per GPU-hour               {plan.jobs_per_gpu_hour:.1f} jobs, {plan.output_minutes_per_gpu_hour:.1f} output minutes "
        f"(utilisation {plan.utilisation:.0%})",
    ]
    if plan.price_per_gpu_hour is not None and plan.cost_per_output_minute is not None:
        lines.append(
            f"  cost                       ${plan.price_per_gpu_hour:.3f}/GPU-hour -> ${plan.cost_per_output_minute:.4f} per output minute"
        )
    if plan.gpus_needed is not None:
        lines.append(f"  fleet                      {plan.minutes:g} output minutes in {plan.hours:g} h -> {plan.gpus_needed} GPU(s)")
        if plan.cost_total is not None:
            lines.append(f"  total GPU cost             ${plan.cost_total:.2f}")
    return "\n".join(lines)
