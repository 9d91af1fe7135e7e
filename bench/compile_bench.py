#!/usr/bin/env python3
"""Eager vs ``torch.compile`` for the GPU hot loop (UNet at t=0 + VAE decode), one JSON on stdout.

    python bench/compile_bench.py --models .bench/models-full            # H200: ~3-4 min
    python bench/compile_bench.py --models DIR --compile regional --batch 64 --mode default

Sections (each one catches and reports its own error; a failed section never stops the next):
- ``setup``: full-size random weights written into ``--models`` when it has no UNet (~30 s),
  models loaded in fp16 (``MuseTalkModels.load``), versions, GPU name.
- ``eager``: UNet at ``--batch``, VAE decode of that batch in chunks of ``--chunk`` (exactly
  ``latents.decode_latents`` as the engine calls it), and both together: ms/frame (CUDA events,
  median of ``--iters``), peak memory.
- ``<compile>_cold`` for each of ``--compile`` (``regional``, ``full``): a fresh cache dir,
  ``compiled.enable`` + ``compiled.warmup`` timed (= compile seconds, cold cache), then the same
  timings as eager, peak memory, and the max difference to eager (UNet output, uint8 faces).
- ``<compile>_warm``: a second process (``--child``) with the same cache dir loads the models and
  times ``enable`` + ``warmup`` again (= compile seconds, warm cache) and the hot loop.
A section is skipped (reported as such) when the ``--budget-s`` wall budget would be exceeded.
Logs go to stderr; stdout carries only the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[compile_bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class SectionTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise SectionTimeout("section ran past its time limit")


def section(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
    log(f"section {name} ...")
    t = time.perf_counter()
    if timeout:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(timeout)))
    try:
        out = fn()
        out["section_s"] = round(time.perf_counter() - t, 2)
        report[name] = out
        log(f"section {name} done in {out['section_s']}s")
        return out
    except BaseException as exc:  # noqa: BLE001 - the bench reports everything and goes on
        if isinstance(exc, KeyboardInterrupt):
            raise
        report[name] = {
            "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:1500]}",
            "traceback": traceback.format_exc()[-3000:],
            "section_s": round(time.perf_counter() - t, 2),
        }
        log(f"section {name} FAILED: {report[name]['error'][:300]}")
        return None
    finally:
        if timeout:
            signal.alarm(0)


# ------------------------------------------------------------------------------- measuring


def load_models(models_dir: Path, dtype_name: str) -> Any:
    import torch

    from musetalk_job.models import layout
    from musetalk_job.models.loading import MuseTalkModels

    try:
        from musetalk_job.pipeline import CUDNN_BENCHMARK
    except Exception:
        CUDNN_BENCHMARK = False
    torch.backends.cudnn.benchmark = CUDNN_BENCHMARK  # as Pipeline.from_models_dir
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if not layout.unet_paths(models_dir, "v15")[0].exists():
        raise FileNotFoundError(f"{models_dir} has no v15 UNet")
    return MuseTalkModels.load(models_dir, version="v15", device="cuda", dtype=dtype)


def inputs(models: Any, batch: int) -> tuple[Any, Any, Any]:
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    # As in the engine: latents and audio features are inference tensors (made under
    # inference_mode), the timestep is not (Pipeline.__init__). Dynamo guards on that flag.
    with torch.inference_mode():
        lat = (torch.randn((batch, 8, 32, 32), generator=g) * 0.8).to("cuda", models.dtype)
        cond = (torch.randn((batch, 50, 384), generator=g) * 0.5).to("cuda", models.dtype)
    ts = torch.zeros(1, dtype=torch.long, device="cuda")
    return lat, cond, ts


def time_cuda(fn: Callable[[], Any], iters: int, warm: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def hot_loop(models: Any, args: argparse.Namespace) -> dict[str, Any]:
    """ms/frame of UNet, decode and both at ``args.batch``; peak memory of the timed runs."""
    import torch

    from musetalk_job.latents import decode_latents

    lat, cond, ts = inputs(models, args.batch)
    b = args.batch
    with torch.inference_mode():
        pred = models.unet(lat, ts, encoder_hidden_states=cond).sample.clone()  # clone: reduce-overhead reuses outputs
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        unet_ms = time_cuda(lambda: models.unet(lat, ts, encoder_hidden_states=cond).sample, args.iters)
        dec_ms = time_cuda(lambda: decode_latents(models.vae, pred, args.chunk), args.iters)
        both_ms = time_cuda(
            lambda: decode_latents(models.vae, models.unet(lat, ts, encoder_hidden_states=cond).sample, args.chunk), args.iters
        )
        peak = torch.cuda.max_memory_allocated()
        pred = models.unet(lat, ts, encoder_hidden_states=cond).sample.clone()
        faces = decode_latents(models.vae, pred, args.chunk)
        torch.cuda.synchronize()
    return {
        "batch": b,
        "decode_chunk": args.chunk,
        "unet_ms_per_frame": round(unet_ms / b, 4),
        "decode_ms_per_frame": round(dec_ms / b, 4),
        "unet_plus_decode_ms_per_frame": round(both_ms / b, 4),
        "unet_plus_decode_fps": round(1000.0 * b / both_ms, 1),
        "peak_mem_gib_timed": round(peak / 2**30, 3),
        "peak_mem_above_inputs_gib": round((peak - base) / 2**30, 3),
        "_pred": pred.float().cpu(),
        "_faces": faces.cpu(),
    }


def diff(a: Any, b: Any) -> Optional[float]:
    import torch

    d = (a.float() - b.float()).abs()
    d = d[torch.isfinite(d)]
    return round(float(d.max()), 6) if d.numel() else None


def compile_and_time(models: Any, args: argparse.Namespace, kind: str, cache: Path) -> dict[str, Any]:
    import torch

    from musetalk_job import compiled

    torch._dynamo.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    ok = compiled.enable(models, kind, inductor_mode=args.mode, cache=cache)
    if not ok:
        raise RuntimeError("compiled.enable returned False (see the warning on stderr)")
    warm_s = compiled.warmup(models, [args.batch], decode_chunk=args.chunk)
    compile_s = time.perf_counter() - t
    compile_peak = torch.cuda.max_memory_allocated()
    res = hot_loop(models, args)
    res.update(
        compile_s=round(compile_s, 2),
        warmup_s=round(warm_s, 2),
        peak_mem_gib_compile=round(compile_peak / 2**30, 3),
        still_compiled=compiled.is_enabled(models),
        compile_failure=compiled.failure(models),
        cache_dir=str(cache),
        inductor_mode=args.mode,
    )
    try:
        from torch._dynamo.utils import counters

        res["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
        res["fxgraph_cache_hit"] = int(counters["inductor"]["fxgraph_cache_hit"])
        res["fxgraph_cache_miss"] = int(counters["inductor"]["fxgraph_cache_miss"])
        counters.clear()
    except Exception:
        pass
    return res


def child(args: argparse.Namespace) -> None:
    """Warm-cache run in a fresh process: load, compile against ``--cache``, time."""
    import torch

    t = time.perf_counter()
    models = load_models(Path(args.models), args.dtype)
    load_s = time.perf_counter() - t
    res = compile_and_time(models, args, args.child, Path(args.cache))
    res.pop("_pred", None)
    res.pop("_faces", None)
    res["load_s"] = round(load_s, 2)
    res["process_s"] = round(time.perf_counter() - T0, 2)
    torch.cuda.synchronize()
    print(json.dumps(res))


def run_child(args: argparse.Namespace, kind: str, cache: Path, timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--cache", str(cache),
            "--models", str(args.models), "--batch", str(args.batch), "--chunk", str(args.chunk),
            "--mode", args.mode, "--iters", str(args.iters), "--dtype", args.dtype]
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr[-1500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["child_wall_s"] = round(time.perf_counter() - t, 2)
    return out


# ------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(ROOT / ".bench" / "models-full"), help="models dir (random full weights written when it has no UNet)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16, help="VAE decode chunk (the engine's GPU_CHUNK)")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--mode", default="default", choices=("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"))
    ap.add_argument("--compile", default="regional,full", help="comma list of regional, full (in this order of running)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cache", default=None, help="compile cache root (default: a fresh temp dir, removed afterwards)")
    ap.add_argument("--budget-s", type=float, default=225.0, help="skip sections that would end after this many seconds")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-cache child processes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.child:
        child(args)
        return 0

    report: dict[str, Any] = {"argv": sys.argv[1:], "batch": args.batch, "chunk": args.chunk, "dtype": args.dtype,
                              "inductor_mode": args.mode}
    state: dict[str, Any] = {}
    # Rough cost of each section on an H200 (seconds), for the budget check.
    estimate = {"regional_cold": 60, "regional_warm": 45, "full_cold": 90, "full_warm": 50}

    def setup() -> dict[str, Any]:
        import diffusers
        import torch

        from musetalk_job.models import layout
        from musetalk_job.models.random_weights import write_random_weights

        out: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0]}
        try:
            import triton

            out["triton"] = triton.__version__
        except Exception as exc:
            out["triton"] = f"unavailable: {exc}"
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        out["gpu"] = torch.cuda.get_device_name(0)
        models_dir = Path(args.models)
        if not layout.unet_paths(models_dir, "v15")[0].exists():
            t = time.perf_counter()
            write_random_weights(models_dir, size="full", version="v15", dwpose=False)
            out["weights_written_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        state["models"] = load_models(models_dir, args.dtype)
        out["load_s"] = round(time.perf_counter() - t, 2)
        return out

    def eager() -> dict[str, Any]:
        res = hot_loop(state["models"], args)
        state["eager_pred"], state["eager_faces"] = res.pop("_pred"), res.pop("_faces")
        return res

    root = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="musetalk-compile-bench-"))
    kinds = [k.strip() for k in args.compile.split(",") if k.strip()]
    try:
        if section(report, "setup", setup) is not None:
            section(report, "eager", eager)
            for kind in kinds:
                if kind not in ("regional", "full"):
                    report[f"{kind}_cold"] = {"error": f"unknown --compile kind {kind!r}"}
                    continue
                cache = root / f"{kind}-{args.mode}"
                elapsed = time.perf_counter() - T0
                if elapsed + estimate[f"{kind}_cold"] > args.budget_s:
                    report[f"{kind}_cold"] = {"skipped": f"budget: {elapsed:.0f}s elapsed of {args.budget_s:.0f}s"}
                    continue
                shutil.rmtree(cache, ignore_errors=True)

                def cold(kind: str = kind, cache: Path = cache) -> dict[str, Any]:
                    from musetalk_job import compiled

                    models = state["models"]
                    res = compile_and_time(models, args, kind, cache)
                    pred, faces = res.pop("_pred"), res.pop("_faces")
                    if "eager_pred" in state:
                        res["max_abs_diff_unet_vs_eager"] = diff(pred, state["eager_pred"])
                        res["max_abs_diff_faces_u8_vs_eager"] = diff(faces, state["eager_faces"])
                        e = report.get("eager", {})
                        if e.get("unet_plus_decode_ms_per_frame"):
                            res["speedup_unet_plus_decode"] = round(e["unet_plus_decode_ms_per_frame"] / res["unet_plus_decode_ms_per_frame"], 3)
                            res["speedup_unet"] = round(e["unet_ms_per_frame"] / res["unet_ms_per_frame"], 3)
                            res["speedup_decode"] = round(e["decode_ms_per_frame"] / res["decode_ms_per_frame"], 3)
                    compiled.disable(models)
                    return res

                ok = section(report, f"{kind}_cold", cold, timeout=max(60.0, args.budget_s + 60 - elapsed))
                if ok is None:
                    try:
                        from musetalk_job import compiled

                        compiled.disable(state["models"])
                    except Exception:
                        pass
                    continue
                if args.no_warm:
                    continue
                elapsed = time.perf_counter() - T0
                if elapsed + estimate[f"{kind}_warm"] > args.budget_s:
                    report[f"{kind}_warm"] = {"skipped": f"budget: {elapsed:.0f}s elapsed of {args.budget_s:.0f}s"}
                    continue
                timeout = max(30.0, args.budget_s + 60 - elapsed)
                section(report, f"{kind}_warm", lambda kind=kind, cache=cache, timeout=timeout: run_child(args, kind, cache, timeout))
    finally:
        if not args.cache:
            shutil.rmtree(root, ignore_errors=True)
        report["total_s"] = round(time.perf_counter() - T0, 1)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
