"""``musetalk-job doctor``: can a job run on this machine, and if not, why.

Contract:
- ``diagnose(*, models_dir, version="v15", landmarks="dwpose", verify=False, workspace=None,
  require_gpu=False, manifest=None) -> Diagnosis`` runs every check and never raises for a bad
  environment: Python, torch, CUDA (GPU name, compute capability, free/total memory via
  ``torch.cuda.mem_get_info``), video encoders (``media.encoders_available``: libx264,
  h264_nvenc), the landmark runtime (DWPose runs in PyTorch; onnxruntime and its providers are
  listed for information), the models dir (``weights.check_models_dir``: each file present, size
  ok, sha256 ok with ``verify``; random-weights dirs and fast copies noted), free disk of the
  workspace root, torch.compile and CUDA graphs as ``MUSETALK_COMPILE`` / ``MUSETALK_CUDA_GRAPHS``
  set them (an invalid value fails with the job's exit code, 2), which storage/hub credentials are configured (variable **names** only, never
  values), SaladCloud variables present.
- ``Diagnosis.exit_code``: 0 when a job can run here; 6 for a broken runtime (torch or PyAV
  unusable, no H.264 encoder, CUDA error, too little VRAM or disk, no GPU with
  ``require_gpu``/``MUSETALK_DEVICE=cuda``); 5 for missing/corrupt models. Runtime failures win
  (they are checked first); ``Diagnosis.reason`` names every failure.
- CLI: a readable table on stdout (``--json`` for a JSON object), and on failure one line
  ``error[N]: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .errors import EXIT_MODELS, EXIT_OK, EXIT_RUNTIME, JobError

Status = Literal["ok", "warn", "fail", "info"]

GIB = 1024**3
MIN_FREE_VRAM = 3 * GIB  # fp16 weights ≈ 2 GB plus activations of a small batch
LOW_FREE_VRAM = 8 * GIB
MIN_FREE_DISK = 1 * GIB
LOW_FREE_DISK = 10 * GIB

# Credentials the storage layer (fsspec backends) and the hub client read. Names only are shown.
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "SALAD_API_KEY",
)
SALAD_VARS = (
    "SALAD_MACHINE_ID",
    "SALAD_CONTAINER_GROUP_ID",
    "SALAD_CONTAINER_GROUP_NAME",
    "SALAD_INSTANCE_ID",
    "SALAD_ORGANIZATION_NAME",
    "SALAD_PROJECT_NAME",
)


@dataclass
class Check:
    name: str
    status: Status
    value: str
    exit_code: int | None = None  # set on "fail"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "value": self.value, "exit_code": self.exit_code}


@dataclass
class Diagnosis:
    checks: list[Check] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, status: Status, value: str, exit_code: int | None = None) -> Check:
        if status == "fail" and exit_code is None:
            exit_code = EXIT_RUNTIME
        check = Check(name, status, value, exit_code)
        self.checks.append(check)
        return check

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def exit_code(self) -> int:
        codes = [c.exit_code for c in self.failures if c.exit_code is not None]
        if not codes:
            return EXIT_OK
        return EXIT_RUNTIME if EXIT_RUNTIME in codes else codes[0]

    @property
    def reason(self) -> str | None:
        if not self.failures:
            return None
        # Per-file model rows (indented names) are summarised by the "models dir" row.
        return "; ".join(f"{c.name}: {c.value}" for c in self.failures if not c.name.startswith(" "))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == EXIT_OK,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "checks": [c.to_dict() for c in self.checks],
            "models": self.models,
        }

    def table(self) -> str:
        width = max((len(c.name) for c in self.checks), default=10)
        lines = [f"{'CHECK'.ljust(width)}  STATUS  VALUE"]
        for c in self.checks:
            lines.append(f"{c.name.ljust(width)}  {c.status.upper().ljust(6)}  {c.value}")
        return "\n".join(lines)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _check_torch(d: Diagnosis, require_gpu: bool) -> Any:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken install shows up as anything
        d.add("torch", "fail", f"cannot be imported ({_short(exc)}); reinstall torch (pip install torch)")
        return None
    d.add("torch", "ok", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    wants_cuda = require_gpu or os.environ.get("MUSETALK_DEVICE", "").strip().lower().startswith("cuda")
    try:
        available = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        d.add("cuda", "fail", f"CUDA check failed ({_short(exc)})")
        return torch
    if not available:
        why = (
            "no CUDA GPU: this torch is a CPU-only build"
            if torch.version.cuda is None
            else "no CUDA GPU visible (no driver, or CUDA_VISIBLE_DEVICES hides it)"
        )
        if wants_cuda:
            d.add("gpu", "fail", f"{why}; a GPU is required here")
        else:
            d.add("gpu", "warn", f"{why}: jobs run on the CPU in fp32, very slowly")
        return torch
    count = torch.cuda.device_count()
    for i in range(count):
        name = f"gpu{i}" if count > 1 else "gpu"
        try:
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
        except Exception as exc:  # noqa: BLE001 - a wedged GPU raises here
            d.add(name, "fail", f"CUDA error on device {i} ({_short(exc)}); this node cannot run jobs")
            continue
        desc = f"{props.name}, sm_{props.major}{props.minor}, {_gib(free)} free of {_gib(total)}"
        if free < MIN_FREE_VRAM:
            d.add(name, "fail", f"{desc}: needs at least {_gib(MIN_FREE_VRAM)} free (another process holds it?)")
        elif free < LOW_FREE_VRAM:
            d.add(name, "warn", f"{desc}: small batches only")
        else:
            d.add(name, "ok", desc)
    return torch


def _check_encoders(d: Diagnosis) -> None:
    try:
        from .media import encoders_available

        found = encoders_available()
    except Exception as exc:  # noqa: BLE001 - PyAV/FFmpeg libraries broken or missing
        d.add("video encoders", "fail", f"PyAV unusable ({_short(exc)}); reinstall av (pip install av)")
        return
    names = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in found.items())
    if not (found.get("libx264") or found.get("h264_nvenc")):
        d.add("video encoders", "fail", f"no H.264 encoder ({names}); install a PyAV build with libx264")
    else:
        d.add("video encoders", "ok", names)


def _check_cpus(d: Diagnosis) -> None:
    """The CPUs the thread pools are sized for (cpus.usable_cpus), and why fewer than the host's."""
    from . import cpus

    try:
        usable = cpus.compute_usable_cpus()
    except JobError as exc:  # MUSETALK_CPUS invalid
        d.add("cpus", "fail", exc.message, exc.exit_code)
        return
    why = [f"affinity {cpus.affinity_cpus()}"]
    quota = cpus.quota_cpus()
    if quota is not None:
        why.append(f"container quota {quota:g}")
    if os.environ.get(cpus.CPUS_ENV, "").strip():
        why.append(f"{cpus.CPUS_ENV} {os.environ[cpus.CPUS_ENV].strip()}")
    d.add("cpus", "info", f"{usable} usable (host {os.cpu_count()}; {', '.join(why)})")


def _check_landmarks(d: Diagnosis, landmarks: str, torch: Any) -> None:
    if landmarks == "dwpose":
        device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
        d.add("landmarks", "ok" if torch is not None else "fail", f"DWPose (RTMPose-l) in PyTorch on {device}")
    else:
        d.add("landmarks", "ok", "cascade (scikit-image LBP frontal-face model, no weights; lower fidelity)")
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        d.add("onnxruntime", "info", f"{onnxruntime.__version__}, providers {', '.join(providers)} (not used by the engine)")
    except Exception as exc:  # noqa: BLE001
        d.add("onnxruntime", "info", f"not available ({_short(exc, 80)}; not used by the engine)")


def _check_models(
    d: Diagnosis, models_dir: Path, version: str, landmarks: str, verify: bool, manifest: Path | None
) -> None:
    from . import weights
    from .models import layout

    random_weights = weights.is_random_weights_dir(models_dir)
    label = " (RANDOM test weights: the mouth will be noise)" if random_weights else ""
    if not models_dir.is_dir():
        label = " (does not exist)"
    statuses = weights.check_models_dir(models_dir, version=version, landmarks=landmarks, verify=verify, manifest=manifest)
    d.models = [s.to_dict() for s in statuses]
    bad = [s for s in statuses if s.required and not s.ok]
    head = d.add("models dir", "warn" if random_weights else "ok", f"{models_dir}{label}, version {version}, landmarks {landmarks}")
    for s in statuses:
        parts = [f"{s.size:,} B"] if s.size is not None else []
        if s.size_ok:
            parts.append("size ok")
        elif s.size_ok is None and s.present:
            parts.append("size not checked" + (" (random weights)" if random_weights else " (unknown)"))
        if s.sha256_ok:
            parts.append("sha256 ok")
        elif s.sha256_ok is None and s.present and verify:
            parts.append("sha256 not checked")
        if s.problem:
            parts.append(s.problem)
        status: Status = "ok" if s.ok else ("fail" if s.required else "warn")
        d.add(f"  {s.entry.path}", status, ", ".join(parts), EXIT_MODELS if status == "fail" else None)
    if bad:
        head.status, head.exit_code = "fail", EXIT_MODELS
        listed = ", ".join(f"{s.entry.path} ({s.problem})" for s in bad)
        head.value += f": {len(bad)} file(s) missing or corrupt: {listed}; {layout.DOWNLOAD_HINT.format(dir=models_dir)}"
    versions = ("v15", "v1") if version == "all" else (version,)
    fast_keys = [f"unet-{v}" for v in versions] + ["vae", "whisper-encoder", "bisenet"]
    fast = [k for k in fast_keys if weights.fast_copy_valid(models_dir, k)]
    stale = [k for k in fast_keys if (models_dir / layout.FAST[k]).is_file() and k not in fast]
    value = f"{len(fast)}/{len(fast_keys)} current" + (f", stale: {', '.join(stale)} (run convert-weights)" if stale else "")
    if not fast and not stale:
        value = "none (optional: `musetalk-job convert-weights` for a faster cold start)"
    d.add("fast copies", "info", value)


def _check_disk(d: Diagnosis, workspace: Path) -> None:
    probe = workspace
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        d.add("workspace disk", "fail", f"{workspace}: {_short(exc)}")
        return
    if not os.access(probe, os.W_OK):
        d.add("workspace disk", "fail", f"{workspace}: not writable (set MUSETALK_WORKDIR / --workdir)")
    elif free < MIN_FREE_DISK:
        d.add("workspace disk", "fail", f"{workspace}: {_gib(free)} free, needs at least {_gib(MIN_FREE_DISK)}")
    elif free < LOW_FREE_DISK:
        d.add("workspace disk", "warn", f"{workspace}: {_gib(free)} free (long videos need more)")
    else:
        d.add("workspace disk", "ok", f"{workspace}: {_gib(free)} free")


def _check_speedups(d: Diagnosis, torch: Any) -> None:
    """torch.compile and CUDA graphs as this environment sets them (a bad value fails every job)."""
    if torch is None:  # already a failure: both modules need torch
        return
    from . import compiled, graphs

    try:
        compile_mode = compiled.mode_from_env()
        graphs_mode = graphs.mode_from_env()
    except JobError as exc:
        d.add("speed-ups", "fail", exc.message, exc.exit_code)
        return
    parts = [f"torch.compile {compile_mode or 'off'} ({compiled.ENV_COMPILE})"]
    if torch.cuda.is_available():
        on = graphs.decide(graphs_mode, torch.device("cuda"))
        why = f", GPUs with >= {graphs.AUTO_MIN_TOTAL_GIB:g} GiB" if graphs_mode == "auto" else ""
        parts.append(f"CUDA graphs {'on' if on else 'off'} ({graphs.ENV_GRAPHS}={graphs_mode}{why})")
    else:
        parts.append("CUDA graphs off (no GPU)")
    d.add("speed-ups", "info", "; ".join(parts))


def _check_env(d: Diagnosis) -> None:
    creds = [n for n in CREDENTIAL_VARS if os.environ.get(n)]
    d.add("credentials", "info", ", ".join(creds) + " set" if creds else "none set (local paths and presigned URLs only)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    d.add("hub", "info", "offline (HF_HUB_OFFLINE)" if offline else ("HF_ENDPOINT set" if os.environ.get("HF_ENDPOINT") else "https://huggingface.co"))
    salad = [n for n in SALAD_VARS if os.environ.get(n)]
    d.add("salad", "info", f"SaladCloud container ({', '.join(salad)} set)" if salad else "not on SaladCloud")


def diagnose(
    *,
    models_dir: Path | str,
    version: str = "v15",
    landmarks: str = "dwpose",
    verify: bool = False,
    workspace: Path | str | None = None,
    require_gpu: bool = False,
    manifest: Path | str | None = None,
) -> Diagnosis:
    """Run every check (see the module docstring)."""
    d = Diagnosis()
    d.add("musetalk-job", "info", __version__)
    d.add("python", "ok", f"{platform.python_version()} ({platform.system()} {platform.machine()})")
    torch = _check_torch(d, require_gpu)
    _check_encoders(d)
    _check_cpus(d)
    _check_landmarks(d, landmarks, torch)
    _check_disk(d, Path(workspace) if workspace else Path(os.environ.get("MUSETALK_WORKDIR") or tempfile.gettempdir()))
    try:
        _check_models(d, Path(models_dir), version, landmarks, verify, Path(manifest) if manifest else None)
    except JobError as exc:  # a bad --manifest or version
        d.add("models dir", "fail", exc.message, exc.exit_code)
    _check_speedups(d, torch)
    _check_env(d)
    return d


def _cmd(args: argparse.Namespace) -> int:
    d = diagnose(
        models_dir=args.models_dir,
        version=args.version,
        landmarks=args.landmarks,
        verify=args.verify,
        workspace=args.workdir,
        require_gpu=args.require_gpu,
        manifest=args.manifest,
    )
    if args.json:
        print(json.dumps(d.to_dict(), indent=2))
    else:
        print(d.table())
    if d.exit_code != EXIT_OK:
        print(JobError(f"a job cannot run here: {d.reason}", exit_code=d.exit_code).one_line(), file=sys.stderr)
    return d.exit_code


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check Python, torch/CUDA/GPU, encoders, landmarks runtime, models, disk and credentials",
        description="Print what this machine has and whether a job can run here. Exit 0 if it can, "
        "5 when model files are missing or corrupt, 6 when the runtime is broken.",
    )
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("MUSETALK_MODELS_DIR") or "models"),
                   help="models directory (default $MUSETALK_MODELS_DIR or ./models)")
    p.add_argument("--version", choices=("v15", "v1", "all"), default="v15", help="UNet version(s) to check (default v15)")
    p.add_argument("--landmarks", choices=("dwpose", "cascade"), default="dwpose", help="landmark backend to check for")
    p.add_argument("--verify", action="store_true", help="also check sha256 of the model files (reads every byte)")
    p.add_argument("--workdir", type=Path, default=None, help="workspace root (default $MUSETALK_WORKDIR or /tmp)")
    p.add_argument("--require-gpu", action="store_true", help="fail when no CUDA GPU is usable")
    p.add_argument("--manifest", type=Path, default=None, help="weights manifest to check against (default: packaged)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.set_defaults(func=_cmd)
