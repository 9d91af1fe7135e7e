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
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ModelsError
from . import layout
from .bisenet import BiSeNet

log = logging.getLogger(__name__)

VAE_SCALING_FACTOR = 0.18215  # diffusers' default; sd-vae-ft-mse's config does not set it
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WHISPER_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.")

# Legacy (diffusers < 0.14 ``AttentionBlock``) names of the VAE mid-block attention.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

StateDict = dict[str, torch.Tensor]


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


def read_state_dict(path: Path, models_dir: Path, device: torch.device | str = "cpu") -> StateDict:
    """A flat ``{name: tensor}`` dict from a ``.safetensors`` or torch zip/legacy file (no unpickling)."""
    if not path.is_file():
        raise _error(path, "missing", models_dir)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device=str(device))
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                # mmap needs the zip format; pre-1.6 legacy pickles still load (weights_only) without it.
                if "mmap" not in str(exc):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad magic, refused pickle op, ...
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

    @classmethod
    def load(
        cls,
        models_dir: Path | str,
        *,
        version: str = "v15",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "MuseTalkModels":
        t0 = time.perf_counter()
        models_dir = Path(models_dir)
        if version not in layout.UNET:
            raise ModelsError(f"unknown model version {version!r}; expected one of {sorted(layout.UNET)}")
        if not models_dir.is_dir():
            raise ModelsError(f"models dir {models_dir} does not exist; {_hint(models_dir)}")
        _check_sizes(models_dir, version)
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = dtype or default_dtype(device)
        loader = _Loader(models_dir, device, dtype)
        unet = loader.unet(version)
        vae, scaling = loader.vae()
        whisper, feature_extractor = loader.whisper()
        bisenet = loader.bisenet()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        log.info(
            "models loaded in %.2fs (version %s, %s, %s; fast copies: %s)",
            seconds,
            version,
            device,
            str(dtype).replace("torch.", ""),
            ", ".join(k for k, s in loader.sources.items() if s.fast) or "none",
        )
        return cls(
            unet=unet,
            vae=vae,
            whisper=whisper,
            feature_extractor=feature_extractor,
            bisenet=bisenet,
            device=device,
            dtype=dtype,
            version=version,
            load_seconds=seconds,
            vae_scaling_factor=scaling,
            sources=loader.sources,
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


class _Loader:
    def __init__(self, models_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.dir = models_dir
        self.device = device
        self.dtype = dtype
        self.sources: dict[str, ModelSource] = {}

    # -- helpers -----------------------------------------------------------------------
    def _with_fast(
        self,
        name: str,
        fast_key: str,
        original: Path,
        build: Callable[[StateDict, Path], nn.Module],
        read_original: Callable[[], StateDict],
    ) -> nn.Module:
        """Build on meta and fill from the fast copy when usable, else from the original."""
        from ..weights import fast_copy_valid

        fast = self.dir / layout.FAST[fast_key]
        # A fast copy is used only when it holds the dtype we run in: an fp16 copy cast up to
        # fp32 would silently lose precision.
        fast_dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype)
        if fast.is_file() and fast_dtype is not None:
            if not fast_copy_valid(self.dir, fast_key, dtype=fast_dtype):
                log.warning("ignoring %s: not made from the current %s (run convert-weights again)", fast, original)
            else:
                try:
                    sd = read_state_dict(fast, self.dir, device=self.device)
                    module = fill_module(self._meta(lambda: build(sd, fast)), sd, fast, self.dir)
                    self.sources[name] = ModelSource(fast, True)
                    return _finish(module, self.device, self.dtype)
                except ModelsError as exc:
                    log.warning("ignoring fast copy: %s", exc.message)
        sd = read_original()
        module = fill_module(self._meta(lambda: build(sd, original)), sd, original, self.dir)
        self.sources[name] = ModelSource(original, False)
        return _finish(module, self.device, self.dtype)

    @staticmethod
    def _meta(build: Callable[[], nn.Module]) -> nn.Module:
        with torch.device("meta"):
            return build()

    def _weights_file(self, folder: Path, names: tuple[str, ...]) -> tuple[Path, Callable[[], StateDict]]:
        """The first of ``names`` present in ``folder`` and a reader for it (the reader raises when none is)."""
        for name in names:
            if (folder / name).is_file():
                path = folder / name
                return path, lambda: read_state_dict(path, self.dir)

        def missing() -> StateDict:
            raise _error(folder / names[-1], f"missing (looked for {' or '.join(names)} in {folder})", self.dir)

        return folder / names[-1], missing

    # -- models ------------------------------------------------------------------------
    def unet(self, version: str) -> nn.Module:
        from diffusers import UNet2DConditionModel

        weights, config_path = layout.unet_paths(self.dir, version)
        config = read_json(config_path, self.dir)

        def build(_sd: StateDict, _path: Path) -> nn.Module:
            try:
                return UNet2DConditionModel.from_config(config)
            except Exception as exc:
                raise _error(config_path, f"not a valid UNet config ({_short(exc)})", self.dir) from exc

        return self._with_fast("unet", f"unet-{version}", weights, build, lambda: read_state_dict(weights, self.dir))

    def vae(self) -> tuple[nn.Module, float]:
        from diffusers import AutoencoderKL

        folder = self.dir / layout.VAE_DIR
        config_path = folder / "config.json"
        config = read_json(config_path, self.dir)
        weights, read_weights = self._weights_file(folder, VAE_WEIGHT_NAMES)

        def build(_sd: StateDict, _path: Path) -> nn.Module:
            try:
                return AutoencoderKL.from_config(config)
            except Exception as exc:
                raise _error(config_path, f"not a valid VAE config ({_short(exc)})", self.dir) from exc

        def read() -> StateDict:
            return convert_legacy_vae_keys(read_weights())

        vae = self._with_fast("vae", "vae", weights, build, read)
        scaling = config.get("scaling_factor") or VAE_SCALING_FACTOR
        return vae, float(scaling)

    def whisper(self) -> tuple[nn.Module, Any]:
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        folder = self.dir / layout.WHISPER_DIR
        config_path = folder / "config.json"
        config_dict = read_json(config_path, self.dir)
        try:
            config = WhisperConfig.from_dict(config_dict)
        except Exception as exc:
            raise _error(config_path, f"not a valid Whisper config ({_short(exc)})", self.dir) from exc
        config._attn_implementation = "sdpa"
        weights, read_weights = self._weights_file(folder, WHISPER_WEIGHT_NAMES)

        def read() -> StateDict:
            sd = read_weights()
            for prefix in WHISPER_ENCODER_PREFIXES:
                enc = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
                if enc:
                    return enc
            raise _error(
                weights, f"no Whisper encoder tensors (keys starting with {' or '.join(WHISPER_ENCODER_PREFIXES)})", self.dir
            )

        encoder = self._with_fast("whisper", "whisper-encoder", weights, lambda _sd, _path: WhisperEncoder(config), read)

        pre_path = folder / "preprocessor_config.json"
        read_json(pre_path, self.dir)
        try:
            feature_extractor = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise _error(pre_path, f"not a valid Whisper feature-extractor config ({_short(exc)})", self.dir) from exc
        if feature_extractor.feature_size != config.num_mel_bins:
            raise _error(
                pre_path,
                f"feature_size {feature_extractor.feature_size} does not match num_mel_bins {config.num_mel_bins} of {config_path}",
                self.dir,
            )
        return encoder, feature_extractor

    def bisenet(self) -> BiSeNet:
        path = self.dir / layout.BISENET

        def build(sd: StateDict, source: Path) -> nn.Module:
            n_classes, width = self._bisenet_shapes(sd, source)  # the width is read from the tensor shapes
            return BiSeNet(n_classes=n_classes, width=width)

        return self._with_fast("bisenet", "bisenet", path, build, lambda: read_state_dict(path, self.dir))  # type: ignore[return-value]

    def _bisenet_shapes(self, sd: Mapping[str, torch.Tensor], path: Path) -> tuple[int, int]:
        try:
            n_classes, width = BiSeNet.shapes_from_state_dict(sd)
        except (KeyError, IndexError) as exc:
            raise _error(path, f"not a BiSeNet face-parsing checkpoint (no {exc})", self.dir) from exc
        if n_classes != 19:
            raise _error(path, f"BiSeNet has {n_classes} classes, expected the 19 CelebAMask-HQ classes", self.dir)
        return n_classes, width
