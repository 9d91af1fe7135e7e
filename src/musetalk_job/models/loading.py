"""Load the MuseTalk models from the official models-dir layout (``models.layout``).

Contract:
- ``MuseTalkModels.load(models_dir, *, version="v15", device=None, dtype=None)`` returns the
  UNet (diffusers ``UNet2DConditionModel``), the VAE (``AutoencoderKL``), the Whisper encoder
  (transformers ``WhisperEncoder``) with its ``WhisperFeatureExtractor``, and the BiSeNet face
  parser — all ``eval()``, ``requires_grad_(False)``, on ``device`` in ``dtype`` (default: CUDA
  + fp16 when available, else CPU + fp32).
- Modules are built on the meta device and filled with a **strict** ``load_state_dict(...,
  assign=True)`` so no time is spent on random init. Files are read with
  ``torch.load(weights_only=True, mmap=True)`` or safetensors; nothing is ever unpickled.
- Accepted variants: the VAE as ``diffusion_pytorch_model.safetensors`` or ``.bin``, with legacy
  attention names (``query/key/value/proj_attn``) or current ones (``to_q/to_k/to_v/to_out.0``);
  Whisper as ``pytorch_model.bin`` or ``model.safetensors`` with encoder keys under
  ``model.encoder.`` or ``encoder.``; BiSeNet of any width (read from the tensor shapes).
- When ``layout.FAST[key]`` exists (fp16/bf16 safetensors written by ``convert-weights`` holding
  the module's own ``state_dict()`` keys) and ``weights.fast_copy_valid`` says it was made from
  the current originals (sizes and mtimes recorded in ``fast/fast.json``), it is loaded straight
  to the device instead; a stale copy, or one that fails to load, falls back to the original
  with a warning.
- Any missing, truncated, corrupt or mismatched file raises ``ModelsError`` naming the file and
  the download hint.
- Cold start (``PARALLEL_LOAD``, default on; ``MUSETALK_LOAD_PARALLEL=0`` gives the plain serial
  loader): independent work overlaps — CUDA context + cuBLAS/cuDNN warm-up in a background
  thread, diffusers then transformers imported in one background thread, every weight file read by
  ``fastio.Reader`` (parallel ``os.preadv`` chunks; safetensors parsed zero-copy from the
  buffer, torch zip/legacy files pulled into the page cache and then ``torch.load(mmap=True)``),
  modules built on meta while the bytes arrive. Reads started earlier by ``fastio.prefetch`` are
  taken over. Errors of any thread surface as they would serially (the same ``ModelsError``).
- ``load_breakdown`` holds seconds per step and ``load_timeline`` (start, end) seconds since the
  start of ``load`` (docs/engine-models.md, "Cold start", lists the keys); ``load_counters``
  holds, for the imports and the CUDA steps, the thread's ``cpu_s``, ``majflt``, ``read_bytes``
  and ``syscr`` during the step (``fastio.thread_counters``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..errors import ModelsError
from . import fastio, layout, lazy_packages
from .bisenet import BiSeNet

log = logging.getLogger(__name__)

VAE_SCALING_FACTOR = 0.18215  # diffusers' default; sd-vae-ft-mse's config does not set it
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WHISPER_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.")

# Legacy (diffusers < 0.14 ``AttentionBlock``) names of the VAE mid-block attention.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

StateDict = dict[str, torch.Tensor]

PARALLEL_LOAD = os.environ.get("MUSETALK_LOAD_PARALLEL", "1") != "0"
WARM_CUDA_LIBS = os.environ.get("MUSETALK_LOAD_WARM_CUDA_LIBS", "1") != "0"


def _hint(models_dir: Path) -> str:
    return layout.DOWNLOAD_HINT.format(dir=models_dir)


def _error(path: Path, problem: str, models_dir: Path) -> ModelsError:
    return ModelsError(f"model file {path}: {problem}; {_hint(models_dir)}")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def read_json(path: Path, models_dir: Path) -> dict[str, Any]:
    """A JSON object from ``path`` or ``ModelsError``."""
    if not path.is_file():
        raise _error(path, "missing", models_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(path, f"not valid JSON ({exc})", models_dir) from exc
    if not isinstance(data, dict):
        raise _error(path, "expected a JSON object", models_dir)
    return data


def read_state_dict(
    path: Path,
    models_dir: Path,
    device: torch.device | str = "cpu",
    handle: "fastio.ReadHandle | None" = None,
) -> StateDict:
    """A flat ``{name: tensor}`` dict from a ``.safetensors`` or torch zip/legacy file (no unpickling).

    With ``handle`` (a ``fastio`` read of ``path``): waits for it; a safetensors file is parsed
    from the read buffer (zero-copy CPU tensors, then moved to ``device``), any other file is
    loaded as without it (the read only filled the page cache). Same tensors, same errors."""
    if not path.is_file():
        raise _error(path, "missing", models_dir)
    try:
        buffer = handle.result() if handle is not None else None
        if buffer is not None and path.suffix == ".safetensors":
            sd: Any = fastio.safetensors_from_buffer(buffer)
            if torch.device(device).type != "cpu":
                sd = {k: v.to(device) for k, v in sd.items()}
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device=str(device))
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                # mmap needs the zip format; pre-1.6 legacy pickles still load (weights_only) without it.
                if "mmap" not in str(exc):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad magic, refused pickle op, short read, ...
        raise _error(path, f"unreadable or corrupt ({type(exc).__name__}: {_short(exc)})", models_dir) from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise _error(path, "not a state dict of tensors", models_dir)
    return sd


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _mismatch_summary(module: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    return "; ".join(parts) or "state dict does not match the model"


def fill_module(module: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, models_dir: Path) -> nn.Module:
    """Strictly assign ``sd`` into a meta-device ``module``; ``ModelsError`` naming ``path`` on mismatch."""
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise _error(path, f"does not match the model ({_mismatch_summary(module, sd)})", models_dir) from exc
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer would stay on meta; no model of ours has one
        raise _error(path, f"tensors not provided by the file: {left[:3]}", models_dir)
    return module


def _finish(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    # nn.Module.to, not diffusers' override: that one warns on every dtype cast (even with no fp32 modules).
    module = nn.Module.to(module, device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def convert_legacy_vae_keys(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename diffusers' pre-0.14 VAE attention keys (``mid_block.attentions.0.query`` ...) to
    the current ``to_q/to_k/to_v/to_out.0`` names; 1×1-conv weights become linear weights."""
    out: StateDict = {}
    for key, value in sd.items():
        parts = key.split(".")
        if ".attentions." in key and len(parts) >= 2 and parts[-2] in _LEGACY_VAE_ATTENTION:
            parts[-2] = _LEGACY_VAE_ATTENTION[parts[-2]]
            key = ".".join(parts)
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


@dataclass
class ModelSource:
    """Where one model came from (for logs and ``doctor``)."""

    path: Path
    fast: bool


class _Timer:
    """Per-step seconds (``breakdown``), (start, end) since ``t0`` (``timeline``) and, for steps
    timed with ``counters=True``, the thread's CPU / page-fault / disk-read counters; thread-safe."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.breakdown: dict[str, float] = {}
        self.timeline: dict[str, tuple[float, float]] = {}
        self.counters: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def add(self, key: str, start: float, end: float) -> None:
        with self._lock:
            self.breakdown[key] = round(self.breakdown.get(key, 0.0) + end - start, 4)
            first = self.timeline.get(key, (start - self.t0, 0.0))[0]
            self.timeline[key] = (round(first, 4), round(end - self.t0, 4))

    @contextmanager
    def step(self, key: str, counters: bool = False) -> Iterator[None]:
        before = fastio.thread_counters() if counters else None
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, start, time.perf_counter())
            if before is not None:
                delta = fastio.counters_delta(before, fastio.thread_counters())
                with self._lock:
                    self.counters[key] = delta


class _Background:
    """``fn()`` in a daemon thread; ``result()`` waits and re-raises its exception."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"musetalk-load-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class _CudaWarmup:
    """CUDA context (then cuBLAS and cuDNN, ``WARM_CUDA_LIBS``) created in a background thread."""

    def __init__(self, device: torch.device, dtype: torch.dtype, timer: _Timer) -> None:
        self.device = device
        self.context = threading.Event()
        self.error: BaseException | None = None
        self._timer = timer
        self._dtype = dtype
        self._job = _Background("cuda", self._run)

    def _run(self) -> None:
        try:
            with self._timer.step("cuda_init", counters=True):
                torch.cuda.init()
                torch.empty(1, device=self.device)
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread by wait_context()
            self.error = exc
            return
        finally:
            self.context.set()
        if WARM_CUDA_LIBS:
            with self._timer.step("cuda_libs", counters=True):
                a = torch.ones(16, 16, device=self.device, dtype=self._dtype)
                torch.mm(a, a)  # cuBLAS / cuBLASLt handle and library load
                x = torch.ones(1, 4, 8, 8, device=self.device, dtype=self._dtype)
                torch.nn.functional.conv2d(x, torch.ones(4, 4, 3, 3, device=self.device, dtype=self._dtype), padding=1)
                torch.cuda.synchronize(self.device)

    def wait_context(self) -> None:
        """Block until the context exists; re-raise its creation error (a CUDA error, as serially)."""
        self.context.wait()
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        self.wait_context()
        self._job.result()


def _import_diffusers() -> tuple[Any, Any]:
    fastio.cache_package_map()  # diffusers scans every installed distribution while importing
    lazy_packages.defer_diffusers()  # only the two model classes' modules, not every model's
    try:  # the submodules only (the top-level package resolves them lazily anyway)
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    except ImportError:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    return UNet2DConditionModel, AutoencoderKL


def _import_transformers() -> tuple[Any, Any, Any]:
    try:
        from transformers.models.whisper.configuration_whisper import WhisperConfig
        from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder
    except ImportError:
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder
    return WhisperConfig, WhisperFeatureExtractor, WhisperEncoder


class _Imports:
    """diffusers, then transformers, imported in one background thread (``parallel``) or on demand.

    One thread, not two: the imports are mostly CPU-bound bytecode execution under the GIL, so
    two threads only delay diffusers (needed first, for the UNet) behind transformers."""

    _FNS: dict[str, Callable[[], Any]] = {"diffusers": _import_diffusers, "transformers": _import_transformers}

    def __init__(self, timer: _Timer, parallel: bool) -> None:
        self._timer = timer
        self._done: dict[str, threading.Event] = {k: threading.Event() for k in self._FNS}
        self._values: dict[str, Any] = {}
        self._errors: dict[str, BaseException] = {}
        self._job = _Background("imports", self._run) if parallel else None

    def _run(self) -> None:
        for key, fn in self._FNS.items():
            try:
                with self._timer.step(f"import_{key}", counters=True):
                    self._values[key] = fn()
            except BaseException as exc:  # noqa: BLE001 - retried in the main thread by get()
                self._errors[key] = exc
            finally:
                self._done[key].set()

    def get(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        if self._job is not None:
            with self._timer.step(f"wait_import_{key}"):
                self._done[key].wait()
            if key in self._values:
                return self._values[key]
            log.debug("background import of %s failed; importing in the main thread", key, exc_info=self._errors.get(key))
        with self._timer.step(f"import_{key}", counters=True):
            self._values[key] = self._FNS[key]()
        return self._values[key]


@dataclass
class MuseTalkModels:
    """Everything the engine runs; see the module docstring."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    whisper: Any  # transformers WhisperEncoder
    feature_extractor: Any  # transformers.WhisperFeatureExtractor
    bisenet: BiSeNet
    device: torch.device
    dtype: torch.dtype
    version: str
    load_seconds: float
    vae_scaling_factor: float = VAE_SCALING_FACTOR
    sources: dict[str, ModelSource] = field(default_factory=dict)
    load_breakdown: dict[str, float] = field(default_factory=dict)
    load_timeline: dict[str, tuple[float, float]] = field(default_factory=dict)
    load_counters: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        models_dir: Path | str,
        *,
        version: str = "v15",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        parallel: bool | None = None,
    ) -> "MuseTalkModels":
        """``parallel`` (default ``PARALLEL_LOAD``) overlaps CUDA init, imports and reads."""
        t0 = time.perf_counter()
        timer = _Timer(t0)
        parallel = PARALLEL_LOAD if parallel is None else parallel
        record = False
        if parallel:
            with timer.step("warm_manifest"):  # import/library files into the page cache, in parallel
                record = fastio.manifest_path() is not None and not fastio.warm_manifest() and not fastio.manifest_is_current()
                if record:
                    fastio.start_recording()  # for record_manifest at the end
        models_dir = Path(models_dir)
        if version not in layout.UNET:
            raise ModelsError(f"unknown model version {version!r}; expected one of {sorted(layout.UNET)}")
        if not models_dir.is_dir():
            raise ModelsError(f"models dir {models_dir} does not exist; {_hint(models_dir)}")
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cuda" and device.index is None:
            # current_device() would create the context here; before init it is device 0
            device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
        dtype = dtype or default_dtype(device)
        cuda = _CudaWarmup(device, dtype, timer) if parallel and device.type == "cuda" else None
        imports = _Imports(timer, parallel)
        reader = fastio.shared_reader() if parallel else None
        with timer.step("check_sizes"):
            _check_sizes(models_dir, version)
        loader = _Loader(models_dir, device, dtype, timer, imports, reader, cuda)
        try:
            specs = loader.plan(version)
            loader.prebuild(specs)
            unet = loader.load_spec(specs["unet"])
            vae = loader.load_spec(specs["vae"])
            whisper = loader.load_spec(specs["whisper"])
            feature_extractor = loader.feature_extractor(specs["whisper"])
            bisenet = loader.load_spec(specs["bisenet"])
            if cuda is not None:
                with timer.step("wait_cuda_libs"):
                    cuda.join()
            if device.type == "cuda":
                with timer.step("synchronize"):
                    torch.cuda.synchronize(device)
        finally:
            loader.close()
            fastio.release_prefetched()  # an entry point's prefetch of files this load did not use
        seconds = time.perf_counter() - t0
        timer.breakdown["total"] = round(seconds, 4)
        if parallel and record:
            # for the next cold start; off the critical path (a killed thread leaves no partial file)
            fastio.record_manifest_async(exclude=[models_dir])
        log.info(
            "models loaded in %.2fs (version %s, %s, %s; fast copies: %s; %s)",
            seconds,
            version,
            device,
            str(dtype).replace("torch.", ""),
            ", ".join(k for k, s in loader.sources.items() if s.fast) or "none",
            "parallel" if parallel else "serial",
        )
        log.debug("load breakdown: %s", timer.breakdown)
        return cls(
            unet=unet,
            vae=vae,
            whisper=whisper,
            feature_extractor=feature_extractor,
            bisenet=bisenet,  # type: ignore[arg-type]
            device=device,
            dtype=dtype,
            version=version,
            load_seconds=seconds,
            vae_scaling_factor=specs["vae"].scaling,
            sources=loader.sources,
            load_breakdown=dict(timer.breakdown),
            load_timeline=dict(timer.timeline),
            load_counters=dict(timer.counters),
        )


def _check_sizes(models_dir: Path, version: str) -> None:
    """Fail fast on a present file whose size disagrees with the weights manifest (a truncated
    or wrong download). Missing files are reported by the loaders themselves; stats only."""
    from ..weights import check_models_dir

    bad = [
        s
        for s in check_models_dir(models_dir, version=version, landmarks="cascade")
        if s.present and s.size_ok is False
    ]
    if bad:
        items = "; ".join(f"{s.path}: {s.problem}" for s in bad)
        raise ModelsError(f"{items}; {_hint(models_dir)}")


@dataclass
class _Spec:
    """One model to load: where from, how to build it (on meta) and how to read the original."""

    name: str
    fast_key: str
    original: Path
    build: Callable[[StateDict, Path], nn.Module]
    read_original: Callable[[], StateDict]
    needs_state_dict: bool = False  # BiSeNet: its width comes from the tensor shapes
    fast: Path | None = None  # the fast copy to try first
    scaling: float = VAE_SCALING_FACTOR
    extra: dict[str, Any] = field(default_factory=dict)
    prebuilt: nn.Module | None = None


class _Loader:
    def __init__(
        self,
        models_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        timer: _Timer,
        imports: _Imports,
        reader: fastio.Reader | None,
        cuda: _CudaWarmup | None,
    ) -> None:
        self.dir = models_dir
        self.device = device
        self.dtype = dtype
        self.timer = timer
        self.imports = imports
        self.reader = reader
        self.cuda = cuda
        self.sources: dict[str, ModelSource] = {}
        self._handles: dict[Path, fastio.ReadHandle] = {}

    # -- reads -------------------------------------------------------------------------
    def _start_read(self, path: Path) -> None:
        if self.reader is None or path in self._handles or not path.is_file():
            return
        handle = fastio.take(path)
        try:
            self._handles[path] = handle or fastio.start(path, self.reader)
        except OSError:
            pass  # read_state_dict reports it

    def read(self, name: str, path: Path, device: torch.device | str = "cpu") -> StateDict:
        """``read_state_dict`` of ``path`` through its parallel read when one was started."""
        self._start_read(path)
        handle = self._handles.pop(path, None)
        if handle is None:
            with self.timer.step(f"read_{name}"):
                return read_state_dict(path, self.dir, device=device)
        with self.timer.step(f"wait_read_{name}"):
            try:
                handle.result()
            except Exception:  # noqa: BLE001
                pass  # read_state_dict below raises the ModelsError naming the file
        if handle.finished is not None:
            self.timer.add(f"read_{name}", handle.started, handle.finished)
        with self.timer.step(f"parse_{name}"):
            return read_state_dict(path, self.dir, device=device, handle=handle)

    def close(self) -> None:
        self._handles.clear()  # unused reads (e.g. a fast copy that was not needed) are dropped

    # -- generic -----------------------------------------------------------------------
    def _fast_path(self, fast_key: str, original: Path) -> Path | None:
        """The fast copy to use for ``fast_key``, or None (a stale one is logged)."""
        from ..weights import fast_copy_valid

        fast = self.dir / layout.FAST[fast_key]
        # A fast copy is used only when it holds the dtype we run in: an fp16 copy cast up to
        # fp32 would silently lose precision.
        fast_dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype)
        if not fast.is_file() or fast_dtype is None:
            return None
        if not fast_copy_valid(self.dir, fast_key, dtype=fast_dtype):
            log.warning("ignoring %s: not made from the current %s (run convert-weights again)", fast, original)
            return None
        return fast

    def plan(self, version: str) -> dict[str, _Spec]:
        """Every model's spec; the parallel reads of the files it will use start here."""
        with self.timer.step("plan"):
            specs = {
                "unet": self._unet_spec(version),
                "vae": self._vae_spec(),
                "whisper": self._whisper_spec(),
                "bisenet": self._bisenet_spec(),
            }
            for spec in specs.values():  # largest first: its fill and copy overlap the other reads
                spec.fast = self._fast_path(spec.fast_key, spec.original)
                self._start_read(spec.fast or spec.original)
        return specs

    def prebuild(self, specs: Mapping[str, _Spec]) -> None:
        """Build the modules that do not need their tensors on meta while the reads run."""
        for spec in specs.values():
            if not spec.needs_state_dict:
                with self.timer.step(f"build_{spec.name}"):
                    spec.prebuilt = self._meta(lambda: spec.build({}, spec.original))

    def _module(self, spec: _Spec, sd: StateDict, path: Path) -> nn.Module:
        if spec.prebuilt is not None:
            module, spec.prebuilt = spec.prebuilt, None
            return module
        with self.timer.step(f"build_{spec.name}"):
            return self._meta(lambda: spec.build(sd, path))

    def _fill_and_finish(self, spec: _Spec, sd: StateDict, path: Path, fast: bool) -> nn.Module:
        module = self._module(spec, sd, path)
        with self.timer.step(f"fill_{spec.name}"):
            fill_module(module, sd, path, self.dir)
        self.sources[spec.name] = ModelSource(path, fast)
        if self.cuda is not None:
            with self.timer.step("wait_cuda_init"):
                self.cuda.wait_context()
        with self.timer.step(f"to_device_{spec.name}"):
            return _finish(module, self.device, self.dtype)

    def load_spec(self, spec: _Spec) -> nn.Module:
        """Fill from the fast copy when usable, else from the original (the fallback rebuilds)."""
        if spec.fast is not None:
            try:
                sd = self.read(spec.name, spec.fast)
                return self._fill_and_finish(spec, sd, spec.fast, True)
            except ModelsError as exc:
                log.warning("ignoring fast copy: %s", exc.message)
                spec.prebuilt = None  # may be partly assigned
                self._start_read(spec.original)
        sd = spec.read_original()
        return self._fill_and_finish(spec, sd, spec.original, False)

    @staticmethod
    def _meta(build: Callable[[], nn.Module]) -> nn.Module:
        with torch.device("meta"):
            return build()

    def _weights_file(self, name: str, folder: Path, names: tuple[str, ...]) -> tuple[Path, Callable[[], StateDict]]:
        """The first of ``names`` present in ``folder`` and a reader for it (the reader raises when none is)."""
        for file_name in names:
            if (folder / file_name).is_file():
                path = folder / file_name
                return path, lambda: self.read(name, path)

        def missing() -> StateDict:
            raise _error(folder / names[-1], f"missing (looked for {' or '.join(names)} in {folder})", self.dir)

        return folder / names[-1], missing

    # -- models ------------------------------------------------------------------------
    def _unet_spec(self, version: str) -> _Spec:
        weights, config_path = layout.unet_paths(self.dir, version)
        config = read_json(config_path, self.dir)

        def build(_sd: StateDict, _path: Path) -> nn.Module:
            unet_cls, _ = self.imports.get("diffusers")
            try:
                return unet_cls.from_config(config)
            except Exception as exc:
                raise _error(config_path, f"not a valid UNet config ({_short(exc)})", self.dir) from exc

        return _Spec("unet", f"unet-{version}", weights, build, lambda: self.read("unet", weights))

    def _vae_spec(self) -> _Spec:
        folder = self.dir / layout.VAE_DIR
        config_path = folder / "config.json"
        config = read_json(config_path, self.dir)
        weights, read_weights = self._weights_file("vae", folder, VAE_WEIGHT_NAMES)

        def build(_sd: StateDict, _path: Path) -> nn.Module:
            _, vae_cls = self.imports.get("diffusers")
            try:
                return vae_cls.from_config(config)
            except Exception as exc:
                raise _error(config_path, f"not a valid VAE config ({_short(exc)})", self.dir) from exc

        def read() -> StateDict:
            return convert_legacy_vae_keys(read_weights())

        scaling = float(config.get("scaling_factor") or VAE_SCALING_FACTOR)
        return _Spec("vae", "vae", weights, build, read, scaling=scaling)

    def _whisper_spec(self) -> _Spec:
        folder = self.dir / layout.WHISPER_DIR
        config_path = folder / "config.json"
        config_dict = read_json(config_path, self.dir)
        weights, read_weights = self._weights_file("whisper", folder, WHISPER_WEIGHT_NAMES)
        spec_extra: dict[str, Any] = {"folder": folder, "config_path": config_path}

        def config() -> Any:
            if "config" not in spec_extra:
                config_cls, _, _ = self.imports.get("transformers")
                try:
                    cfg = config_cls.from_dict(config_dict)
                except Exception as exc:
                    raise _error(config_path, f"not a valid Whisper config ({_short(exc)})", self.dir) from exc
                cfg._attn_implementation = "sdpa"
                spec_extra["config"] = cfg
            return spec_extra["config"]

        def build(_sd: StateDict, _path: Path) -> nn.Module:
            _, _, encoder_cls = self.imports.get("transformers")
            return encoder_cls(config())

        def read() -> StateDict:
            sd = read_weights()
            for prefix in WHISPER_ENCODER_PREFIXES:
                enc = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
                if enc:
                    return enc
            raise _error(
                weights, f"no Whisper encoder tensors (keys starting with {' or '.join(WHISPER_ENCODER_PREFIXES)})", self.dir
            )

        spec_extra["config_fn"] = config
        return _Spec("whisper", "whisper-encoder", weights, build, read, extra=spec_extra)

    def feature_extractor(self, spec: _Spec) -> Any:
        folder, config_path = spec.extra["folder"], spec.extra["config_path"]
        config = spec.extra["config_fn"]()
        _, extractor_cls, _ = self.imports.get("transformers")
        with self.timer.step("feature_extractor"):
            pre_path = folder / "preprocessor_config.json"
            read_json(pre_path, self.dir)
            try:
                feature_extractor = extractor_cls.from_pretrained(str(folder), local_files_only=True)
            except Exception as exc:
                raise _error(pre_path, f"not a valid Whisper feature-extractor config ({_short(exc)})", self.dir) from exc
        if feature_extractor.feature_size != config.num_mel_bins:
            raise _error(
                pre_path,
                f"feature_size {feature_extractor.feature_size} does not match num_mel_bins {config.num_mel_bins} of {config_path}",
                self.dir,
            )
        return feature_extractor

    def _bisenet_spec(self) -> _Spec:
        path = self.dir / layout.BISENET

        def build(sd: StateDict, source: Path) -> nn.Module:
            n_classes, width = self._bisenet_shapes(sd, source)  # the width is read from the tensor shapes
            return BiSeNet(n_classes=n_classes, width=width)

        return _Spec("bisenet", "bisenet", path, build, lambda: self.read("bisenet", path), needs_state_dict=True)

    def _bisenet_shapes(self, sd: Mapping[str, torch.Tensor], path: Path) -> tuple[int, int]:
        try:
            n_classes, width = BiSeNet.shapes_from_state_dict(sd)
        except (KeyError, IndexError) as exc:
            raise _error(path, f"not a BiSeNet face-parsing checkpoint (no {exc})", self.dir) from exc
        if n_classes != 19:
            raise _error(path, f"BiSeNet has {n_classes} classes, expected the 19 CelebAMask-HQ classes", self.dir)
        return n_classes, width
