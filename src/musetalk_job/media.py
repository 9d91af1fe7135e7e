"""Media I/O for the engine: probe, decode frames, load speech, encode the result once.

Contract
--------
- ``probe(path) -> MediaInfo``: what a file holds (video / image / audio), display size after
  rotation, average frame rate, durations. Anything unreadable raises ``InputMediaError``
  naming the file and the problem; a missing stream is reported in the fields
  (``has_video`` / ``has_audio``), not raised, so the caller words the error for its field.
- ``read_frames(path, image_fps=25.0) -> VideoFrames``: every frame as RGB uint8
  ``[N, H, W, 3]`` at a **constant** frame rate. Rotation side data (display matrix) is
  applied like the ffmpeg CLI does; a variable-frame-rate file is resampled to its average
  rate by timestamp (frames duplicated or dropped as ffmpeg's ``fps`` filter does); a single
  image gives ``N == 1`` at ``image_fps`` (EXIF orientation applied, as ``cv2.imread`` does).
- ``FrameStream(path)``: ``read_frames`` on a background thread; for files that state their
  frame count and rate the array is usable row by row while it decodes (``first``, ``wait``),
  and ``result()`` says (``predicted``) whether the file kept its header's word.
- ``load_audio(path, sr=16000) -> float32 mono``: what ``librosa.load(path, sr=16000)``
  gives: decode at the native rate, average the channels, resample with soxr "HQ" and fix
  the length to ``ceil(n * sr / native_sr)`` samples (librosa's ``fix_length``).
- ``VideoWriter``: H.264 (``h264_nvenc`` when an NVIDIA encoder really opens, else libx264)
  yuv420p CRF 18 ``+faststart``, or lossless ``ffv1`` / ``h264-lossless`` for exact
  comparisons; AAC audio re-encoded from the decoded source; encoding and colour conversion
  run in background threads behind a bounded queue; the video is encoded exactly once.
  ``write(rgb)`` takes RGB; ``write_i420(i420)`` (when ``accepts_i420``: H.264) takes frames
  already converted by ``colour.rgb_to_i420``. libx264 may encode consecutive segments in
  parallel (``workers``, ``segment_frames``; one IDR per segment, packets joined in order into
  one stream without re-encoding). The same frames give the same bytes on every run
  (``x264_cpu_options``).
- ``encoders_available() -> dict[str, bool]``.

PyAV (``av``) does all decoding and encoding in-process; no ffmpeg subprocess, no temporary
PNGs.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional, Union

import av
import numpy as np

from .cpus import usable_cpus
from .errors import EngineRuntimeError, InputMediaError, SpecError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
# libavformat demuxers that mean "this file is one still image".
_IMAGE_DEMUXERS = frozenset({"image2", "image2pipe"})
# Sample rates the AAC encoder accepts as is; others are resampled to 48 kHz.
_AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350})
# libx264 preset names -> NVENC p1 (fastest) .. p7 (slowest).
_NVENC_PRESETS = {
    "ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p3",
    "medium": "p4", "slow": "p5", "slower": "p6", "veryslow": "p7", "placebo": "p7",
}

Codec = Literal["h264", "ffv1", "h264-lossless"]
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class MediaInfo:
    """What one media file holds. Sizes are the displayed size (after rotation)."""

    kind: Literal["video", "image", "audio"]
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[float] = None  # average frame rate (video), None for images/audio
    duration_s: Optional[float] = None  # container duration (video/audio); None for an image
    n_frames: Optional[int] = None  # frames read_frames will return (estimate from duration x fps)
    has_video: bool = False
    has_audio: bool = False
    audio_duration_s: Optional[float] = None
    rotation: int = 0  # degrees counter-clockwise applied to decoded frames (0, 90, 180, 270)
    video_codec: Optional[str] = None
    audio_codec: Optional[str] = None
    audio_sample_rate: Optional[int] = None
    audio_channels: Optional[int] = None


@dataclass
class VideoFrames:
    """Decoded frames, RGB uint8 ``[N, H, W, 3]``, at a constant rate ``fps``.

    ``rate`` is the same rate as an exact fraction (e.g. 30000/1001); pass it to
    ``VideoWriter(fps=...)`` to keep NTSC rates exact.
    """

    frames: np.ndarray
    fps: float
    rate: Optional[Fraction] = None

    def __len__(self) -> int:
        return int(self.frames.shape[0])


# ---------------------------------------------------------------------------------------
# Opening and probing


def _check_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputMediaError(f"{p}: file not found")
    if not p.is_file():
        raise InputMediaError(f"{p}: is not a regular file")
    if p.stat().st_size == 0:
        raise InputMediaError(f"{p}: file is empty (0 bytes); send a video, image or audio file")
    return p


def _open(p: Path) -> Any:
    try:
        return av.open(str(p), "r")
    except av.FFmpegError as exc:
        raise InputMediaError(
            f"{p}: not a readable media file ({_av_reason(exc)}); send a video (mp4, mov, mkv, webm), "
            "an image (jpg, png) or an audio file (wav, mp3, m4a, flac, ogg)"
        ) from exc


def _av_reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())[:200]


def _video_stream(container: Any) -> Any:
    """The first video stream that is a real picture sequence (not cover art)."""
    for stream in container.streams.video:
        if stream.disposition & av.stream.Disposition.attached_pic:
            continue
        return stream
    return None


def _is_still_image(p: Path, container: Any | None) -> bool:
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    if container is None:
        return False
    names = set(container.format.name.split(","))
    return bool(names & _IMAGE_DEMUXERS) or any(n.endswith("_pipe") for n in names)


def _as_float(value: Any) -> Optional[float]:
    return float(value) if value else None


def _stream_duration(stream: Any, container: Any) -> Optional[float]:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _rotation_of(frame: Any) -> int:
    """Display-matrix rotation in degrees counter-clockwise, snapped to a multiple of 90."""
    try:
        angle = float(frame.rotation or 0)
    except (AttributeError, TypeError, ValueError):
        return 0
    return int(round(angle / 90.0)) % 4 * 90


def _frame_rate(stream: Any) -> Optional[Fraction]:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return Fraction(rate)
    return None


def probe(path: PathLike) -> MediaInfo:
    """Describe ``path``; raises ``InputMediaError`` if it is missing, empty or unreadable."""
    p = _check_file(path)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return _probe_image(p)
    try:
        container = av.open(str(p), "r")
    except av.FFmpegError as exc:
        try:  # an image with an unusual name is still an image
            return _probe_image(p)
        except InputMediaError:
            pass
        raise InputMediaError(
            f"{p}: not a readable media file ({_av_reason(exc)}); send a video (mp4, mov, mkv, webm), "
            "an image (jpg, png) or an audio file (wav, mp3, m4a, flac, ogg)"
        ) from exc
    with container:
        if _is_still_image(p, container):
            return _probe_image(p)
        vstream = _video_stream(container)
        astream = container.streams.audio[0] if container.streams.audio else None
        if vstream is None and astream is None:
            raise InputMediaError(f"{p}: has neither a video nor an audio stream")
        info: dict[str, Any] = {}
        if astream is not None:
            info.update(
                has_audio=True,
                audio_duration_s=_stream_duration(astream, container),
                audio_codec=astream.codec_context.name,
                audio_sample_rate=astream.codec_context.sample_rate or None,
                audio_channels=astream.codec_context.channels or None,
            )
        if vstream is None:
            return MediaInfo(kind="audio", duration_s=info.get("audio_duration_s"), **info)
        rotation, first = 0, None
        try:
            for frame in container.decode(vstream):
                first = frame
                break
        except av.FFmpegError as exc:
            raise InputMediaError(f"{p}: the video stream cannot be decoded ({_av_reason(exc)})") from exc
        if first is None:
            raise InputMediaError(f"{p}: the video stream has no decodable frames")
        rotation = _rotation_of(first)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        rate = _frame_rate(vstream)
        duration = _stream_duration(vstream, container)
        if vstream.frames:
            n_frames = int(vstream.frames)
        elif duration and rate:
            n_frames = max(1, int(round(duration * rate)))
        else:
            n_frames = None
        return MediaInfo(
            kind="video",
            width=width,
            height=height,
            fps=float(rate) if rate else None,
            duration_s=duration,
            n_frames=n_frames,
            has_video=True,
            rotation=rotation,
            video_codec=vstream.codec_context.name,
            **info,
        )


def _load_image(p: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            img = ImageOps.exif_transpose(img)
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputMediaError(f"{p}: not a readable image ({_av_reason(exc)}); send a jpg or png") from exc
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InputMediaError(f"{p}: the image is empty")
    return np.ascontiguousarray(rgb)


def _probe_image(p: Path) -> MediaInfo:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            width, height = ImageOps.exif_transpose(img).size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputMediaError(f"{p}: not a readable image or media file ({_av_reason(exc)})") from exc
    return MediaInfo(kind="image", width=width, height=height, n_frames=1, has_video=True)


# ---------------------------------------------------------------------------------------
# Frames


def cfr_indices(times: np.ndarray, rate: Fraction | float) -> np.ndarray:
    """Which decoded frame fills each constant-rate output slot.

    ``times`` are the decoded frames' presentation times in seconds (ascending). Like
    ffmpeg's ``fps`` filter (``round=near``, ``eof_action=round``): a frame at time ``t``
    belongs to slot ``round(t * rate)`` (relative to the first frame); each slot shows the
    latest frame at or before it (a gap repeats the previous frame, several frames in one
    slot keep the last); the stream ends after the last frame's slot.
    """
    rate_f = float(rate)
    rel = (np.asarray(times, dtype=np.float64) - float(times[0])) * rate_f
    slots = np.floor(rel + 0.5).astype(np.int64)  # round half up, as av_rescale_q_rnd NEAR_INF
    slots = np.maximum.accumulate(slots)  # timestamps that go backwards never reorder frames
    n_out = int(slots[-1]) + 1
    return np.searchsorted(slots, np.arange(n_out), side="right") - 1


_DECODE_AHEAD = 16  # decoded frames waiting for conversion at most


@functools.lru_cache(maxsize=1)
def _DECODE_POOL() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=max(1, min(4, usable_cpus() - 1)), thread_name_prefix="yuv2rgb")


def read_frames(path: PathLike, *, image_fps: float = 25.0) -> VideoFrames:
    """Decode every frame of ``path`` to RGB uint8 at a constant rate (see module doc)."""
    return _read_frames(_check_file(path), image_fps)


class _Hooks:
    """What ``FrameStream`` learns from ``_read_frames`` while it decodes (all no-ops here)."""

    def started(self, buf: np.ndarray, rate: Fraction) -> None:
        """The frames will be decoded into ``buf``: the container stated their count and rate."""

    def progress(self, done: int) -> None:
        """Rows ``0..done-1`` of the buffer hold their decoded RGB pixels."""

    def stopped(self) -> bool:
        return False


def _read_frames(p: Path, image_fps: float, hooks: Optional[_Hooks] = None) -> VideoFrames:
    hooks = hooks or _Hooks()
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return _image_frames(p, image_fps)
    container = _open(p)
    with container:
        if _is_still_image(p, container):
            return _image_frames(p, image_fps)
        stream = _video_stream(container)
        if stream is None:
            raise InputMediaError(f"{p}: has no video stream; send a video file or an image of a face")
        stream.thread_type = "AUTO"
        rate = _frame_rate(stream)
        duration = _stream_duration(stream, container)
        stated = int(stream.frames or 0)  # the container's frame count (MP4/MOV sample tables)
        capacity = stated
        if not capacity and rate and duration:
            capacity = int(duration * rate * 1.05) + 2
        capacity = max(capacity, 16)
        buf: Optional[np.ndarray] = None
        times: list[float] = []
        rotation = 0
        n = 0
        # YUV->RGB (swscale, which releases the GIL) runs on a few threads beside the decoder's:
        # one thread converting was most of this function's time (720p: ~2 ms a frame).
        pool = _DECODE_POOL()
        pending: deque[Any] = deque()

        def convert(frame: Any, dst: np.ndarray, resize: bool) -> None:
            if resize:  # a mid-stream size change is scaled to the first size, as ffmpeg does
                rgb = frame.to_ndarray(format="rgb24", width=first_w, height=first_h, interpolation="BICUBIC")
            else:
                rgb = frame.to_ndarray(format="rgb24")
            dst[...] = np.rot90(rgb, rotation // 90) if rotation else rgb

        def drain(keep: int) -> None:
            while len(pending) > keep or (pending and pending[0].done()):
                pending.popleft().result()
            hooks.progress(n - len(pending))

        try:
            for frame in container.decode(stream):
                if hooks.stopped():
                    break
                if buf is None:
                    rotation = _rotation_of(frame)
                    first_w, first_h = frame.width, frame.height
                    shape = (first_w, first_h) if rotation in (90, 270) else (first_h, first_w)
                    buf = np.empty((capacity, shape[0], shape[1], 3), dtype=np.uint8)
                    if stated and rate is not None:
                        hooks.started(buf, rate)
                if n == buf.shape[0]:
                    drain(0)  # nothing may write into the old buffer once it is replaced
                    buf = np.concatenate([buf, np.empty_like(buf)], axis=0)
                resize = (frame.width, frame.height) != (first_w, first_h)
                pending.append(pool.submit(convert, frame, buf[n], resize))
                t = frame.time
                times.append(float(t) if t is not None else (n / float(rate) if rate else float(n)))
                n += 1
                drain(_DECODE_AHEAD)
            drain(0)
        except av.FFmpegError as exc:
            try:
                drain(0)  # the frames decoded before the error are kept: finish converting them
            except av.FFmpegError as conv:
                raise InputMediaError(f"{p}: a decoded frame cannot be converted to RGB ({_av_reason(conv)})") from conv
            if n == 0:
                raise InputMediaError(f"{p}: the video stream cannot be decoded ({_av_reason(exc)})") from exc
            # A damaged tail: keep what decoded, as ffmpeg does.
        if buf is None or n == 0:
            raise InputMediaError(f"{p}: the video stream has no decodable frames")
        frames = buf[:n]
        if rate is None:
            span = times[-1] - times[0]
            rate = Fraction(n - 1, 1) / Fraction(span) if span > 0 else Fraction(25)
            rate = rate.limit_denominator(1001)
        index = cfr_indices(np.asarray(times), rate)
        if len(index) != n or np.any(index != np.arange(n)):
            frames = frames[index]
        elif n < buf.shape[0] // 2:
            frames = frames.copy()  # give the spare capacity back
        return VideoFrames(frames=frames, fps=float(rate), rate=rate)


class FrameStream(_Hooks):
    """``read_frames`` on a background thread, with the frames usable while they decode.

    When the container states the frame count and rate (MP4, MOV), the frames are decoded into
    an array allocated up front with that many rows: ``frames`` is that array once the first
    frame is decoded (``None`` for other inputs), ``rate`` its rate, and ``wait(k)`` blocks until
    rows ``0..k-1`` hold their pixels (or the decode ended). ``result()`` waits for the end and
    returns exactly what ``read_frames`` returns, raising its errors. ``predicted`` is then True
    when ``result().frames`` is ``frames`` itself: False when the file disagreed with its header
    (fewer or more frames, a damaged tail, variable frame timing), and work done on ``frames``
    must be redone on ``result().frames``. ``close()`` stops the decode early.
    """

    def __init__(self, path: PathLike, *, image_fps: float = 25.0) -> None:
        self.path = _check_file(path)
        self.frames: Optional[np.ndarray] = None
        self.rate: Optional[Fraction] = None
        self._done = 0
        self._finished = False
        self._result: Optional[VideoFrames] = None
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(image_fps,), name="video-decode", daemon=True)
        self._thread.start()

    # _Hooks, called on the decode thread
    def started(self, buf: np.ndarray, rate: Fraction) -> None:
        with self._cond:
            self.frames, self.rate = buf, rate
            self._cond.notify_all()

    def progress(self, done: int) -> None:
        if done > self._done:
            with self._cond:
                self._done = done
                self._cond.notify_all()

    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self, image_fps: float) -> None:
        try:
            self._result = _read_frames(self.path, image_fps, self)
        except BaseException as exc:  # handed to result()
            self._error = exc
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    # the reader's side
    def first(self) -> Optional[np.ndarray]:
        """``frames`` as soon as it exists; ``None`` when the input does not stream (or failed)."""
        with self._cond:
            self._cond.wait_for(lambda: self.frames is not None or self._finished)
            return self.frames

    @property
    def decoded(self) -> int:
        """How many leading rows of ``frames`` hold their pixels now."""
        return self._done

    def wait(self, k: int) -> None:
        """Block until rows ``0..k-1`` of ``frames`` are decoded, or the decode has ended."""
        with self._cond:
            self._cond.wait_for(lambda: self._done >= k or self._finished)

    def result(self) -> VideoFrames:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    @property
    def predicted(self) -> bool:
        """After ``result()``: whether its frames are ``frames`` (see the class doc)."""
        r = self._result
        return r is not None and self.frames is not None and r.frames.base is self.frames and r.frames.shape == self.frames.shape

    def close(self) -> None:
        self._stop.set()


def _image_frames(p: Path, image_fps: float) -> VideoFrames:
    if not image_fps or image_fps <= 0:
        raise SpecError(f"fps: must be > 0 for a single-image input (got {image_fps})")
    rgb = _load_image(p)
    rate = _as_rate(image_fps)
    return VideoFrames(frames=rgb[None], fps=float(image_fps), rate=rate)


# ---------------------------------------------------------------------------------------
# Audio


def _decode_audio(p: Path, container: Any, stream: Any) -> Iterator[Any]:
    """Decoded audio frames of ``stream``; decode errors become ``InputMediaError``."""
    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:
        raise InputMediaError(f"{p}: the audio stream cannot be decoded ({_av_reason(exc)})") from exc


def load_audio(path: PathLike, sr: int = 16000) -> np.ndarray:
    """Mono float32 samples of the first audio stream at ``sr`` Hz (librosa.load semantics)."""
    import soxr

    p = _check_file(path)
    container = _open(p)
    with container:
        if not container.streams.audio:
            raise InputMediaError(
                f"{p}: has no audio stream; send a speech file (wav, mp3, m4a, flac, ogg) or a video with sound"
            )
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        # Sample-format conversion only (same rate, same layout): exact for PCM input.
        resampler = None
        chunks: list[np.ndarray] = []
        native_sr = 0
        for frame in _decode_audio(p, container, stream):
            if resampler is None:
                native_sr = frame.sample_rate
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=native_sr)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        if resampler is not None:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise InputMediaError(f"{p}: the audio stream holds no samples; send a file with audible speech")
    planar = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    mono = planar.mean(axis=0, dtype=np.float32) if planar.shape[0] > 1 else planar[0]
    if native_sr == sr:
        return np.ascontiguousarray(mono, dtype=np.float32)
    # librosa.resample: soxr "HQ", then fix_length to ceil(n * ratio) with ratio a float.
    n_out = int(np.ceil(mono.shape[-1] * (float(sr) / native_sr)))
    y = soxr.resample(mono, native_sr, sr, quality="HQ").astype(np.float32, copy=False)
    if y.shape[0] > n_out:
        y = y[:n_out]
    elif y.shape[0] < n_out:
        y = np.pad(y, (0, n_out - y.shape[0]))
    return np.ascontiguousarray(y)


# ---------------------------------------------------------------------------------------
# Encoding


@functools.lru_cache(maxsize=None)
def encoders_available() -> dict[str, bool]:
    """Which output encoders this PyAV build has; ``h264_nvenc`` only if it really opens
    (an NVIDIA GPU and driver are present), checked once per process."""
    found: dict[str, bool] = {}
    for name in ("libx264", "h264_nvenc", "libx264rgb", "ffv1", "aac"):
        try:
            av.codec.Codec(name, "w")
            found[name] = True
        except Exception:  # noqa: BLE001 - any failure means "not available"
            found[name] = False
    if found["h264_nvenc"]:
        found["h264_nvenc"] = _nvenc_opens()
    return found


def _nvenc_opens(width: int = 256, height: int = 256, options: Optional[dict[str, str]] = None) -> bool:
    """Whether an NVENC H.264 session really opens and encodes a frame of this size.
    ``MUSETALK_NVENC=0`` turns NVENC off."""
    if os.environ.get("MUSETALK_NVENC", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        ctx = av.CodecContext.create("h264_nvenc", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = Fraction(1, 25)
        ctx.framerate = Fraction(25)
        if options:
            ctx.options = dict(options)
        ctx.open()
        frame = av.VideoFrame(width, height, "yuv420p")
        frame.pts = 0
        ctx.encode(frame)
        ctx.encode(None)
        return True
    except Exception:  # noqa: BLE001 - no GPU, no driver, size/session limit: fall back to libx264
        return False


# x264's CPU feature names (its --asm list), each enabled only when /proc/cpuinfo has every
# listed flag. AVX-512 is left out on purpose: see x264_cpu_options().
_X264_ASM = (
    ("SSE2", ("sse2",)),
    ("SSE2Fast", ("sse2",)),
    ("SSE3", ("pni",)),
    ("SSSE3", ("ssse3",)),
    ("SSE4.1", ("sse4_1",)),
    ("SSE4.2", ("sse4_2",)),
    ("LZCNT", ("abm",)),
    ("AVX", ("avx",)),
    ("FMA3", ("avx", "fma")),
    ("AVX2", ("avx", "fma", "avx2")),
    ("BMI1", ("bmi1",)),
    ("BMI2", ("bmi1", "bmi2")),
    ("Cache64", ("clflush",)),
)


def x264_cpu_options(cpuinfo: Optional[str] = None) -> dict[str, str]:
    """libx264 options that keep its output reproducible on this CPU: ``{}`` or ``{"x264-params":
    "asm=..."}`` (every SIMD level the CPU has, AVX-512 excluded).

    On CPUs with AVX-512, libx264's AVX-512 kernels make the same frames encode to different
    bytes from run to run (measured: 8 of 80 encodes of the same 4 frames differed; 0 of 80 with
    the same CPU limited to AVX2; 720p ``medium`` speed and size unchanged). ``cpuinfo`` is the
    text of ``/proc/cpuinfo`` (read when not given); on other systems, or a CPU without
    AVX-512, x264 keeps its own detection. ``MUSETALK_X264_AVX512=1`` keeps AVX-512.
    """
    if os.environ.get("MUSETALK_X264_AVX512", "").strip().lower() in ("1", "true", "yes", "on"):
        return {}
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return {}
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            break
    if "avx512f" not in flags:
        return {}
    names = [name for name, need in _X264_ASM if all(f in flags for f in need)]
    if not names:
        return {}
    return {"x264-params": "asm=" + ",".join(["MMX2", "SSE"] + names)}


@functools.lru_cache(maxsize=1)
def _x264_options() -> tuple[tuple[str, str], ...]:
    """``x264_cpu_options()`` once per process, kept only if libx264 opens with them."""
    options = x264_cpu_options()
    if not options:
        return ()
    try:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = 64, 64, "yuv420p"
        ctx.time_base, ctx.framerate = Fraction(1, 25), Fraction(25)
        ctx.options = {"preset": "medium", **options}
        ctx.open()
        frame = av.VideoFrame(64, 64, "yuv420p")
        frame.pts = 0
        ctx.encode(frame)
        ctx.encode(None)
    except Exception:  # noqa: BLE001 - an x264 that rejects the list: its own CPU detection
        return ()
    return tuple(options.items())


def _as_rate(fps: float | Fraction) -> Fraction:
    """An exact frame rate: 29.97002997... -> 30000/1001, 25.0 -> 25, 22.7272... -> 250/11."""
    if isinstance(fps, Fraction):
        return fps
    value = float(fps)
    if not math.isfinite(value) or value <= 0:
        raise SpecError(f"fps: must be a positive number (got {fps})")
    close = Fraction(value).limit_denominator(1001)
    if abs(float(close) - value) <= 1e-9 * value:
        return close
    return Fraction(value).limit_denominator(1_000_000)


_STOP = object()

# Segment-parallel libx264: each segment starts with an IDR frame. 50 frames (2 s at 25 fps)
# keep every encoder busy on a 30 s job (15 segments) and bound the tail (the last segment's
# encode time). The extra IDRs cost file size at crf 18 against one stream with x264's 250-frame GOP: measured
# +16 % with 50-frame and +6 % with 125-frame segments (250 frames of the 720p sample face video,
# preset medium; bench/README.md, "Encoder"). Pass segment_frames to trade speed for size.
DEFAULT_SEGMENT_FRAMES = 50
# The shortest segment the tail schedule (VideoWriter ``expected_frames``) makes: each segment
# costs an IDR frame, so the tail stops shrinking here.
MIN_TAIL_SEGMENT = 12
# A streamed segment's encoder gives up after this long without a frame (a writer never closed).
SEGMENT_IDLE_S = 600.0


# Segment encoders and their threads: half as many encoders as CPUs (at most 8), each running
# SEGMENT_THREADS libx264 threads or more, so that there are twice as many encoder threads as
# CPUs: an encoder that waits for frames or ramps a segment up or down then leaves no CPU idle.
# W1 with DWPose, x264 `medium` (bench/README.md, runs 56-57): 16 CPUs 8 x 4 threads 4.86-5.21 s
# against 4 x 4 5.20-5.66 s; 8 CPUs (taskset) 4 x 4 7.33-7.45 s against 2 x 4 8.74-8.94 s;
# `veryfast` on 16 CPUs unchanged (3.00-3.11 against 2.94-3.05 s).
SEGMENT_THREADS = 4


def default_encoder_workers(cpus: Optional[int] = None) -> int:
    """Parallel libx264 segments for this machine (``cpus``: default ``cpus.usable_cpus()``): one
    stream below 8 CPUs (x264's own threads suffice there), else one encoder per 2 CPUs, at most 8,
    each running ``segment_threads(workers)`` threads (see above)."""
    cpus = cpus or usable_cpus()
    return 1 if cpus < 8 else min(8, cpus // 2)


def tail_rounds(workers: int, cpus: Optional[int] = None) -> int:
    """Rounds of segments the tail schedule shrinks (``VideoWriter(expected_frames=)``): the
    encoders the CPUs run at full speed at once (``cpus // SEGMENT_THREADS``), at most ``workers``.
    More rounds end the job no sooner on CPUs already shared out, and each extra segment costs an
    IDR frame (8 rounds instead of 4: +6-9 % file size on W1)."""
    cpus = cpus or usable_cpus()
    return max(1, min(workers, cpus // SEGMENT_THREADS))


def segment_threads(workers: int, cpus: Optional[int] = None) -> int:
    """libx264 threads per segment encoder: twice the CPUs shared out between the ``workers``,
    at least ``SEGMENT_THREADS``."""
    cpus = cpus or usable_cpus()
    return max(SEGMENT_THREADS, 2 * cpus // max(1, workers))


class VideoWriter:
    """Encode RGB frames to ``path`` in a background thread; mux AAC audio from ``audio_path``.

    ``write(frames)`` queues a ``[B, H, W, 3]`` uint8 RGB batch (``[H, W, 3]`` is one frame)
    and returns as soon as the frames fit in the bounded queue (``queue_frames`` frames);
    the writer owns the array from then on (do not modify it). ``close()`` flushes and
    finalises; ``abort()`` stops and deletes the partial file. Used as a context manager it
    closes on success and aborts on an exception.

    H.264 output needs even dimensions: an odd width/height is padded by one pixel that
    repeats the last column/row (no input pixel is lost). Lossless codecs keep odd sizes.

    ``write_i420(frames)`` queues uint8 ``[B, Hp*3//2, Wp]`` I420 frames (``colour.rgb_to_i420``;
    ``Hp``/``Wp`` the even-padded size); only when ``accepts_i420`` (H.264). Both write methods
    copy what they queue, so the caller may reuse its buffer as soon as they return, except
    ``write_i420(frames, copy=False)``, which hands the array over.

    Segment-parallel libx264 (``workers > 1``; ``None`` = ``MUSETALK_ENCODER_WORKERS`` or
    ``default_encoder_workers()``): consecutive runs of ``segment_frames`` frames (default
    ``DEFAULT_SEGMENT_FRAMES``) are each encoded by their own libx264 context (same options,
    ``segment_threads`` threads, starting with an IDR) on ``workers`` threads; the mux thread
    joins their packets in order, re-timed by the segment's first frame. A segment whose SPS/PPS
    differ from the stream's fails the job (``EngineRuntimeError``), as do decreasing dts at a
    join. ``write()`` blocks while ``segments_ahead`` (default ``workers + 1``) segments are being
    encoded; each segment's libx264 runs ``segment_threads`` threads (default
    ``segment_threads(workers)``). NVENC and the lossless codecs always use one stream
    (``workers == 1``). ``expected_frames`` (a hint: how many frames will be written) lets the
    segments of the last ``tail_rounds`` (default ``tail_rounds(workers)``) rounds shrink
    (``segment_sizes``) so that the encoders finish soon after the last frame instead of one whole
    segment later; more or fewer frames are fine. ``stream_segments`` (default): a segment's encoder
    starts at its first frame and takes the frames as they come, instead of once the segment is
    complete; the same segments and bytes, but the last one is mostly encoded when the last frame
    arrives.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        width: int,
        height: int,
        fps: float | Fraction,
        audio_path: Optional[PathLike] = None,
        codec: Codec = "h264",
        crf: int = 18,
        preset: str = "medium",
        queue_frames: int = 32,
        workers: Optional[int] = None,
        segment_frames: Optional[int] = None,
        expected_frames: Optional[int] = None,
        segments_ahead: Optional[int] = None,
        segment_threads: Optional[int] = None,
        tail_rounds: Optional[int] = None,
        stream_segments: bool = True,
    ) -> None:
        if width <= 0 or height <= 0:
            raise SpecError(f"output size must be positive (got {width}x{height})")
        if codec not in ("h264", "ffv1", "h264-lossless"):
            raise SpecError(f"codec: unknown value {codec!r}; use h264, ffv1 or h264-lossless")
        if preset not in _NVENC_PRESETS:
            raise SpecError(f"preset: unknown value {preset!r}; use one of {', '.join(_NVENC_PRESETS)}")
        if not 0 <= int(crf) <= 51:
            raise SpecError(f"crf: must be between 0 and 51 (got {crf})")
        needed = {"h264": "libx264", "h264-lossless": "libx264rgb", "ffv1": "ffv1"}[codec]
        if not encoders_available()[needed] and not (codec == "h264" and encoders_available()["h264_nvenc"]):
            raise EngineRuntimeError(f"codec {codec}: this PyAV build has no {needed} encoder; install the PyAV wheel from PyPI")
        self.path = Path(path)
        self.width, self.height = int(width), int(height)
        self.rate = _as_rate(fps)
        self.codec = codec
        self.frames_written = 0
        self._error: Optional[BaseException] = None
        self._aborted = threading.Event()
        self._closed = False
        self._finished = False
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_frames))
        self._open_lock = threading.Lock()
        suffix = self.path.suffix.lower()
        if codec == "ffv1" and suffix not in (".mkv", ".avi", ".nut"):
            raise SpecError(f"codec: ffv1 needs an .mkv output path (got {self.path.name})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {"movflags": "+faststart"} if suffix in (".mp4", ".mov", ".m4v") else {}
        try:
            self._container = av.open(str(self.path), "w", options=options)
        except (av.FFmpegError, ValueError) as exc:
            raise EngineRuntimeError(f"output {self.path}: cannot create ({_av_reason(exc)})") from exc
        self._audio_in = None
        self._crf, self._preset = int(crf), preset
        self.expected_frames = int(expected_frames) if expected_frames else None
        self.stream_segments = bool(stream_segments)
        try:
            self._setup_video(crf, preset)
            self._setup_segments(workers, segment_frames, segments_ahead, segment_threads, tail_rounds)
            if audio_path is not None:
                self._setup_audio(Path(audio_path))
        except BaseException:
            self._container.close()
            self._remove_output()
            if self._audio_in is not None:
                self._audio_in.close()
            raise
        self._thread = threading.Thread(target=self._run, name="video-encoder", daemon=True)
        self._thread.start()

    # -- setup ----------------------------------------------------------------------------

    def _setup_video(self, crf: int, preset: str) -> None:
        self._pad_w = self._pad_h = 0
        if self.codec == "h264":
            self._pad_w, self._pad_h = self.width % 2, self.height % 2
            nvenc_options = {"preset": _NVENC_PRESETS.get(preset, "p4"), "tune": "hq", "rc": "vbr",
                             "cq": str(crf), "b": "0"}
            # NVENC only when it really opens at this size with these options (a GPU without
            # NVENC, e.g. H100/H200, a session limit or a size limit all fall back to libx264).
            use_nvenc = encoders_available()["h264_nvenc"] and _nvenc_opens(
                self.width + self._pad_w, self.height + self._pad_h, nvenc_options)
            self.encoder = "h264_nvenc" if use_nvenc else "libx264"
            stream = self._container.add_stream(self.encoder, rate=self.rate)
            stream.pix_fmt = "yuv420p"
            if use_nvenc:
                stream.options = nvenc_options
            else:
                stream.options = self._libx264_options()
            # The RGB->YUV matrix used below, tagged so players decode the colours we meant.
            stream.codec_context.colorspace = 6  # AVCOL_SPC_SMPTE170M (BT.601)
            stream.codec_context.color_range = 1  # AVCOL_RANGE_MPEG (limited)
            self._pix_fmt = "yuv420p"
        elif self.codec == "h264-lossless":
            self.encoder = "libx264rgb"
            stream = self._container.add_stream("libx264rgb", rate=self.rate)
            stream.pix_fmt = "rgb24"
            stream.options = {"qp": "0", "preset": preset}
            self._pix_fmt = "rgb24"
        else:
            self.encoder = "ffv1"
            stream = self._container.add_stream("ffv1", rate=self.rate)
            stream.pix_fmt = "bgr0"  # ffv1's 8-bit RGB input; coded losslessly as RGB
            self._pix_fmt = "bgr0"
        stream.width = self.width + self._pad_w
        stream.height = self.height + self._pad_h
        stream.codec_context.thread_count = 0
        self._vstream = stream

    def _setup_audio(self, audio_path: Path) -> None:
        p = _check_file(audio_path)
        self._audio_in = _open(p)
        if not self._audio_in.streams.audio:
            raise InputMediaError(f"{p}: has no audio stream to put in the output")
        self._audio_src = self._audio_in.streams.audio[0]
        src_ctx = self._audio_src.codec_context
        rate = src_ctx.sample_rate if src_ctx.sample_rate in _AAC_RATES else 48000
        channels = src_ctx.channels or 1
        layout = "mono" if channels == 1 else "stereo"
        self._astream = self._container.add_stream("aac", rate=rate)
        self._astream.layout = layout
        self._astream.bit_rate = 128_000 if channels > 1 else 64_000
        self._audio_path = p
        self._audio_rate = rate
        self._audio_resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        self._audio_fifo = av.AudioFifo()
        self._audio_frames = _decode_audio(p, self._audio_in, self._audio_src)
        self._audio_eof = False
        self._audio_samples = 0  # samples sent to the encoder

    def _setup_segments(
        self,
        workers: Optional[int],
        segment_frames: Optional[int],
        ahead: Optional[int] = None,
        threads: Optional[int] = None,
        rounds: Optional[int] = None,
    ) -> None:
        """Segment-parallel libx264 (see the class docstring); one stream for everything else."""
        if workers is None:
            env = os.environ.get("MUSETALK_ENCODER_WORKERS", "").strip()
            if env:
                try:
                    workers = int(env)
                except ValueError:
                    raise SpecError(f"MUSETALK_ENCODER_WORKERS: must be an integer (got {env!r})") from None
            else:
                workers = default_encoder_workers()
        if int(workers) < 1:
            raise SpecError(f"encoder workers: must be >= 1 (got {workers})")
        self.workers = int(workers) if self.encoder == "libx264" else 1
        self._tail_rounds = max(1, int(rounds)) if rounds else tail_rounds(self.workers)
        self.segment_frames = max(1, int(segment_frames or DEFAULT_SEGMENT_FRAMES))
        self._segmented = self.workers > 1
        self._seg_buf: list[tuple[str, np.ndarray]] = []
        self._seg_feed: Optional["queue.SimpleQueue[Any]"] = None  # the open segment's frames (stream_segments)
        self._seg_count = 0
        self._seg_start = 0
        self._seg_target = self._next_segment_size(0)
        self.segment_sizes: list[int] = []
        self._last_dts: Optional[int] = None
        self._seg_pool: Any = None
        self.segments_ahead = max(self.workers, int(ahead)) if ahead else self.workers + 1
        self._seg_slots = threading.Semaphore(self.segments_ahead)
        if self._segmented:
            from concurrent.futures import ThreadPoolExecutor

            self._seg_threads = max(1, int(threads)) if threads else segment_threads(self.workers)
            self._seg_pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="x264-segment")
            self._vstream.codec_context.thread_count = self._seg_threads

    # -- public API -----------------------------------------------------------------------

    @property
    def accepts_i420(self) -> bool:
        """Whether ``write_i420`` may be used (H.264 output: the encoder takes yuv420p)."""
        return self._pix_fmt == "yuv420p"

    def write_i420(self, frames: np.ndarray, *, copy: bool = True) -> None:
        """Queue frames already converted to I420 (``colour.rgb_to_i420``): uint8
        ``[B, Hp*3//2, Wp]`` (or one ``[Hp*3//2, Wp]``) with ``Hp``/``Wp`` the even-padded size.
        ``copy=False`` hands the array over instead of copying it (a caller that never touches it
        again, e.g. a fresh pinned buffer per batch): the writer keeps views until they are encoded."""
        if self._closed:
            raise EngineRuntimeError(f"output {self.path}: write() after close()/abort()")
        self._raise_if_failed()  # a failed encoder (any segment worker) surfaces here
        if not self.accepts_i420:
            raise EngineRuntimeError(f"output {self.path}: codec {self.codec} takes RGB frames; use write()")
        arr = np.asarray(frames)
        if arr.ndim == 2:
            arr = arr[None]
        hp, wp = self.height + self._pad_h, self.width + self._pad_w
        if arr.ndim != 3 or arr.shape[1:] != (hp * 3 // 2, wp) or arr.dtype != np.uint8:
            raise EngineRuntimeError(
                f"output {self.path}: I420 frames must be uint8 [B, {hp * 3 // 2}, {wp}], got {arr.dtype} {list(arr.shape)}"
            )
        for frame in arr:
            self._queue_frame("i420", frame.copy() if copy else frame)

    def write(self, frames: np.ndarray) -> None:
        """Queue frames ``[B, H, W, 3]`` (or one ``[H, W, 3]``) uint8 RGB for encoding."""
        if self._closed:
            raise EngineRuntimeError(f"output {self.path}: write() after close()/abort()")
        self._raise_if_failed()  # a failed encoder (any segment worker) surfaces here
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3) or arr.dtype != np.uint8:
            raise EngineRuntimeError(
                f"output {self.path}: frames must be uint8 [B, {self.height}, {self.width}, 3], "
                f"got {arr.dtype} {list(arr.shape)}"
            )
        for frame in arr:  # queued frame by frame: the queue bounds memory in frames
            self._queue_frame("rgb", frame.copy())

    def _queue_frame(self, kind: str, frame: np.ndarray) -> None:
        """Hand one frame (a private copy, or an array handed over) to the encoder side."""
        if self._segmented and self.stream_segments:
            if self._seg_feed is None:
                self._open_segment()
            assert self._seg_feed is not None
            self._seg_feed.put((kind, frame))
            self._seg_count += 1
            if self._seg_count >= self._seg_target:
                self._end_segment()
            return
        if self._segmented:
            self._seg_buf.append((kind, frame))
            if len(self._seg_buf) >= self._seg_target:
                self._submit_segment()
            return
        while True:
            self._raise_if_failed()
            try:
                # The RGB→YUV conversion runs in a small pool (swscale releases the GIL), off
                # the encoder thread's critical path; the queue keeps the frames in order.
                # A copy: the caller may reuse its buffer (e.g. pinned host memory) as soon as
                # write() returns, while this frame still waits in the queue.
                self._queue.put(self._convert_pool().submit(self._video_frame, frame, kind), timeout=0.2)
                break
            except queue.Full:
                continue
            except RuntimeError as exc:  # the pool was shut down: the encoder thread has ended
                self._raise_if_failed()
                raise EngineRuntimeError(f"output {self.path}: the encoder stopped ({exc})") from exc

    def _next_segment_size(self, start: int) -> int:
        """Frames in the segment that starts at frame ``start``. With ``expected_frames`` known, the
        segments of the last ``R = tail_rounds`` rounds shrink (each an ``R``-th of what is left, at
        least MIN_TAIL_SEGMENT): the last one, which nothing overlaps, is then short."""
        full = self.segment_frames
        if self.expected_frames is None:
            return full
        left = self.expected_frames - start
        rounds = self._tail_rounds
        if left <= 0 or left > rounds * full:
            return full
        return max(min(full, MIN_TAIL_SEGMENT), min(full, -(-left // rounds)))

    def _submit_segment(self) -> None:
        """Give the buffered frames to a segment encoder; blocks while ``segments_ahead`` are being encoded."""
        frames, start = self._seg_buf, self._seg_start
        self._seg_buf = []
        self._seg_start += len(frames)
        self._seg_target = self._next_segment_size(self._seg_start)
        self.segment_sizes.append(len(frames))
        self._start_segment(frames, start)

    def _open_segment(self) -> None:
        """``stream_segments``: start the next segment's encoder at its first frame; ``_queue_frame``
        feeds it frame by frame and ``_end_segment`` ends it (same frames, same bytes as a segment
        handed over whole, but the encoder works while the segment fills: the last one is mostly
        encoded when the last frame arrives)."""
        feed: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._start_segment(self._feed_frames(feed), self._seg_start)
        self._seg_feed, self._seg_count = feed, 0

    def _end_segment(self) -> None:
        assert self._seg_feed is not None
        self._seg_feed.put(_STOP)
        self.segment_sizes.append(self._seg_count)
        self._seg_start += self._seg_count
        self._seg_target = self._next_segment_size(self._seg_start)
        self._seg_feed, self._seg_count = None, 0

    def _start_segment(self, frames: Iterable[tuple[str, np.ndarray]], start: int) -> None:
        """Submit one segment's encode (its slot taken first) and queue its result for the mux thread, in order."""
        while not self._seg_slots.acquire(timeout=0.2):
            self._raise_if_failed()
        try:
            future = self._seg_pool.submit(self._encode_segment, frames, start)
        except RuntimeError as exc:  # the pool was shut down: the mux thread has ended
            self._seg_slots.release()
            self._raise_if_failed()
            raise EngineRuntimeError(f"output {self.path}: the encoder stopped ({exc})") from exc
        while True:
            try:
                self._queue.put(future, timeout=0.2)
                return
            except queue.Full:
                self._raise_if_failed()

    def _libx264_options(self) -> dict[str, str]:
        """The stream's libx264 options; segment encoders use the same (their SPS/PPS must match)."""
        return {"crf": str(self._crf), "preset": self._preset, **dict(_x264_options())}

    def _segment_context(self) -> Any:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = self.width + self._pad_w, self.height + self._pad_h
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = 1 / self.rate
        ctx.framerate = self.rate
        ctx.colorspace, ctx.color_range = 6, 1  # as _setup_video tags the stream
        ctx.options = self._libx264_options()
        ctx.thread_count = self._seg_threads
        ctx.flags = ctx.flags | av.codec.context.Flags.global_header  # SPS/PPS in extradata, as the MP4 stream's
        ctx.open()
        return ctx

    def _encode_segment(self, frames: Iterable[tuple[str, np.ndarray]], start: int) -> tuple[list[Any], int]:
        """Encode one segment with its own libx264 (runs on a segment thread; PyAV releases the GIL
        inside the encoder): ``frames`` is a whole segment's list, or ``_feed_frames`` of a segment
        still filling. Returns its packets re-timed to the whole stream, and its frame count.
        Its slot is freed as soon as it is encoded (not muxed): the mux thread, which also encodes
        the audio, never holds back ``write()``."""
        try:
            return self._encode_segment_frames(frames, start)
        finally:
            if isinstance(frames, list):
                frames.clear()  # the frames (possibly the caller's buffers) are not needed any more
            self._seg_slots.release()

    def _feed_frames(self, feed: "queue.SimpleQueue[Any]") -> Iterator[tuple[str, np.ndarray]]:
        idle = 0.0
        while True:
            try:
                item = feed.get(timeout=0.2)
            except queue.Empty:
                idle += 0.2
                if self._aborted.is_set() or not self._thread.is_alive():
                    return
                if idle >= SEGMENT_IDLE_S:  # a writer left open: do not hold the thread (and exit) for ever
                    raise EngineRuntimeError(f"output {self.path}: no frame for {SEGMENT_IDLE_S:.0f} s; encoding stopped")
                continue
            if item is _STOP:
                return
            idle = 0.0
            yield item

    def _encode_segment_frames(self, frames: Iterable[tuple[str, np.ndarray]], start: int) -> tuple[list[Any], int]:
        if self._aborted.is_set():
            return [], 0
        ctx = self._segment_context()
        packets: list[Any] = []
        n = 0
        for i, (kind, data) in enumerate(frames):
            frame = self._video_frame(data, kind)
            frame.pts = i
            packets.extend(ctx.encode(frame))
            n = i + 1
            if self._aborted.is_set():
                return [], 0
        packets.extend(ctx.encode(None))
        self._check_headers(ctx)
        tb = 1 / self.rate
        for p in packets:
            p.pts += start
            p.dts += start
            p.time_base = tb
        return packets, n

    def _check_headers(self, ctx: Any) -> None:
        # Packets from another encoder than the stream's need the same SPS/PPS as the stream.
        if bytes(ctx.extradata or b"") != self._stream_extradata():
            raise EngineRuntimeError(
                f"output {self.path}: a segment encoder's SPS/PPS differ from the stream's; "
                "set MUSETALK_ENCODER_WORKERS=1 to encode in one stream"
            )

    def _stream_extradata(self) -> bytes:
        ctx = self._vstream.codec_context
        if not ctx.is_open:
            with self._open_lock:
                if not ctx.is_open:
                    ctx.open()
        return bytes(ctx.extradata or b"")

    def _convert_pool(self) -> Any:
        pool = getattr(self, "_pool", None)
        if pool is None:
            from concurrent.futures import ThreadPoolExecutor

            workers = max(1, min(4, usable_cpus() - 1))
            pool = self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rgb2yuv")
        return pool

    def close(self) -> None:
        """Flush the encoders, write the trailer; raises if encoding failed (file removed)."""
        if self._closed:
            return
        if self._segmented and self._seg_buf and self._error is None:
            try:
                self._submit_segment()
            except BaseException:
                self.abort()
                raise
        if self._seg_feed is not None:
            self._end_segment()
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        if self._error is not None:
            self._remove_output()
            raise self._wrap(self._error)
        self._finished = True

    def abort(self) -> None:
        """Stop encoding and delete the partial output (no-op after a successful ``close()``)."""
        if self._finished:
            return
        self._closed = True
        self._aborted.set()
        if self._seg_feed is not None:  # wakes the open segment's encoder
            self._seg_feed.put(_STOP)
            self._seg_feed = None
        while True:  # make room for the stop marker
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join()
        self._remove_output()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- encoder thread -------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._wrap(self._error)
        if not self._thread.is_alive():
            raise EngineRuntimeError(f"output {self.path}: the encoder thread stopped")

    def _wrap(self, error: BaseException) -> BaseException:
        if isinstance(error, (InputMediaError, EngineRuntimeError, SpecError)):
            return error
        return EngineRuntimeError(f"output {self.path}: encoding failed ({_av_reason(error)})")

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP or self._aborted.is_set():
                    break
                if self._segmented:
                    packets, n = item.result()  # its slot was freed when its encoding ended
                    self._mux_segment(packets, n)
                else:
                    self._encode_video(item.result())
            if not self._aborted.is_set():
                self._finish()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self._error = exc
        finally:
            for pool in (getattr(self, "_pool", None), getattr(self, "_seg_pool", None)):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            for closer in (self._container.close, getattr(self._audio_in, "close", None)):
                if closer is None:
                    continue
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001
                    if self._error is None and not self._aborted.is_set():
                        self._error = exc

    def _video_frame(self, data: np.ndarray, kind: str = "rgb") -> Any:
        if kind == "i420":
            # A frame over the array's own memory (kept alive by the frame): from_ndarray would copy
            # it with the GIL held (0.6 ms a 720p frame; 0.6 s of W1, serialising the segment
            # threads); the encoder copies it into its own pictures with the GIL released.
            return av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(data), format="yuv420p")
        rgb = data
        if self._pad_w or self._pad_h:
            rgb = np.pad(rgb, ((0, self._pad_h), (0, self._pad_w), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        if self._pix_fmt == "yuv420p":
            # BT.601 limited range with bicubic chroma filtering: what ffmpeg's
            # `-vf format=yuv420p` does to the official RGB PNGs.
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG",
                                   interpolation="BICUBIC")
        elif self._pix_fmt == "bgr0":
            frame = frame.reformat(format="bgr0")
        return frame

    def _encode_video(self, frame: Any) -> None:
        """Encode one converted frame (``_video_frame``'s result)."""
        frame.pts = self.frames_written
        frame.time_base = 1 / self.rate
        for packet in self._vstream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1
        self._pump_audio_ahead()

    def _mux_segment(self, packets: list[Any], n: int) -> None:
        """Mux one encoded segment (packets already re-timed), keeping the audio just ahead.

        Every segment of 3 frames or more has the same B-frame delay (x264's dts = pts - 2 at
        `medium`), so the shifted dts continue the previous segment's; a short last segment has
        less delay, which only leaves a gap. Checked anyway: the muxer needs increasing dts."""
        for packet in packets:
            if packet.dts is not None:
                if self._last_dts is not None and packet.dts <= self._last_dts:
                    raise EngineRuntimeError(
                        f"output {self.path}: segment join at frame {self.frames_written} gives decreasing "
                        f"timestamps (dts {packet.dts} after {self._last_dts}); set MUSETALK_ENCODER_WORKERS=1"
                    )
                self._last_dts = packet.dts
            packet.stream = self._vstream
            self._container.mux(packet)
        self.frames_written += n
        self._pump_audio_ahead()

    def _pump_audio_ahead(self) -> None:
        """Keep the audio a little ahead of the video written so far, so the muxer interleaves evenly."""
        if self._audio_in is not None:
            self._pump_audio(self._audio_samples_through(self.frames_written + 1))

    def _audio_samples_through(self, frames: int) -> int:
        return int(math.ceil(frames / self.rate * self._audio_rate))

    def _pump_audio(self, until: int, *, final: bool = False) -> None:
        """Encode source audio up to sample ``until`` (output rate)."""
        fifo = self._audio_fifo
        while self._audio_samples + fifo.samples < until and not self._audio_eof:
            try:
                frame = next(self._audio_frames)
            except StopIteration:
                self._audio_eof = True
                for out in self._audio_resampler.resample(None):
                    out.pts = None
                    fifo.write(out)
                break
            frame.pts = None  # the fifo re-times the samples from zero
            for out in self._audio_resampler.resample(frame):
                out.pts = None
                fifo.write(out)
        size = self._astream.codec_context.frame_size or 1024
        while fifo.samples >= size and self._audio_samples + size <= until:
            self._encode_audio(fifo.read(size))
        if final:
            rest = min(fifo.samples, until - self._audio_samples)
            if rest > 0:
                self._encode_audio(fifo.read(rest))

    def _encode_audio(self, frame: Any) -> None:
        frame.pts = self._audio_samples
        frame.time_base = Fraction(1, self._audio_rate)
        self._audio_samples += frame.samples
        for packet in self._astream.encode(frame):
            self._container.mux(packet)

    def _finish(self) -> None:
        if self.frames_written == 0:
            raise EngineRuntimeError(f"output {self.path}: no frames were written")
        if not self._segmented:
            for packet in self._vstream.encode(None):
                self._container.mux(packet)
        if self._audio_in is not None:
            # The audio may run at most one frame past the video's end (official: no -shortest,
            # and the frame count is floor(audio_s * fps), so the audio is never longer than that).
            limit = self._audio_samples_through(self.frames_written + 1)
            self._pump_audio(limit, final=True)
            for packet in self._astream.encode(None):
                self._container.mux(packet)

    def _remove_output(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass
