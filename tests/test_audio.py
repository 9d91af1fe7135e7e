"""audio: frame counts, the official window/padding rule at exact fps, token order, the PE
formula, and Whisper features (tiny random encoder) per 30 s piece."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk_job import audio
from musetalk_job.errors import InputMediaError
from musetalk_job.models.loading import MuseTalkModels


def numbered_features(n: int, layers: int = 5, dim: int = 384) -> torch.Tensor:
    """features[t, l, :] = 1000·(t+1) + l: every (time, layer) pair is recognisable, never 0."""
    t = torch.arange(n, dtype=torch.float32)[:, None] + 1
    l = torch.arange(layers, dtype=torch.float32)[None, :]
    return (1000 * t + l)[:, :, None].expand(n, layers, dim).contiguous()


def expected_windows(feats: torch.Tensor, fps: float, n_frames: int, pad_left: int = 2, pad_right: int = 2) -> torch.Tensor:
    """The official rule written out index by index: frame i's token (j·5 + l) is original feature
    floor(i·50/fps) − ceil(50/fps)·pad_left + j of layer l, or zero outside the features."""
    mult = 50 / fps
    left = math.ceil(mult) * pad_left
    length = 2 * (pad_left + pad_right + 1)
    n_feat, layers, dim = feats.shape
    out = torch.zeros(n_frames, length * layers, dim)
    for i in range(n_frames):
        start = math.floor(i * mult)
        for j in range(length):
            t = start - left + j
            if 0 <= t < n_feat:
                for l in range(layers):
                    out[i, j * layers + l] = feats[t, l]
    return out


# --------------------------------------------------------------------------------------------
# frame counts


def test_num_output_frames_uses_the_exact_fps() -> None:
    assert audio.num_output_frames(32000, 25.0) == 50
    assert audio.num_output_frames(32000 - 1, 25.0) == 49
    assert audio.num_output_frames(16000 * 10, 29.97) == 299  # official int(fps) would give 290
    assert audio.num_output_frames(16000 * 60, 30000 / 1001) == 1798
    assert audio.num_output_frames(0, 25.0) == 0
    assert audio.num_feature_frames(16000 * 2) == 100
    assert audio.num_feature_frames(16000 * 31 + 100) == 1550


# --------------------------------------------------------------------------------------------
# windows


def test_windows_at_25_fps_cover_2i_minus_4_to_2i_plus_5() -> None:
    n_feat = 100  # 2 s
    feats = numbered_features(n_feat)
    n_frames = audio.num_output_frames(32000, 25.0)
    w = audio.frame_windows(feats, 25.0, n_frames)
    assert w.shape == (50, 50, 384)
    # hand-written for 25 fps: 4 zero frames before, window of 10 starting at 2i
    for i in (0, 1, 2, 17, 47, 49):
        for j in range(10):
            t = 2 * i - 4 + j
            for l in range(5):
                expected = 1000 * (t + 1) + l if 0 <= t < n_feat else 0.0
                assert w[i, j * 5 + l, 0].item() == expected, (i, j, l)
    assert torch.equal(w, expected_windows(feats, 25.0, n_frames))


def test_windows_at_29_97_fps_follow_the_exact_rate() -> None:
    n_samples = 16000 * 5
    feats = numbered_features(audio.num_feature_frames(n_samples))
    fps = 29.97
    n_frames = audio.num_output_frames(n_samples, fps)
    assert n_frames == 149
    w = audio.frame_windows(feats, fps, n_frames)
    assert torch.equal(w, expected_windows(feats, fps, n_frames))
    # frame 100: 100·50/29.97 = 166.83 → starts at padded index 166 = feature 162 (4 zero frames)
    assert w[100, 0, 0].item() == 1000 * (162 + 1)
    assert w[100, 9 * 5 + 4, 0].item() == 1000 * (171 + 1) + 4
    # official int(fps)=29 would start at floor(100·50/29) − 4 = 168: our frames do not drift
    assert w[100, 0, 0].item() != 1000 * (168 + 1)
    # the last frame's window reaches into the right zero padding without running out
    assert w[-1, -1, 0].item() == 0.0


@pytest.mark.parametrize("fps", [12.5, 24.0, 25.0, 30.0, 50.0, 59.94, 60.0])
def test_windows_exist_for_every_frame_at_any_rate(fps: float) -> None:
    n_samples = 16000 * 3 + 123
    feats = numbered_features(audio.num_feature_frames(n_samples), dim=4)
    n_frames = audio.num_output_frames(n_samples, fps)
    w = audio.frame_windows(feats, fps, n_frames)
    assert w.shape == (n_frames, 50, 4)
    assert torch.equal(w, expected_windows(feats, fps, n_frames))


def test_windows_with_other_padding() -> None:
    feats = numbered_features(60, dim=2)
    w = audio.frame_windows(feats, 25.0, 30, pad_left=1, pad_right=3)
    assert w.shape == (30, 2 * (1 + 3 + 1) * 5, 2)
    assert torch.equal(w, expected_windows(feats, 25.0, 30, 1, 3))
    assert w[0, 0, 0].item() == 0.0 and w[0, 2 * 5, 0].item() == 1000 * 1  # 2 zero frames then feature 0


def test_windows_reject_bad_fps() -> None:
    feats = numbered_features(10, dim=2)
    for bad in (0.0, -25.0, float("nan"), float("inf")):
        with pytest.raises(InputMediaError):
            audio.frame_windows(feats, bad, 5)


# --------------------------------------------------------------------------------------------
# positional encoding


def test_positional_encoding_formula() -> None:
    pe = audio.positional_encoding(torch.zeros(1, 50, 384))[0].double()
    for p in (0, 1, 7, 49):
        for i in (0, 1, 50, 191):
            angle = p / 10000 ** (2 * i / 384)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=2e-5)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=2e-5)
    x = torch.randn(3, 50, 384)
    assert torch.allclose(audio.positional_encoding(x) - x, pe.float().expand(3, -1, -1), atol=1e-6)


def test_positional_encoding_keeps_dtype_and_caches_the_table() -> None:
    x = torch.zeros(2, 50, 384, dtype=torch.float16)
    y = audio.positional_encoding(x)
    assert y.dtype == torch.float16
    assert torch.equal(y[0], audio.pe_table("cpu", torch.float32)[:50].half())
    assert audio.pe_table("cpu", torch.float16) is audio.pe_table(torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError):
        audio.positional_encoding(torch.zeros(1, 50, 256))


# --------------------------------------------------------------------------------------------
# Whisper features (tiny random encoder)


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path) -> MuseTalkModels:
    return MuseTalkModels.load(tiny_models_dir, device=torch.device("cpu"), dtype=torch.float32)


def _signal(seconds: float, seed: int = 0) -> np.ndarray:
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (200 + 150 * np.sin(t)) * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)


def _encode_piece(models: MuseTalkModels, piece: np.ndarray) -> torch.Tensor:
    """One 30 s piece through the extractor and encoder, as official does per piece: [1500, 5, 384]."""
    mel = models.feature_extractor(piece, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        hs = models.whisper(mel, output_hidden_states=True).hidden_states
    return torch.stack(hs, dim=2)[0]


def test_whisper_features_2s(models: MuseTalkModels) -> None:
    x = _signal(2.0)
    feats = audio.whisper_features(x, models)
    assert feats.shape == (100, 5, 384)
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert torch.isfinite(feats).all()
    assert torch.allclose(feats, _encode_piece(models, x)[:100], atol=1e-5)
    # hidden state 4 is the encoder output after the final LayerNorm; 0 is conv + positions
    mel = models.feature_extractor(x, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        enc = models.whisper
        last = enc(mel).last_hidden_state[0, :100]
        emb = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(mel))))[0].T + enc.embed_positions.weight
    assert torch.allclose(feats[:, 4], last, atol=1e-5)
    assert torch.allclose(feats[:, 0], emb[:100], atol=1e-5)


def test_whisper_features_31s_are_two_independent_pieces(models: MuseTalkModels) -> None:
    x = _signal(31.0, seed=1)
    feats = audio.whisper_features(x, models)
    assert feats.shape == (1550, 5, 384)
    first = _encode_piece(models, x[:480000])
    second = _encode_piece(models, x[480000:])
    assert torch.allclose(feats[:1500], first, atol=1e-4)
    assert torch.allclose(feats[1500:], second[:50], atol=1e-4)  # context resets at 30 s
    one_per_call = audio.whisper_features(x, models, pieces_per_call=1)
    assert torch.allclose(feats, one_per_call, atol=1e-4)


def test_whisper_features_end_to_end_tokens(models: MuseTalkModels) -> None:
    x = _signal(1.0)
    fps = 29.97
    feats = audio.whisper_features(x, models)
    tokens = audio.positional_encoding(audio.frame_windows(feats, fps, audio.num_output_frames(len(x), fps)))
    assert tokens.shape == (29, 50, 384) and torch.isfinite(tokens).all()


def test_whisper_features_reject_bad_audio(models: MuseTalkModels) -> None:
    with pytest.raises(InputMediaError):
        audio.whisper_features(np.zeros(0, dtype=np.float32), models)
    with pytest.raises(InputMediaError):
        audio.whisper_features(np.zeros((2, 1600), dtype=np.float32), models)
    bad = _signal(0.5)
    bad[10] = np.nan
    with pytest.raises(InputMediaError):
        audio.whisper_features(bad, models)


def test_whisper_features_from_a_log_mel_computed_before(models: MuseTalkModels) -> None:
    """The engine computes the log-mel on a thread while the video is prepared and hands it in:
    the features are exactly those computed in one call."""
    x = _signal(31.0, seed=2)
    mel = audio.log_mel(x, models)
    assert mel[0].shape == (2, 80, 3000) and mel[1] == len(x)
    assert torch.equal(audio.whisper_features(x, models, mel=mel), audio.whisper_features(x, models))
    with pytest.raises(InputMediaError, match="NaN"):
        audio.log_mel(np.full(1600, np.nan, dtype=np.float32), models)
