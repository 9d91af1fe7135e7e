"""Device memory of a job with and without CUDA graphs, per batch size (CUDA only).

    python bench/probes/graph_memory.py --out graph_memory.json [--batches 64 32 16 8] [--compile regional]

For each batch size and each setting (graphs off, on) it drops the captured graphs, empties the
allocator's cache, warms up (capturing the graphs when on), empties the cache again and runs the
10 s job (250 output frames) of W1. It reports the job's peak allocated and peak *reserved* memory
(what the process takes from the card; the graphs' private pool is reserved for good), the pool's
size and the wall time. ``models_gib`` is what the loaded models hold before any job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="graph_memory.json")
    p.add_argument("--models", type=Path, default=Path("/tmp/musetalk-bench-models"))
    p.add_argument("--media", type=Path, default=ROOT / ".bench" / "media")
    p.add_argument("--work", type=Path, default=Path("/tmp/musetalk-bench-out"))
    p.add_argument("--batches", type=int, nargs="+", default=[64, 32, 16, 8])
    p.add_argument("--compile", default="", help="regional|full: compile first (as deploy/salad does)")
    args = p.parse_args(argv)

    import torch

    import bench

    gib = 2**30
    pipe, (video, audio, boxes), info = bench.probe_pipeline(args.models, args.media, compile_mode=args.compile)
    torch.cuda.empty_cache()
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, **info,
                              "models_gib": round(torch.cuda.memory_allocated() / gib, 2), "runs": {}}
    args.work.mkdir(parents=True, exist_ok=True)
    short = bench.trimmed_audio(audio, args.work / "speech_10s.wav", 10.0)
    for batch in args.batches:
        for on in (False, True):
            pipe.cuda_graphs = on
            r = bench.run_alone(pipe, batch, video, short, boxes, args.work, f"gm{batch}{int(on)}")
            report["runs"][f"b{batch}_{'graphs' if on else 'eager_launch'}"] = {
                k: r.get(k) for k in ("wall_s", "peak_gpu_mem_gib", "peak_gpu_reserved_gib", "graph_pool_gib", "output_sha256")
            } | {"cuda_graphs": r["detail"].get("cuda_graphs")}
            Path(args.out).write_text(json.dumps(report, indent=2))
    report["failures"] = {"face": pipe.face_step.failure, "encode": pipe.encode_step.failure}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
