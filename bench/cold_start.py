#!/usr/bin/env python3
"""Cold start: process start → models ready, from the original weights and from the fast copies.

    python bench/cold_start.py --models-dir models [--convert] [--repeats 3] [--drop-caches] > cold.json
    python bench/cold_start.py --models-dir .bench/models --write-random full --convert   # no real weights

"Models ready" is what a job waits for: a fresh ``python`` process imports the package, builds
``Pipeline.from_models_dir(models_dir, device=..., version=..., landmarks=...)`` (UNet, VAE,
Whisper encoder + feature extractor, BiSeNet, and the landmark detector) and, on CUDA,
synchronises the device. The parent takes the wall clock just before spawning the child and the
child reports the wall clock when ready, so interpreter start-up and imports are included.

Two modes, interleaved per repeat so that neither always runs second:
- ``original``: a shadow dir of symlinks to every file except ``fast/`` (the loaders see no copies);
- ``fast``: the models dir itself with current ``convert-weights`` copies (``--convert`` makes them).

Page cache: with ``--drop-caches`` (root only) every run starts with a dropped page cache
(``sync`` + ``/proc/sys/vm/drop_caches``), i.e. weights come from disk as on a fresh node;
without it, one untimed warm-up per mode runs first and the figures are warm-cache figures.
The JSON says which. Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T_MAIN = time.time()  # first statement after the stdlib imports: the child's "interpreter up"

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST_KEYS_BASE = ("vae", "whisper-encoder", "bisenet")


def _child(args: argparse.Namespace) -> None:
    """Runs in the measured process: load everything, report timestamps as JSON."""
    t_imports0 = time.time()
    import torch

    from musetalk_job.pipeline import Pipeline

    t_imports = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_models_dir(args.models_dir, device=device, version=args.version,
                                    landmarks=None if args.landmarks == "none" else args.landmarks)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ready = time.time()
    sources = {name: {"path": str(src.path), "fast": bool(src.fast)} for name, src in pipe.models.sources.items()}
    print(json.dumps({
        "t_main": T_MAIN,
        "t_imports_start": t_imports0,
        "t_imports": t_imports,
        "t_ready": t_ready,
        "models_load_s": pipe.models.load_seconds,
        "device": str(pipe.models.device),
        "dtype": str(pipe.models.dtype).replace("torch.", ""),
        "sources": sources,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    }))


def _shadow_dir(models_dir: Path, root: Path) -> Path:
    """Symlinks to every file of ``models_dir`` except the fast copies."""
    from musetalk_job.models import layout

    shadow = root / "original"
    for path in sorted(models_dir.rglob("*")):
        rel = path.relative_to(models_dir)
        if rel.parts[0] == layout.FAST_DIR or not path.is_file():
            continue
        (shadow / rel).parent.mkdir(parents=True, exist_ok=True)
        (shadow / rel).symlink_to(path.resolve())
    return shadow


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _run_child(models_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--models-dir", str(models_dir),
            "--version", args.version, "--landmarks", args.landmarks]
    if args.device:
        argv += ["--device", args.device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    t_spawn = time.time()
    res = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    t_exit = time.time()
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"cold_start: child failed with exit {res.returncode}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "start_to_ready_s": round(out["t_ready"] - t_spawn, 3),
        "interpreter_s": round(out["t_main"] - t_spawn, 3),
        "imports_s": round(out["t_imports"] - out["t_imports_start"], 3),
        "models_load_s": round(out["models_load_s"], 3),
        "landmarks_and_rest_s": round(out["t_ready"] - out["t_imports"] - out["models_load_s"], 3),
        "process_total_s": round(t_exit - t_spawn, 3),
        "device": out["device"],
        "dtype": out["dtype"],
        "gpu": out["gpu"],
        "peak_gpu_bytes": out["peak_gpu_bytes"],
        "fast_sources": sorted(k for k, v in out["sources"].items() if v["fast"]),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = [r["start_to_ready_s"] for r in runs]
    return {"median_s": round(statistics.median(values), 3), "min_s": min(values), "max_s": max(values), "runs": runs}


def _log(msg: str) -> None:
    print(f"cold_start: {msg}", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--version", choices=("v15", "v1"), default="v15")
    p.add_argument("--landmarks", choices=("dwpose", "cascade", "none"), default="dwpose",
                   help="detector loaded with the models (default dwpose)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before every run (root)")
    p.add_argument("--convert", action="store_true", help="run convert-weights first when the copies are not current")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="dtype of the fast copies (--convert)")
    p.add_argument("--write-random", choices=("tiny", "full"), default=None,
                   help="write random weights of this size into an empty --models-dir first")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return 0

    sys.path.insert(0, str(REPO_ROOT / "src"))
    from musetalk_job import weights
    from musetalk_job.models import layout

    models_dir = args.models_dir.resolve()
    result: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "models_dir": str(models_dir),
        "version": args.version,
        "landmarks": args.landmarks,
        "random_weights": None,
    }
    if args.write_random and not (models_dir / layout.UNET[args.version][0]).is_file():
        from musetalk_job.models.random_weights import write_random_weights

        _log(f"writing {args.write_random} random weights to {models_dir}")
        t0 = time.perf_counter()
        write_random_weights(models_dir, size=args.write_random, version=args.version, dwpose=args.landmarks == "dwpose")
        result["write_random_s"] = round(time.perf_counter() - t0, 2)
    weights.assert_models_dir(models_dir, version=args.version,
                              landmarks="dwpose" if args.landmarks == "dwpose" else "cascade")
    result["random_weights"] = weights.is_random_weights_dir(models_dir)
    keys = (f"unet-{args.version}", *FAST_KEYS_BASE)
    if args.convert and not all(weights.fast_copy_valid(models_dir, k) for k in keys):
        _log("converting (convert-weights)")
        t0 = time.perf_counter()
        weights.convert_weights(models_dir, version=args.version, dtype=args.dtype,
                                landmarks="dwpose" if args.landmarks == "dwpose" else "cascade")
        result["convert_s"] = round(time.perf_counter() - t0, 2)
    stale = [k for k in keys if not weights.fast_copy_valid(models_dir, k)]
    if stale:
        raise SystemExit(f"cold_start: fast copies missing or stale for {', '.join(stale)}; pass --convert")
    result["weights_bytes"] = {
        "original": sum(p.stat().st_size for p in models_dir.rglob("*") if p.is_file() and p.parts[len(models_dir.parts)] != layout.FAST_DIR),
        "fast": sum(p.stat().st_size for p in (models_dir / layout.FAST_DIR).glob("*.safetensors")),
    }

    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        dirs = {"original": _shadow_dir(models_dir, Path(tmp)), "fast": models_dir}
        runs: dict[str, list[dict[str, Any]]] = {"original": [], "fast": []}
        dropped = None
        if args.drop_caches:
            dropped = _drop_caches()
            if not dropped:
                _log("cannot drop the page cache (not root?): reporting warm-cache figures")
        if not dropped:
            for mode, d in dirs.items():
                _log(f"warm-up {mode}")
                _run_child(d, args)
        for i in range(args.repeats):
            order = ("original", "fast") if i % 2 == 0 else ("fast", "original")
            for mode in order:
                if dropped:
                    _drop_caches()
                run = _run_child(dirs[mode], args)
                _log(f"{mode} #{i + 1}: {run['start_to_ready_s']:.2f}s (fast: {', '.join(run['fast_sources']) or 'none'})")
                runs[mode].append(run)
    result["page_cache"] = "dropped before every run" if dropped else "warm (one untimed warm-up per mode)"
    result["device"] = runs["fast"][0]["device"]
    result["gpu"] = runs["fast"][0]["gpu"]
    result["original"] = _summary(runs["original"])
    result["fast"] = _summary(runs["fast"])
    result["speedup"] = round(result["original"]["median_s"] / result["fast"]["median_s"], 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
