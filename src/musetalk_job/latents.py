"""Face crops and the VAE: the per-input-frame latents MuseTalk's UNet is conditioned on, and decoding.

Contract (official v1.5 parity, see docs/engine.md):

- ``crop_faces(frames, boxes)``: for each box (already including ``extra_margin``) the crop
  ``frame[y1:y2, x1:x2]`` resized to 256x256 with OpenCV's uint8 ``INTER_LANCZOS4`` (the aspect
  ratio is not kept, exactly as upstream). CPU, uint8 in and out.
- ``encode_faces(vae, crops, batch_size)``: uint8 RGB crops ``[N,256,256,3]`` (any device) →
  ``[N, 8, 32, 32]`` latents in the VAE's dtype on its device, channels 0-3 the lower-half-masked
  crop, 4-7 the full crop (the reference). Each is ``mean(encode((x/255·mask − 0.5)/0.5)) · 0.18215``
  — the distribution mean instead of upstream's unseeded ``sample()``.
- ``decode_latents(vae, latents)``: predicted latents ``[B,4,32,32]`` → uint8 RGB ``[B,256,256,3]``
  on the device: ``round(clamp(decode(z/0.18215)/2 + 0.5, 0, 1) · 255)``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch

from .cpus import usable_cpus

FACE_SIZE = 256
LATENT_SIZE = 32
SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default; sd-vae-ft-mse's config sets none

Box = tuple[int, int, int, int]


def scaling_factor(vae: torch.nn.Module) -> float:
    return float(getattr(vae.config, "scaling_factor", None) or SCALING_FACTOR)


def crop_faces(frames: np.ndarray | Sequence[np.ndarray], boxes: Sequence[Box]) -> np.ndarray:
    """Crop each box out of its frame and resize it to 256x256 (LANCZOS4, uint8) → ``[N,256,256,3]``."""
    out = np.empty((len(boxes), FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    for k, (frame, (x1, y1, x2, y2)) in enumerate(zip(frames, boxes)):
        if y2 <= y1 or x2 <= x1 or y1 >= frame.shape[0] or x1 >= frame.shape[1]:
            raise ValueError(f"empty face crop for box {(x1, y1, x2, y2)} in a {frame.shape[1]}x{frame.shape[0]} frame")

    def resize(k: int) -> None:
        frame = frames[k]
        x1, y1, x2, y2 = boxes[k]
        out[k] = cv2.resize(frame[y1:y2, x1:x2], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)

    # cv2.resize releases the GIL: a thread pool spreads the per-frame LANCZOS4 crops over the
    # cores (the results are identical to the serial loop; each writes its own slot).
    workers = min(8, usable_cpus(), max(1, len(boxes) // 8))
    if workers <= 1:
        for k in range(len(boxes)):
            resize(k)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crop") as pool:
            list(pool.map(resize, range(len(boxes))))
    return out


def _to_model_input(crops: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC → (masked, full) NCHW in [-1, 1]; the arithmetic is fp32 as upstream, then cast."""
    x = crops.permute(0, 3, 1, 2).contiguous().float() / 255.0  # NCHW-contiguous: NHWC strides slow the CPU convs
    masked = x.clone()
    masked[:, :, FACE_SIZE // 2 :, :] = 0.0
    return ((masked - 0.5) / 0.5).to(dtype), ((x - 0.5) / 0.5).to(dtype)


def encode_chunk(vae: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops ``[P,256,256,3]`` on the VAE's device → scaled latent means ``[2P,4,32,32]``:
    the masked crops' first, then the full crops'."""
    masked, full = _to_model_input(crops, next(vae.parameters()).dtype)
    # One encoder call for both halves: better occupancy than two calls of half the size.
    return vae.encode(torch.cat([masked, full], dim=0)).latent_dist.mean * scaling_factor(vae)


@torch.inference_mode()
def encode_faces(
    vae: torch.nn.Module,
    crops: torch.Tensor,
    batch_size: int,
    *,
    pad: bool = False,
    encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """VAE-encode uint8 crops ``[N,256,256,3]`` → ``[N,8,32,32]`` ([masked, reference] channels).

    ``pad``: run a ragged last chunk padded to the next power of two (at most ``batch_size``).
    ``encode``: what encodes one chunk (default ``encode_chunk(vae, ·)``; the pipeline passes its
    CUDA-graphed version)."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    n = crops.shape[0]
    out = torch.empty((n, 8, LATENT_SIZE, LATENT_SIZE), device=device, dtype=dtype)
    step = max(1, batch_size)
    for start in range(0, n, step):
        chunk = crops[start : start + step].to(device, non_blocking=True)
        b = chunk.shape[0]
        if pad and b < step:
            # A ragged tail padded (repeating its last crop) to the next power of two, at most
            # ``step``: fewer distinct shapes for cudnn.benchmark to tune.
            padded = min(step, 1 << (b - 1).bit_length())
            chunk = torch.cat([chunk, chunk[-1:].expand(padded - b, *chunk.shape[1:])])
        mean = encode(chunk) if encode is not None else encode_chunk(vae, chunk)
        p = chunk.shape[0]
        out[start : start + b, :4] = mean[:b]
        out[start : start + b, 4:] = mean[p : p + b]
    return out


@torch.inference_mode()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """Predicted latents ``[B,4,32,32]`` → uint8 RGB faces ``[B,256,256,3]`` on the same device.

    ``chunk``: decode at most this many latents per VAE call. The decoder's 256² activations
    dominate the engine's device memory (~150 MiB per frame in fp16), so bounding the chunk bounds
    the peak; the per-frame work is the same, and every chunk is large enough to fill the GPU.
    """
    n = latents.shape[0]
    step = n if not chunk or chunk >= n else int(chunk)
    if step == n:
        return _decode_chunk(vae, latents)
    out = torch.empty((n, FACE_SIZE, FACE_SIZE, 3), dtype=torch.uint8, device=latents.device)
    for start in range(0, n, step):
        out[start : start + step] = _decode_chunk(vae, latents[start : start + step])
    return out


def _decode_chunk(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    img = vae.decode(latents / scaling_factor(vae)).sample
    img = (img / 2 + 0.5).clamp(0, 1)  # in the model dtype, as upstream
    return (img.float() * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
