"""Face landmarks and face boxes: DWPose (no mmlab), an offline cascade backend, the official bbox recipe.

Contract:

* ``load_detector(backend, models_dir, device) -> Detector``: ``"dwpose"`` loads
  ``<models_dir>/dwpose/dw-ll_ucoco_384.pth`` (missing/corrupt → ``ModelsError`` naming the file
  and the ``cascade`` option; never a silent fallback); ``"cascade"`` needs no weights.
* ``detect_boxes(frames [N,H,W,3] RGB uint8, *, backend, detector=None, bbox_shift=0,
  batch_size=None, progress=None, ready=None) -> list[box | None]``: one box per given frame
  (callers pass the distinct input frames once; boxes are reused for every output frame that
  shows that input frame). A frame identical to its predecessor is not analysed again: it gets
  the same box. ``progress("landmarks", done, total)`` after each batch (total = frames
  analysed). ``ready(k)``, when given, blocks until ``frames[:k]`` hold their pixels (a video
  still decoding): a detector whose frames are analysed independently
  (``independent_frames``, DWPose) then works through the frames a batch at a time as they
  arrive, with the same result; any other waits for all of them.
* Boxes are ``(x1, y1, x2, y2)`` Python ints before ``extra_margin``; ``None`` = no face, and the
  engine passes such frames through unchanged.

Heavy imports (torch, cv2, skimage) happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

from ..errors import ModelsError, SpecError

if TYPE_CHECKING:
    import numpy as np

    from .boxes import Box

BACKENDS = ("dwpose", "cascade")


class Detector(Protocol):
    backend: str

    def detect(
        self,
        frames: "np.ndarray",
        *,
        bbox_shift: int = 0,
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> "list[Optional[Box]]": ...


def load_detector(backend: str, models_dir: Path | str | None, device: Any = "cpu") -> Detector:
    """Load the face-box detector for ``backend`` on ``device``."""
    if backend == "cascade":
        from .cascade import CascadeDetector

        return CascadeDetector()
    if backend != "dwpose":
        raise SpecError(f"landmarks must be one of {', '.join(BACKENDS)}, got {backend!r}")
    from ..models import layout

    if models_dir is None:
        raise ModelsError(f"landmarks=dwpose needs a models dir with {layout.DWPOSE_PTH}; or set landmarks=cascade (lower fidelity, no weights)")
    path = Path(models_dir) / layout.DWPOSE_PTH
    if not path.is_file():
        raise ModelsError(
            f"DWPose weights {path} are missing (needed for landmarks=dwpose); "
            + layout.DOWNLOAD_HINT.format(dir=models_dir)
            + ", or set landmarks=cascade for the lower-fidelity detector that needs no weights"
        )
    from .dwpose import DWPoseDetector

    try:
        return DWPoseDetector.load(path, device)
    except ModelsError as exc:
        raise ModelsError(f"{exc.message}; or set landmarks=cascade (lower fidelity, no weights)") from exc


def detect_boxes(
    frames: "np.ndarray",
    *,
    backend: str = "dwpose",
    detector: Optional[Detector] = None,
    bbox_shift: int = 0,
    batch_size: Optional[int] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
    ready: Optional[Callable[[int], None]] = None,
) -> "list[Optional[Box]]":
    """One face box (or None) per frame of ``frames`` [N,H,W,3] RGB uint8."""
    import numpy as np

    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0:
        return []
    if detector is None:
        if backend != "cascade":
            raise ValueError("detect_boxes(backend='dwpose') needs detector=load_detector('dwpose', models_dir, device)")
        detector = load_detector("cascade", None)
    if detector.backend != backend:
        raise ValueError(f"detector is for backend {detector.backend!r}, not {backend!r}")
    n = arr.shape[0]
    if ready is not None and getattr(detector, "independent_frames", False):
        step = max(1, int(batch_size or detector.default_batch_size()))
        pieces = [(a, min(n, a + step)) for a in range(0, n, step)]
    else:
        pieces = [(0, n)]
    cb: Optional[Callable[[int, int], None]] = None
    if progress is not None and len(pieces) == 1:
        cb = lambda done, total: progress("landmarks", done, total)  # noqa: E731
    out: list = []
    for a, b in pieces:
        if ready is not None:
            ready(b)
        keep = _distinct_runs(arr, a, b)
        found = list(detector.detect(arr[keep] if len(keep) < b - a else arr[a:b], bbox_shift=bbox_shift,
                                     batch_size=batch_size, progress=cb)) if keep else []
        if progress is not None and len(pieces) > 1:
            progress("landmarks", b, n)  # frames covered so far (duplicates included)
        # a frame identical to the one before it (VFR→CFR duplicates, stills) reuses that frame's box
        j = -1
        for i in range(a, b):
            if j + 1 < len(keep) and keep[j + 1] == i:
                j += 1
            out.append(found[j] if j >= 0 else out[-1])
    return out


def _distinct_runs(frames: "np.ndarray", start: int = 0, stop: Optional[int] = None) -> list[int]:
    """Indices in ``[start, stop)`` of frames that differ from their predecessor (a sparse sample
    is compared first); ``frames[start]`` is compared with ``frames[start - 1]`` when there is one."""
    import numpy as np

    stop = frames.shape[0] if stop is None else stop
    keep = []
    for i in range(start, stop):
        if i == 0:
            keep.append(0)
            continue
        a, b = frames[i], frames[i - 1]
        if not (np.array_equal(a[::17, ::17], b[::17, ::17]) and np.array_equal(a, b)):
            keep.append(i)
    return keep


__all__: Sequence[str] = ("BACKENDS", "Detector", "load_detector", "detect_boxes")
