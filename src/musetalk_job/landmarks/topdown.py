"""mmpose's top-down inference recipe for RTMPose/DWPose, re-implemented without mmlab.

Contract (what official MuseTalk gets from ``mmpose.apis.inference_topdown(model, frame)``
with no person boxes, mmpose 1.1):

* the person box is the whole frame ``[0, 0, W, H]`` (float32);
* centre = box middle, scale = box size × 1.25 (``GetBBoxCenterScale`` padding);
* the scale is widened or heightened to aspect w/h = 288/384 = 0.75 (``TopdownAffine``);
* the frame is warped to 288×384 with the plain (non-UDP) three-point affine matrix and
  ``cv2.warpAffine(..., INTER_LINEAR)``, constant zero border;
* pixels are normalised with the ImageNet mean/std in RGB order;
* SimCC decoding: argmax per axis, bin / split ratio 2.0; the score is the *smaller* of the
  two axis maxima (mmpose's ``get_simcc_maximum``), and a keypoint whose score is ≤ 0 gets
  location −1 before scaling;
* flip test: the horizontally flipped input's x vectors are reversed and both vectors are
  re-indexed with the COCO-WholeBody flip table, then averaged with the plain pass;
* keypoints return to frame pixels as ``kp / input_size * scale + centre − scale / 2``
  (float64 arithmetic, as mmpose's numpy code does; official truncates that float64 to int).

Everything here is numpy/cv2/torch maths with no model; ``dwpose.py`` runs the network.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

INPUT_SIZE: tuple[int, int] = (288, 384)  # network input (w, h)
BBOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0
NUM_KEYPOINTS = 133
FACE_SLICE = slice(23, 91)  # the 68 iBUG face points inside COCO-WholeBody
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------- flip table


def _wholebody_pairs() -> list[tuple[int, int]]:
    """Left/right pairs of COCO-WholeBody (0-based keypoint ids)."""
    pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]  # body
    pairs += [(17, 20), (18, 21), (19, 22)]  # feet: big toe, small toe, heel
    face = 23
    face_pairs = [(i, 16 - i) for i in range(8)]  # jaw contour 0..16
    face_pairs += [(17 + i, 26 - i) for i in range(5)]  # eyebrows
    face_pairs += [(31, 35), (32, 34)]  # nose bottom
    face_pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    face_pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
    face_pairs += [(60, 64), (61, 63), (65, 67)]  # inner lips
    pairs += [(face + a, face + b) for a, b in face_pairs]
    pairs += [(91 + i, 112 + i) for i in range(21)]  # left hand <-> right hand
    return pairs


def flip_indices() -> list[int]:
    """``flip[k]`` = the keypoint that ``k`` becomes in a horizontally mirrored image."""
    table = list(range(NUM_KEYPOINTS))
    for a, b in _wholebody_pairs():
        table[a], table[b] = b, a
    return table


# --------------------------------------------------------------------------- box → warp


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Grow the shorter side of ``scale`` (w, h) so that w / h == aspect_ratio."""
    w, h = scale[..., 0:1], scale[..., 1:2]
    return np.where(w > h * aspect_ratio, np.concatenate([w, w / aspect_ratio], -1), np.concatenate([h * aspect_ratio, h], -1))


def frame_center_scale(width: int, height: int, input_size: tuple[int, int] = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Centre and (aspect-fixed, padded) scale of the whole-frame person box, float32 like mmpose."""
    box = np.array([0, 0, width, height], dtype=np.float32)
    center = (box[2:] + box[:2]) * 0.5
    scale = (box[2:] - box[:2]) * BBOX_PADDING
    scale = fix_aspect_ratio(scale, input_size[0] / input_size[1]).astype(np.float32)
    return center.astype(np.float32), scale


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=d.dtype)


def warp_matrix(center: np.ndarray, scale: np.ndarray, output_size: tuple[int, int] = INPUT_SIZE, *, inverse: bool = False) -> np.ndarray:
    """The 2×3 affine matrix that maps the box (centre, scale) onto ``output_size`` (no rotation).

    Built from three point pairs (centre, a point half a box-width above it, and the point
    perpendicular to those) and solved by ``cv2.getAffineTransform`` on float32 points — the
    same construction and precision as mmpose's ``get_warp_matrix``, so the warp matches bit
    for bit. ``inverse`` gives output → frame.
    """
    import cv2

    dst_w, dst_h = output_size
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, float(scale[0]) * -0.5])
    src[2] = _third_point(src[0], src[1])
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + np.array([0.0, dst_w * -0.5])
    dst[2] = _third_point(dst[0], dst[1])
    if inverse:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2×3 affine matrix to points ``[..., 2]`` (float64 result)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def warp_frames(
    frames: np.ndarray, matrix: np.ndarray, output_size: tuple[int, int] = INPUT_SIZE, *, rows: Optional[int] = None
) -> np.ndarray:
    """``cv2.warpAffine`` (bilinear, zero border) of each frame ``[N,H,W,3]`` → ``[N,h,w,3]`` uint8;
    with ``rows`` (≥ N) the result has ``rows`` rows, the ones past N black.

    Done on the CPU on purpose: OpenCV's uint8 bilinear warp uses fixed-point weights
    (1/32-pixel grid), which ``grid_sample`` cannot reproduce; matching the official
    network input matters more than the few milliseconds per distinct frame.
    """
    import cv2

    n = frames.shape[0]
    shape = (max(n, rows or 0), output_size[1], output_size[0], frames.shape[3])
    out = np.empty(shape, dtype=np.uint8) if shape[0] == n else np.zeros(shape, dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = cv2.warpAffine(np.ascontiguousarray(frame), matrix, output_size, flags=cv2.INTER_LINEAR)
    return out


# --------------------------------------------------------------------------- SimCC


def flip_simcc(simcc_x, simcc_y, flip_idx: Sequence[int]):
    """Undo a horizontal input flip on SimCC vectors ``[B,K,Wx]``, ``[B,K,Wy]`` (torch).

    ``flip_idx``: the flip table, a sequence or an index tensor on the vectors' device."""
    import torch

    idx = flip_idx if isinstance(flip_idx, torch.Tensor) else list(flip_idx)
    return simcc_x[:, idx].flip(-1), simcc_y[:, idx]


def decode_simcc(simcc_x, simcc_y, split_ratio: float = SIMCC_SPLIT_RATIO):
    """SimCC → keypoints in network-input pixels ``[B,K,2]`` float32 and scores ``[B,K]`` (torch).

    Per keypoint: the argmax bin of each axis divided by ``split_ratio``; the score is the
    smaller of the two maxima; a keypoint with score ≤ 0 gets location −1 (before division),
    all as mmpose's ``SimCCLabel.decode`` does.
    """
    import torch

    max_x, loc_x = simcc_x.max(dim=-1)
    max_y, loc_y = simcc_y.max(dim=-1)
    locs = torch.stack([loc_x, loc_y], dim=-1).to(torch.float32)
    scores = torch.minimum(max_x, max_y)
    locs = torch.where((scores <= 0)[..., None], torch.full_like(locs, -1.0), locs)
    return locs / split_ratio, scores


def keypoints_to_frame(
    keypoints: np.ndarray, center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int] = INPUT_SIZE
) -> np.ndarray:
    """Network-input keypoints ``[..., 2]`` (float32) → frame pixels, float64.

    Same operands and order as mmpose's ``add_pred_to_datasample``: float32 keypoints divided by
    the integer input size promote to float64 and stay float64, which is what official MuseTalk
    truncates to int.
    """
    size = np.asarray(input_size, dtype=np.int64)
    return np.asarray(keypoints, dtype=np.float32) / size * scale + center - 0.5 * scale
