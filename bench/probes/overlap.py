"""W1 with the engine's overlap settings switched, in rounds, in one process (CUDA).

    python bench/probes/overlap.py --out overlap.json [--rounds 3] [--presets veryfast,medium] [--compile regional]

Variants (``Pipeline`` attributes): ``overlap_latents`` (latents made chunk by chunk in the generate
loop, or all before it). Each round runs every variant once per preset, in a rotated order, so
that drift in the machine's speed spreads over all of them; the report has every run and, per
variant and preset, the median and the spread of the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

VARIANTS: dict[str, dict[str, Any]] = {
    "latents_loop": {"overlap_latents": True},
    "latents_first": {"overlap_latents": False},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="overlap.json")
    p.add_argument("--models", type=Path, default=Path("/tmp/musetalk-bench-models"))
    p.add_argument("--media", type=Path, default=ROOT / ".bench" / "media")
    p.add_argument("--work", type=Path, default=Path("/tmp/musetalk-bench-out"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--presets", default="veryfast,medium", help="comma list of x264 presets")
    p.add_argument("--compile", default="regional", help="regional|full|'' (eager)")
    p.add_argument("--commit", default=None)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run with --size tiny")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--audio-seconds", type=float, default=None, help="trim the speech (smoke runs)")
    args = p.parse_args(argv)

    import torch

    import bench

    pipe, (video, audio, boxes), info = bench.probe_pipeline(
        args.models, args.media, device=args.device, size=args.size, compile_mode=args.compile
    )
    args.work.mkdir(parents=True, exist_ok=True)
    if args.audio_seconds:
        audio = bench.trimmed_audio(audio, args.work / "speech_trimmed.wav", args.audio_seconds)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    report: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count(),
                              "commit": args.commit or bench._commit(), **info, "cuda_graphs": pipe.cuda_graphs,
                              "variants": VARIANTS, "runs": [], "summary": {}}
    names = list(VARIANTS)
    presets = [x for x in args.presets.split(",") if x]
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for preset in presets:
            for name in order:
                saved = {k: getattr(pipe, k) for k in VARIANTS[name]}
                for k, v in VARIANTS[name].items():
                    setattr(pipe, k, v)
                try:
                    run = bench.w1_run(pipe, video, audio, boxes, args.work, f"ov{r}{name}{preset}", preset=preset)
                finally:
                    for k, v in saved.items():
                        setattr(pipe, k, v)
                report["runs"].append({"round": r, "variant": name, "preset": preset, "wall_s": run["wall_s"], "frames": run["frames"],
                                       "stage_seconds": run["stage_seconds"], "detail": run["detail"],
                                       "output_sha256": run["output_sha256"], "peak_gpu_mem_gib": run["peak_gpu_mem_gib"]})
                Path(args.out).write_text(json.dumps(report, indent=2))
    for preset in presets:
        for name in names:
            mine = [x for x in report["runs"] if x["variant"] == name and x["preset"] == preset]
            walls = [x["wall_s"] for x in mine]
            report["summary"][f"{name}_{preset}"] = {"median_s": round(statistics.median(walls), 3),
                                                     "min_s": min(walls), "max_s": max(walls),
                                                     "median_fps": round(mine[0]["frames"] / statistics.median(walls), 1)}
        shas = {x["output_sha256"] for x in report["runs"] if x["preset"] == preset}
        report["summary"][f"identical_outputs_{preset}"] = len(shas) == 1
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
