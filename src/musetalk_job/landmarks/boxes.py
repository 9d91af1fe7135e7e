"""Face boxes: the official landmark → box recipe, the boxes file, and optional temporal smoothing.

A box is ``(x1, y1, x2, y2)`` of Python ints in frame pixels, or ``None`` (no face), *before*
v1.5's ``extra_margin`` (the meaning of official saved coordinates).

``bbox_from_landmarks`` is MuseTalk's ``get_landmark_and_bbox`` rule (preprocessing.py):
with ``L`` the 68 iBUG points truncated to int, ``hy = L[29].y + bbox_shift``,
``d = max(L.y) − hy``, the box is ``(min L.x, max(0, hy − d), max L.x, max L.y)``; it is
invalid (official falls back to the S3FD box; we return ``None``) when ``y2 − y1 ≤ 0``,
``x2 − x1 ≤ 0`` or ``x1 < 0``.

Boxes file: JSON ``{"format": "musetalk-job/boxes", "version": 1, "frames": [[x1,y1,x2,y2] | null, ...]}``
with one entry per input frame.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

import numpy as np

from ..errors import InputMediaError

Box = tuple[int, int, int, int]
BOXES_FORMAT = "musetalk-job/boxes"
BOXES_VERSION = 1


def bbox_from_landmarks(landmarks68: np.ndarray, bbox_shift: int = 0) -> Optional[Box]:
    """The official crop box from 68 integer face landmarks ``[68, 2]``, or None when invalid."""
    lm = np.asarray(landmarks68)
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must have shape (68, 2), got {lm.shape}")
    lm = lm.astype(np.int64)
    half_y = int(lm[29, 1]) + int(bbox_shift)
    chin_y = int(lm[:, 1].max())
    y1 = max(0, half_y - (chin_y - half_y))
    x1, x2 = int(lm[:, 0].min()), int(lm[:, 0].max())
    box = (x1, int(y1), x2, chin_y)
    if box[3] - box[1] <= 0 or box[2] - box[0] <= 0 or box[0] < 0:
        return None
    return box


# --------------------------------------------------------------------------- boxes file


def write_boxes_file(path: Path | str, boxes: Sequence[Optional[Sequence[int]]]) -> Path:
    """Write ``boxes`` (one per input frame) as a boxes file, atomically."""
    path = Path(path)
    frames = [None if b is None else [int(v) for v in b] for b in boxes]
    for i, b in enumerate(frames):
        if b is not None and len(b) != 4:
            raise ValueError(f"box {i} must have 4 values, got {b!r}")
    doc = {"format": BOXES_FORMAT, "version": BOXES_VERSION, "frames": frames}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_boxes_file(path: Path | str, n_frames: int) -> list[Optional[Box]]:
    """Read and validate a boxes file with exactly ``n_frames`` entries.

    Raises ``InputMediaError`` naming the file and the problem (unreadable, not JSON, wrong
    format/version, wrong length, a box that is not four ints with x1 < x2, y1 < y2, ≥ 0).
    """
    path = Path(path)
    where = f"boxes file {path.name}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputMediaError(f"{where}: cannot be read ({exc.strerror or exc}); check the path") from exc
    except UnicodeDecodeError as exc:
        raise InputMediaError(f"{where}: is not UTF-8 text; it must be JSON written by save_boxes") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputMediaError(f"{where}: is not valid JSON ({exc.msg} at line {exc.lineno}); it must be JSON written by save_boxes") from exc
    if not isinstance(doc, dict):
        raise InputMediaError(f"{where}: must be a JSON object with keys format, version, frames")
    if doc.get("format") != BOXES_FORMAT:
        raise InputMediaError(f"{where}: 'format' must be {BOXES_FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("version") != BOXES_VERSION or isinstance(doc.get("version"), bool):
        raise InputMediaError(f"{where}: 'version' must be {BOXES_VERSION}, got {doc.get('version')!r}; write it again with this version")
    frames = doc.get("frames")
    if not isinstance(frames, list):
        raise InputMediaError(f"{where}: 'frames' must be a list with one [x1, y1, x2, y2] or null per input frame")
    if len(frames) != n_frames:
        raise InputMediaError(
            f"{where}: has {len(frames)} frame entries but the video has {n_frames} frames; "
            "boxes must come from this same video (one entry per input frame)"
        )
    out: list[Optional[Box]] = []
    for i, entry in enumerate(frames):
        if entry is None:
            out.append(None)
            continue
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
        ):
            raise InputMediaError(f"{where}: frame {i} must be null or four integers [x1, y1, x2, y2], got {entry!r}")
        x1, y1, x2, y2 = entry
        if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
            raise InputMediaError(f"{where}: frame {i} box {entry} is invalid; need 0 <= x1 < x2 and 0 <= y1 < y2")
        out.append((x1, y1, x2, y2))
    return out


# --------------------------------------------------------------------------- smoothing


def _runs(boxes: Sequence[Optional[Sequence[int]]]) -> Iterable[tuple[int, int]]:
    """Half-open index ranges of consecutive non-None boxes."""
    start = None
    for i, b in enumerate(boxes):
        if b is not None and start is None:
            start = i
        elif b is None and start is not None:
            yield start, i
            start = None
    if start is not None:
        yield start, len(boxes)


def _savgol(values: np.ndarray, window: int, polyorder: int) -> np.ndarray:
    from scipy.signal import savgol_filter

    n = values.shape[0]
    win = min(window, n if n % 2 == 1 else n - 1)
    if win <= polyorder:
        return values
    return savgol_filter(values, win, polyorder, axis=0, mode="interp")


def _one_euro(values: np.ndarray, fps: float, min_cutoff: float, beta: float, d_cutoff: float) -> np.ndarray:
    def alpha(cutoff: float) -> float:
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau * fps)

    out = np.empty_like(values)
    x_prev = values[0]
    dx_prev = np.zeros_like(values[0])
    out[0] = x_prev
    a_d = alpha(d_cutoff)
    for i in range(1, values.shape[0]):
        dx = (values[i] - x_prev) * fps
        dx_hat = a_d * dx + (1 - a_d) * dx_prev
        cutoff = min_cutoff + beta * np.abs(dx_hat)
        tau = 1.0 / (2.0 * math.pi * cutoff)
        a = 1.0 / (1.0 + tau * fps)
        x_hat = a * values[i] + (1 - a) * x_prev
        out[i] = x_hat
        x_prev, dx_prev = x_hat, dx_hat
    return out


def smooth_boxes(
    boxes: Sequence[Optional[Sequence[int]]],
    *,
    method: Literal["savgol", "one-euro"] = "savgol",
    window: int = 9,
    polyorder: int = 2,
    fps: float = 25.0,
    min_cutoff: float = 1.0,
    beta: float = 0.05,
    d_cutoff: float = 1.0,
) -> list[Optional[Box]]:
    """Temporally smooth box coordinates; ``None`` entries and the frame count stay as they are.

    Each run of consecutive frames with a face is smoothed on its own (a face-less frame is a
    cut). ``savgol``: Savitzky–Golay over each coordinate (``window`` frames, clipped to the run
    length, polynomial ``polyorder``). ``one-euro``: the One-Euro filter (Casiez et al. 2012)
    at ``fps`` with ``min_cutoff`` Hz, speed coefficient ``beta`` and derivative cutoff
    ``d_cutoff``. Results are rounded to ints and kept valid (x1 < x2, y1 < y2, ≥ 0).
    """
    if method not in ("savgol", "one-euro"):
        raise ValueError(f"method must be 'savgol' or 'one-euro', got {method!r}")
    out: list[Optional[Box]] = [None if b is None else tuple(int(v) for v in b) for b in boxes]  # type: ignore[misc]
    for start, stop in _runs(boxes):
        vals = np.asarray([boxes[i] for i in range(start, stop)], dtype=np.float64)
        if stop - start >= 2:
            if method == "savgol":
                vals = _savgol(vals, window, polyorder)
            else:
                vals = _one_euro(vals, fps, min_cutoff, beta, d_cutoff)
        for j, row in enumerate(np.rint(vals).astype(np.int64)):
            x1, y1, x2, y2 = (int(v) for v in row)
            x1, y1 = max(0, x1), max(0, y1)
            x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
            out[start + j] = (x1, y1, x2, y2)
    return out
