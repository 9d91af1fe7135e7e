"""Sample media made on the spot: a real face video, a face image and real speech.

Used by the demo (``musetalk-job dev make-sample``) and by the tests; nothing is downloaded.

- ``make_face_video(path, seconds=2.0, fps=25.0, size=(320, 240), no_face_frames=(), audio=None)``:
  the astronaut portrait from scikit-image (Eileen Collins, public domain) framed so the
  face fills about 40 % of the frame height, panning smoothly a few pixels per frame;
  frames listed in ``no_face_frames`` show a smooth, face-less gradient instead. H.264
  yuv420p via PyAV (``media.VideoWriter``), with ``audio`` muxed as AAC when given.
- ``make_face_image(path, size=(320, 240))``: the first frame of that video as an image
  (format from the file extension).
- ``make_speech(path, text=..., seconds=None)``: ``espeak-ng`` speech as a 16-bit mono wav,
  padded with silence or trimmed to ``seconds`` when given.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from .errors import EngineRuntimeError, SpecError

PathLike = Union[str, Path]

DEFAULT_TEXT = "Hello! This is a short sample of synthetic speech, made to test lip sync."

# Where the face is in skimage.data.astronaut() (512x512): centre and height in pixels.
_FACE_CENTRE = (225.0, 118.0)
_FACE_HEIGHT = 125.0


def _astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[..., :3])


def _face_frame(src: np.ndarray, width: int, height: int, t: float) -> np.ndarray:
    """The portrait framed for a ``width`` x ``height`` output at time ``t`` (seconds)."""
    import cv2

    # The face takes ~40 % of the frame height; the window pans on a slow ellipse.
    scale = 0.4 * height / _FACE_HEIGHT
    dx = 6.0 * math.sin(2 * math.pi * t / 2.0)
    dy = 3.0 * math.sin(2 * math.pi * t / 3.0)
    cx = _FACE_CENTRE[0] + dx / scale
    cy = _FACE_CENTRE[1] + 0.1 * height / scale + dy / scale  # face slightly above centre
    # Affine map from output pixel centres to source coordinates (sub-pixel smooth motion).
    m = np.array(
        [[scale, 0.0, width / 2.0 - scale * cx], [0.0, scale, height / 2.0 - scale * cy]], dtype=np.float64
    )
    return cv2.warpAffine(src, m, (width, height), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def _no_face_frame(width: int, height: int, t: float) -> np.ndarray:
    """A smooth, face-less colour gradient that drifts with ``t``.

    No noise: blurred low-frequency noise made blobs that OpenCV's face cascade took for a
    face in 1-4 of 50 frames (and whether it did changed with the encoder's bytes); these
    gradients gave none in 200 frames at 160x120 to 640x360.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = 2 * math.pi * t / 2.0
    r = 120 + 80 * np.sin(xx / max(width, 1) * 3.0 + phase)
    g = 110 + 60 * np.cos(yy / max(height, 1) * 2.5 - phase)
    b = 140 + 50 * np.sin((xx + yy) / max(width + height, 1) * 4.0)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = int(size[0]), int(size[1])
    if width < 16 or height < 16:
        raise SpecError(f"size: must be at least 16x16 (got {width}x{height})")
    return width, height


def make_face_video(
    path: PathLike,
    *,
    seconds: float = 2.0,
    fps: float = 25.0,
    size: tuple[int, int] = (320, 240),
    no_face_frames: Iterable[int] = (),
    audio: Optional[PathLike] = None,
) -> Path:
    """Write an H.264 video of a real face moving a few pixels per frame; returns ``path``."""
    from .media import VideoWriter

    width, height = _check_size(size)
    if seconds <= 0 or fps <= 0:
        raise SpecError(f"seconds and fps must be > 0 (got seconds={seconds}, fps={fps})")
    n = max(1, int(round(seconds * fps)))
    hidden = {int(i) for i in no_face_frames}
    src = _astronaut()
    out = Path(path)
    with VideoWriter(out, width=width, height=height, fps=fps, audio_path=audio, codec="h264") as writer:
        for start in range(0, n, 16):
            batch = np.stack([
                _no_face_frame(width, height, i / fps) if i in hidden else _face_frame(src, width, height, i / fps)
                for i in range(start, min(n, start + 16))
            ])
            writer.write(batch)
    return out


def make_face_image(path: PathLike, *, size: tuple[int, int] = (320, 240)) -> Path:
    """Write a still image of the face (format from the extension: .png, .jpg, ...)."""
    from PIL import Image

    width, height = _check_size(size)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_face_frame(_astronaut(), width, height, 0.0)).save(out)
    return out


def make_speech(path: PathLike, *, text: str = DEFAULT_TEXT, seconds: Optional[float] = None) -> Path:
    """Speak ``text`` with espeak-ng into a mono 16-bit wav; pad/trim to ``seconds`` if given."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EngineRuntimeError(
            "espeak-ng is not installed; install it (apt-get install espeak-ng) or pass your own speech file"
        )
    if not text.strip():
        raise SpecError("text: must not be empty")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The text goes through stdin, so nothing in it can be taken for an option.
    run = subprocess.run([exe, "-w", str(out), "--stdin"], input=text.encode("utf-8"),
                         capture_output=True, timeout=120, check=False)
    if run.returncode != 0 or not out.exists() or out.stat().st_size <= 44:
        raise EngineRuntimeError(f"espeak-ng failed (exit {run.returncode}): {run.stderr.decode(errors='replace')[-300:]}")
    if seconds is not None:
        if seconds <= 0:
            raise SpecError(f"seconds: must be > 0 (got {seconds})")
        with wave.open(str(out), "rb") as src:
            params = src.getparams()
            data = src.readframes(params.nframes)
        frame_bytes = params.sampwidth * params.nchannels
        want = int(round(seconds * params.framerate)) * frame_bytes
        data = data[:want] + b"\x00" * max(0, want - len(data))
        with wave.open(str(out), "wb") as dst:
            dst.setnchannels(params.nchannels)
            dst.setsampwidth(params.sampwidth)
            dst.setframerate(params.framerate)
            dst.writeframes(data)
    return out
