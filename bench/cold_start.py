#!/usr/bin/env python3
"""Cold start: process start → models ready, from the original weights and from the fast copies.

    python bench/cold_start.py --models-dir models [--convert] [--repeats 3] [--drop-caches] > cold.json
    python bench/cold_start.py --models-dir .bench/models --write-random full --convert   # no real weights
    python bench/cold_start.py --models-dir models --drop-caches --loaders parallel,serial --read-throughput

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

Per run, ``load_breakdown`` / ``load_timeline`` are ``MuseTalkModels.load``'s own step times
(docs/engine-models.md, "Cold start"). ``--loaders parallel,serial`` also runs the plain serial
loader (``MUSETALK_LOAD_PARALLEL=0``) and reports it under ``loaders.serial``; ``prefetch`` is the
parallel loader after ``fastio.prefetch`` (the warm manifest and the weights, before importing
torch) and ``early`` after ``fastio.warm_early`` (the warm manifest only: what ``musetalk-job
run``/``serve`` do), reported under ``loaders.<name>``; the top-level ``original``/``fast`` keys
are always the first loader's. ``--early-prefetch`` makes every loader's child start
``fastio.prefetch`` before ``import torch``.
``--load-dtype fp16`` runs in fp16 (so the fp16 fast copies are used on a CPU too).
``--read-throughput`` adds the raw read speed of the weight files, one thread sequentially and
with N threads of ``fastio.Reader`` (page cache dropped before each when possible);
``--repeats 0`` with it measures only that.
``--import-profile`` adds one more run per mode (after the timed ones, page cache dropped as
for them) with a sampling profiler in the child (stdlib; ``sys._current_frames`` every 5 ms):
for the main thread and the loader's import and CUDA threads, the seconds spent per module
body being executed (``modules``, self time, like ``-X importtime``), per innermost Python
function (``leaf``: e.g. ``<frozen importlib._bootstrap_external>:get_data`` = reading a
``.pyc``, ``:_path_stat`` = ``stat``, ``:create_module`` = ``dlopen`` of an extension) and per
top-level package. Sampling slows the child a little: those runs are not in the medians.
Every run reports ``imports_counters`` (the main thread's CPU seconds, major page faults,
bytes read from disk and read syscalls during the imports before ``load``) and
``load_counters`` (the same for the import and CUDA steps inside ``load``); a CPU-bound step has
``cpu_s`` close to its wall time, one waiting on the disk has high ``majflt``/``read_bytes``.
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
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

T_MAIN = time.time()  # first statement after the stdlib imports: the child's "interpreter up"

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST_KEYS_BASE = ("vae", "whisper-encoder", "bisenet")


PROFILED_THREADS = ("MainThread", "musetalk-load-imports", "musetalk-load-cuda")


def _short_path(file: str) -> str:
    for marker in ("site-packages/", "dist-packages/", "/src/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


class _Sampler:
    """Stdlib sampling profiler of a few threads: every ``interval`` s, each thread's innermost
    frame (``leaf``) and innermost module body being executed (``modules``, ``packages``)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.counts: dict[str, dict[str, Counter[str]]] = {}
        self.samples: Counter[str] = Counter()
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cold-start-sampler", daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        names: dict[int, str] = {}
        while not self._stop.wait(self.interval):
            self.ticks += 1
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                if tid not in names:
                    names.update({t.ident: t.name for t in threading.enumerate() if t.ident is not None})
                name = names.get(tid, str(tid))
                if name not in PROFILED_THREADS:
                    continue
                c = self.counts.setdefault(name, {"modules": Counter(), "leaf": Counter(), "leaf_lines": Counter(),
                                                   "packages": Counter()})
                self.samples[name] += 1
                code = frame.f_code
                c["leaf"][f"{_short_path(code.co_filename)}:{code.co_name}"] += 1
                c["leaf_lines"][f"{_short_path(code.co_filename)}:{frame.f_lineno}:{code.co_name}"] += 1
                f: Any = frame
                while f is not None and f.f_code.co_name != "<module>":
                    f = f.f_back
                # the outermost frame (the script itself, a thread's run) is not an import
                module = _short_path(f.f_code.co_filename) if f is not None and f.f_back is not None else "(not importing)"
                c["modules"][module] += 1
                c["packages"][module.split("/", 1)[0] if "/" in module else module] += 1

    def report(self, top: int = 25) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._t0
        out: dict[str, Any] = {"interval_s": self.interval, "ticks": self.ticks, "wall_s": round(wall, 3), "threads": {}}
        for name, c in self.counts.items():
            n = self.samples[name]
            per = wall / max(1, self.ticks)  # seconds per sample: the real tick, sampling cost included
            out["threads"][name] = {"samples": n, "seconds": round(n * per, 3)} | {
                kind: [[k, round(v * per, 3)] for k, v in counter.most_common(top)] for kind, counter in c.items()}
        return out


def _child(args: argparse.Namespace) -> None:
    """Runs in the measured process: load everything, report timestamps as JSON."""
    sampler = _Sampler() if args.import_profile else None
    t_imports0 = time.time()
    from musetalk_job.models import fastio  # stdlib only

    counters0 = fastio.thread_counters()
    prefetched: list[str] = []
    if args.early_prefetch:
        on_cuda = args.device.startswith("cuda") if args.device else os.path.exists("/dev/nvidiactl")
        dtype = args.load_dtype or ("fp16" if on_cuda else None)
        dtype = None if dtype == "fp32" else dtype
        prefetched = [str(p) for p in fastio.prefetch(args.models_dir, args.version, dtype)]
    elif args.warm_early:  # what the run/serve entry points do (EngineCache.warm_early)
        prefetched = ["warm manifest"] if fastio.warm_early() else []
    import torch

    from musetalk_job.pipeline import Pipeline

    t_imports = time.time()
    imports_counters = fastio.counters_delta(counters0, fastio.thread_counters())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_models_dir(args.models_dir, device=device, version=args.version, dtype=args.load_dtype,
                                    landmarks=None if args.landmarks == "none" else args.landmarks)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ready = time.time()
    profile = sampler.report() if sampler is not None else None
    fastio.wait_recorded(30)  # after t_ready: a recording run must not exit before its manifest is written
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
        "load_breakdown": getattr(pipe.models, "load_breakdown", {}),
        "load_timeline": getattr(pipe.models, "load_timeline", {}),
        "load_counters": getattr(pipe.models, "load_counters", {}),
        "imports_counters": imports_counters,
        "import_profile": profile,
        "prefetched": prefetched,
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


def _run_child(models_dir: Path, args: argparse.Namespace, loader: str = "parallel", profile: bool = False) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--models-dir", str(models_dir),
            "--version", args.version, "--landmarks", args.landmarks]
    if profile:
        argv += ["--import-profile"]
    if args.device:
        argv += ["--device", args.device]
    if args.load_dtype:
        argv += ["--load-dtype", args.load_dtype]
    if args.early_prefetch or loader == "prefetch":
        argv += ["--early-prefetch"]
    elif loader == "early":
        argv += ["--warm-early"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "MUSETALK_LOAD_PARALLEL": "0" if loader == "serial" else "1"}
    if args.warm_manifest == "off":
        env["MUSETALK_WARM_MANIFEST"] = "0"
    elif args.warm_manifest == "record":
        env["MUSETALK_WARM_MANIFEST"] = str(args.manifest_file)
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
        "loader": loader,
        "load_breakdown": out.get("load_breakdown", {}),
        "load_timeline": out.get("load_timeline", {}),
        "load_counters": out.get("load_counters", {}),
        "imports_counters": out.get("imports_counters", {}),
        "prefetched": out.get("prefetched", []),
        **({"import_profile": out["import_profile"]} if out.get("import_profile") else {}),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = [r["start_to_ready_s"] for r in runs]
    keys = sorted({k for r in runs for k in r["load_breakdown"]})
    breakdown = {k: round(statistics.median([r["load_breakdown"].get(k, 0.0) for r in runs]), 3) for k in keys}
    steps = sorted({k for r in runs for k in r.get("load_counters", {})})
    counters = {
        step: {c: round(statistics.median([r["load_counters"].get(step, {}).get(c, 0.0) for r in runs]), 3)
               for c in sorted({c for r in runs for c in r["load_counters"].get(step, {})})}
        for step in steps
    }
    imports = {c: round(statistics.median([r.get("imports_counters", {}).get(c, 0.0) for r in runs]), 3)
               for c in sorted({c for r in runs for c in r.get("imports_counters", {})})}
    return {"median_s": round(statistics.median(values), 3), "min_s": min(values), "max_s": max(values),
            "load_breakdown_median": breakdown, "load_counters_median": counters,
            "imports_counters_median": imports, "runs": runs}


def _manifest_bytes(path: Path) -> int:
    total = 0
    for entry in json.loads(path.read_text())["files"]:
        try:
            total += sum(b for _a, b in entry["ranges"]) if "ranges" in entry else os.path.getsize(entry["path"])
        except OSError:
            pass
    return total


def _weight_files(models_dir: Path, mode: str, version: str) -> list[Path]:
    """The weight files a load reads: the originals, or the fast copies where current."""
    from musetalk_job.models import fastio

    return fastio.planned_files(models_dir, version, "fp16" if mode == "fast" else None)


def _read_throughput(models_dir: Path, args: argparse.Namespace, can_drop: bool) -> dict[str, Any]:
    """Raw read speed of the weight files: one thread, then N threads (page cache dropped before each)."""
    from musetalk_job.models import fastio

    out: dict[str, Any] = {"page_cache": "dropped before each" if can_drop else "warm (could not drop)",
                           "chunk_bytes": fastio.CHUNK_BYTES}
    for mode in ("original", "fast"):
        files = _weight_files(models_dir, mode, args.version)
        entry: dict[str, Any] = {"files": [str(p) for p in files], "bytes": sum(p.stat().st_size for p in files)}
        for workers in [1, *args.read_workers]:
            if can_drop:
                _drop_caches()
            res = fastio.throughput(files, workers)
            entry["sequential" if workers == 1 else f"parallel_{workers}"] = res
            _log(f"read {mode} with {workers} thread(s): {res['gb_per_s']:.3f} GB/s ({res['bytes'] / 1e9:.2f} GB in {res['seconds']:.2f}s)")
        out[mode] = entry
    return out


def _log(msg: str) -> None:
    print(f"cold_start: {msg}", file=sys.stderr, flush=True)


def _torch_has_pyc() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return False
    cache = Path(spec.origin).parent / "__pycache__"
    return cache.is_dir() and any(cache.glob("__init__.*.pyc"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--version", choices=("v15", "v1"), default="v15")
    p.add_argument("--landmarks", choices=("dwpose", "cascade", "none"), default="dwpose",
                   help="detector loaded with the models (default dwpose)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="original,fast", type=lambda v: [m for m in v.split(",") if m],
                   help="which weights to time: original and/or fast (default both)")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before every run (root)")
    p.add_argument("--convert", action="store_true", help="run convert-weights first when the copies are not current")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="dtype of the fast copies (--convert)")
    p.add_argument("--write-random", choices=("tiny", "full"), default=None,
                   help="write random weights of this size into an empty --models-dir first")
    p.add_argument("--loaders", default="parallel",
                   help="comma-separated loaders to time: parallel (default), serial (MUSETALK_LOAD_PARALLEL=0), "
                        "prefetch (parallel, the child first calling fastio.prefetch: the warm manifest and the "
                        "weights, before importing torch), early (parallel after fastio.warm_early, the warm "
                        "manifest only, as the run/serve entry points do)")
    p.add_argument("--load-dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="dtype of the run (default: fp16 on CUDA, fp32 on CPU; fp16 uses the fast copies on CPU)")
    p.add_argument("--early-prefetch", action="store_true",
                   help="child starts fastio.prefetch before importing torch")
    p.add_argument("--warm-early", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--read-throughput", action="store_true",
                   help="also report raw sequential/parallel read speed of the weight files")
    p.add_argument("--read-workers", default="4,16,32", type=lambda v: [int(x) for x in v.split(",") if x],
                   help="thread counts for --read-throughput (default 4,16,32)")
    p.add_argument("--warm-manifest", choices=("record", "off", "inherit"), default="record",
                   help="record (default): one untimed run records a fresh warm manifest in a temp dir that the "
                        "timed runs use; off: MUSETALK_WARM_MANIFEST=0; inherit: the environment's")
    p.add_argument("--import-profile", action="store_true",
                   help="one extra sampled run per mode: where the imports and load spend their time")
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
        # Without bytecode caches every process compiles the sources it imports: 4.7 s of
        # `compile()` inside `import diffusers` alone on the H200 VM, whose image sets
        # PYTHONDONTWRITEBYTECODE=1 and ships torch without .pyc (run 14). The image this
        # project builds compiles them at build time (Dockerfile).
        "dont_write_bytecode": bool(sys.dont_write_bytecode),
        "torch_has_pyc": _torch_has_pyc(),
    }
    if result["dont_write_bytecode"] or not result["torch_has_pyc"]:
        _log("warning: no bytecode caches (PYTHONDONTWRITEBYTECODE set or torch has no .pyc): every run "
             "compiles the Python sources it imports; unset PYTHONDONTWRITEBYTECODE or run compileall first")
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

    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    if not loaders or any(x not in ("parallel", "serial", "prefetch", "early") for x in loaders):
        raise SystemExit(f"cold_start: --loaders takes parallel, serial, prefetch and/or early, got {args.loaders!r}")
    if not args.modes or any(m not in ("original", "fast") for m in args.modes):
        raise SystemExit(f"cold_start: --modes takes original and/or fast, got {','.join(args.modes)!r}")
    result["loaders_timed"] = loaders
    result["warm_manifest_mode"] = args.warm_manifest
    result["early_prefetch"] = args.early_prefetch
    can_drop = _drop_caches() if args.drop_caches or args.read_throughput else False
    if args.read_throughput:
        result["read_throughput"] = _read_throughput(models_dir, args, can_drop)

    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        dirs = {"original": _shadow_dir(models_dir, Path(tmp)), "fast": models_dir}
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {lo: {"original": [], "fast": []} for lo in loaders}
        args.manifest_file = Path(tmp) / "warm-files.json"
        if args.warm_manifest == "record" and args.repeats > 0:
            _log("recording the warm manifest (untimed run)")
            if args.drop_caches:
                _drop_caches()
            _run_child(dirs["fast"], args, "parallel")
            result["warm_manifest"] = {"files": len(json.loads(args.manifest_file.read_text())["files"]),
                                       "warm_bytes": _manifest_bytes(args.manifest_file)} if args.manifest_file.is_file() else None
        dropped = None
        if args.drop_caches:
            dropped = can_drop
            if not dropped:
                _log("cannot drop the page cache (not root?): reporting warm-cache figures")
        if not dropped and args.repeats > 0:
            for mode, d in dirs.items():
                if mode not in args.modes:
                    continue
                _log(f"warm-up {mode}")
                _run_child(d, args, loaders[0])
        modes = [m for m in ("original", "fast") if m in args.modes]
        for i in range(args.repeats):
            order = modes if i % 2 == 0 else modes[::-1]
            for loader in loaders if i % 2 == 0 else loaders[::-1]:
                for mode in order:
                    if dropped:
                        _drop_caches()
                    run = _run_child(dirs[mode], args, loader)
                    bd = run["load_breakdown"]
                    _log(f"{loader} {mode} #{i + 1}: {run['start_to_ready_s']:.2f}s (load {run['models_load_s']:.2f}s; "
                         f"fast: {', '.join(run['fast_sources']) or 'none'}; "
                         + ", ".join(f"{k} {v:.2f}" for k, v in sorted(bd.items(), key=lambda kv: -kv[1])[:6]) + ")")
                    runs[loader][mode].append(run)
        if args.import_profile:
            result["import_profile"] = {}
            for mode in ("original", "fast"):
                if dropped:
                    _drop_caches()
                run = _run_child(dirs[mode], args, loaders[0], profile=True)
                result["import_profile"][mode] = {
                    "start_to_ready_s": run["start_to_ready_s"], "imports_s": run["imports_s"],
                    "models_load_s": run["models_load_s"], "load_breakdown": run["load_breakdown"],
                    "load_counters": run["load_counters"], "imports_counters": run["imports_counters"],
                    "profile": run.get("import_profile")}
                _log(f"profiled {mode}: {run['start_to_ready_s']:.2f}s")
    result["page_cache"] = "dropped before every run" if dropped else "warm (one untimed warm-up per mode)"
    if args.repeats > 0:
        first = runs[loaders[0]]
        result["device"] = first[modes[-1]][0]["device"]
        result["gpu"] = first[modes[-1]][0]["gpu"]
        for mode in modes:
            result[mode] = _summary(first[mode])
        if len(modes) == 2:
            result["speedup"] = round(result["original"]["median_s"] / result["fast"]["median_s"], 2)
        result["loaders"] = {lo: {mode: _summary(r[mode]) for mode in modes} for lo, r in runs.items()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
