"""Pillow's uint8 ``Image.resize`` (BILINEAR, BICUBIC), bit for bit, as batched tensor ops.

Contract
--------
- ``axis_taps(in_size, out_size, kind) -> (first, coeffs)``: the taps Pillow uses along one axis,
  the first input pixel of each output pixel and its fixed-point coefficients (22 fractional
  bits); ``axis_weights`` is the same as a dense ``[out_size, in_size]`` matrix.
- ``resize(images, in_sizes, out_sizes, kind) -> uint8 tensor``: every image of a batch
  resized to its own size, as Pillow would, on the images' device. ``images`` is uint8
  ``[B, H, W, C]`` (or ``[B, H, W]``), image ``b`` in its top-left ``in_sizes[b] = (h, w)``
  corner (the rest is ignored); the result is ``[B, max oh, max ow, C]`` with image ``b`` in its
  top-left ``out_sizes[b]`` corner and zeros elsewhere.

Why it is exact: Pillow resizes a uint8 image in two passes, horizontal then vertical, each
output value being ``clip8((2**21 + sum(in * k)) >> 22)`` over a few taps with integer
coefficients ``k`` (``Resample.c``: ``precompute_coeffs`` in double precision, then
``normalize_coeffs_8bpc``), summed in 32-bit integers. The coefficients are computed here with the
same double-precision operations in the same order, and each pass gathers the same taps and sums
them in int32 too, then shifts (arithmetic: a floor, as Pillow's) and clips. The tests compare
with Pillow itself on random images.

Scope: the engine resizes squares to squares (the face-parsing crops and masks), where this
equals every Pillow release from 10 to 13. Pillow 13 sometimes runs the vertical pass first when
the two axes scale differently (some widened-and-shortened or shrunk images), and then differs
from this by a level on some pixels; those resizes are not used here.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Optional, Sequence

import numpy as np
import torch

Kind = Literal["bilinear", "bicubic"]

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


def _bilinear(x: float) -> float:
    if x < 0.0:
        x = -x
    if x < 1.0:
        return 1.0 - x
    return 0.0


def _bicubic(x: float) -> float:
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


@functools.lru_cache(maxsize=512)
def axis_taps(in_size: int, out_size: int, kind: Kind) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's taps for resizing ``in_size`` pixels to ``out_size`` along one axis: the first
    input pixel of each output pixel ``[out_size]`` and its integer coefficients
    ``[out_size, ksize]`` (22 fractional bits; zeros past a pixel's own taps)."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    filt, base_support = _FILTERS[kind]
    scale = filterscale = float(in_size) / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = base_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    first = np.zeros(out_size, dtype=np.int64)
    coeffs = np.zeros((out_size, ksize), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [filt((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in ws:
            ww += w
        first[xx] = xmin
        for x, w in enumerate(ws):
            k = w / ww if ww != 0.0 else w
            scaled = k * (1 << PRECISION_BITS)
            coeffs[xx, x] = int(-0.5 + scaled) if k < 0 else int(0.5 + scaled)
    return first, coeffs


def axis_weights(in_size: int, out_size: int, kind: Kind) -> np.ndarray:
    """``axis_taps`` as a dense ``[out_size, in_size]`` int64 matrix."""
    first, coeffs = axis_taps(in_size, out_size, kind)
    out = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        n = min(coeffs.shape[1], in_size - int(first[xx]))
        out[xx, first[xx] : first[xx] + n] = coeffs[xx, :n]
    return out


def _tap_tables(
    pairs: Sequence[tuple[int, int]], out_len: int, kind: Kind, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, its axis taps padded to ``out_len`` outputs and the batch's widest kernel:
    input indices and int32 coefficients, each ``[B, out_len, ksize]``. Padding taps read pixel
    0 of their image with coefficient 0."""
    taps = [axis_taps(int(n_in), int(n_out), kind) for n_in, n_out in pairs]
    ksize = max(c.shape[1] for _, c in taps)
    index = np.zeros((len(pairs), out_len, ksize), dtype=np.int64)
    coeff = np.zeros((len(pairs), out_len, ksize), dtype=np.int32)
    for b, ((n_in, n_out), (first, c)) in enumerate(zip(pairs, taps)):
        k = c.shape[1]
        index[b, :n_out, :k] = np.minimum(first[:, None] + np.arange(k), int(n_in) - 1)
        coeff[b, :n_out, :k] = c
    return torch.from_numpy(index).to(device), torch.from_numpy(coeff).to(device)


def _pass(x: torch.Tensor, index: torch.Tensor, coeff: torch.Tensor, axis: int) -> torch.Tensor:
    """One Pillow pass along ``axis`` (1: rows, 2: columns) of int32 ``[B, H, W, C]``:
    ``clip8((2**21 + sum_t x[.., index[t], ..] * coeff[t]) >> 22)``, in int32 as Pillow."""
    b, h, w, c = x.shape
    out_len, ksize = index.shape[1], index.shape[2]
    acc: Optional[torch.Tensor] = None
    for t in range(ksize):
        if axis == 2:
            idx = index[:, None, :, t, None].expand(b, h, out_len, c)
            term = torch.gather(x, 2, idx) * coeff[:, None, :, t, None]
        else:
            idx = index[:, :, t, None, None].expand(b, out_len, w, c)
            term = torch.gather(x, 1, idx) * coeff[:, :, t, None, None]
        acc = term if acc is None else acc.add_(term)
    assert acc is not None
    acc.add_(1 << (PRECISION_BITS - 1))
    return torch.bitwise_right_shift(acc, PRECISION_BITS).clamp_(0, 255)


def resize(
    images: torch.Tensor, in_sizes: Sequence[tuple[int, int]], out_sizes: Sequence[tuple[int, int]], kind: Kind
) -> torch.Tensor:
    """Each image resized as ``PIL.Image.resize((ow, oh), kind)`` would (see the module's contract)."""
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"images must be uint8 [B, H, W(, C)], got {images.dtype} {tuple(images.shape)}")
    if not (len(in_sizes) == len(out_sizes) == images.shape[0]):
        raise ValueError("one input and one output size per image")
    gray = images.dim() == 3
    x = (images.unsqueeze(-1) if gray else images).to(torch.int32)
    oh, ow = max_size(out_sizes)
    # Horizontal pass: [B, h, w, C] -> [B, h, ow, C]; Pillow keeps the intermediate as uint8.
    ix, cx = _tap_tables([(s[1], o[1]) for s, o in zip(in_sizes, out_sizes)], ow, kind, x.device)
    t = _pass(x, ix, cx, axis=2)
    # Vertical pass: [B, h, ow, C] -> [B, oh, ow, C].
    iy, cy = _tap_tables([(s[0], o[0]) for s, o in zip(in_sizes, out_sizes)], oh, kind, x.device)
    out = _pass(t, iy, cy, axis=1).to(torch.uint8)
    # Rows and columns past an image's own output size hold the padding taps' values: zero them.
    rows = torch.arange(oh, device=x.device)[None, :] < torch.tensor([o[0] for o in out_sizes], device=x.device)[:, None]
    cols = torch.arange(ow, device=x.device)[None, :] < torch.tensor([o[1] for o in out_sizes], device=x.device)[:, None]
    out.mul_((rows[:, :, None] & cols[:, None, :]).to(torch.uint8)[..., None])
    return out.squeeze(-1) if gray else out


def max_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The smallest ``(h, w)`` holding every size (for padding a batch)."""
    return max(int(s[0]) for s in sizes), max(int(s[1]) for s in sizes)


