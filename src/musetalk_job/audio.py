"""Speech → per-video-frame audio tokens for the MuseTalk UNet (official ``audio_processor`` rule).

Contract:
- ``num_output_frames(n_samples_16k, fps)`` = floor(n / 16000 · fps): one output frame per video
  frame of audio. ``fps`` is the **exact** float rate (official truncates it with ``int(fps)``,
  so a 29.97 fps video drifts ~3 % against its audio there; see docs/engine-models.md).
- ``whisper_features(samples_16k, models) -> [F, 5, 384]`` on the models' device in their dtype:
  the audio is cut into 30 s pieces (480,000 samples; the feature extractor zero-pads the last),
  each piece encoded independently by the Whisper encoder (several pieces per call), all 5
  hidden states kept, pieces concatenated on time and trimmed to F = floor(n / 16000 · 50).
- ``frame_windows(features, fps, num_frames, pad_left=2, pad_right=2) -> [T, 50, 384]``: zero
  padding of ceil(50/fps)·pad_left frames before and ceil(50/fps)·3·pad_right after; the window
  of frame i starts at floor(i·50/fps) in the padded sequence and spans 2·(pad_left+pad_right+1)
  feature frames; token index = time·5 + layer. (Where official would run past its padding —
  fps ≥ 50 — more zeros are appended instead of failing an assertion.)
- ``positional_encoding(x [B, L, 384]) -> x + pe[:L]``: the fixed Transformer sinusoid
  (pe[p,2i] = sin(p·10000^(−2i/384)), pe[p,2i+1] = cos(…)), computed in fp32 as official and
  cached per device/dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputMediaError

if TYPE_CHECKING:
    from .models.loading import MuseTalkModels

SAMPLE_RATE = 16000
FEATURE_RATE = 50  # Whisper encoder frames per second (20 ms)
PIECE_SAMPLES = 30 * SAMPLE_RATE
PIECE_FRAMES = 30 * FEATURE_RATE
N_LAYERS = 5  # embedding output + 4 encoder layers (the last after the final LayerNorm)
D_MODEL = 384
PE_MAX_LEN = 5000
PIECES_PER_CALL = 8  # 4 minutes of audio per encoder call


def num_output_frames(n_samples_16k: int, fps: float) -> int:
    """Output video frames for ``n_samples_16k`` samples at ``fps`` (floor)."""
    return math.floor(n_samples_16k / SAMPLE_RATE * fps)


def num_feature_frames(n_samples_16k: int) -> int:
    """Whisper feature frames kept for ``n_samples_16k`` samples (floor(n/16000·50))."""
    return math.floor(n_samples_16k / SAMPLE_RATE * FEATURE_RATE)


def log_mel(samples_16k: np.ndarray, models: "MuseTalkModels") -> tuple[torch.Tensor, int]:
    """The Whisper encoder's input for ``samples_16k``: ``[pieces, 80, 3000]`` log-mel on the CPU
    (one 30 s piece per row) and the sample count. CPU work only: the engine runs it on a thread
    while the video is prepared (``whisper_features(..., mel=)``)."""
    samples = np.asarray(samples_16k, dtype=np.float32)
    if samples.ndim != 1:
        raise InputMediaError(f"audio must be mono samples (1-D), got an array of shape {samples.shape}")
    n = samples.shape[0]
    if n == 0:
        raise InputMediaError("the audio has no samples; give a speech file with audible content")
    if not np.isfinite(samples).all():
        raise InputMediaError("the audio contains NaN or infinite samples; re-encode the audio file")
    pieces = [samples[i : i + PIECE_SAMPLES] for i in range(0, n, PIECE_SAMPLES)]
    # The extractor pads each piece to 30 s and normalises each piece's log-mel on its own.
    return models.feature_extractor(pieces, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features, n


def whisper_features(
    samples_16k: np.ndarray,
    models: "MuseTalkModels",
    *,
    pieces_per_call: int = PIECES_PER_CALL,
    mel: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """All 5 Whisper-encoder hidden states per 20 ms of audio: ``[F, 5, 384]`` on ``models.device``.
    ``mel``: ``log_mel(samples_16k, models)`` when already computed."""
    mel, n = log_mel(samples_16k, models) if mel is None else mel
    encoder = models.whisper
    outputs = []
    with torch.inference_mode():
        for start in range(0, mel.shape[0], pieces_per_call):
            batch = mel[start : start + pieces_per_call].to(device=models.device, dtype=models.dtype, non_blocking=True)
            hidden = encoder(batch, output_hidden_states=True).hidden_states
            outputs.append(torch.stack(hidden, dim=2))  # [p, 1500, 5, 384]
        feats = torch.cat(outputs, dim=0).reshape(-1, len(hidden), hidden[0].shape[-1])
    return feats[: num_feature_frames(n)]


def window_starts(fps: float, num_frames: int) -> np.ndarray:
    """Start of each frame's window in the padded feature sequence: floor(i·50/fps)."""
    mult = FEATURE_RATE / fps
    return np.floor(np.arange(num_frames, dtype=np.float64) * mult).astype(np.int64)


def frame_windows(
    features: torch.Tensor, fps: float, num_frames: int, pad_left: int = 2, pad_right: int = 2
) -> torch.Tensor:
    """Per-frame audio tokens ``[T, 10·L, D]`` (= ``[T, 50, 384]``) from ``features [F, L, D]``."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise InputMediaError(f"frame rate must be a positive number, got {fps!r}")
    if pad_left < 0 or pad_right < 0:
        raise ValueError(f"audio padding must be >= 0, got left={pad_left} right={pad_right}")
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    n_feat, n_layers, dim = features.shape
    mult = FEATURE_RATE / fps
    left = math.ceil(mult) * pad_left
    right = math.ceil(mult) * 3 * pad_right
    length = 2 * (pad_left + pad_right + 1)
    starts = window_starts(fps, num_frames)
    if num_frames:
        right = max(right, int(starts[-1]) + length - left - n_feat)
    padded = torch.cat(
        [
            features.new_zeros(left, n_layers, dim),
            features,
            features.new_zeros(right, n_layers, dim),
        ]
    )
    index = torch.from_numpy(starts).to(features.device)[:, None] + torch.arange(length, device=features.device)
    return padded[index].reshape(num_frames, length * n_layers, dim)  # token = time·L + layer


_PE_FP32: torch.Tensor | None = None
_PE_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _pe_table_fp32() -> torch.Tensor:
    global _PE_FP32
    if _PE_FP32 is None:
        position = torch.arange(PE_MAX_LEN, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, D_MODEL, 2, dtype=torch.float32) * (-math.log(10000.0) / D_MODEL))
        table = torch.zeros(PE_MAX_LEN, D_MODEL, dtype=torch.float32)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq)
        _PE_FP32 = table
    return _PE_FP32


def pe_table(device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The ``[5000, 384]`` sinusoid table on ``device`` in ``dtype`` (cached)."""
    key = (torch.device(device), dtype)
    table = _PE_CACHE.get(key)
    if table is None:
        table = _pe_table_fp32().to(device=key[0], dtype=dtype)
        _PE_CACHE[key] = table
    return table


def positional_encoding(x: torch.Tensor) -> torch.Tensor:
    """``x + pe`` for audio tokens ``x [B, L, 384]`` (positions 0..L−1)."""
    if x.shape[-1] != D_MODEL or x.shape[-2] > PE_MAX_LEN:
        raise ValueError(f"expected audio tokens [B, L<={PE_MAX_LEN}, {D_MODEL}], got {tuple(x.shape)}")
    return x + pe_table(x.device, x.dtype)[: x.shape[-2]]
