"""colour.rgb_to_i420 against swscale's BT.601 limited-range bicubic conversion (the writer's RGB path)."""

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
    flat = i420.reshape(-1)
    n = h * w
    return flat[:n].reshape(h, w), flat[n : n + n // 4].reshape(h // 2, w // 2), flat[n + n // 4 :].reshape(h // 2, w // 2)


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    from skimage import data

    from musetalk_job.samples import _astronaut, _face_frame

    return {
        "astronaut": data.astronaut(),
        "face_320x240": _face_frame(_astronaut(), 320, 240, 0.3),
        "face_1280x720": _face_frame(_astronaut(), 1280, 720, 0.3),
        # Noise: every chroma filter tap matters (a 2x2 mean is off by up to 20 levels here).
        "noise_64x48": np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8),
    }


# Measured (max, mean) |difference| per plane Y, U, V against swscale, this PyAV 18 / torch 2.x:
#   astronaut  (1, 0.004) (1, 0.086) (1, 0.083)    face 320x240 (1, 0.003) (1, 0.095) (1, 0.093)
#   face 720p  (1, 0.004) (1, 0.099) (1, 0.091)    noise 64x48  (1, 0.005) (1, 0.077) (1, 0.099)
@pytest.mark.parametrize("name", ["astronaut", "face_320x240", "face_1280x720", "noise_64x48"])
def test_matches_swscale_within_rounding(images: dict[str, np.ndarray], name: str) -> None:
    img = images[name]
    h, w = img.shape[:2]
    got = rgb_to_i420(torch.from_numpy(img)[None])[0].numpy()
    want = _swscale(img)
    assert got.shape == want.shape == (h * 3 // 2, w)
    for plane, g, r, mean_diff in zip("YUV", _planes(got, h, w), _planes(want, h, w), (0.01, 0.12, 0.12)):
        d = np.abs(g.astype(np.int16) - r.astype(np.int16))
        assert d.max() <= 1, (plane, d.max())
        assert d.mean() <= mean_diff, (plane, d.mean())


def test_batch_equals_frame_by_frame_and_layout_is_what_pyav_takes(images: dict[str, np.ndarray]) -> None:
    a, b = images["face_320x240"], np.ascontiguousarray(images["astronaut"][:240, :320])
    batch = rgb_to_i420(torch.from_numpy(np.stack([a, b])))
    assert batch.shape == (2, 360, 320) and batch.dtype == torch.uint8
    for k, img in enumerate((a, b)):
        assert torch.equal(batch[k], rgb_to_i420(torch.from_numpy(img)[None])[0])
    frame = av.VideoFrame.from_ndarray(batch[0].numpy(), format="yuv420p")
    assert (frame.width, frame.height) == (320, 240)
    back = frame.to_ndarray(format="rgb24", src_colorspace="ITU601", src_color_range="MPEG")
    assert np.abs(back.astype(int) - a.astype(int)).mean() < 3.0  # 4:2:0 round trip of a real picture


def test_known_colours() -> None:
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
    img = rng.integers(0, 256, (15, 21, 3), dtype=np.uint8)
    padded = np.pad(img, ((0, 1), (0, 1), (0, 0)), mode="edge")
    got = rgb_to_i420(torch.from_numpy(img)[None])[0]
    assert got.shape == (24, 22)
    assert torch.equal(got, rgb_to_i420(torch.from_numpy(padded)[None])[0])
    d = np.abs(got.numpy().astype(int) - _swscale(padded).astype(int))  # what the writer's RGB path encodes
    assert d.max() <= 1


def test_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_i420(torch.zeros((1, 4, 4, 3), dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_i420(torch.zeros((4, 4, 3), dtype=torch.uint8))
