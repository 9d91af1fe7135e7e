"""colour.rgb_to_i420 against swscale's BT.601 limited-range bicubic conversion (the CPU path)."""

from __future__ import annotations

import av
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from musetalk_job.colour import rgb_to_i420  # noqa: E402


def _swscale(rgb: np.ndarray) -> np.ndarray:
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return frame.reformat(format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG",
                          interpolation="BICUBIC").to_ndarray()


def _planes(i420: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = i420[:h]
    u = i420[h : h + h // 4].reshape(h // 2, w // 2)
    v = i420[h + h // 4 :].reshape(h // 2, w // 2)
    return y, u, v


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    from skimage import data

    from musetalk_job.samples import _astronaut, _face_frame

    return [data.astronaut(), _face_frame(_astronaut(), 320, 240, 0.3)]


def test_matches_swscale_within_rounding(images: list[np.ndarray]) -> None:
    for img in images:
        h, w = img.shape[:2]
        got = rgb_to_i420(torch.from_numpy(img)[None])[0].numpy()
        want = _swscale(img)
        assert got.shape == want.shape == (h * 3 // 2, w)
        for name, g, r, max_diff, mean_diff in zip("YUV", _planes(got, h, w), _planes(want, h, w), (1, 6, 6), (0.5, 0.25, 0.25)):
            d = np.abs(g.astype(np.int16) - r.astype(np.int16))
            assert d.max() <= max_diff, (name, d.max())
            assert d.mean() <= mean_diff, (name, d.mean())


def test_known_colours_and_batch() -> None:
    # BT.601 limited range: black -> (16, 128, 128), white -> (235, 128, 128), pure red -> (81, 90, 240)
    colours = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0]], dtype=torch.uint8)
    frames = colours.view(3, 1, 1, 3).expand(3, 4, 6, 3).contiguous()
    out = rgb_to_i420(frames).numpy()
    assert out.shape == (3, 6, 6)
    expected = [(16, 128, 128), (235, 128, 128), (81, 90, 240)]
    for k, (y, u, v) in enumerate(expected):
        yy, uu, vv = _planes(out[k], 4, 6)
        assert (yy == y).all() and (uu == u).all() and (vv == v).all(), (k, yy[0, 0], uu[0, 0], vv[0, 0])


def test_odd_sizes_repeat_the_last_row_and_column() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    padded = np.pad(img, ((0, 1), (0, 1), (0, 0)), mode="edge")
    got = rgb_to_i420(torch.from_numpy(img)[None])[0]
    assert got.shape == (9, 8)
    assert torch.equal(got, rgb_to_i420(torch.from_numpy(padded)[None])[0])


def test_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_i420(torch.zeros((1, 4, 4, 3), dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_i420(torch.zeros((4, 4, 3), dtype=torch.uint8))
