"""The official MuseTalk models-dir layout (paths relative to the models dir).

This is the single source of truth for file names: the loaders, ``download-weights``,
``doctor`` and ``dev random-weights`` all read it.
"""

from __future__ import annotations

from pathlib import Path

UNET = {
    "v15": ("musetalkV15/unet.pth", "musetalkV15/musetalk.json"),
    "v1": ("musetalk/pytorch_model.bin", "musetalk/musetalk.json"),
}
VAE_DIR = "sd-vae"  # diffusers folder: config.json + diffusion_pytorch_model.{bin,safetensors}
WHISPER_DIR = "whisper"  # transformers folder: config.json, pytorch_model.bin, preprocessor_config.json
BISENET = "face-parse-bisent/79999_iter.pth"
DWPOSE_PTH = "dwpose/dw-ll_ucoco_384.pth"
DWPOSE_ONNX = "dwpose/dw-ll_ucoco_384.onnx"

DOWNLOAD_HINT = "run `musetalk-job download-weights --models-dir {dir}` (or `musetalk-job dev random-weights {dir}` for test weights)"


def unet_paths(models_dir: Path, version: str) -> tuple[Path, Path]:
    weights, config = UNET[version]
    return models_dir / weights, models_dir / config

# Optional fast-start copies written by `musetalk-job convert-weights` (fp16 safetensors,
# loadable straight to the GPU). Loaders prefer them when present and valid; the
# originals stay the source of truth.
FAST_DIR = "fast"
FAST = {
    "unet-v15": "fast/unet-v15.fp16.safetensors",
    "unet-v1": "fast/unet-v1.fp16.safetensors",
    "vae": "fast/vae.fp16.safetensors",
    "whisper-encoder": "fast/whisper-encoder.fp16.safetensors",
    "bisenet": "fast/bisenet.fp16.safetensors",
    "dwpose": "fast/dwpose.fp16.safetensors",
}
