"""The official MuseTalk v1.5 blend, split into a once-per-input-frame mask and a GPU composite.

Contract
--------
- ``apply_extra_margin(box, margin, frame_h)``: v1.5 ``y2 += margin``, clamped to the frame.
- ``crop_box(box) -> (x1, y1, x2, y2, s)``: the official 1.5x square crop around a box
  (centre ``((x+x1)//2, (y+y1)//2)``, half-size ``s = int(max(w, h)//2 * 1.5)``).
- ``blur_kernel(s)``: the offline Gaussian kernel ``int(0.05 * 2s // 2 * 2) + 1``.
- ``parsing_mask(classes, mode, left_cheek_width, right_cheek_width)``: the face-parsing
  classes (512x512, CelebAMask-HQ ids) turned into a 0/255 mask, modes ``raw``/``neck``/``jaw``.
- ``prepare_masks(frames, boxes, bisenet, ...) -> list[BlendMask | None]``: the final
  blurred alpha of every input frame, restricted to its face box. Computed once per
  distinct input frame (the official code recomputes it for every output frame).
  ``on_ready({index: mask})`` is called as each chunk of masks is final (and on the device);
  ``stop`` (an Event) ends the work early. The chunks are pipelined (parse of chunk k beside
  the CPU work of chunks k-1 and k+1).
- ``MaskStream(n)``: the masks of a job while a background thread still makes them: a read-only
  sequence whose ``stream[i]`` waits until mask ``i`` is published (``publish``), re-raises the
  producer's error (``fail``), and records the seconds readers waited (``waited_s``). The engine
  composites the first batches while later masks are still being made.
- ``composite(frames, faces, masks)``: the generated 256x256 faces resized to their boxes
  and alpha-blended into the frames with PIL's exact rounding, on the tensors' device, the
  whole batch at once (gathers over the boxes padded to the largest).

Why only the box region of the mask is kept: officially the whole 2s x 2s crop is pasted
back with the blurred mask, and the blur spreads the mask a few pixels beyond the face
box. But outside the box the pasted crop *is* the original frame, and PIL's blend of a
pixel with itself returns that pixel for every alpha (checked in the tests), so only the
alpha inside the box changes anything.

Parity with the official code (§6, §14 of the pipeline report): crop, BiSeNet input
(PIL BILINEAR resize), the mask morphology, the bicubic resize back, the uint8
``cv2.GaussianBlur`` and the alpha rounding are the same operations, so the mask and the
blend are bit-exact given the same parsing classes. The face resize back to the box uses
float bilinear + rounding on the device, where OpenCV uses 11-bit fixed point: about 1 in
8 pixels of the resized face differs by one level before blending.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import cv2
import numpy as np
import torch

from .cpus import usable_cpus

Box = tuple[int, int, int, int]
ParsingMode = Literal["jaw", "raw", "neck"]

EXPAND = 1.5  # official crop expansion around the face box
UPPER_BOUNDARY_RATIO = 0.5  # rows of the crop above this fraction get no face
PARSING_SIZE = 512

# CelebAMask-HQ class ids produced by the BiSeNet face parser.
SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK = 1, 10, 11, 12, 13, 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BlendMask:
    """The blurred blend alpha of one input frame inside its face box.

    ``box`` is the face box after ``extra_margin`` (frame pixels, may reach past the frame
    edge like the official box); ``alpha`` is uint8 ``[y2 - y1, x2 - x1]``.
    """

    box: Box
    alpha: np.ndarray
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device: torch.device | str) -> torch.Tensor:
        """``alpha`` as a uint8 tensor on ``device``, uploaded once and cached
        (``upload_masks`` uploads many at once without a per-mask synchronisation)."""
        key = _device_key(device)
        cached = self._on_device.get(key)
        if cached is None:
            cached = torch.from_numpy(np.ascontiguousarray(self.alpha)).to(key)
            self._on_device[key] = cached
        return cached


def _device_key(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def upload_masks(masks: Sequence[Optional[BlendMask]], device: torch.device | str) -> None:
    """Copy every mask's alpha to ``device`` in one transfer (one pinned buffer, one copy),
    so that ``composite`` never waits on a host-to-device copy. On CUDA the copy is ordered on
    the current stream; a caller on a side stream synchronises it before handing masks over."""
    key = _device_key(device)
    todo = [m for m in masks if m is not None and key not in m._on_device]
    if not todo:
        return
    flat = torch.from_numpy(np.concatenate([np.ascontiguousarray(m.alpha).ravel() for m in todo]))
    if torch.device(key).type == "cuda":
        flat = flat.pin_memory()
    on_device = flat.to(key, non_blocking=True)
    offset = 0
    for m in todo:
        n = m.alpha.size
        m._on_device[key] = on_device[offset : offset + n].view(m.alpha.shape)
        offset += n


class MaskStream(Sequence[Optional[BlendMask]]):
    """The ``n`` masks of a job, readable while a producer thread is still making them.

    ``stream[i]`` blocks until mask ``i`` has been published, then returns it (``None`` = no
    face); if the producer failed first, it raises the producer's exception. ``close()`` tells the
    producer to stop (its ``stop`` event) — the engine calls it when a job ends early.
    """

    def __init__(self, n: int) -> None:
        self._items: list[Optional[BlendMask]] = [None] * n
        self._ready = [False] * n
        self._missing = n
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self.stop = threading.Event()
        self.waited_s = 0.0

    def publish(self, items: dict[int, Optional[BlendMask]]) -> None:
        with self._cond:
            for i, m in items.items():
                if not self._ready[i]:
                    self._missing -= 1
                self._items[i] = m
                self._ready[i] = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        self.stop.set()

    @property
    def done(self) -> bool:
        with self._cond:
            return self._missing == 0

    def wait_all(self) -> list[Optional[BlendMask]]:
        """Every mask, once all are published (raises the producer's error)."""
        return [self[i] for i in range(len(self))]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Optional[BlendMask]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        if i < 0:
            i += len(self._items)
        with self._cond:
            if not self._ready[i]:
                t = time.perf_counter()
                while not self._ready[i] and self._error is None:
                    self._cond.wait(timeout=1.0)
                self.waited_s += time.perf_counter() - t
            if not self._ready[i]:
                assert self._error is not None
                raise self._error
            return self._items[i]

    def __iter__(self) -> Iterator[Optional[BlendMask]]:
        return (self[i] for i in range(len(self)))


# ---------------------------------------------------------------------------------------
# Geometry


def apply_extra_margin(box: Optional[Sequence[int]], margin: int, frame_h: int) -> Optional[Box]:
    """v1.5's ``extra_margin``: extend the box ``margin`` px down, not past the frame bottom."""
    if box is None:
        return None
    x1, y1, x2, y2 = (int(v) for v in box)
    return (x1, y1, x2, min(y2 + int(margin), int(frame_h)))


def crop_box(box: Sequence[int]) -> tuple[int, int, int, int, int]:
    """The official square crop around ``box``: ``(x1, y1, x2, y2, s)`` with side ``2s``."""
    x, y, x1, y1 = (int(v) for v in box)
    cx, cy = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * EXPAND)
    return cx - s, cy - s, cx + s, cy + s, s


def blur_kernel(s: int) -> int:
    """Gaussian kernel size of the offline blend for a crop of side ``2s`` (always odd)."""
    return int(0.05 * (2 * s) // 2 * 2) + 1


def _crop_zero_padded(frame: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """``frame[y1:y2, x1:x2]`` with zeros where the window leaves the frame (PIL ``crop``)."""
    h, w = frame.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1, frame.shape[2]), dtype=frame.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = frame[sy1:sy2, sx1:sx2]
    return out


# ---------------------------------------------------------------------------------------
# Parsing mask


def _jaw_kernel() -> np.ndarray:
    """33x33 dilation kernel: a cone widening downwards (rows 10..20, widths 1..21), then a
    21-wide tail (rows 21..32), centred on column 16."""
    cone, tail = 21, 12
    size = cone + tail
    kernel = np.zeros((size, size), dtype=np.uint8)
    centre = size // 2
    for row in range(cone // 2, cone):
        half = row - cone // 2
        kernel[row, centre - half : centre + half + 1] = 1
    base = int(kernel[cone - 1].sum())
    kernel[cone:, max(0, centre - base // 2) : min(size, centre + base // 2 + 1)] = 1
    return kernel


_JAW_KERNEL = _jaw_kernel()
_CHEEK_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


def _cheek_mask(left_cheek_width: int, right_cheek_width: int) -> np.ndarray:
    """255 on the outer columns ``[0, 256 - left]`` and ``[256 + right, 511]`` (inclusive)."""
    mask = np.zeros((PARSING_SIZE, PARSING_SIZE), dtype=np.uint8)
    centre = PARSING_SIZE // 2
    cv2.rectangle(mask, (0, 0), (centre - int(left_cheek_width), PARSING_SIZE), 255, -1)
    cv2.rectangle(mask, (centre + int(right_cheek_width), 0), (PARSING_SIZE, PARSING_SIZE), 255, -1)
    return mask


def parsing_mask(
    classes: np.ndarray, mode: ParsingMode = "jaw", left_cheek_width: int = 90, right_cheek_width: int = 90
) -> np.ndarray:
    """The official 0/255 blend region from a 512x512 map of parsing classes.

    ``raw``: skin and mouth/lips. ``neck``: plus the neck. ``jaw`` (v1.5): the skin dilated
    downwards (so the generated jaw may extend below the old one), eroded again at the cheeks
    (outside the centre band of ``left``/``right`` px), the nose left out, lips always in.
    """
    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise ValueError(f"parsing classes must be a 2-D map, got shape {classes.shape}")
    lips = np.isin(classes, (MOUTH, UPPER_LIP, LOWER_LIP))
    if mode == "raw":
        keep = lips | (classes == SKIN)
    elif mode == "neck":
        keep = lips | np.isin(classes, (SKIN, NECK))
    elif mode == "jaw":
        skin = (classes == SKIN).astype(np.uint8) * 255
        dilated = cv2.dilate(skin, _JAW_KERNEL, iterations=1)
        eroded = cv2.erode(dilated, _CHEEK_KERNEL, iterations=2)
        cheeks = _cheek_mask(left_cheek_width, right_cheek_width)
        region = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(dilated, cv2.bitwise_not(cheeks)))
        keep = ((region == 255) & (classes != NOSE)) | lips
    else:
        raise ValueError(f"parsing_mode: unknown value {mode!r}; use jaw, raw or neck")
    return keep.astype(np.uint8) * 255


# ---------------------------------------------------------------------------------------
# Masks, once per input frame


def _parser_input(frame: np.ndarray, box: Box) -> np.ndarray:
    """The BiSeNet input for one frame: the zero-padded 2s crop resized to 512x512 (PIL BILINEAR)."""
    from PIL import Image

    x1, y1, x2, y2, _ = crop_box(box)
    crop = _crop_zero_padded(frame, x1, y1, x2, y2)
    return np.asarray(Image.fromarray(crop).resize((PARSING_SIZE, PARSING_SIZE), Image.BILINEAR))


def _finish_mask(classes: np.ndarray, box: Box, mode: ParsingMode, left: int, right: int) -> BlendMask:
    """Parsing classes -> the blurred alpha inside ``box`` (the official ``get_image`` recipe)."""
    from PIL import Image

    side = 2 * crop_box(box)[4]
    parsed = parsing_mask(classes, mode, left, right)
    # PIL's default resample for an "L" image is bicubic (with antialiasing when shrinking).
    return _blend_alpha(np.asarray(Image.fromarray(parsed).resize((side, side))), box)


def _blend_alpha(resized: np.ndarray, box: Box) -> BlendMask:
    """The parsing mask resized to the crop (``[2s, 2s]`` uint8) -> the blurred alpha inside ``box``."""
    bx1, by1, bx2, by2 = box
    x1, y1, _, _, s = crop_box(box)
    side = 2 * s
    mask = np.zeros((side, side), dtype=np.uint8)
    # Keep the parsing only inside the box (PIL crop/paste clip to the crop square).
    ix1, iy1 = max(bx1 - x1, 0), max(by1 - y1, 0)
    ix2, iy2 = min(bx2 - x1, side), min(by2 - y1, side)
    if ix2 > ix1 and iy2 > iy1:
        mask[iy1:iy2, ix1:ix2] = resized[iy1:iy2, ix1:ix2]
    mask[: int(side * UPPER_BOUNDARY_RATIO)] = 0  # no face above the box centre row
    k = blur_kernel(s)
    # uint8 blur on purpose: OpenCV's fixed-point result is what the official blend uses.
    mask = cv2.GaussianBlur(mask, (k, k), 0)
    alpha = np.zeros((by2 - by1, bx2 - bx1), dtype=np.uint8)
    if ix2 > ix1 and iy2 > iy1:
        alpha[iy1 - (by1 - y1) : iy2 - (by1 - y1), ix1 - (bx1 - x1) : ix2 - (bx1 - x1)] = mask[iy1:iy2, ix1:ix2]
    return BlendMask(box=(int(bx1), int(by1), int(bx2), int(by2)), alpha=alpha)


# ---------------------------------------------------------------------------------------
# The same steps as tensor ops (``prepare_masks(on_device=True)``): bit for bit the CPU path's


def _crop_batch(frames: np.ndarray, chunk: Sequence[tuple[int, Box]], pin: bool) -> tuple[torch.Tensor, list[int]]:
    """The zero-padded 2s crops of ``chunk``, each in the top-left corner of one uint8
    ``[B, S, S, 3]`` array (S the largest side), and their sides."""
    sides = [2 * crop_box(box)[4] for _, box in chunk]
    big = max(sides)
    out = torch.zeros((len(chunk), big, big, 3), dtype=torch.uint8, pin_memory=pin)
    view = out.numpy()
    for j, (i, box) in enumerate(chunk):
        x1, y1, x2, y2, _ = crop_box(box)
        view[j, : y2 - y1, : x2 - x1] = _crop_zero_padded(frames[i], x1, y1, x2, y2)
    return out, sides


def _row_segments(kernel: np.ndarray) -> list[tuple[int, int, int]]:
    """A structuring element as horizontal runs ``(dy, dx, half)`` relative to its centre
    anchor: the run covers columns ``dx - half .. dx + half`` of kernel row ``dy``."""
    kh, kw = kernel.shape
    runs = []
    for r in range(kh):
        cols = np.flatnonzero(kernel[r])
        if cols.size == 0:
            continue
        if cols[-1] - cols[0] + 1 != cols.size or cols.size % 2 == 0:
            raise ValueError("each kernel row must be one run of odd length")
        runs.append((r - kh // 2, int(cols[0] + cols[-1]) // 2 - kw // 2, int(cols.size // 2)))
    return runs


def _shift(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``out[y, x] = x[y + dy, x + dx]``, ``fill`` where that leaves the map ([B, H, W])."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def _dilate(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """``cv2.dilate`` of 0/1 maps ``[B, H, W]`` (centre anchor; pixels outside the map never
    count): the max over the kernel's row runs, each a 1-D max-pool then a shift. Exact."""
    out: Optional[torch.Tensor] = None
    pooled: dict[int, torch.Tensor] = {}
    for dy, dx, half in _row_segments(kernel):
        if half not in pooled:  # max-pool pads with -inf: outside pixels are ignored
            pooled[half] = torch.nn.functional.max_pool2d(x[:, None], (1, 2 * half + 1), 1, (0, half))[:, 0] if half else x
        part = _shift(pooled[half], dy, dx, 0.0)
        out = part if out is None else torch.maximum(out, part)
    assert out is not None
    return out


def _erode(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """``cv2.erode`` of 0/1 maps: 1 where every pixel under the kernel inside the map is 1."""
    return 1 - _dilate(1 - x, kernel)


def parsing_mask_batch(
    classes: torch.Tensor, mode: ParsingMode = "jaw", left_cheek_width: int = 90, right_cheek_width: int = 90
) -> torch.Tensor:
    """``parsing_mask`` of a batch of class maps ``[B, 512, 512]`` (uint8) on their device: uint8 0/255.
    The morphology runs as max-pools of 0/1 maps over the kernels' rows (exact)."""
    lips = (classes == MOUTH) | (classes == UPPER_LIP) | (classes == LOWER_LIP)
    if mode == "raw":
        keep = lips | (classes == SKIN)
    elif mode == "neck":
        keep = lips | (classes == SKIN) | (classes == NECK)
    elif mode == "jaw":
        ftype = torch.float16 if classes.device.type == "cuda" else torch.float32
        dilated = _dilate((classes == SKIN).to(ftype), _JAW_KERNEL)
        eroded = _erode(_erode(dilated, _CHEEK_KERNEL), _CHEEK_KERNEL)
        cheeks = torch.from_numpy(_cheek_mask(left_cheek_width, right_cheek_width) == 255).to(classes.device)
        region = torch.where(cheeks, eroded, dilated) > 0.5
        keep = (region & (classes != NOSE)) | lips
    else:
        raise ValueError(f"parsing_mode: unknown value {mode!r}; use jaw, raw or neck")
    return keep.to(torch.uint8) * 255


def _parse_on_device(
    bisenet: Any, crops: torch.Tensor, sides: list[int], rows: int, device: torch.device, dtype: torch.dtype,
    mode: ParsingMode, left: int, right: int,
) -> torch.Tensor:
    """Crops (uint8 ``[B, S, S, 3]`` on ``device``) -> each parsing mask resized back to its crop,
    ``[B, S, S]`` uint8 on the device (queued, not waited for). The parser runs on ``rows`` inputs
    (black ones after the crops: one shape per job)."""
    from . import resample

    n = len(sides)
    inputs = resample.resize(crops, [(s, s) for s in sides], [(PARSING_SIZE, PARSING_SIZE)] * n, "bilinear")
    if rows > n:
        inputs = torch.cat([inputs, inputs.new_zeros((rows - n, *inputs.shape[1:]))])
    classes = _parse(bisenet, inputs, device, dtype)[:n]
    parsed = parsing_mask_batch(classes, mode, left, right)
    return resample.resize(parsed, [(PARSING_SIZE, PARSING_SIZE)] * n, [(s, s) for s in sides], "bicubic")


def _module_dtype(module: Any) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _parse(bisenet: Any, inputs: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """BiSeNet on uint8 parser inputs ``[B, 512, 512, 3]`` (host array or tensor) -> uint8 classes
    ``[B, 512, 512]`` on ``device`` (queued, not waited for); normalised as torchvision's ToTensor +
    Normalize, in float32 as the official code does."""
    with torch.inference_mode():
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        t = inputs if isinstance(inputs, torch.Tensor) else torch.from_numpy(inputs)
        x = t.to(device).permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)
        logits = bisenet(x.to(dtype))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return logits.argmax(dim=1).to(torch.uint8)


def _masks_to_make(
    frames: np.ndarray, boxes: Sequence[Optional[Sequence[int]]], mode: str,
    on_ready: Optional[Callable[[dict[int, Optional[BlendMask]]], None]],
) -> list[tuple[int, Box]]:
    """``prepare_masks``' checks and work list: ``(frame index, box)`` for each frame that gets a
    mask; ``on_ready`` is told at once about the frames that get none."""
    if len(boxes) != len(frames):
        raise ValueError(f"prepare_masks: {len(frames)} frames but {len(boxes)} boxes")
    if mode not in ("jaw", "raw", "neck"):
        raise ValueError(f"parsing_mode: unknown value {mode!r}; use jaw, raw or neck")
    todo: list[tuple[int, Box]] = []
    for i, box in enumerate(boxes):
        if box is None:
            continue
        b = tuple(int(v) for v in box)
        if b[2] - b[0] <= 0 or b[3] - b[1] <= 0 or crop_box(b)[4] <= 0:
            continue  # degenerate: the official code cannot blend it either
        todo.append((i, b))  # type: ignore[arg-type]
    if on_ready is not None:
        with_mask = {i for i, _ in todo}
        on_ready({i: None for i in range(len(boxes)) if i not in with_mask})
    return todo


def prepare_masks(
    frames: np.ndarray,
    boxes: Sequence[Optional[Sequence[int]]],
    bisenet: Any,
    *,
    mode: ParsingMode = "jaw",
    left_cheek_width: int = 90,
    right_cheek_width: int = 90,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    workers: Optional[int] = None,
    on_ready: Optional[Callable[[dict[int, Optional[BlendMask]]], None]] = None,
    stop: Optional[threading.Event] = None,
    frames_ready: Optional[Callable[[int], None]] = None,
    pad: bool = False,
    on_device: bool = False,
) -> list[Optional[BlendMask]]:
    """The blend mask of every frame (``None`` where the box is ``None`` or empty).

    ``frames`` are RGB uint8 ``[N, H, W, 3]``; ``boxes`` are after ``extra_margin``;
    ``bisenet`` maps ImageNet-normalised ``[B, 3, 512, 512]`` to logits ``[B, 19, 512, 512]``.
    The crops/resizes and the mask post-processing run on a CPU thread pool (PIL and OpenCV
    release the GIL); the parser runs in batches of ``batch_size`` on ``device``. The masks
    are also uploaded to ``device`` (one transfer per chunk) for ``composite``; their memory is
    the sum of the box areas in bytes. ``on_ready({index: mask})`` is called for the frames
    without a mask first, then after each chunk, once that chunk's masks are on the device.
    ``stop``: when set, the function returns early (the result is then incomplete).
    ``frames_ready(k)``: blocks until ``frames[:k]`` hold their pixels (frames still decoding).
    ``pad``: a short last chunk is filled up with black inputs to ``batch_size``, so that the
    parser always runs at one shape (on CUDA a new shape costs cuDNN set-up in the job, ~0.25 s
    of waiting for masks on an H200, and a frame's mask then does not depend on its chunk).
    ``on_device``: the parser input's resize, the parsing mask's morphology and its resize back to
    the crop run as tensor ops on ``device`` (``resample.py``, ``parsing_mask_batch``; the same
    values), leaving the pool only the crops and the blur: ~0.4 ms of CPU a frame instead of ~12.
    """
    todo = _masks_to_make(frames, boxes, mode, on_ready)
    device = torch.device(device)
    dtype = _module_dtype(bisenet)
    result: list[Optional[BlendMask]] = [None] * len(boxes)
    if not todo:
        return result
    batch_size = max(1, int(batch_size))
    chunks = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    # A three-stage pipeline over the chunks: while the parser runs on chunk k (device), the pool
    # finishes the masks of chunk k-1 and makes the parser inputs of chunk k+1 (CPU; PIL and
    # OpenCV release the GIL). The same functions on the same data: only the order of work changes.
    with ThreadPoolExecutor(max_workers=workers or min(8, usable_cpus())) as pool:

        def parser_inputs(chunk: list[tuple[int, Box]]) -> Any:
            if frames_ready is not None:
                frames_ready(chunk[-1][0] + 1)  # the work list ascends
            if on_device:
                return pool.submit(_crop_batch, frames, chunk, device.type == "cuda")
            return [pool.submit(_parser_input, frames[i], box) for i, box in chunk]

        def parse(chunk: list[tuple[int, Box]], inputs: Any) -> tuple[torch.Tensor, Any]:
            """Queue chunk's work on the device: (its result there, what finishes one mask from it)."""
            rows = batch_size if pad else len(chunk)
            if on_device:
                crops, sides = inputs.result()
                out = _parse_on_device(bisenet, crops.to(device, non_blocking=True), sides, rows, device, dtype,
                                       mode, left_cheek_width, right_cheek_width)
                return out, lambda resized, j, box: _blend_alpha(resized[j, : sides[j], : sides[j]], box)
            batch = np.stack([future.result() for future in inputs])
            if len(batch) < rows:
                batch = np.concatenate([batch, np.zeros((rows - len(batch), *batch.shape[1:]), batch.dtype)])
            out = _parse(bisenet, batch, device, dtype)
            return out, lambda classes, j, box: _finish_mask(classes[j], box, mode, left_cheek_width, right_cheek_width)

        def publish(chunk: list[tuple[int, Box]], finishing: list[Any]) -> None:
            for (i, _), future in zip(chunk, finishing):
                result[i] = future.result()
            if on_ready is not None:
                upload_masks([result[i] for i, _ in chunk], device)
                if device.type == "cuda":
                    # The consumer may be another thread on another stream: the copies must be done.
                    torch.cuda.current_stream(device).synchronize()
                on_ready({i: result[i] for i, _ in chunk})

        def stopped() -> bool:
            return stop is not None and stop.is_set()

        inputs = parser_inputs(chunks[0])
        previous: Optional[tuple[list[tuple[int, Box]], list[Any]]] = None
        for k, chunk in enumerate(chunks):
            if stopped():
                return result
            current = inputs
            if k + 1 < len(chunks):
                inputs = parser_inputs(chunks[k + 1])
            parsed_dev, finish = parse(chunk, current)
            if previous is not None:  # finished on the pool while the device parsed this chunk
                publish(*previous)
                if stopped():
                    return result
            parsed = parsed_dev.cpu().numpy()
            previous = (chunk, [pool.submit(finish, parsed, j, box) for j, (_, box) in enumerate(chunk)])
        if previous is not None and not stopped():
            publish(*previous)
    # Masks are reused for many output frames: put them on the device now, in one copy.
    upload_masks(result, device)
    return result


# ---------------------------------------------------------------------------------------
# Composite, once per output frame


# Box pixels per batched composite step: bounds the float temporaries of the resize
# (~50 bytes per box pixel: 4 gathered corner values and the blend, 3 channels).
COMPOSITE_STEP_PIXELS = 1 << 22


def _taps(size: torch.Tensor, length: int, src: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps along one axis for outputs of ``size[k]`` pixels (padded to ``length``) from
    ``src`` pixels: ``(i0, i1, w0, w1)``, each ``[n, length]``; the half-pixel-centre rule of
    ``F.interpolate(mode="bilinear", align_corners=False)`` (= OpenCV's INTER_LINEAR geometry)."""
    i = torch.arange(length, device=size.device, dtype=torch.float32)
    scale = float(src) / size.to(torch.float32)
    pos = (scale[:, None] * (i + 0.5) - 0.5).clamp_min_(0.0)
    i0 = pos.to(torch.int64)  # truncation = floor, pos >= 0
    w1 = pos - i0.to(torch.float32)
    i0 = i0.clamp_(max=src - 1)  # padding positions past the output size
    i1 = (i0 + 1).clamp_(max=src - 1)
    return i0, i1, 1.0 - w1, w1


def _resize_faces(faces: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor, wm: int, hm: int) -> torch.Tensor:
    """uint8 ``[n, S, S, 3]`` faces -> uint8 ``[n, hm, wm, 3]``: face ``k`` resized bilinearly to
    ``heights[k] x widths[k]`` (rounded to nearest) in the top-left corner; the rest is padding.
    One set of gathers for the whole batch, whatever the sizes."""
    n, size = faces.shape[0], faces.shape[1]
    y0, y1, wy0, wy1 = _taps(heights, hm, size)
    x0, x1, wx0, wx1 = _taps(widths, wm, size)
    flat = faces.reshape(n, size * size, 3)

    def corner(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        idx = (yi[:, :, None] * size + xi[:, None, :]).reshape(n, hm * wm, 1).expand(n, hm * wm, 3)
        return torch.gather(flat, 1, idx).reshape(n, hm, wm, 3).to(torch.float32)

    wy0, wy1 = wy0[:, :, None, None], wy1[:, :, None, None]
    wx0, wx1 = wx0[:, None, :, None], wx1[:, None, :, None]
    # The order of F.interpolate's bilinear kernel: across x within each row, then across y.
    val = wy0 * (wx0 * corner(y0, x0) + wx1 * corner(y0, x1)) + wy1 * (wx0 * corner(y1, x0) + wx1 * corner(y1, x1))
    return val.round_().clamp_(0, 255).to(torch.uint8)


def resize_face(face: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[256, 256, 3]`` uint8 -> ``[height, width, 3]`` uint8, bilinear (cv2 INTER_LINEAR
    geometry: half-pixel centres, no antialiasing), rounded to nearest; what ``composite`` pastes."""
    sizes = torch.tensor([[width, height]], device=face.device)
    return _resize_faces(face[None], sizes[:, 0], sizes[:, 1], int(width), int(height))[0]


def blend_pil(src: torch.Tensor, dst: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """PIL's ``paste(src, mask=alpha)`` rounding on uint8 tensors: ``alpha`` [h, w] or [h, w, 1]."""
    m = alpha.to(torch.int32)
    if m.dim() == src.dim() - 1:
        m = m.unsqueeze(-1)
    t = src.to(torch.int32) * m + dst.to(torch.int32) * (255 - m) + 128
    return ((t + (t >> 8)) >> 8).to(torch.uint8)


def composite(frames: torch.Tensor, faces: torch.Tensor, masks: Sequence[Optional[BlendMask]]) -> torch.Tensor:
    """Paste each generated face into its frame with its blend mask; returns new frames.

    ``frames`` uint8 ``[B, H, W, 3]``, ``faces`` uint8 ``[B, 256, 256, 3]`` on the same
    device; ``masks[b] is None`` leaves frame ``b`` unchanged. No host synchronisation.
    The whole batch is resized, blended and written back with a fixed number of tensor
    operations (gathers over the boxes padded to the largest one), not a few per frame.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"composite: frames must be uint8 [B, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if faces.dim() != 4 or faces.shape[0] != frames.shape[0] or faces.dtype != torch.uint8:
        raise ValueError(f"composite: faces must be uint8 [B, h, w, 3] with B={frames.shape[0]}, "
                         f"got {faces.dtype} {list(faces.shape)}")
    if len(masks) != frames.shape[0]:
        raise ValueError(f"composite: {frames.shape[0]} frames but {len(masks)} masks")
    batch, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    # One spare pixel at the end: where the padding and the parts of boxes outside the frame
    # are written, so that the scatter needs no data-dependent (host-synchronising) selection.
    buf = torch.empty((batch * height * width + 1, 3), dtype=torch.uint8, device=frames.device)
    buf[:-1].copy_(frames.reshape(-1, 3))
    buf[-1].zero_()
    items = []
    for b, mask in enumerate(masks):
        if mask is None:
            continue
        x1, y1, x2, y2 = mask.box
        # The part of the box inside the frame (the official paste clips the same way).
        if min(x2, width) > max(x1, 0) and min(y2, height) > max(y1, 0):
            items.append((b, mask))
    start = 0
    while start < len(items):
        stop, wm, hm = start, 0, 0
        while stop < len(items):
            x1, y1, x2, y2 = items[stop][1].box
            w2, h2 = max(wm, x2 - x1), max(hm, y2 - y1)
            if stop > start and (stop - start + 1) * w2 * h2 > COMPOSITE_STEP_PIXELS:
                break
            wm, hm, stop = w2, h2, stop + 1
        _composite_step(buf, faces, items[start:stop], (batch, height, width), wm, hm)
        start = stop
    return buf[:-1].view(batch, height, width, 3)


def _composite_step(
    buf: torch.Tensor, faces: torch.Tensor, items: list[tuple[int, BlendMask]], shape: tuple[int, int, int], wm: int, hm: int
) -> None:
    """Blend ``items`` ((frame index, mask), boxes at most ``wm x hm``) into ``buf`` (flat frames + 1 spare pixel)."""
    batch, height, width = shape
    dev = buf.device
    alphas = [m.to(dev).reshape(-1) for _, m in items]
    offsets = np.cumsum([0] + [a.numel() for a in alphas[:-1]])
    meta = torch.tensor([[b, m.box[0], m.box[1], m.box[2] - m.box[0], m.box[3] - m.box[1], int(off)]
                         for (b, m), off in zip(items, offsets)], dtype=torch.int64)
    meta = meta.to(dev, non_blocking=True)
    fidx, x1, y1, w, h, off = meta.unbind(1)
    rows = torch.arange(hm, device=dev)
    cols = torch.arange(wm, device=dev)
    ys, xs = y1[:, None] + rows, x1[:, None] + cols  # [n, hm], [n, wm] frame coordinates
    valid = (((rows < h[:, None]) & (ys >= 0) & (ys < height))[:, :, None]
             & ((cols < w[:, None]) & (xs >= 0) & (xs < width))[:, None, :])
    pix = (fidx[:, None, None] * (height * width) + ys.clamp(0, height - 1)[:, :, None] * width
           + xs.clamp(0, width - 1)[:, None, :])
    pix = torch.where(valid, pix, batch * height * width).reshape(-1)
    aidx = off[:, None, None] + rows[None, :, None] * w[:, None, None] + cols[None, None, :]
    alpha = torch.cat(alphas)[torch.where(valid, aidx, 0).reshape(-1)]
    face = _resize_faces(faces.index_select(0, fidx), w, h, wm, hm).reshape(-1, 3)
    buf[pix] = blend_pil(face, buf[pix], alpha)
