#!/usr/bin/env python3
"""The engine's GPU steps per chunk size, as the process's cuDNN setting runs them.

    python bench/probes/kernel_probe.py --compile regional --chunks 32,64 --out off.json                        # H200
    python bench/probes/kernel_probe.py --compile regional --chunks 32,64 --cudnn-benchmark 1 --out on.json
    python bench/probes/kernel_probe.py --device cpu --size tiny --models /tmp/tiny --chunks 2,4 --batch 4 \\
        --reps 1 --out k.json                                                                          # smoke

cuDNN caches the algorithm it picked per convolution shape for the life of the process, whatever
``torch.backends.cudnn.benchmark`` says later, so heuristics against autotuning is a comparison
of two processes (``--cudnn-benchmark``: ``pipeline.CUDNN_BENCHMARK``, which the pipeline sets when
it loads; the engine's is off); the chunk size
(``Pipeline.gpu_chunk``: images per VAE decoder / BiSeNet call, half as many crops per VAE encode
call) is compared inside one. Per chunk, at the job batch (``--batch``, default the auto batch):

- ``face_ms_per_frame``: the face step (UNet + VAE decode → uint8 faces), as the engine calls it
  (CUDA graph replay where graphs are on), device time per frame;
- ``encode_ms_per_crop``: the VAE encode step (masked + full) per face crop;
- ``parse_ms_per_image``: BiSeNet at 512² per image;
- ``warmup_s``: what setting up that chunk cost (compiles, captures, autotuning);
- ``face_sha256``: the faces of a fixed random input, and ``face_diff_vs_first`` the largest
  difference from the first chunk's (a different chunk is a different convolution batch, which
  may pick other kernels). ``--save-faces DIR`` writes them (``faces-<chunk>.npy``) so that two
  processes' outputs can be compared (``--compare A.npy B.npy`` prints the largest difference).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # noqa: E402 - bench/bench.py: probe_arguments, probe_setup
import compile_bench  # noqa: E402 - bench/compile_bench.py: time_cuda
import report  # noqa: E402 - bench/probes/report.py, beside this script


def _log(msg: str) -> None:
    print(f"[kernel_probe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def device_ms(fn: Callable[[], Any], device: Any, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls (CUDA events on CUDA; wall time on CPU)."""
    if device.type == "cuda":
        return float(compile_bench.time_cuda(fn, reps, warm=1))  # the call after a set-up is not the steady state
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def compare(a: Path, b_: Path) -> dict[str, Any]:
    x, y = np.load(a).astype(np.int16), np.load(b_).astype(np.int16)
    d = np.abs(x - y)
    return {"max_diff": int(d.max()), "share_differing": round(float((d > 0).mean()), 6), "pixels": int(d.size)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--compare"]:
        print(json.dumps(compare(Path(raw[1]), Path(raw[2]))))
        return 0
    b.probe_arguments(p)
    p.add_argument("--chunks", default="32,64", help="comma-separated Pipeline.gpu_chunk values")
    p.add_argument("--batch", type=int, default=0, help="job batch (default: the auto batch)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--save-faces", type=Path, default=None)
    p.add_argument("--cudnn-benchmark", type=int, default=0, choices=(0, 1), help="cuDNN autotuning for this process")
    args = p.parse_args(argv)

    import torch

    from musetalk_job import pipeline

    pipeline.CUDNN_BENCHMARK = bool(args.cudnn_benchmark)  # read by Pipeline.from_models_dir

    from musetalk_job.latents import FACE_SIZE, LATENT_SIZE
    from musetalk_job.pipeline import auto_batch_size

    t0 = time.perf_counter()
    pipe, _video, _audio, _boxes, info, _work = b.probe_setup(args, "kernel-probe-")
    info["setup_s"] = round(time.perf_counter() - t0, 2)
    info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    dev, dt = pipe.device, pipe.dtype
    batch = args.batch or auto_batch_size(dev, dt, 1280 * 720 * 3)
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn((batch, 8, LATENT_SIZE, LATENT_SIZE), generator=g).to(dev, dt)
    cond = torch.randn((batch, 50, 384), generator=g).to(dev, dt)
    bis_dtype = next(pipe.models.bisenet.parameters()).dtype
    rows: list[dict[str, Any]] = []
    first = None
    for chunk in [int(c) for c in args.chunks.split(",") if c.strip()]:
        pipe.gpu_chunk = chunk
        pipe.drop_cuda_graphs()
        t = time.perf_counter()
        pipe.warmup(batch)
        warm = time.perf_counter() - t
        with torch.inference_mode():
            faces = pipe.face_step(latents, cond)
            host = faces.cpu().numpy()
            face_ms = device_ms(lambda: pipe.face_step(latents, cond), dev, args.reps) / batch
            n_crops = pipe._encode_batch(batch)
            crops = torch.randint(0, 256, (n_crops, FACE_SIZE, FACE_SIZE, 3), generator=g, dtype=torch.uint8).to(dev)
            enc_ms = device_ms(lambda: pipe.encode_step(crops), dev, args.reps) / n_crops
            parse_in = torch.zeros((pipe._chunk(batch), 3, 512, 512), device=dev, dtype=bis_dtype)
            parse_ms = device_ms(lambda: pipe.models.bisenet(parse_in), dev, args.reps) / parse_in.shape[0]
        row: dict[str, Any] = {
            "chunk": chunk, "batch": batch, "encode_crops_per_call": n_crops, "warmup_s": round(warm, 2),
            "face_ms_per_frame": round(face_ms, 4), "encode_ms_per_crop": round(enc_ms, 4),
            "parse_ms_per_image": round(parse_ms, 4),
            "face_sha256": hashlib.sha256(host.tobytes()).hexdigest(),
        }
        if first is None:
            first = host
        row["face_diff_vs_first"] = int(np.abs(host.astype(np.int16) - first.astype(np.int16)).max())
        if args.save_faces is not None:
            args.save_faces.mkdir(parents=True, exist_ok=True)
            np.save(args.save_faces / f"faces-{chunk}.npy", host[:8])
        _log(json.dumps(row))
        rows.append(row)
    if dev.type == "cuda":
        info["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / 2**30, 2)
    report.write({**info, "torch": torch.__version__, "chunks": rows}, str(args.out))
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
