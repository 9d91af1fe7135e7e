#!/usr/bin/env python3
"""Where DWPose's time goes, and what the same computation costs in other forms.

    python bench/probes/dwpose_probe.py --media .bench/media --out dwpose.json        # H200
    python bench/probes/dwpose_probe.py --device cpu --size tiny --frames 8 --out d.json   # smoke

On the W1 face video's first ``--frames`` frames (random frames when no media), with a random
checkpoint at the official size (``dwpose.write_random_checkpoint``; speed does not depend on the
values):

- ``warp_ms_per_frame``: ``topdown.warp_frames`` (OpenCV, one thread) per 720p frame;
- ``detector``: ``DWPoseDetector.keypoints`` end to end per batch size (frames/s);
- ``forward``: one batch's ``_forward`` (upload, normalise, network on ``[x, flip(x)]``, flip
  average, SimCC decode) per batch size, device time, and the network alone;
- ``variants`` at ``--variant-batch``: cuDNN ``benchmark``, channels-last, the forward as a CUDA
  graph; each with its largest SimCC difference from the eager forward and the share of
  keypoints whose decoded location differs (0 = the same boxes);
- ``top_kernels``: the eager forward's kernels under ``torch.profiler``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))


def _log(msg: str) -> None:
    print(f"[dwpose_probe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], Any], dev: torch.device, iters: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / iters


def load_frames(media: Path | None, n: int) -> np.ndarray:
    if media is not None:
        from musetalk_job.media import read_frames

        video = sorted(media.glob("face_*.mp4"))
        if video:
            return np.ascontiguousarray(read_frames(video[0]).frames[:n])
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 720, 1280, 3), dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--media", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16, 32, 64])
    ap.add_argument("--variant-batch", type=int, default=32)
    args = ap.parse_args(argv)

    from musetalk_job.landmarks import dwpose, topdown

    dev = torch.device(args.device)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "torch": torch.__version__, "size": args.size}
    frames = load_frames(args.media, args.frames)
    out["frames"] = int(len(frames))
    with tempfile.TemporaryDirectory() as tmp:
        path = dwpose.write_random_checkpoint(Path(tmp) / "dw.pth", size=args.size)
        det = dwpose.DWPoseDetector.load(path, dev)
    center, scale = topdown.frame_center_scale(frames.shape[2], frames.shape[1])
    mat = topdown.warp_matrix(center, scale)

    t = time.perf_counter()
    warped_all = topdown.warp_frames(frames, mat)
    out["warp_ms_per_frame"] = round((time.perf_counter() - t) / len(frames) * 1e3, 3)
    _log(f"warp {out['warp_ms_per_frame']} ms/frame")

    out["detector"] = {}
    for bs in args.batches:
        det.keypoints(frames[: min(len(frames), 2 * bs)], batch_size=bs)
        runs = []
        for _ in range(2):  # the first meets the last batch's odd shape for the first time
            _sync(dev)
            t = time.perf_counter()
            det.keypoints(frames, batch_size=bs)
            _sync(dev)
            runs.append(time.perf_counter() - t)
        out["detector"][f"batch_{bs}"] = {"seconds": [round(s, 4) for s in runs],
                                          "fps": [round(len(frames) / s, 1) for s in runs]}
        _log(f"detector batch {bs}: {out['detector'][f'batch_{bs}']['fps']} frames/s (first, second run)")

    out["forward"] = {}
    for bs in args.batches:
        w = warped_all[:bs]
        s_fwd = _timed(lambda: det._forward(w), dev)
        x = torch.randn(2 * bs, 3, 384, 288, device=dev)
        with torch.inference_mode():
            s_net = _timed(lambda: det.model(x), dev)
        out["forward"][f"batch_{bs}"] = {"forward_ms": round(s_fwd * 1e3, 3), "network_ms": round(s_net * 1e3, 3),
                                         "forward_fps": round(bs / s_fwd, 1)}
        _log(f"forward batch {bs}: {s_fwd * 1e3:.2f} ms ({s_net * 1e3:.2f} network)")

    bs = args.variant_batch
    w = warped_all[:bs]
    with torch.inference_mode():
        ref = det._forward(w)
    ref_locs, ref_scores = (t_.detach().clone() for t_ in ref)

    def compare(got: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        locs, scores = got
        return {"max_score_diff": float((scores.float() - ref_scores.float()).abs().max()),
                "locs_differ": float((locs != ref_locs).any(-1).float().mean())}

    variants: dict[str, Any] = {}

    def variant(name: str) -> None:
        """The eager forward timed as the process is set up now, and compared with the reference."""
        s = _timed(lambda: det._forward(w), dev, warmup=3)
        with torch.inference_mode():
            variants[name] = {"forward_ms": round(s * 1e3, 3), **compare(det._forward(w))}

    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        variant("cudnn_benchmark")
        torch.backends.cudnn.benchmark = False
        det.model.to(memory_format=torch.channels_last)
        variant("channels_last")
        torch.backends.cudnn.benchmark = True
        variant("channels_last_cudnn_benchmark")
        torch.backends.cudnn.benchmark = False
        det.model.to(memory_format=torch.contiguous_format)
        with torch.autocast("cuda", dtype=torch.float16):
            variant("autocast_fp16")
        # a short batch padded to the full one: do its rows come out the same as unpadded?
        k = max(1, bs - 6)
        with torch.inference_mode():
            short = det._forward(w[:k])
            padded = det._forward(np.concatenate([w[:k], np.zeros_like(w[: bs - k])]))
        variants["padding"] = {"rows": k, "batch": bs,
                               "max_score_diff": float((short[1] - padded[1][:k]).abs().max()),
                               "locs_differ": float((short[0] != padded[0][:k]).any(-1).float().mean()),
                               "batch_rows_vs_alone_max_score_diff": float((padded[1][:k] - ref_scores[:k]).abs().max())}
        # the whole forward (from the uploaded uint8 batch) as one CUDA graph
        static_in = torch.from_numpy(w).to(dev)

        mean = torch.tensor(topdown.MEAN_RGB, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(topdown.STD_RGB, device=dev).view(1, 3, 1, 1)
        flip_idx = torch.tensor(det._flip, device=dev)

        def from_device(xu8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = xu8.permute(0, 3, 1, 2).to(torch.float32)
            x = (x - mean) / std
            b = x.shape[0]
            with dwpose._official_matmul_precision(dev):
                sx, sy = det.model(torch.cat([x, x.flip(-1)], dim=0))
            fx, fy = topdown.flip_simcc(sx[b:], sy[b:], flip_idx)
            return topdown.decode_simcc((sx[:b] + fx) * 0.5, (sy[:b] + fy) * 0.5)

        with torch.inference_mode():
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(3):
                    from_device(static_in)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g_out = from_device(static_in)

            def replay() -> tuple[torch.Tensor, torch.Tensor]:
                static_in.copy_(torch.from_numpy(w).pin_memory(), non_blocking=True)
                graph.replay()
                return g_out

            s = _timed(replay, dev)
            variants["cuda_graph"] = {"forward_ms": round(s * 1e3, 3), **compare(replay())}
            s = _timed(lambda: graph.replay(), dev)
            variants["cuda_graph_replay_only"] = {"forward_ms": round(s * 1e3, 3)}
        with torch.inference_mode():
            from torch.profiler import ProfilerActivity, profile

            det._forward(w)
            _sync(dev)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                det._forward(w)
                _sync(dev)
        rows = []
        for ev in prof.key_averages():
            dt = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
            if dt:
                rows.append({"name": ev.key[:90], "calls": ev.count, "ms": round(dt / 1e3, 3)})
        rows.sort(key=lambda r: -r["ms"])
        out["top_kernels"] = rows[:25]
        out["kernel_ms_total"] = round(sum(r["ms"] for r in rows), 3)
        cpu_rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        out["top_cpu"] = [{"name": e.key[:90], "calls": e.count, "ms": round(e.self_cpu_time_total / 1e3, 3)} for e in cpu_rows]
    out["variants"] = variants
    for k, v in variants.items():
        _log(f"{k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
