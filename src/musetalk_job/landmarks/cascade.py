"""Offline face boxes without downloaded weights: scikit-image's LBP frontal-face cascade.

LOWER FIDELITY than DWPose: a frontal-face detector with no landmarks, for CPU-only use, the
demo and tests on real faces. The model file ships inside the scikit-image wheel
(``skimage.data.lbp_frontal_face_cascade_filename()``, OpenCV's ``lbpcascade_frontalface``).
OpenCV 5 wheels no longer ship ``CascadeClassifier``/Haar files, so scikit-image's runtime is used.

Detection: each frame is shrunk (INTER_AREA) so its longer side is at most ``max_side``
(320) px; the cascade scans windows from ``max(20, min_face_fraction × shorter side)`` up to
the frame with ``scale_factor`` 1.1 and keeps groups supported by at least ``min_neighbors``
(8) raw windows — strict enough that textures (gravel, grass, text) give nothing. The largest
detection is the face; none → ``None``. In a sequence, the region around the previous frame's
face is searched first (a full scan only when that finds nothing), which is ~20× faster.

Box rule (the landmark recipe applied to landmark positions estimated from the square
detection ``(x, y, s)``; ratios measured on ``skimage.data.astronaut()``): the jaw contour spans
``x + 0.08 s`` … ``x + 0.92 s``, the chin (max landmark y) is at ``y + 1.00 s`` and the lower
nose-bridge point (iBUG 29) at ``y + 0.54 s``. ``bbox_from_landmarks``' rule then gives
``(x + 0.08 s, max(0, nose − (chin − nose)), x + 0.92 s, chin)``, i.e. the nose point sits
mid-height as in the official crop. ``bbox_shift`` moves the nose point as official does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .boxes import Box

JAW_LEFT = 0.08
JAW_RIGHT = 0.92
CHIN = 1.00
NOSE = 0.54


def box_from_detection(x: float, y: float, size: float, *, bbox_shift: int = 0, frame_w: int | None = None,
                       frame_h: int | None = None) -> Optional[Box]:
    """The crop box (before extra_margin) for a square face detection at ``(x, y)`` of side ``size``."""
    x1 = int(x + JAW_LEFT * size)
    x2 = int(x + JAW_RIGHT * size)
    chin = int(y + CHIN * size)
    if frame_w is not None:
        x2 = min(x2, frame_w)
    if frame_h is not None:
        chin = min(chin, frame_h)
    nose = int(y + NOSE * size) + int(bbox_shift)
    y1 = max(0, nose - (chin - nose))
    if chin - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        return None
    return (x1, int(y1), x2, chin)


@dataclass
class CascadeDetector:
    """LBP frontal-face cascade (scikit-image); ``detect`` gives one box (or None) per frame."""

    max_side: int = 320
    scale_factor: float = 1.1
    min_neighbors: int = 8
    min_face_fraction: float = 0.1
    backend: str = "cascade"
    _cascade: Any = None

    def __post_init__(self) -> None:
        import skimage.data
        from skimage.feature import Cascade

        self._cascade = Cascade(skimage.data.lbp_frontal_face_cascade_filename())

    def _scan(self, img: np.ndarray, min_size: int) -> Optional[tuple[float, float, float]]:
        ih, iw = img.shape[:2]
        if min_size > min(ih, iw):
            return None
        dets = self._cascade.detect_multi_scale(
            img=np.ascontiguousarray(img), scale_factor=self.scale_factor, step_ratio=1,
            min_size=(min_size, min_size), max_size=(ih, iw), min_neighbor_number=self.min_neighbors,
        )
        if not dets:
            return None
        best = max(dets, key=lambda d: d["width"] * d["height"])
        return float(best["c"]), float(best["r"]), float(max(best["width"], best["height"]))

    def find_face(self, frame: np.ndarray, near: Optional[tuple[float, float, float]] = None) -> Optional[tuple[float, float, float]]:
        """The largest face ``(x, y, size)`` in frame pixels, or None.

        ``near`` (the previous frame's face) is searched first: the region ``size × 0.6`` around
        it, windows from 0.6 × its size. Found there → that face (≈ 20× faster than a full scan);
        otherwise the whole frame is scanned.
        """
        import cv2

        h, w = frame.shape[:2]
        s = min(1.0, self.max_side / max(h, w))
        img = frame if s >= 1.0 else cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        ih, iw = img.shape[:2]
        min_size = max(20, int(self.min_face_fraction * min(ih, iw)))
        if near is not None:
            nx, ny, ns = (v * s for v in near)
            x0, y0 = max(0, int(nx - 0.6 * ns)), max(0, int(ny - 0.6 * ns))
            x1, y1 = min(iw, int(nx + 1.6 * ns)), min(ih, int(ny + 1.6 * ns))
            if x1 > x0 and y1 > y0:
                found = self._scan(img[y0:y1, x0:x1], max(min_size, int(0.6 * ns)))
                if found is not None:
                    return (found[0] + x0) / s, (found[1] + y0) / s, found[2] / s
        found = self._scan(img, min_size)
        return None if found is None else (found[0] / s, found[1] / s, found[2] / s)

    def detect(
        self,
        frames: np.ndarray,
        *,
        bbox_shift: int = 0,
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> list[Optional[Box]]:
        n, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
        out: list[Optional[Box]] = []
        face = None
        for i in range(n):
            face = self.find_face(frames[i], near=face)
            out.append(None if face is None else box_from_detection(*face, bbox_shift=bbox_shift, frame_w=w, frame_h=h))
            if progress is not None and ((i + 1) % 8 == 0 or i + 1 == n):
                progress(i + 1, n)
        return out
