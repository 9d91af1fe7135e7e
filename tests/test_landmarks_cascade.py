"""Offline cascade backend on real faces (skimage's astronaut), in a real H.264 video, and on face-less images."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data

from musetalk_job.landmarks import detect_boxes, load_detector
from musetalk_job.landmarks.cascade import CascadeDetector, box_from_detection

# Where the astronaut's face is in the 512x512 original (measured by eye): nose tip ~(228, 128),
# chin ~(225, 167), eyes at y ~100.
NOSE = (228, 128)
CHIN_Y = 167


@pytest.fixture(scope="module")
def detector() -> CascadeDetector:
    return load_detector("cascade", None)  # type: ignore[return-value]


def _contains(box: tuple[int, int, int, int], x: float, y: float) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def test_box_rule_by_hand() -> None:
    # detection at (100, 50) of side 100: jaw 108..192, chin 150, nose point 104 -> top 58
    assert box_from_detection(100, 50, 100) == (108, 58, 192, 150)
    assert box_from_detection(100, 50, 100, bbox_shift=4) == (108, 66, 192, 150)
    # clamps: chin to the frame, top to 0
    assert box_from_detection(100, -30, 100, frame_h=60) == (108, 0, 192, 60)
    assert box_from_detection(-20, 50, 100) is None  # x1 < 0 like the official invalid rule


def test_finds_the_astronauts_face(detector: CascadeDetector) -> None:
    img = skimage.data.astronaut()
    (box,) = detect_boxes(img[None], backend="cascade", detector=detector)
    assert box is not None
    assert _contains(box, *NOSE)
    assert abs(box[3] - CHIN_Y) < 15  # the crop ends near the chin
    w, h = box[2] - box[0], box[3] - box[1]
    assert 60 < w < 130 and 60 < h < 130  # face-sized, not the whole picture


def _write_video(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as inp:
        return np.stack([f.to_ndarray(format="rgb24") for f in inp.decode(video=0)])


def test_finds_the_face_in_every_frame_of_a_video(detector: CascadeDetector, tmp_path: Path) -> None:
    img = skimage.data.astronaut()
    offsets = [(10 + i, 90 + 3 * i) for i in range(6)]  # the camera pans: face moves left/up
    frames = np.stack([img[y:y + 240, x:x + 320] for y, x in offsets])
    video = tmp_path / "face.mp4"
    _write_video(video, frames)
    decoded = _read_video(video)
    assert decoded.shape == (6, 240, 320, 3)
    calls: list[tuple[str, int, int]] = []
    boxes = detect_boxes(decoded, backend="cascade", detector=detector, progress=lambda *a: calls.append(a))
    assert calls[-1] == ("landmarks", 6, 6)
    assert all(b is not None for b in boxes)
    for (y, x), box in zip(offsets, boxes):
        assert _contains(box, NOSE[0] - x, NOSE[1] - y)
    # the boxes follow the pan (15 px left over the clip), within detector jitter
    assert boxes[-1][0] < boxes[0][0]


@pytest.mark.parametrize("name", ["coffee", "rocket", "gravel"])
def test_no_face_in_face_less_images(detector: CascadeDetector, name: str) -> None:
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    assert detect_boxes(np.ascontiguousarray(img[None, ..., :3]), backend="cascade", detector=detector) == [None]


def test_blank_and_tiny_frames_have_no_face(detector: CascadeDetector) -> None:
    frames = np.full((2, 120, 160, 3), 128, np.uint8)
    frames[1] = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    assert detector.detect(frames) == [None, None]
    assert detector.detect(np.zeros((1, 10, 12, 3), np.uint8)) == [None]


def test_tracking_agrees_with_full_scans_and_drops_to_none_on_cuts(detector: CascadeDetector) -> None:
    img = skimage.data.astronaut()
    face = [img[10 + i:250 + i, 90 + 3 * i:410 + 3 * i] for i in range(4)]
    blank = np.full_like(face[0], 90)
    frames = np.stack([face[0], face[1], blank, face[2], face[3]])
    tracked = detector.detect(frames)
    assert tracked[2] is None and all(tracked[i] is not None for i in (0, 1, 3, 4))
    for i in (0, 1, 3, 4):
        x, y, s = detector.find_face(frames[i])  # independent full scan
        alone = box_from_detection(x, y, s, frame_w=320, frame_h=240)
        assert max(abs(a - b) for a, b in zip(tracked[i], alone)) <= 12


def test_repeated_frames_are_analysed_once(detector: CascadeDetector) -> None:
    img = skimage.data.astronaut()
    a, b = img[10:250, 90:410], img[14:254, 96:416]
    frames = np.stack([a, a, a, b, b, a])
    calls: list[tuple[str, int, int]] = []
    boxes = detect_boxes(frames, backend="cascade", detector=detector, progress=lambda *x: calls.append(x))
    assert calls[-1] == ("landmarks", 3, 3)  # three distinct runs
    assert boxes[0] == boxes[1] == boxes[2] and boxes[3] == boxes[4]
    assert boxes[3] != boxes[0] and all(bx is not None for bx in boxes)
