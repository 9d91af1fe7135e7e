"""mmpose top-down recipe: warp maths, SimCC decoding, the COCO-WholeBody flip table."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from musetalk_job.landmarks import topdown


def test_whole_frame_box_and_warp_matrix_by_hand() -> None:
    # 1920x1080 frame: box scale (2400, 1350) padded, widened in h to aspect 0.75 -> (2400, 3200).
    center, scale = topdown.frame_center_scale(1920, 1080)
    assert center.tolist() == [960.0, 540.0]
    assert scale.tolist() == [2400.0, 3200.0]
    mat = topdown.warp_matrix(center, scale)
    # input = (frame - (centre - scale/2)) * 288/2400 = (x + 240) * 0.12, (y + 1060) * 0.12
    np.testing.assert_allclose(mat, [[0.12, 0.0, 28.8], [0.0, 0.12, 127.2]], atol=1e-5)
    # portrait frame: width is the short side -> scale grows in w
    center, scale = topdown.frame_center_scale(300, 1000)
    assert scale.tolist() == pytest.approx([937.5, 1250.0])


def test_fix_aspect_ratio_grows_the_short_side() -> None:
    wide = topdown.fix_aspect_ratio(np.array([400.0, 100.0]), 0.75)
    tall = topdown.fix_aspect_ratio(np.array([30.0, 400.0]), 0.75)
    assert wide.tolist() == pytest.approx([400.0, 400.0 / 0.75])
    assert tall.tolist() == pytest.approx([300.0, 400.0])


@pytest.mark.parametrize("size", [(1920, 1080), (320, 240), (720, 1280), (97, 61)])
def test_warp_and_inverse_round_trip_points(size: tuple[int, int]) -> None:
    center, scale = topdown.frame_center_scale(*size)
    fwd = topdown.warp_matrix(center, scale)
    inv = topdown.warp_matrix(center, scale, inverse=True)
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 1, (50, 2)) * np.array(size)
    back = topdown.transform_points(topdown.transform_points(pts, fwd), inv)
    np.testing.assert_allclose(back, pts, atol=1e-3)
    # the frame centre lands in the middle of the 288x384 input
    np.testing.assert_allclose(topdown.transform_points(center, fwd), [144.0, 192.0], atol=1e-4)
    # mmpose's linear map back to the frame agrees with the inverse affine matrix
    inp = rng.uniform(0, 1, (50, 2)) * np.array(topdown.INPUT_SIZE)
    np.testing.assert_allclose(topdown.keypoints_to_frame(inp, center, scale), topdown.transform_points(inp, inv), rtol=1e-5, atol=2e-3)


def test_warped_frame_shows_a_dot_where_the_matrix_says() -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    cv2.circle(frame, (400, 150), 6, (255, 255, 255), -1)
    center, scale = topdown.frame_center_scale(640, 480)
    mat = topdown.warp_matrix(center, scale)
    warped = topdown.warp_frames(frame[None], mat)
    assert warped.shape == (1, 384, 288, 3) and warped.dtype == np.uint8
    ys, xs = np.nonzero(warped[0, :, :, 0] > 64)
    expect = topdown.transform_points([400.0, 150.0], mat)
    assert abs(xs.mean() - expect[0]) < 1.0 and abs(ys.mean() - expect[1]) < 1.0
    # outside the frame the border is black
    assert warped[0, 0, 0].tolist() == [0, 0, 0]


def test_simcc_decoding_of_known_peaks_gives_known_pixels() -> None:
    k = topdown.NUM_KEYPOINTS
    sx = torch.full((2, k, 576), -0.5)
    sy = torch.full((2, k, 768), -0.5)
    bins_x = torch.randint(0, 576, (2, k))
    bins_y = torch.randint(0, 768, (2, k))
    peak_x = torch.rand(2, k) + 0.1
    peak_y = torch.rand(2, k) + 0.1
    sx.scatter_(2, bins_x[..., None], peak_x[..., None])
    sy.scatter_(2, bins_y[..., None], peak_y[..., None])
    # keypoint 5 of image 1 has a non-positive maximum: mmpose marks it -1 before scaling
    sx[1, 5] = -0.2
    locs, scores = topdown.decode_simcc(sx, sy)
    expect = torch.stack([bins_x, bins_y], -1).float() / 2.0
    expect[1, 5] = -0.5
    assert torch.equal(locs, expect)
    want_scores = torch.minimum(peak_x, peak_y)
    want_scores[1, 5] = -0.2
    assert torch.allclose(scores, want_scores)
    # back to a 640x480 frame: centre (320,240), scale (800, 800/0.75)
    center, scale = topdown.frame_center_scale(640, 480)
    frame_pts = topdown.keypoints_to_frame(locs.numpy(), center, scale)
    x_in, y_in = float(locs[0, 0, 0]), float(locs[0, 0, 1])
    assert frame_pts[0, 0, 0] == pytest.approx(x_in / 288 * 800 + 320 - 400, abs=1e-3)
    assert frame_pts[0, 0, 1] == pytest.approx(y_in / 384 * (800 / 0.75) + 240 - 400 / 0.75, abs=1e-3)
    assert frame_pts.dtype == np.float64  # mmpose's numpy promotion; official truncates this to int


def test_flip_table_is_an_involution_that_swaps_left_and_right() -> None:
    flip = topdown.flip_indices()
    assert len(flip) == 133 and sorted(flip) == list(range(133))
    assert all(flip[flip[i]] == i for i in range(133))
    assert flip[0] == 0  # nose
    assert (flip[1], flip[3]) == (2, 4)  # eyes, ears
    assert (flip[5], flip[9], flip[15]) == (6, 10, 16)  # shoulders, wrists, ankles
    assert (flip[17], flip[19]) == (20, 22)  # feet
    assert all(flip[91 + i] == 112 + i for i in range(21))  # hands
    face = 23
    assert all(flip[face + i] == face + 16 - i for i in range(17))  # jaw contour, chin (8) fixed
    assert all(flip[face + i] == face + i for i in (27, 28, 29, 30, 33, 51, 57, 62, 66))  # midline
    assert flip[face + 36] == face + 45 and flip[face + 39] == face + 42  # eye corners
    assert flip[face + 17] == face + 26  # brows
    assert flip[face + 48] == face + 54 and flip[face + 60] == face + 64  # mouth corners
    # only the midline stays put: nose, chin, nose bridge 27-30, nose tip 33, lip centres 51/57/62/66
    assert sorted(i for i in range(133) if flip[i] == i) == [0] + [face + i for i in (8, 27, 28, 29, 30, 33, 51, 57, 62, 66)]


def test_flip_simcc_mirrors_bins_and_swaps_pairs() -> None:
    flip = topdown.flip_indices()
    sx = torch.zeros(1, 133, 576)
    sy = torch.zeros(1, 133, 768)
    sx[0, 1, 100] = 1.0  # left eye seen at x-bin 100 in the mirrored image
    sy[0, 1, 300] = 1.0
    fx, fy = topdown.flip_simcc(sx, sy, flip)
    assert int(fx[0, 2].argmax()) == 575 - 100  # becomes the right eye, mirrored
    assert int(fy[0, 2].argmax()) == 300
    assert float(fx[0, 1].abs().sum()) == 0.0
