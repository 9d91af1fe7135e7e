#!/usr/bin/env python3
"""The blend masks' steps per chunk, on the CPU pool (PIL/OpenCV) and as tensor ops on the device.

    python bench/probes/mask_probe.py --out masks.json                                             # H200
    python bench/probes/mask_probe.py --device cpu --size tiny --models /tmp/tiny --reps 1 --out m.json  # smoke

On W1's frames and boxes (the boxes file) and the loaded BiSeNet, for one chunk of
``Pipeline.gpu_chunk`` faces (``--chunk``):

- ``device_ms``: the device path's steps, device time each (CUDA events; wall time on CPU):
  ``crop_upload`` (the crops' pinned copy), ``resize_up`` (to the parser's 512², Pillow's bilinear),
  ``bisenet``, ``morphology`` (``parsing_mask_batch``), ``resize_back`` (to the crop, bicubic),
  ``download`` (the resized masks to the host);
- ``host_ms``: per chunk on one thread: the crops (device path), the blur and alpha (device path),
  and the CPU path's ``parser_inputs`` (crop + PIL resize) and ``finish`` (morphology, PIL resize,
  blur), the work its pool shares;
- ``equal``: the device path's masks equal the CPU path's for the chunk.
"""

from __future__ import annotations

import argparse
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
import report  # noqa: E402 - bench/probes/report.py, beside this script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    b.probe_arguments(p)
    p.add_argument("--chunk", type=int, default=None, help="faces per chunk (default: Pipeline.gpu_chunk)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from musetalk_job import blending as bl
    from musetalk_job import resample
    from musetalk_job.landmarks.boxes import read_boxes_file
    from musetalk_job.media import read_frames
    from musetalk_job.options import EngineOptions

    pipe, video, _audio, boxes_file, info, _work = b.probe_setup(args, "mask-probe-")
    dev = pipe.device
    cuda = dev.type == "cuda"
    chunk_n = args.chunk or pipe.gpu_chunk
    frames = read_frames(video).frames[:chunk_n]
    boxes = list(read_boxes_file(boxes_file, read_frames(video).frames.shape[0]))[:chunk_n]
    boxes = pipe._blend_boxes(boxes, frames.shape[1], EngineOptions())
    chunk = [(i, b_) for i, b_ in enumerate(boxes) if b_ is not None]
    bisenet = pipe.models.bisenet
    dtype = next(bisenet.parameters()).dtype

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        out = fn()  # first use
        times = []
        for _ in range(args.reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t) * 1000)
        return float(np.median(times)), out

    def host(fn: Callable[[], Any]) -> tuple[float, Any]:
        out = fn()
        t = time.perf_counter()
        for _ in range(args.reps):
            out = fn()
        return (time.perf_counter() - t) * 1000 / args.reps, out

    with torch.inference_mode():
        ms: dict[str, float] = {}
        hms: dict[str, float] = {}
        hms["crops"], (crops_host, sides) = host(lambda: bl._crop_batch(frames, chunk, cuda))
        ms["crop_upload"], crops = timed(lambda: crops_host.to(dev, non_blocking=True))
        n = len(sides)
        ms["resize_up"], inputs = timed(lambda: resample.resize(crops, [(s, s) for s in sides], [(512, 512)] * n, "bilinear"))
        ms["bisenet"], classes = timed(lambda: bl._parse(bisenet, inputs, dev, dtype))
        ms["morphology"], parsed = timed(lambda: bl.parsing_mask_batch(classes, "jaw", 90, 90))
        ms["resize_back"], back = timed(lambda: resample.resize(parsed, [(512, 512)] * n, [(s, s) for s in sides], "bicubic"))
        ms["download"], back_host = timed(lambda: back.cpu().numpy())
        hms["blur_alpha"], dev_masks = host(lambda: [bl._blend_alpha(back_host[j, : sides[j], : sides[j]], box) for j, (_, box) in enumerate(chunk)])
        hms["cpu_parser_inputs"], cpu_inputs = host(lambda: np.stack([bl._parser_input(frames[i], box) for i, box in chunk]))
        classes_host = bl._parse(bisenet, cpu_inputs, dev, dtype).cpu().numpy()
        hms["cpu_finish"], cpu_masks = host(lambda: [bl._finish_mask(classes_host[j], box, "jaw", 90, 90) for j, (_, box) in enumerate(chunk)])
    equal = all(np.array_equal(a.alpha, c.alpha) for a, c in zip(dev_masks, cpu_masks))
    rep = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": b._commit(), **info,
           "device": str(dev), "chunk": n, "crop_sides": sorted(set(sides)), "device_ms": {k: round(v, 3) for k, v in ms.items()},
           "device_ms_total": round(sum(ms.values()), 3), "host_ms": {k: round(v, 2) for k, v in hms.items()}, "equal": equal}
    if cuda:
        rep["gpu"] = torch.cuda.get_device_name()
    report.write(rep, str(args.out))
    print(rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
