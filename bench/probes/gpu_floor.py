#!/usr/bin/env python3
"""The GPU models against their compute floor, op by op, and against compile variants.

    python bench/probes/gpu_floor.py --out floor.json                       # H200: full size, fp16
    python bench/probes/gpu_floor.py --device cpu --size tiny --variants eager --out f.json   # smoke

What it measures, at the engine's own call shapes (UNet at ``--unet-batch`` frames, the VAE
decoder at ``--decode-chunk`` latents, the VAE encoder at ``--encode-batch`` images):

- ``ops``: every compute op the models run (``Conv2d``, ``Linear``, scaled-dot-product attention),
  captured with forward hooks during one real forward; each distinct shape is then timed on its
  own with the best the libraries offer (cuDNN with ``benchmark`` on, NCHW and channels-last,
  the faster counts; cuBLAS; PyTorch's SDPA kernels). FLOPs: multiply-add = 2.
- ``floor``: per model, the sum over its ops of count × that best time — what the model's compute
  ops need at these shapes with every GroupNorm, SiLU, add and copy between them free. It is a
  floor for any implementation built on those kernels (a fused conv kernel better than cuDNN's
  could go below it). Also the same FLOPs at the dense fp16 matmul ceiling (8192³, measured here).
- ``variants``: the models' real forward time per frame, eager and compiled
  (``musetalk_job.compiled``) in the variants named by ``--variants``: ``eager``, ``regional``,
  ``regional-nolayout`` (inductor's ``layout_optimization`` off: no NCHW↔NHWC conversion at each
  region's edges), ``full``, ``full-nolayout``, each optionally with ``+unetcl`` (the UNet's weights
  channels-last). Each compiled variant reports its first call (compile) seconds; ``--profile``
  adds the top GPU kernels per call of the variants it names (torch.profiler).

Weights are random at the official sizes (``musetalk_job.models.random_weights``); speed does
not depend on their values. Prints progress on stderr and writes one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def _log(msg: str) -> None:
    print(f"[gpu_floor {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_call(fn: Callable[[], Any], dev: torch.device, min_s: float = 0.05, rounds: int = 3) -> float:
    """Seconds per call: warm up, then the fastest of ``rounds`` timed loops of >= ``min_s``."""
    for _ in range(2):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(200, int(min_s / once)))
    best = math.inf
    for _ in range(rounds):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                fn()
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
    return best


# --------------------------------------------------------------------------- op capture


@dataclass(frozen=True)
class OpKey:
    kind: str  # conv | linear | sdpa
    shape: tuple[Any, ...]


@dataclass
class Capture:
    counts: dict[OpKey, int] = field(default_factory=dict)
    params: dict[OpKey, Any] = field(default_factory=dict)

    def add(self, key: OpKey, param: Any = None) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        self.params.setdefault(key, param)


def capture_ops(model: nn.Module, run: Callable[[], Any]) -> Capture:
    """Run ``run()`` once and record every Conv2d / Linear / SDPA call with its shapes."""
    cap = Capture()
    hooks = []

    def conv_hook(mod: nn.Conv2d, args: tuple[Any, ...]) -> None:
        x = args[0]
        key = OpKey("conv", (tuple(x.shape), mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                             tuple(mod.padding) if not isinstance(mod.padding, str) else mod.padding,
                             mod.groups, mod.bias is not None))
        cap.add(key)

    def linear_hook(mod: nn.Linear, args: tuple[Any, ...]) -> None:
        x = args[0]
        cap.add(OpKey("linear", (tuple(x.shape), mod.out_features, mod.bias is not None)))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(linear_hook))
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
             is_causal: bool = False, **kw: Any) -> torch.Tensor:
        cap.add(OpKey("sdpa", (tuple(q.shape), tuple(k.shape), tuple(v.shape), attn_mask is None, bool(is_causal))))
        return real_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = sdpa  # diffusers' AttnProcessor2_0 looks it up on F at call time
    # Compiled code calls no module hooks: capture eagerly (regional blocks: their compiled call
    # set aside; whole-model graphs: dynamo's force_eager stance).
    regions = [(mod, mod._compiled_call_impl) for mod in model.modules() if getattr(mod, "_compiled_call_impl", None) is not None]
    set_stance = getattr(torch.compiler, "set_stance", None)
    stance = set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
    try:
        for mod, _ in regions:
            mod._compiled_call_impl = None
        with torch.inference_mode(), stance:
            run()
    finally:
        for mod, impl in regions:
            mod._compiled_call_impl = impl
        F.scaled_dot_product_attention = real_sdpa
        for h in hooks:
            h.remove()
    return cap


def op_flops(key: OpKey) -> float:
    if key.kind == "conv":
        (n, c, h, w), cout, (kh, kw), (sh, sw), pad, groups, _ = key.shape
        ph, pw = (pad if isinstance(pad, tuple) else (kh // 2, kw // 2))
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return 2.0 * n * ho * wo * cout * (c // groups) * kh * kw
    if key.kind == "linear":
        shape, out, _ = key.shape
        return 2.0 * math.prod(shape[:-1]) * shape[-1] * out
    q, k, v, _, _ = key.shape
    b, h, lq, d = q
    lk = k[-2]
    return 2.0 * b * h * lq * lk * d + 2.0 * b * h * lq * lk * v[-1]


def time_op(key: OpKey, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The op alone at its shape, in each layout that applies; ``best_s`` is the fastest."""
    out: dict[str, Any] = {}
    with torch.inference_mode():
        if key.kind == "conv":
            (n, c, h, w), cout, ks, stride, pad, groups, bias = key.shape
            x = torch.randn(n, c, h, w, device=dev, dtype=dtype)
            wt = torch.randn(cout, c // groups, *ks, device=dev, dtype=dtype) * 0.05
            b = torch.zeros(cout, device=dev, dtype=dtype) if bias else None
            out["nchw_s"] = time_call(lambda: F.conv2d(x, wt, b, stride, pad, 1, groups), dev)
            if dev.type == "cuda":
                xc, wc = x.contiguous(memory_format=torch.channels_last), wt.contiguous(memory_format=torch.channels_last)
                out["channels_last_s"] = time_call(lambda: F.conv2d(xc, wc, b, stride, pad, 1, groups), dev)
        elif key.kind == "linear":
            shape, fout, bias = key.shape
            x = torch.randn(*shape, device=dev, dtype=dtype)
            wt = torch.randn(fout, shape[-1], device=dev, dtype=dtype) * 0.05
            b = torch.zeros(fout, device=dev, dtype=dtype) if bias else None
            out["gemm_s"] = time_call(lambda: F.linear(x, wt, b), dev)
        else:
            qs, ks_, vs, _, causal = key.shape
            q = torch.randn(*qs, device=dev, dtype=dtype)
            k = torch.randn(*ks_, device=dev, dtype=dtype)
            v = torch.randn(*vs, device=dev, dtype=dtype)
            out["sdpa_s"] = time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), dev)
    out["best_s"] = min(v for k, v in out.items() if k.endswith("_s"))
    return out


def op_floor(name: str, model: nn.Module, run: Callable[[], Any], dev: torch.device, dtype: torch.dtype,
             frames: int, matmul_tflops: float | None) -> dict[str, Any]:
    cap = capture_ops(model, run)
    rows = []
    total_s = total_flop = 0.0
    by_kind: dict[str, dict[str, float]] = {}
    for key, count in cap.counts.items():
        t = time_op(key, dev, dtype)
        flop = op_flops(key)
        total_s += count * t["best_s"]
        total_flop += count * flop
        agg = by_kind.setdefault(key.kind, {"calls": 0, "gflop": 0.0, "floor_s": 0.0})
        agg["calls"] += count
        agg["gflop"] += count * flop / 1e9
        agg["floor_s"] += count * t["best_s"]
        rows.append((count * t["best_s"], {
            "kind": key.kind, "shape": json.loads(json.dumps(key.shape)), "count": count, "gflop": round(flop / 1e9, 3),
            **{f"{k[:-2]}_ms": round(v * 1e3, 4) for k, v in t.items()}, "best_tflops": round(flop / t["best_s"] / 1e12, 1),
        }))
    rows.sort(key=lambda r: -r[0])
    for agg in by_kind.values():
        agg["tflops_at_floor"] = round(agg["gflop"] / agg["floor_s"] / 1e3, 1) if agg["floor_s"] else None
        agg["gflop"] = round(agg["gflop"], 1)
        agg["floor_s"] = round(agg["floor_s"], 5)
    res = {
        "frames_per_call": frames,
        "gflop_per_frame": round(total_flop / frames / 1e9, 2),
        "op_floor_ms_per_frame": round(total_s / frames * 1e3, 4),
        "op_floor_tflops": round(total_flop / total_s / 1e12, 1),
        "by_kind": by_kind,
        "distinct_ops": len(rows),
        "ops_by_floor_time": [row for _, row in rows[:25]],
    }
    if matmul_tflops:
        res["matmul_floor_ms_per_frame"] = round(total_flop / frames / (matmul_tflops * 1e12) * 1e3, 4)
    _log(f"{name}: {res['gflop_per_frame']} GFLOP/frame, op floor {res['op_floor_ms_per_frame']} ms/frame "
         f"({res['op_floor_tflops']} TFLOP/s), {len(rows)} distinct ops")
    return res


# --------------------------------------------------------------------------- models and variants


class Models:
    def __init__(self, unet: nn.Module, vae: nn.Module) -> None:
        self.unet, self.vae = unet, vae


def build_models(size: str, dev: torch.device, dtype: torch.dtype) -> Models:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from musetalk_job.models import random_weights as rw

    def make(cls: Any, config: dict[str, Any], seed: str) -> nn.Module:
        with torch.device("meta"):
            meta = cls.from_config(config)
        sd = rw.random_state_dict(meta, rw._seed(0, seed))
        model = cls.from_config(config)
        model.load_state_dict(sd)
        return model.to(dev, dtype).eval().requires_grad_(False)

    unet = make(UNet2DConditionModel, rw.UNET_FULL if size == "full" else rw.UNET_TINY, "unet-v15")
    vae = make(AutoencoderKL, rw.VAE_FULL if size == "full" else rw.VAE_TINY, "vae")
    return Models(unet, vae)


def model_calls(m: Models, dev: torch.device, dtype: torch.dtype, ub: int, dc: int, eb: int) -> dict[str, tuple[Callable[[], Any], int]]:
    """Each model's call at the engine's shapes, with inputs made as the engine makes them: in
    inference mode (dynamo guards on the flag: frozen compiled models would run other inputs
    eagerly), the timestep outside it (``Pipeline._timestep``)."""
    cfg = m.unet.config
    with torch.inference_mode():
        lat = torch.randn(ub, int(cfg.in_channels), 32, 32, device=dev, dtype=dtype)
        cond = torch.randn(ub, 50, int(cfg.cross_attention_dim), device=dev, dtype=dtype)
        z = torch.randn(dc, int(m.vae.config.latent_channels), 32, 32, device=dev, dtype=dtype)
        img = torch.randn(eb, 3, 256, 256, device=dev, dtype=dtype).clamp(-1, 1)
    with torch.inference_mode(False):
        t0 = torch.zeros(1, dtype=torch.long, device=dev)
    return {
        "unet": (lambda: m.unet(lat, t0, encoder_hidden_states=cond).sample, ub),
        "vae_decode": (lambda: m.vae.decode(z).sample, dc),
        "vae_encode": (lambda: m.vae.encode(img).latent_dist.mean, eb),
    }


def profile_kernels(fn: Callable[[], Any], calls: int = 3, top: int = 30) -> list[dict[str, Any]]:
    """The GPU kernels of ``calls`` calls of ``fn``, by device time per call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0)
        if dev_us > 0:
            rows.append({"name": ev.key[:120], "count_per_call": ev.count / calls, "ms_per_call": dev_us / 1e3 / calls})
    rows.sort(key=lambda r: -r["ms_per_call"])
    total = sum(r["ms_per_call"] for r in rows)
    for r in rows:
        r["ms_per_call"] = round(r["ms_per_call"], 4)
        r["share"] = round(r["ms_per_call"] / total, 3) if total else None
    return [{"total_ms_per_call": round(total, 3)}] + rows[:top]


def run_variant(name: str, m: Models, dev: torch.device, dtype: torch.dtype, ub: int, dc: int, eb: int,
                models: list[str], profile: bool = False) -> dict[str, Any]:
    """``name``: eager | regional | regional-nolayout | full | full-nolayout, optionally suffixed
    ``+unetcl`` (the UNet's weights in channels-last memory format)."""
    from musetalk_job import compiled

    base, _, extra = name.partition("+")
    res: dict[str, Any] = {}
    if extra == "unetcl":
        m.unet.to(memory_format=torch.channels_last)
    ic = importlib.import_module("torch._inductor.config")
    try:
        if base != "eager":
            importlib.import_module("torch._dynamo").reset()
            ic.layout_optimization = not base.endswith("nolayout")
            if not compiled.enable(m, "full" if base.startswith("full") else "regional"):
                return {"error": compiled.failure(m) or "compile not available"}
        calls = model_calls(m, dev, dtype, ub, dc, eb)
        with torch.inference_mode():
            for key in models:
                fn, frames = calls[key]
                if base.startswith("full") and key == "vae_encode":
                    continue  # full mode leaves the encoder eager
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                if base != "eager":
                    res[f"{key}_first_call_s"] = round(time.perf_counter() - t0, 1)
                res[f"{key}_ms_per_frame"] = round(time_call(fn, dev) / frames * 1e3, 4)
                if profile and dev.type == "cuda":
                    res[f"{key}_kernels"] = profile_kernels(fn)
        if compiled.failure(m):
            res["error"] = compiled.failure(m)
    finally:
        if base != "eager":
            compiled.disable(m)
            ic.layout_optimization = True
        if extra == "unetcl":
            m.unet.to(memory_format=torch.contiguous_format)
    _log(f"variant {name}: { {k: v for k, v in res.items() if not k.endswith('_kernels')} }")
    return res


def matmul_ceiling(dev: torch.device, dtype: torch.dtype) -> float | None:
    if dev.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return round(2 * n**3 / time_call(lambda: a @ b, dev, min_s=0.2) / 1e12, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--decode-chunk", type=int, default=32)
    p.add_argument("--encode-batch", type=int, default=32, help="images per encoder call (the engine: 2 x 16)")
    p.add_argument("--variants", default="eager,regional,regional-nolayout,full")
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--models", default="unet,vae_decode,vae_encode", help="which models the variants time")
    p.add_argument("--profile", default="", help="comma-separated variants to profile (top kernels per call)")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if dev.type == "cuda" else "fp32")]
    os.environ.setdefault("MUSETALK_COMPILE_CACHE", tempfile.mkdtemp(prefix="gpu-floor-inductor-"))
    torch.backends.cudnn.benchmark = False  # the engine's setting for the variants
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": args.commit,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "size": args.size,
        "unet_batch": args.unet_batch, "decode_chunk": args.decode_chunk, "encode_batch": args.encode_batch,
    }
    t0 = time.perf_counter()
    m = build_models(args.size, dev, dtype)
    _log(f"models built in {time.perf_counter() - t0:.1f}s")
    report["matmul_fp16_8192_tflops"] = matmul_ceiling(dev, dtype)
    if not args.no_floor:
        calls = model_calls(m, dev, dtype, args.unet_batch, args.decode_chunk, args.encode_batch)
        torch.backends.cudnn.benchmark = True  # the floor takes cuDNN's best algorithm
        report["floor"] = {}
        for key, model in (("unet", m.unet), ("vae_decode", m.vae), ("vae_encode", m.vae)):
            fn, frames = calls[key]
            report["floor"][key] = op_floor(key, model, fn, dev, dtype, frames, report["matmul_fp16_8192_tflops"])
        torch.backends.cudnn.benchmark = False
        args.out.write_text(json.dumps(report, indent=1))
    report["variants"] = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        try:
            report["variants"][name] = run_variant(name, m, dev, dtype, args.unet_batch, args.decode_chunk, args.encode_batch,
                                                   [k.strip() for k in args.models.split(",") if k.strip()],
                                                   profile=name in args.profile.split(","))
        except Exception as exc:  # report and go on with the next variant
            report["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            _log(f"variant {name} failed: {exc}")
        args.out.write_text(json.dumps(report, indent=1))
    if "floor" in report:
        for key, fl in report["floor"].items():
            fl["variant_vs_op_floor"] = {
                name: round(fl["op_floor_ms_per_frame"] / v[f"{key}_ms_per_frame"], 3)
                for name, v in report["variants"].items() if f"{key}_ms_per_frame" in v
            }
    report["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(report, indent=1))
    _log(f"done in {report['total_s']}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
