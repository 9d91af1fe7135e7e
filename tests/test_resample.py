"""resample: Pillow's uint8 BILINEAR/BICUBIC resize as tensor ops, compared with Pillow itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from musetalk_job.resample import PRECISION_BITS, axis_weights, resize

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _pil(img: np.ndarray, size: tuple[int, int], kind: str) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), PIL_FILTERS[kind]))


@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
def test_square_resizes_of_a_padded_batch_equal_pillow_bit_for_bit(kind: str) -> None:
    """The engine's case: square crops of different sides, one batch, up- and downscaled."""
    rng = np.random.default_rng(0 if kind == "bilinear" else 1)
    for colour in (True, False):
        sides = [int(s) for s in rng.integers(6, 300, 5)] + [64]
        outs = [int(s) for s in rng.integers(6, 300, 5)] + [64]  # the last one: same size (identity)
        big = max(sides)
        shape = (len(sides), big, big, 3) if colour else (len(sides), big, big)
        batch = rng.integers(0, 256, shape, dtype=np.uint8)
        batch[1] = np.where(batch[1] > 127, 255, 0)  # a 0/255 mask, like the parsing masks
        got = resize(torch.from_numpy(batch), [(s, s) for s in sides], [(o, o) for o in outs], kind).numpy()
        assert got.shape[:3] == (len(sides), max(outs), max(outs))
        for b, (s, o) in enumerate(zip(sides, outs)):
            expected = _pil(np.ascontiguousarray(batch[b, :s, :s]), (o, o), kind)
            np.testing.assert_array_equal(got[b, :o, :o], expected, err_msg=f"{kind} {s}->{o}")
            assert not got[b, o:].any() and not got[b, :, o:].any()  # the padding stays black


@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
def test_one_axis_resizes_equal_pillow(kind: str) -> None:
    rng = np.random.default_rng(2)
    for _ in range(12):
        h, w, o = (int(v) for v in rng.integers(3, 200, 3))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for size in ((h, o), (o, w)):
            got = resize(torch.from_numpy(img[None]), [(h, w)], [size], kind).numpy()[0]
            np.testing.assert_array_equal(got, _pil(img, size, kind))


def test_the_engines_sizes_equal_pillow() -> None:
    """The mask path: a 2s crop up to the parser's 512 (bilinear), the 512 mask back to 2s (bicubic)."""
    rng = np.random.default_rng(3)
    for side in (188, 380, 512, 640):
        crop = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        up = resize(torch.from_numpy(crop[None]), [(side, side)], [(512, 512)], "bilinear").numpy()[0]
        np.testing.assert_array_equal(up, _pil(crop, (512, 512), "bilinear"))
        mask = np.where(rng.random((512, 512)) > 0.6, 255, 0).astype(np.uint8)
        back = resize(torch.from_numpy(mask[None]), [(512, 512)], [(side, side)], "bicubic").numpy()[0]
        np.testing.assert_array_equal(back, _pil(mask, (side, side), "bicubic"))


def test_axis_weights_are_pillows_normalised_fixed_point() -> None:
    one = 1 << PRECISION_BITS
    up = axis_weights(10, 25, "bilinear")
    assert up.shape == (25, 10) and np.abs(up.sum(axis=1) - one).max() <= 2  # rounding of each tap
    down = axis_weights(300, 7, "bicubic")
    assert (down < 0).any()  # bicubic's negative lobes survive the fixed point
    assert np.array_equal(axis_weights(9, 9, "bicubic"), np.eye(9, dtype=np.int64) * one)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize(torch.zeros((1, 4, 4), dtype=torch.float32), [(4, 4)], [(2, 2)], "bilinear")
    with pytest.raises(ValueError, match="one input and one output size"):
        resize(torch.zeros((2, 4, 4), dtype=torch.uint8), [(4, 4)], [(2, 2)], "bilinear")
    with pytest.raises(ValueError, match="positive"):
        axis_weights(0, 3, "bilinear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_equal_the_cpu() -> None:
    rng = np.random.default_rng(4)
    batch = torch.from_numpy(rng.integers(0, 256, (3, 200, 200, 3), dtype=np.uint8))
    sizes, outs = [(200, 200), (150, 150), (90, 90)], [(512, 512), (40, 40), (300, 300)]
    for kind in ("bilinear", "bicubic"):
        cpu = resize(batch, sizes, outs, kind)
        gpu = resize(batch.cuda(), sizes, outs, kind).cpu()
        assert torch.equal(cpu, gpu)
