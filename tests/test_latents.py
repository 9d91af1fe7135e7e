"""latents.crop_faces: the official LANCZOS4 crop, spread over a thread pool, equals the serial recipe.
latents.LatentStream: rows made chunk by chunk on demand, equal to making them all at once."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from musetalk_job.latents import LatentStream, crop_faces

torch = pytest.importorskip("torch")


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


class _Recorder:
    """crop/encode callables for a LatentStream over ``n`` fake faces: a crop is its indices,
    the "latent" of face i is i + 0.5 in every element; both calls are logged."""

    def __init__(self, n: int, fail_crop_at: int | None = None) -> None:
        self.n, self.fail_crop_at = n, fail_crop_at
        self.crops: list[tuple[int, int]] = []
        self.encodes: list[tuple[int, ...]] = []

    def crop(self, a: int, b: int) -> torch.Tensor:
        self.crops.append((a, b))
        if self.fail_crop_at is not None and a <= self.fail_crop_at < b:
            raise ValueError(f"empty face crop at {self.fail_crop_at}")
        return torch.arange(a, b)

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        self.encodes.append(tuple(crops.tolist()))
        return (crops.float() + 0.5).view(-1, 1, 1, 1).expand(-1, 8, 2, 2).clone()


def _stream(rec: _Recorder, chunk: int, ahead: int = 2) -> LatentStream:
    out = torch.full((rec.n, 8, 2, 2), -1.0)
    return LatentStream(out, rec.crop, rec.encode, chunk, ahead=ahead)


def test_latent_stream_makes_only_the_chunks_asked_for_in_order() -> None:
    rec = _Recorder(10)
    s = _stream(rec, chunk=4)
    s.ensure(3)  # the first chunk covers rows 0..3
    assert rec.encodes == [(0, 1, 2, 3)] and s.rows_done == 4 and not s.done
    assert torch.all(s.out[4:] == -1), "rows not asked for yet must not be written"
    s.ensure(4)  # already there: nothing new
    assert len(rec.encodes) == 1
    s.ensure(5)
    assert rec.encodes[-1] == (4, 5, 6, 7) and s.rows_done == 8
    s.ensure()  # the rest, a ragged last chunk
    assert rec.encodes[-1] == (8, 9) and s.done
    expected = (torch.arange(10).float() + 0.5).view(-1, 1, 1, 1).expand(-1, 8, 2, 2)
    assert torch.equal(s.out, expected)
    assert sorted(rec.crops) == [(0, 4), (4, 8), (8, 10)], "each chunk is cropped exactly once"
    assert s.seconds > 0


def test_latent_stream_crops_ahead_but_no_further_than_asked() -> None:
    rec = _Recorder(40)
    s = _stream(rec, chunk=4, ahead=2).start()
    s.ensure(1)
    # one chunk encoded; the crop thread may be ahead by at most two chunks
    assert len(rec.encodes) == 1
    s.close()
    assert max(b for _, b in rec.crops) <= 12


def test_latent_stream_raises_a_crop_error_when_the_rows_are_needed() -> None:
    rec = _Recorder(12, fail_crop_at=9)
    s = _stream(rec, chunk=4).start()
    s.ensure(8)  # chunks 0 and 1 are fine
    with pytest.raises(ValueError, match="empty face crop at 9"):
        s.ensure()
    assert s.rows_done == 8 and not s.done
    s.close()


def test_an_empty_latent_stream_is_done() -> None:
    rec = _Recorder(0)
    s = _stream(rec, chunk=4).start()
    assert s.done and s.ensure() is s.out and rec.crops == []
