"""Random weights in the official MuseTalk models-dir layout, for tests, demos and benchmarks.

Contract:
- ``write_random_weights(models_dir, *, size="tiny"|"full", version="v15"|"v1"|"all", seed=0,
  dwpose=True, legacy_vae_keys=False, whisper_prefix="model.") -> Path`` writes exactly the files
  the official ``download_weights.sh`` produces (``layout``), in the same formats: torch state
  dicts (zip format), diffusers/transformers JSON configs, the Whisper ``preprocessor_config.json``.
- ``size="full"`` uses the official architectures (UNet 849,947,844 parameters, sd-vae-ft-mse,
  whisper-tiny, BiSeNet width 64); ``size="tiny"`` keeps every input/output shape (256² RGB ↔
  4×32×32 latents, UNet 8→4 channels with 384-d cross-attention, Whisper d_model 384 with
  4 encoder layers → 5 hidden states, 19 parsing classes) with ~1 M parameters per model.
- Values are deterministic for a seed and numerically tame (fan-in scaled normals, unit norms,
  zero biases), so the whole chain gives finite outputs in fp32.
- ``legacy_vae_keys`` writes the VAE attention under pre-0.14 diffusers names
  (``query/key/value/proj_attn``); ``whisper_prefix`` is the prefix of the encoder/decoder keys
  (``"model."`` as in a ``WhisperForConditionalGeneration`` dump, or ``""``).
- DWPose: ``landmarks.dwpose.write_random_checkpoint`` when ``dwpose`` and that module exists.
- ``RANDOM_WEIGHTS.json`` (``weights.RANDOM_MARKER``) at the root marks the dir as test weights.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import layout

Size = Literal["tiny", "full"]

# Official UNet config (musetalk.json; doc §1.1). v1 and v1.5 share the architecture.
UNET_FULL: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
UNET_TINY: dict[str, Any] = {
    **UNET_FULL,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}

# stabilityai/sd-vae-ft-mse config.json (no scaling_factor, as in the original file).
VAE_FULL: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# Four blocks = three 2× downsamplers: 256² → 32² like the real VAE.
VAE_TINY: dict[str, Any] = {**VAE_FULL, "block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 4}

# openai/whisper-tiny (multilingual).
WHISPER_FULL: dict[str, Any] = {
    "vocab_size": 51865,
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "pad_token_id": 50257,
    "bos_token_id": 50257,
    "eos_token_id": 50257,
    "decoder_start_token_id": 50258,
}
WHISPER_TINY: dict[str, Any] = {
    **WHISPER_FULL,
    "vocab_size": 64,
    "encoder_ffn_dim": 64,
    "decoder_layers": 1,
    "decoder_ffn_dim": 64,
    "max_target_positions": 32,
    "pad_token_id": 1,
    "bos_token_id": 1,
    "eos_token_id": 1,
    "decoder_start_token_id": 2,
}

BISENET_WIDTH = {"full": 64, "tiny": 8}


def _seed(seed: int, name: str) -> int:
    """A stable per-component seed, so components do not share random streams."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_state_dict(module: nn.Module, seed: int, *, std_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Fresh fp32 tensors for every entry of ``module.state_dict()`` (which may live on meta).

    Weights of rank ≥ 2 are N(0, 1/fan_in)·std_scale, 1-D weights (norm scales) are 1, biases
    and running means 0, running variances 1, counters 0. Deterministic for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, ref in module.state_dict().items():
        shape = tuple(ref.shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = torch.zeros((), dtype=torch.long)
        elif leaf in ("bias", "running_mean"):
            out[name] = torch.zeros(shape)
        elif leaf == "running_var" or len(shape) <= 1:
            out[name] = torch.ones(shape)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.empty(shape)
            t.normal_(0.0, std_scale / math.sqrt(fan_in), generator=gen)
            out[name] = t
    return out


def _meta(build: Any) -> nn.Module:
    with torch.device("meta"):
        return build()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save(sd: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(sd, tmp)
    tmp.replace(path)


def write_unet(models_dir: Path, version: str, size: Size, seed: int) -> None:
    from diffusers import UNet2DConditionModel

    config = UNET_FULL if size == "full" else UNET_TINY
    weights, config_path = layout.unet_paths(models_dir, version)
    module = _meta(lambda: UNet2DConditionModel.from_config(config))
    _write_json(config_path, config)
    _save(random_state_dict(module, _seed(seed, f"unet-{version}")), weights)


def write_vae(models_dir: Path, size: Size, seed: int, *, legacy_keys: bool = False) -> None:
    from diffusers import AutoencoderKL

    config = VAE_FULL if size == "full" else VAE_TINY
    module = _meta(lambda: AutoencoderKL.from_config(config))
    sd = random_state_dict(module, _seed(seed, "vae"))
    if legacy_keys:
        new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        renamed: dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            if ".attentions." in key:
                for new, old in new_to_old.items():
                    marker = f".{new}."
                    if marker in key:
                        key = key.replace(marker, f".{old}.")
                        break
            renamed[key] = value
        sd = renamed
    folder = models_dir / layout.VAE_DIR
    _write_json(folder / "config.json", config)
    _save(sd, folder / "diffusion_pytorch_model.bin")


def write_whisper(models_dir: Path, size: Size, seed: int, *, prefix: str = "model.") -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    params = WHISPER_FULL if size == "full" else WHISPER_TINY
    config = WhisperConfig(**params)
    module = _meta(lambda: WhisperForConditionalGeneration(config))
    sd = random_state_dict(module, _seed(seed, "whisper"))
    if "proj_out.weight" in sd and "model.decoder.embed_tokens.weight" in sd:
        sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]  # tied, as in the real file
    if prefix != "model.":
        sd = {(prefix + k[len("model.") :] if k.startswith("model.") else k): v for k, v in sd.items()}
    folder = models_dir / layout.WHISPER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(str(folder))
    _save(sd, folder / "pytorch_model.bin")


def write_bisenet(models_dir: Path, size: Size, seed: int) -> None:
    from .bisenet import BiSeNet

    module = _meta(lambda: BiSeNet(n_classes=19, width=BISENET_WIDTH[size]))
    _save(random_state_dict(module, _seed(seed, "bisenet")), models_dir / layout.BISENET)


def write_random_weights(
    models_dir: Path | str,
    *,
    size: Size = "tiny",
    version: str = "v15",
    seed: int = 0,
    dwpose: bool = True,
    legacy_vae_keys: bool = False,
    whisper_prefix: str = "model.",
) -> Path:
    """Write a complete random models dir; see the module docstring. Returns ``models_dir``."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    if version not in ("v15", "v1", "all"):
        raise ValueError(f"version must be 'v15', 'v1' or 'all', not {version!r}")
    if whisper_prefix not in ("model.", ""):
        raise ValueError(f"whisper_prefix must be 'model.' or '', not {whisper_prefix!r}")
    from ..weights import RANDOM_MARKER

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    # Marks the dir as test weights (``weights`` then skips size checks and refuses to download into it).
    marker = {"format": "musetalk-job/random-weights", "size": size, "version": version, "seed": seed}
    _write_json(models_dir / RANDOM_MARKER, marker)
    for v in ("v15", "v1") if version == "all" else (version,):
        write_unet(models_dir, v, size, seed)
    write_vae(models_dir, size, seed, legacy_keys=legacy_vae_keys)
    write_whisper(models_dir, size, seed, prefix=whisper_prefix)
    write_bisenet(models_dir, size, seed)
    if dwpose:
        import importlib

        try:
            dwpose_module = importlib.import_module("musetalk_job.landmarks.dwpose")
        except ModuleNotFoundError as exc:
            if exc.name != "musetalk_job.landmarks.dwpose":
                raise
            dwpose_module = None
        writer = getattr(dwpose_module, "write_random_checkpoint", None)
        if writer is None:
            warnings.warn("landmarks.dwpose.write_random_checkpoint is not available; no DWPose checkpoint written")
        else:
            writer(models_dir / layout.DWPOSE_PTH, size=size, seed=seed)
    return models_dir
