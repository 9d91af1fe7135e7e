"""samples: the generated face video shows the real face (found by template matching),
moving smoothly; listed frames show none; speech is real audio of the requested length."""

from __future__ import annotations

import shutil
import wave

import cv2
import numpy as np
import pytest

from musetalk_job import media, samples
from musetalk_job.errors import EngineRuntimeError, SpecError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is required")


def _face_template() -> np.ndarray:
    from skimage import data

    return cv2.cvtColor(data.astronaut()[60:180, 175:275], cv2.COLOR_RGB2GRAY)  # eyes to chin


def _find_face(frame: np.ndarray) -> tuple[float, tuple[int, int], float]:
    """Best normalised correlation of the astronaut's face over scales: (score, top-left, scale)."""
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    tpl = _face_template()
    best = (-1.0, (0, 0), 0.0)
    for scale in np.arange(0.3, 1.3, 0.05):
        t = cv2.resize(tpl, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if t.shape[0] >= gray.shape[0] or t.shape[1] >= gray.shape[1]:
            continue
        res = cv2.matchTemplate(gray, t, cv2.TM_CCOEFF_NORMED)
        _, score, _, loc = cv2.minMaxLoc(res)
        if score > best[0]:
            best = (float(score), loc, float(scale))
    return best


@needs_espeak
def test_face_video_with_audio_and_no_face_frames(tmp_path):
    speech = samples.make_speech(tmp_path / "s.wav", seconds=1.0)
    path = samples.make_face_video(tmp_path / "face.mp4", seconds=1.2, fps=25.0, size=(320, 240),
                                   no_face_frames=(5, 6), audio=speech)
    info = media.probe(path)
    assert (info.kind, info.width, info.height, info.fps, info.n_frames) == ("video", 320, 240, 25.0, 30)
    assert info.video_codec == "h264" and info.has_audio and info.audio_codec == "aac"
    assert info.audio_duration_s == pytest.approx(1.0, abs=0.05)
    frames = media.read_frames(path).frames
    found = [_find_face(f) for f in frames]
    for i, (score, _, scale) in enumerate(found):
        if i in (5, 6):
            assert score < 0.75, (i, score)  # face frames score ~0.96
        else:
            assert score > 0.9, (i, score)
            assert 120 * scale >= 0.25 * 240  # the face is a large part of the frame
    locs = np.array([loc for i, (_, loc, _) in enumerate(found) if i not in (5, 6)])
    steps = np.abs(np.diff(locs, axis=0)).max(axis=1)
    assert steps.max() <= 8  # a few pixels per frame
    assert np.ptp(locs, axis=0).max() >= 4  # but it does move


def test_face_video_other_size_and_image(tmp_path):
    path = samples.make_face_video(tmp_path / "hd.mp4", seconds=0.2, fps=30000 / 1001, size=(480, 270))
    info = media.probe(path)
    assert (info.width, info.height, info.n_frames, info.has_audio) == (480, 270, 6, False)
    assert info.fps == pytest.approx(29.97002997)
    image = samples.make_face_image(tmp_path / "face.png", size=(200, 260))
    frames = media.read_frames(image).frames
    assert frames.shape == (1, 260, 200, 3) and _find_face(frames[0])[0] > 0.8
    with pytest.raises(SpecError):
        samples.make_face_image(tmp_path / "tiny.png", size=(4, 4))


@needs_espeak
def test_make_speech_padding_and_trimming(tmp_path):
    natural = samples.make_speech(tmp_path / "n.wav", text="Good morning everyone.")
    with wave.open(str(natural)) as w:
        rate, n, channels = w.getframerate(), w.getnframes(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(n), np.int16)
    assert channels == 1 and n > 0.5 * rate and np.abs(pcm).max() > 3000  # real, audible speech
    padded = samples.make_speech(tmp_path / "p.wav", text="Good morning everyone.", seconds=4.0)
    with wave.open(str(padded)) as w:
        assert w.getnframes() == 4 * rate
        tail = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    np.testing.assert_array_equal(tail[:n], pcm)
    assert not tail[n:].any()
    trimmed = samples.make_speech(tmp_path / "t.wav", text="Good morning everyone.", seconds=0.25)
    assert media.probe(trimmed).audio_duration_s == pytest.approx(0.25, abs=1e-3)
    # Text that looks like an option is spoken, not parsed.
    assert samples.make_speech(tmp_path / "dash.wav", text="--help me").stat().st_size > 1000


def test_make_speech_without_espeak(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no espeak-ng on it
    with pytest.raises(EngineRuntimeError, match="espeak-ng is not installed"):
        samples.make_speech(tmp_path / "x.wav")
