"""Official landmark → box recipe, the boxes file, temporal smoothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from musetalk_job.errors import InputMediaError
from musetalk_job.landmarks.boxes import bbox_from_landmarks, read_boxes_file, smooth_boxes, write_boxes_file


def _face(nose_y: int = 120, chin_y: int = 180, left: int = 60, right: int = 140) -> np.ndarray:
    """68 hand-placed iBUG points: jaw 0..16 from (left, 80) down to the chin and up to (right, 80)."""
    lm = np.zeros((68, 2), np.int32)
    mid = (left + right) // 2
    for i in range(17):  # jaw: a V through the chin
        t = abs(i - 8) / 8
        lm[i] = (left + (right - left) * i // 16, int(chin_y - (chin_y - 80) * t))
    lm[17:27] = [(mid - 30 + 6 * i, 70) for i in range(10)]  # brows
    lm[27:31] = [(mid, 90), (mid, 100), (mid, nose_y), (mid, nose_y + 8)]  # nose bridge; 29 = nose point
    lm[31:36] = [(mid - 10 + 5 * i, nose_y + 12) for i in range(5)]
    lm[36:48] = [(mid - 25 + 4 * i, 88) for i in range(12)]  # eyes
    lm[48:68] = [(mid - 20 + 2 * i, 150) for i in range(20)]  # mouth
    return lm


def test_bbox_recipe_on_hand_placed_landmarks() -> None:
    lm = _face(nose_y=120, chin_y=180, left=60, right=140)
    # x range 60..140, chin 180, nose 120 -> half height 60 -> top 60
    assert bbox_from_landmarks(lm) == (60, 60, 140, 180)
    # bbox_shift moves the nose point (v1 only): 125 -> half 55 -> top 70
    assert bbox_from_landmarks(lm, bbox_shift=5) == (60, 70, 140, 180)
    assert bbox_from_landmarks(lm, bbox_shift=-10) == (60, 40, 140, 180)
    out = bbox_from_landmarks(lm)
    assert all(type(v) is int for v in out)


def test_bbox_recipe_clamps_top_and_rejects_invalid_boxes() -> None:
    # nose high above the chin: 180 - 50 = 130 above the nose -> -80, clamped to 0 (PR #329)
    assert bbox_from_landmarks(_face(nose_y=50, chin_y=180)) == (60, 0, 140, 180)
    # x1 < 0 -> invalid (official falls back to S3FD; we give None)
    assert bbox_from_landmarks(_face(left=-3)) is None
    # zero width -> invalid
    flat = _face()
    flat[:, 0] = 77
    assert bbox_from_landmarks(flat) is None
    # nose point below the chin (huge bbox_shift) -> y2 - y1 <= 0
    assert bbox_from_landmarks(_face(), bbox_shift=100) is None
    with pytest.raises(ValueError):
        bbox_from_landmarks(np.zeros((5, 2)))


def test_boxes_file_round_trip(tmp_path: Path) -> None:
    boxes = [(1, 2, 30, 40), None, (5, 6, 70, 80)]
    path = write_boxes_file(tmp_path / "sub" / "b.json", boxes)
    doc = json.loads(path.read_text())
    assert doc == {"format": "musetalk-job/boxes", "version": 1, "frames": [[1, 2, 30, 40], None, [5, 6, 70, 80]]}
    assert read_boxes_file(path, 3) == boxes


@pytest.mark.parametrize(
    "content, n, words",
    [
        ("not json", 1, "not valid JSON"),
        (json.dumps([1, 2]), 1, "JSON object"),
        (json.dumps({"format": "other", "version": 1, "frames": []}), 0, "'format'"),
        (json.dumps({"format": "musetalk-job/boxes", "version": 2, "frames": []}), 0, "'version'"),
        (json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": {}}), 0, "'frames'"),
        (json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": [None]}), 2, "has 1 frame entries but the video has 2"),
        (json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": [[1, 2, 3.5, 4]]}), 1, "frame 0"),
        (json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": [[1, 2, 3]]}), 1, "frame 0"),
        (json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": [None, [True, 2, 3, 4]]}), 2, "frame 1"),
        (json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": [[-1, 2, 30, 40]]}), 1, "invalid"),
        (json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": [[10, 2, 5, 40]]}), 1, "invalid"),
    ],
)
def test_bad_boxes_files_name_the_file_and_the_problem(tmp_path: Path, content: str, n: int, words: str) -> None:
    path = tmp_path / "mine.json"
    path.write_text(content)
    with pytest.raises(InputMediaError) as err:
        read_boxes_file(path, n)
    assert "mine.json" in err.value.message and words in err.value.message
    assert err.value.exit_code == 3


def test_missing_boxes_file(tmp_path: Path) -> None:
    with pytest.raises(InputMediaError, match="nothere.json"):
        read_boxes_file(tmp_path / "nothere.json", 1)


@pytest.mark.parametrize("method", ["savgol", "one-euro"])
def test_smoothing_reduces_jitter_and_keeps_gaps(method: str) -> None:
    rng = np.random.default_rng(0)
    n = 40
    truth = np.stack([np.linspace(100, 120, n), np.full(n, 50.0), np.linspace(200, 220, n), np.full(n, 180.0)], 1)
    noisy = np.rint(truth + rng.normal(0, 3, truth.shape)).astype(int)
    boxes = [tuple(int(v) for v in row) for row in noisy]
    boxes[10] = None
    boxes[25] = None
    out = smooth_boxes(boxes, method=method)
    assert len(out) == n
    assert [i for i, b in enumerate(out) if b is None] == [10, 25]
    assert all(all(type(v) is int for v in b) for b in out if b is not None)
    keep = [i for i in range(n) if boxes[i] is not None]
    err_in = np.abs(np.array([boxes[i] for i in keep]) - truth[keep]).mean()
    err_out = np.abs(np.array([out[i] for i in keep]) - truth[keep]).mean()
    assert err_out < 0.8 * err_in
    # a steady box stays exactly where it is
    steady = [(10, 20, 110, 140)] * 12
    assert smooth_boxes(steady, method=method) == steady


def test_smoothing_short_runs_and_validity() -> None:
    assert smooth_boxes([None, (1, 2, 3, 4), None]) == [None, (1, 2, 3, 4), None]
    assert smooth_boxes([]) == []
    out = smooth_boxes([(0, 0, 1, 1), (0, 0, 1, 1), (5, 5, 6, 6)], method="savgol")
    assert all(b[0] < b[2] and b[1] < b[3] and b[0] >= 0 and b[1] >= 0 for b in out)
    with pytest.raises(ValueError):
        smooth_boxes([(0, 0, 1, 1)], method="kalman")  # type: ignore[arg-type]
