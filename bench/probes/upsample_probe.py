#!/usr/bin/env python3
"""The upsamplers folded (``musetalk_job.models.upsample``) against diffusers' own, at the engine's shapes.

    python bench/probes/upsample_probe.py --out up.json                          # H200: eager, then compiled
    python bench/probes/upsample_probe.py --device cpu --size tiny --models /tmp/tiny --compile "" \\
        --batch 4 --out u.json                                                    # smoke

Per fold mode (``off``: diffusers' ``Upsample2D``; ``transpose``; ``phases``) and per compile mode
(eager, then ``--compile``): device time per frame of the UNet alone, of the VAE decode alone (the
engine's chunks) and of the two together (the engine's ``_face_step``, at ``--batch``), each the
median of ``--repeats`` timings of ``--iters`` calls; the decoded faces' difference from ``off``'s
(max |Δ| in uint8 levels, share of values that differ, mean |Δ|); and each upsampler shape alone.
Weights are random at the official sizes. Writes one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # noqa: E402 - bench/bench.py: probe_pipeline, _cuda_time
import report  # noqa: E402 - bench/probes/report.py


def _log(msg: str) -> None:
    print(f"[upsample_probe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any], iters: int, repeats: int) -> float:
    return statistics.median(b._cuda_time(fn, warmup=1, iters=iters) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    b.probe_arguments(p)  # --out, --media, --models, --compile, --device, --size (--audio-seconds: unused)
    p.set_defaults(compile="regional")  # the compile mode measured after eager ('' for none)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="off,transpose,phases", help="fold modes in order, the first 'off' (repeats allowed)")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from musetalk_job import compiled
    from musetalk_job.latents import decode_latents
    from musetalk_job.models import upsample

    pipe, _, info = b.probe_pipeline(args.models, args.media, device=args.device, size=args.size)
    m, dev, dtype, n = pipe.models, pipe.device, pipe.dtype, args.batch
    modes = [x for x in args.modes.split(",") if x]
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": b._commit(),
                           "torch": torch.__version__, "batch": n, "decode_chunk": pipe._chunk(n), **info, "results": {}}
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        lat = torch.randn(n, 8, 32, 32, generator=gen).to(dev, dtype)
        cond = torch.randn(n, 50, 384, generator=gen).to(dev, dtype)
        pred = torch.randn(n, 4, 32, 32, generator=gen).to(dev, dtype)
    out["foldable"] = {"unet": sum(map(upsample.foldable, m.unet.modules())), "vae": sum(map(upsample.foldable, m.vae.modules()))}

    def measure(label: str) -> dict[str, Any]:
        r: dict[str, Any] = {}
        with torch.inference_mode():
            t = time.perf_counter()
            faces = pipe._face_step(lat, cond)
            b._sync()
            r["first_call_s"] = round(time.perf_counter() - t, 2)
            r["unet_ms_per_frame"] = round(timed(lambda: m.unet(lat, pipe._timestep, encoder_hidden_states=cond).sample, args.iters, args.repeats) / n * 1e3, 4)
            r["decode_ms_per_frame"] = round(timed(lambda: decode_latents(m.vae, pred, pipe._chunk(n)), args.iters, args.repeats) / n * 1e3, 4)
            r["face_step_ms_per_frame"] = round(timed(lambda: pipe._face_step(lat, cond), args.iters, args.repeats) / n * 1e3, 4)
            r["decoded"] = decode_latents(m.vae, pred, pipe._chunk(n)).cpu()
            r["faces"] = faces.cpu()
        _log(f"{label}: unet {r['unet_ms_per_frame']} decode {r['decode_ms_per_frame']} face step {r['face_step_ms_per_frame']} ms/frame")
        return r

    def diff(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        d = (a.int() - ref.int()).abs()
        return {"max": int(d.max()), "share_differing": round(float((d > 0).float().mean()), 6), "mean": round(float(d.float().mean()), 6)}

    eager_faces: dict[str, torch.Tensor] = {}
    for cmode in ["eager"] + ([args.compile] if args.compile else []):
        ref: dict[str, torch.Tensor] = {}
        for i, mode in enumerate(modes):
            pipe.fold_upsampling = mode  # "off": diffusers' own
            if cmode != "eager":
                pipe.compiled = compiled.enable(m, mode=cmode)
            r = measure(f"{cmode} {mode}")
            faces, decoded = r.pop("faces"), r.pop("decoded")
            if mode == "off" and not ref:
                ref = {"faces": faces, "decoded": decoded}
            r["faces_vs_off"] = diff(faces, ref["faces"])
            r["decoded_vs_off"] = diff(decoded, ref["decoded"])
            if cmode == "eager":
                eager_faces[mode] = faces
            else:  # compiled code runs the mode asked for: its faces match eager's within rounding
                r["faces_vs_eager_same_mode"] = diff(faces, eager_faces[mode])
            key = f"{cmode}|{mode}"
            out["results"][key if key not in out["results"] else f"{key}#{i}"] = r
        if cmode != "eager":
            compiled.disable(m)
    pipe.fold_upsampling = None

    # Each upsampler shape alone, eager, at the batch its model runs it (UNet: batch; decoder: chunk).
    ops: dict[str, Any] = {}
    with torch.inference_mode():
        for mod, bsz in ((m.unet, n), (m.vae, pipe._chunk(n))):
            sizes: dict[int, tuple[int, int]] = {}
            hooks = [u.register_forward_hook(lambda mod_, inp, outp, key=id(u): sizes.__setitem__(key, tuple(inp[0].shape[-2:])))
                     for u in mod.modules() if upsample.foldable(u)]
            if mod is m.unet:
                mod(lat[:1], pipe._timestep, encoder_hidden_states=cond[:1])
            else:
                decode_latents(mod, pred[:1])
            for h in hooks:
                h.remove()
            for u in mod.modules():
                if not upsample.foldable(u):
                    continue
                hh, ww = sizes[id(u)]
                x = torch.randn(bsz, u.channels, hh, ww, device=dev, dtype=dtype)
                key = f"{type(mod).__name__}:{u.channels}->{u.out_channels}@{hh}x{ww}"
                row: dict[str, Any] = {"batch": bsz}
                flop = 2 * bsz * (2 * hh) * (2 * ww) * u.channels * u.out_channels * 9
                row["off_ms"] = round(timed(lambda: u.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), args.iters, args.repeats) * 1e3, 4)
                for mode in sorted(set(modes) - {"off"}):
                    wgt = upsample.folded_weight(u.conv.weight, mode)
                    row[f"{mode}_ms"] = round(timed(lambda: upsample.upsample_conv(x, wgt, u.conv.bias, mode), args.iters, args.repeats) * 1e3, 4)
                row["off_tflops_equiv"] = round(flop / (row["off_ms"] / 1e3) / 1e12, 1)
                ops[key] = row
                _log(f"{key}: {row}")
    out["ops"] = ops
    report.write(out, str(args.out))
    for k, r in out["results"].items():
        print(f"{k:>22}: unet {r['unet_ms_per_frame']} decode {r['decode_ms_per_frame']} face step {r['face_step_ms_per_frame']} ms/frame; "
              f"faces vs off {r['faces_vs_off']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
