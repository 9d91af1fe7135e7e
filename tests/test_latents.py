"""latents.crop_faces: the official LANCZOS4 crop, spread over a thread pool, equals the serial recipe."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from musetalk_job.latents import crop_faces


def test_parallel_crops_equal_the_serial_official_recipe() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(40, 120, 160, 3), dtype=np.uint8)
    boxes = [(int(rng.integers(0, 60)), int(rng.integers(0, 40)), 0, 0) for _ in range(40)]
    boxes = [(x1, y1, x1 + 30 + k, y1 + 50 + k % 7) for k, (x1, y1, _, _) in enumerate(boxes)]
    out = crop_faces(frames, boxes)
    assert out.shape == (40, 256, 256, 3) and out.dtype == np.uint8
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        expected = cv2.resize(frames[k][y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
        assert np.array_equal(out[k], expected), k


def test_empty_box_is_an_error() -> None:
    frames = np.zeros((2, 50, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="empty face crop"):
        crop_faces(frames, [(0, 0, 10, 10), (5, 5, 5, 20)])
