"""The engine's typed interface: options in, result out, progress callback.

The engine (``musetalk_job.pipeline``) knows nothing about URLs, job ids or Salad. The
runner turns a ``JobSpec`` into ``EngineOptions`` and local file paths, then calls
``Pipeline.run(video, audio, output, options, progress=..., cancel=...)``.

Stages reported through ``ProgressFn`` (stage names are stable, used in logs):
``decode``, ``landmarks``, ``latents``, ``audio``, ``generate``, ``blend``, ``encode``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Protocol

Version = Literal["v15", "v1"]
ParsingMode = Literal["jaw", "raw", "neck"]
LandmarkBackend = Literal["dwpose", "cascade"]
Codec = Literal["h264", "ffv1", "h264-lossless"]
Precision = Literal["auto", "fp16", "bf16", "fp32"]

STAGES = ("decode", "landmarks", "latents", "audio", "generate", "blend", "encode")


class ProgressFn(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """MuseTalk's knobs, with the official v1.5 defaults."""

    version: Version = "v15"
    bbox_shift: int = 0  # v1 only; forced to 0 for v15 as official does
    extra_margin: int = 10  # v15 only: y2 += extra_margin (clamped to frame height)
    parsing_mode: ParsingMode = "jaw"
    left_cheek_width: int = 90
    right_cheek_width: int = 90
    audio_padding_left: int = 2
    audio_padding_right: int = 2
    fps: float = 25.0  # used only for single-image inputs
    batch_size: Optional[int] = None  # None: chosen from free memory
    landmarks: LandmarkBackend = "dwpose"
    boxes_file: Optional[Path] = None  # local JSON boxes file; when set no landmarks run
    save_boxes: Optional[Path] = None  # write the computed boxes here
    smooth_boxes: bool = False  # temporal smoothing of boxes (off = official)
    codec: Codec = "h264"
    crf: int = 18
    preset: str = "medium"


@dataclass
class Result:
    """What one engine run produced; stats are JSON-serialisable."""

    output: Path
    frames: int  # output frames written
    fps: float
    duration_s: float
    input_frames: int  # distinct input frames decoded
    frames_with_face: int
    width: int
    height: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 0
    boxes: list = field(default_factory=list)  # per input frame [x1,y1,x2,y2] or None

    def stats(self) -> dict:
        return {
            "frames": self.frames,
            "fps": self.fps,
            "duration_s": self.duration_s,
            "input_frames": self.input_frames,
            "frames_with_face": self.frames_with_face,
            "width": self.width,
            "height": self.height,
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
            "device": self.device,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
        }


CancelEvent = threading.Event
