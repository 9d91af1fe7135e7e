"""End-to-end tests of the engine orchestrator on CPU with tiny random weights and real media.

The model weights are random, so the generated mouth region is noise; what these tests pin down
is everything around it: frame counts and timing, ping-pong frame reuse, that nothing outside the
face boxes is touched, that face-less frames pass through, box sources, errors, cancel, batching.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import wave
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from musetalk_job.errors import Cancelled, InputMediaError, SpecError  # noqa: E402
from musetalk_job.options import EngineOptions  # noqa: E402
from musetalk_job.pipeline import Pipeline, pingpong_indices, used_input_frames  # noqa: E402

NO_FACE = (5, 6)  # the face_video fixture's face-less frames


# ---------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("n_in,n_out", [(1, 5), (3, 14), (4, 3), (30, 50), (7, 7)])
def test_pingpong_indices_cycle_forward_then_backward(n_in: int, n_out: int) -> None:
    cycle = list(range(n_in)) + list(reversed(range(n_in)))  # L + reversed(L), as upstream builds it
    expected = list(itertools.islice(itertools.cycle(cycle), n_out))
    assert pingpong_indices(n_out, n_in).tolist() == expected


def test_used_input_frames_is_prefix_when_audio_is_short() -> None:
    assert used_input_frames(10, 30) == 10
    assert used_input_frames(50, 30) == 30
    # every index pingpong produces lies inside the used prefix
    for n_out, n_in in [(10, 30), (50, 30), (61, 30)]:
        assert pingpong_indices(n_out, n_in).max() < used_input_frames(n_out, n_in)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipe(tiny_models_dir: Path) -> Pipeline:
    return Pipeline.from_models_dir(tiny_models_dir, device="cpu", version="v15")


@pytest.fixture(scope="module")
def frames_in(face_video: Path) -> tuple[np.ndarray, float]:
    from musetalk_job.media import read_frames

    vf = read_frames(face_video)
    return vf.frames, vf.fps


@pytest.fixture(scope="module")
def boxes_file(tmp_path_factory: pytest.TempPathFactory, frames_in: tuple[np.ndarray, float]) -> Path:
    """A hand-made boxes file: one fixed box around the astronaut's face, none on frames 5 and 6."""
    from musetalk_job.landmarks.boxes import write_boxes_file

    frames, _ = frames_in
    h, w = frames.shape[1:3]
    box = (w // 3, h // 6, w // 3 + w // 4, h // 6 + h // 3)
    boxes = [None if i in NO_FACE else box for i in range(frames.shape[0])]
    path = tmp_path_factory.mktemp("boxes") / "boxes.json"
    write_boxes_file(path, boxes)
    return path


def _wav_slice(src: Path, dst: Path, seconds: float) -> Path:
    with wave.open(str(src), "rb") as r:
        params = r.getparams()
        data = r.readframes(int(seconds * params.framerate))
    with wave.open(str(dst), "wb") as wr:
        wr.setparams(params)
        wr.writeframes(data)
    return dst


def _audio_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as r:
        return r.getnframes() / r.getframerate()


def _read(path: Path) -> np.ndarray:
    from musetalk_job.media import read_frames

    return read_frames(path).frames


def _run_with(pipe: Pipeline, attr: str, value: object, video: Path, audio: Path, out: Path, options: EngineOptions) -> np.ndarray:
    """The frames of ``pipe.run`` with the pipeline switch ``attr`` set to ``value`` (restored after)."""
    saved = getattr(pipe, attr)
    setattr(pipe, attr, value)
    try:
        return _read(pipe.run(video, audio, out, options).output)
    finally:
        setattr(pipe, attr, saved)


def _blend_box(box: tuple[int, int, int, int], height: int, margin: int = 10) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return x1, y1, x2, min(height, y2 + margin)


@pytest.fixture(scope="module")
def lossless_run(pipe: Pipeline, face_video: Path, speech_wav: Path, boxes_file: Path, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("out") / "lossless.mkv"
    opts = EngineOptions(boxes_file=boxes_file, codec="ffv1", batch_size=4)
    stages: list[str] = []
    result = pipe.run(face_video, speech_wav, out, opts, progress=lambda s, d, t: stages.append(s))
    return result, out, stages


# ---------------------------------------------------------------------------- end to end


def test_output_length_follows_audio(lossless_run, speech_wav: Path, frames_in) -> None:
    from musetalk_job.media import probe

    result, out, _ = lossless_run
    _, fps = frames_in
    audio_s = _audio_seconds(speech_wav)
    expected = int(np.floor(audio_s * fps))
    assert result.frames == expected
    assert _read(out).shape[0] == expected
    info = probe(out)
    assert info.has_audio and info.has_video
    assert info.fps == pytest.approx(fps, rel=1e-3)
    assert info.duration_s == pytest.approx(audio_s, abs=0.1)
    assert result.input_frames == frames_in[0].shape[0]
    assert result.frames_with_face == frames_in[0].shape[0] - len(NO_FACE)


def test_only_the_face_box_changes_and_faceless_frames_pass_through(lossless_run, frames_in) -> None:
    result, out, _ = lossless_run
    frames, _ = frames_in
    got = _read(out)
    n, h = frames.shape[0], frames.shape[1]
    src = pingpong_indices(got.shape[0], n)
    assert got.shape[0] > n  # the audio outlasts the video: frames are reused backwards
    changed_inside = 0
    for i, j in enumerate(src):
        expected = frames[j]
        box = result.boxes[j]
        if box is None:
            assert j in NO_FACE
            np.testing.assert_array_equal(got[i], expected, err_msg=f"face-less output frame {i} was modified")
            continue
        x1, y1, x2, y2 = _blend_box(tuple(box), h)
        outside = np.ones(expected.shape[:2], dtype=bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(got[i][outside], expected[outside], err_msg=f"output frame {i} changed outside its box")
        changed_inside += int((got[i][~outside] != expected[~outside]).any())
    assert changed_inside > 0.9 * (got.shape[0] - sum(1 for j in src if j in NO_FACE))


def test_result_reports_stages_and_boxes(lossless_run, boxes_file: Path) -> None:
    result, _, stages = lossless_run
    assert set(result.stage_seconds) == {"decode", "landmarks", "latents", "audio", "generate", "blend", "encode"}
    assert all(v >= 0 for v in result.stage_seconds.values())
    assert result.stage_seconds["generate"] > 0
    assert result.boxes == json.loads(boxes_file.read_text())["frames"]
    assert result.device == "cpu" and result.dtype == "float32" and result.batch_size == 4
    assert {"decode", "generate", "encode"} <= set(stages)
    json.dumps(result.stats())


def test_batch_size_and_padding_do_not_change_the_output(pipe, face_video, speech_wav, boxes_file, tmp_path) -> None:
    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.5)  # 12 frames, 10 with a face
    outputs = []
    # (batch, padded): 1 frame at a time; batches 5+5+2 (face-less frames 5, 6 inside one);
    # one batch of 12 whose 10 faces are padded to 14 and VAE-encode chunks 7+3 padded to 7+4.
    for batch, pad in ((1, False), (5, False), (14, True)):
        pipe.pad_batches = pad
        try:
            r = pipe.run(face_video, short, tmp_path / f"b{batch}.mkv", EngineOptions(boxes_file=boxes_file, codec="ffv1", batch_size=batch))
        finally:
            pipe.pad_batches = False
        outputs.append(_read(r.output))
    assert outputs[0].shape[0] == 12
    for other in outputs[1:]:
        assert other.shape == outputs[0].shape
        # oneDNN may pick a different convolution blocking per batch shape: allow float rounding
        # to flip a rare pixel by one level, nothing more (a batching bug would change whole faces).
        diff = np.abs(outputs[0].astype(np.int16) - other.astype(np.int16))
        assert diff.max() <= 1
        assert (diff > 0).mean() < 1e-4


def test_device_colour_hand_off_matches_the_writer_conversion(pipe, face_video, speech_wav, boxes_file, tmp_path) -> None:
    """The CUDA default (I420 converted by the engine, colour.rgb_to_i420) against the CPU default
    (RGB converted by swscale in the writer): same frames within colour rounding, at crf 0."""
    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.4)
    assert pipe.device_colour is False  # CPU default
    outs = []
    for dev_colour in (False, True):
        pipe.device_colour = dev_colour
        try:
            r = pipe.run(face_video, short, tmp_path / f"c{int(dev_colour)}.mp4",
                         EngineOptions(boxes_file=boxes_file, batch_size=4, crf=0))
        finally:
            pipe.device_colour = False
        outs.append(_read(r.output))
    assert outs[0].shape == outs[1].shape and outs[0].shape[0] == 10
    diff = np.abs(outs[0].astype(np.int16) - outs[1].astype(np.int16))
    assert diff.mean() < 0.5 and diff.max() <= 6, (diff.mean(), diff.max())


def test_short_audio_analyses_only_the_frames_it_uses(pipe, face_video, speech_wav, frames_in, tmp_path) -> None:
    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.3)  # 7 output frames < 30 input frames
    result = pipe.run(face_video, short, tmp_path / "o.mp4", EngineOptions(landmarks="cascade", batch_size=3))
    assert result.frames == 7
    assert all(b is None for b in result.boxes[7:])
    assert any(b is not None for b in result.boxes[:7])
    assert _read(result.output).shape[0] == 7


def test_cascade_landmarks_and_save_boxes(pipe, face_video, speech_wav, frames_in, tmp_path) -> None:
    from musetalk_job.landmarks.boxes import read_boxes_file

    n = frames_in[0].shape[0]
    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.3)  # uses 7 frames, but save_boxes needs all
    saved = tmp_path / "saved.json"
    result = pipe.run(
        face_video, short, tmp_path / "o.mp4", EngineOptions(landmarks="cascade", save_boxes=saved, batch_size=4)
    )
    boxes = read_boxes_file(saved, n)
    assert len(json.loads(saved.read_text())["frames"]) == n
    assert [b is None for b in boxes] == [i in NO_FACE for i in range(n)]
    assert [None if b is None else list(b) for b in boxes] == result.boxes
    # the saved file drives a landmark-free run to the same boxes
    again = pipe.run(face_video, short, tmp_path / "o2.mp4", EngineOptions(boxes_file=saved, batch_size=4))
    assert again.boxes[:7] == result.boxes[:7]


def test_video_without_a_face_is_rejected(pipe, speech_wav, tmp_path) -> None:
    from musetalk_job.samples import make_face_video

    from musetalk_job.landmarks import detect_boxes
    from musetalk_job.media import read_frames

    video = make_face_video(tmp_path / "none.mp4", seconds=0.4, fps=25.0, size=(160, 120), no_face_frames=range(10))
    found = detect_boxes(read_frames(video).frames, backend="cascade", detector=pipe.detector("cascade"))
    assert found == [None] * len(found), found  # the input really has no face
    with pytest.raises(InputMediaError, match="no face found"):
        pipe.run(video, speech_wav, tmp_path / "o.mp4", EngineOptions(landmarks="cascade"))
    assert not (tmp_path / "o.mp4").exists()


def test_audio_shorter_than_one_frame_is_rejected(pipe, face_video, speech_wav, boxes_file, tmp_path) -> None:
    tiny = _wav_slice(speech_wav, tmp_path / "tiny.wav", 0.02)
    with pytest.raises(InputMediaError, match="too short"):
        pipe.run(face_video, tiny, tmp_path / "o.mp4", EngineOptions(boxes_file=boxes_file))


def test_cancel_between_batches(pipe, face_video, speech_wav, boxes_file, tmp_path) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "generate":
            seen.append(done)
            cancel.set()

    out = tmp_path / "o.mp4"
    with pytest.raises(Cancelled):
        pipe.run(face_video, speech_wav, out, EngineOptions(boxes_file=boxes_file, batch_size=2), progress=progress, cancel=cancel)
    assert seen == [2]  # stopped right after the first batch


class _ExplodingParser(torch.nn.Module):
    """The real parser for its first ``good`` calls, then an error (a mask thread failing mid-job)."""

    def __init__(self, inner: torch.nn.Module, good: int) -> None:
        super().__init__()
        self.inner, self.good, self.calls = inner, good, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.good:
            raise RuntimeError("parser exploded")
        return self.inner(x)


def test_a_failing_mask_thread_fails_the_job_cleanly(pipe, face_video, speech_wav, boxes_file, tmp_path, monkeypatch) -> None:
    from musetalk_job.errors import EngineRuntimeError

    parser = _ExplodingParser(pipe.models.bisenet, good=1)
    monkeypatch.setattr(pipe.models, "bisenet", parser)
    out = tmp_path / "o.mp4"
    with pytest.raises(EngineRuntimeError, match=r"blend masks \(face parsing\) failed: RuntimeError: parser exploded"):
        pipe.run(face_video, speech_wav, out, EngineOptions(boxes_file=boxes_file, batch_size=2))
    assert parser.calls == 2
    assert not out.exists(), "a failed job must not leave a partial output"


def test_masks_overlap_generation_and_stop_with_a_cancelled_job(pipe, face_video, speech_wav, boxes_file, tmp_path, monkeypatch) -> None:
    """The generate loop starts before every mask exists, and a job that ends early stops the mask thread."""
    from musetalk_job.blending import MaskStream

    release = threading.Event()
    real = pipe.models.bisenet

    class SlowParser(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = real, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 1:
                release.wait(10)  # later chunks wait until the test has seen a generated batch
            return self.inner(x)

    parser = SlowParser()
    monkeypatch.setattr(pipe.models, "bisenet", parser)
    seen: dict = {}
    cancel = threading.Event()
    made: list = []
    real_prepare = pipe.prepare_video

    def prepare(*a, **k):
        prep = real_prepare(*a, **k)
        made.append(prep)
        return prep

    monkeypatch.setattr(pipe, "prepare_video", prepare)

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "generate" and "first" not in seen:
            seen["first"] = done
            seen["masks_done_then"] = made[0].masks.done
            cancel.set()
            release.set()

    with pytest.raises(Cancelled):
        pipe.run(face_video, speech_wav, tmp_path / "o.mp4", EngineOptions(boxes_file=boxes_file, batch_size=2),
                 progress=progress, cancel=cancel)
    assert seen["first"] == 2 and seen["masks_done_then"] is False  # generated while masks were still being made
    stream = made[0].masks
    assert isinstance(stream, MaskStream) and stream.stop.is_set()
    calls = parser.calls
    time.sleep(0.5)
    assert parser.calls <= calls + 1, "the mask thread kept parsing after the job ended"
    assert not stream.done


def _oom_once(real, calls: list):
    def flaky(x, *a, **k):
        calls.append(int(x.shape[0]))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return real(x, *a, **k)

    return flaky


@pytest.mark.parametrize("where", ["vae_encode", "unet"])
def test_out_of_memory_halves_the_batch_and_the_job_goes_on(pipe, face_video, speech_wav, boxes_file, tmp_path, monkeypatch, where) -> None:
    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.4)  # 10 frames
    opts = EngineOptions(boxes_file=boxes_file, codec="ffv1", batch_size=4)
    ref = pipe.run(face_video, short, tmp_path / "ref.mkv", opts)
    calls: list[int] = []
    if where == "vae_encode":
        monkeypatch.setattr(pipe.models.vae, "encode", _oom_once(pipe.models.vae.encode, calls))
    else:
        monkeypatch.setattr(pipe.models.unet, "forward", _oom_once(pipe.models.unet.forward, calls))
    result = pipe.run(face_video, short, tmp_path / "oom.mkv", opts)
    # encode: 2 crops (4 images, masked + full) per call, then 1 crop; UNet: batch 4, then 2.
    assert calls[:2] == [4, 2]
    assert result.frames == ref.frames == 10
    if where == "unet":
        assert result.batch_size == 2
    a, b = _read(ref.output), _read(result.output)
    assert a.shape == b.shape
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1  # fp32 CPU, other batch sizes


def test_avatar_cache_hit_reuses_preparation_and_gives_the_same_video(
    pipe, face_video, speech_wav, tmp_path
) -> None:
    from musetalk_job.cache import AvatarCache

    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.4)  # 10 frames
    opts = EngineOptions(landmarks="cascade", codec="ffv1", batch_size=4, save_boxes=tmp_path / "saved1.json")
    pipe.avatar_cache = AvatarCache(tmp_path / "cache")
    try:
        first = pipe.run(face_video, short, tmp_path / "a.mkv", opts)
        assert len(list((tmp_path / "cache").iterdir())) == 1  # the miss stored one entry
        second = pipe.run(face_video, short, tmp_path / "b.mkv", replace(opts, save_boxes=tmp_path / "saved2.json"))
    finally:
        pipe.avatar_cache = None
    assert first.stage_seconds["latents"] > 0
    assert second.stage_seconds["latents"] == 0.0  # served from the cache: no VAE encode, no masks
    assert second.boxes == first.boxes
    assert (tmp_path / "saved2.json").read_text() == (tmp_path / "saved1.json").read_text()
    np.testing.assert_array_equal(_read(first.output), _read(second.output))


def test_frames_used_while_decoding_give_the_same_video(pipe, face_video, speech_wav, boxes_file, tmp_path, monkeypatch) -> None:
    """The default (crops, VAE encode and masks read each frame as soon as it is decoded) against
    decoding every frame first: the same lossless output, and every pixel read waited for its rows."""
    from musetalk_job import media

    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.6)  # 15 frames
    waits: list[int] = []
    real_wait = media.FrameStream.wait
    monkeypatch.setattr(media.FrameStream, "wait", lambda self, k: (waits.append(k), real_wait(self, k))[1])
    outputs = []
    for streamed in (True, False):
        opts = EngineOptions(boxes_file=boxes_file, codec="ffv1", batch_size=4)
        outputs.append(_run_with(pipe, "stream_decode", streamed, face_video, short, tmp_path / f"s{int(streamed)}.mkv", opts))
        if streamed:
            # The crops and the masks each waited, chunk by chunk, up to the last used frame.
            assert max(waits) == 15 and len(waits) >= 4
            n_streamed = len(waits)
    assert len(waits) == n_streamed  # decoding everything first never waits
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("kind", ["truncated", "vfr"])
def test_a_file_that_breaks_its_header_is_prepared_again(pipe, face_video, speech_wav, tmp_path, caplog, kind) -> None:
    """An MP4 whose sample table states more frames than decode (a damaged tail), or whose timing
    is variable (resampled to a constant rate): the work done on the predicted frames is redone on
    the real ones, and the video is the one made from the frames decoded first. With a damaged
    tail the boxes file has the real count, so the predicted preparation fails on it: that error
    is not the job's."""
    import logging
    import subprocess

    from musetalk_job.landmarks.boxes import write_boxes_file
    from musetalk_job.media import read_frames

    ffmpeg = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
    video = tmp_path / f"{kind}.mp4"
    if kind == "truncated":
        data = face_video.read_bytes()  # the engine's MP4s are faststart: the sample table comes first
        video.write_bytes(data[: len(data) * 3 // 5])
    else:
        subprocess.run([*ffmpeg, "-i", str(face_video), "-vf", "setpts='PTS+gte(N,15)*0.2/TB'", "-fps_mode", "vfr",
                        "-c:v", "libx264", "-crf", "10", str(video)], check=True)
    decoded = read_frames(video).frames
    h, w = decoded.shape[1:3]
    box = (w // 3, h // 6, w // 3 + w // 4, h // 6 + h // 3)
    boxes = tmp_path / "boxes.json"
    write_boxes_file(boxes, [box] * decoded.shape[0])
    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.4)
    opts = EngineOptions(boxes_file=boxes, codec="ffv1", batch_size=4)
    with caplog.at_level(logging.INFO, logger="musetalk_job.pipeline"):
        streamed = pipe.run(video, short, tmp_path / "streamed.mkv", opts)
    assert "preparing them again" in caplog.text
    pipe.stream_decode = False
    try:
        plain = pipe.run(video, short, tmp_path / "plain.mkv", opts)
    finally:
        pipe.stream_decode = True
    assert streamed.input_frames == plain.input_frames == decoded.shape[0]
    if kind == "truncated":
        assert decoded.shape[0] < 30
    np.testing.assert_array_equal(_read(streamed.output), _read(plain.output))


def test_a_cache_hit_renders_frames_while_they_decode(pipe, face_video, speech_wav, tmp_path, monkeypatch) -> None:
    """After an avatar cache hit nothing reads the pixels before the generate loop: it waits for
    the rows each batch needs. The video equals a hit's that decoded every frame first."""
    from musetalk_job import media
    from musetalk_job.cache import AvatarCache

    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.8)  # 20 frames, batches of 4
    opts = EngineOptions(landmarks="cascade", codec="ffv1", batch_size=4)
    waits: list[int] = []
    real_wait = media.FrameStream.wait
    pipe.avatar_cache = AvatarCache(tmp_path / "cache")
    try:
        pipe.run(face_video, short, tmp_path / "miss.mkv", opts)
        monkeypatch.setattr(media.FrameStream, "wait", lambda self, k: (waits.append(k), real_wait(self, k))[1])
        streamed = pipe.run(face_video, short, tmp_path / "hit.mkv", opts)
        pipe.stream_decode = False
        plain = pipe.run(face_video, short, tmp_path / "hit_plain.mkv", opts)
    finally:
        pipe.avatar_cache = None
        pipe.stream_decode = True
    assert streamed.stage_seconds["latents"] == plain.stage_seconds["latents"] == 0.0  # both hits
    assert waits == [4, 8, 12, 16, 20]  # one wait per batch, for the rows that batch shows
    np.testing.assert_array_equal(_read(streamed.output), _read(plain.output))


def test_a_cache_hit_on_a_file_that_breaks_its_header_renders_again(pipe, face_video, speech_wav, tmp_path, caplog) -> None:
    """A variable-frame-rate MP4 whose header count is the resampled count: the cache hit renders
    the frames as they decode, finds at the end that the file was resampled, throws that video
    away and renders again from the decoded frames."""
    import logging
    import subprocess

    from musetalk_job.cache import AvatarCache
    from musetalk_job.media import FrameStream

    video = tmp_path / "vfr.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(face_video), "-vf",
                    "setpts='PTS+gte(N,10)*0.04/TB-gte(N,20)*0.04/TB'", "-fps_mode", "vfr", "-c:v", "libx264",
                    "-crf", "10", str(video)], check=True)
    stream = FrameStream(video)
    predicted, decoded = stream.first(), stream.result().frames
    assert predicted is not None and predicted.shape == decoded.shape and not stream.predicted  # same count, resampled
    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.4)
    opts = EngineOptions(landmarks="cascade", codec="ffv1", batch_size=4)
    pipe.avatar_cache = AvatarCache(tmp_path / "cache")
    try:
        miss = pipe.run(video, short, tmp_path / "miss.mkv", opts)
        with caplog.at_level(logging.INFO, logger="musetalk_job.pipeline"):
            hit = pipe.run(video, short, tmp_path / "hit.mkv", opts)
    finally:
        pipe.avatar_cache = None
    assert "rendering again from the decoded frames" in caplog.text
    assert hit.stage_seconds["latents"] == 0.0
    np.testing.assert_array_equal(_read(hit.output), _read(miss.output))


def test_warmup_runs_every_model_at_job_shapes(pipe) -> None:
    det = pipe.detector("dwpose")  # loaded detectors are warmed at their batch shape too
    shapes: list[int] = []
    hook = det.model.register_forward_pre_hook(lambda _m, args: shapes.append(args[0].shape[0]))
    try:
        assert pipe.warmup(batch_size=3, frame_size=(64, 48)) > 0
    finally:
        hook.remove()
    assert shapes == [2 * det.default_batch_size()]


def test_version_mismatch_is_a_spec_error(pipe, face_video, speech_wav, boxes_file, tmp_path) -> None:
    with pytest.raises(SpecError, match="version"):
        pipe.run(face_video, speech_wav, tmp_path / "o.mp4", EngineOptions(version="v1", boxes_file=boxes_file))


def test_auto_batch_size_follows_free_memory() -> None:
    from musetalk_job.pipeline import auto_batch_size

    cuda, gib, frame_720p = torch.device("cuda"), 2**30, 1280 * 720 * 3
    assert auto_batch_size(torch.device("cpu"), torch.float32, frame_720p) == 4
    # a 12 GB consumer card with the models loaded, and an H200: the cap
    assert auto_batch_size(cuda, torch.float16, frame_720p, free_bytes=int(9.5 * gib)) == 64
    assert auto_batch_size(cuda, torch.float16, frame_720p, free_bytes=130 * gib) == 64
    small = auto_batch_size(cuda, torch.float16, frame_720p, free_bytes=int(5.5 * gib))
    assert 1 < small < 64
    assert auto_batch_size(cuda, torch.float32, frame_720p, free_bytes=int(9.5 * gib)) < 64  # fp32 needs twice the workspace
    assert auto_batch_size(cuda, torch.float16, 3840 * 2160 * 3, free_bytes=int(5.5 * gib)) < small  # 4K frames
    assert auto_batch_size(cuda, torch.float16, frame_720p, free_bytes=gib) == 1  # never below 1


def test_the_hot_loop_runs_the_compiled_graphs(pipe, face_video, speech_wav, boxes_file, tmp_path) -> None:
    """With compile on, every UNet and decoder call of a job runs dynamo's graphs: guards that fail
    in the hot loop (a tensor's inference flag, grad mode) would fall back to eager silently under
    the frozen stance, which is what a benchmark once measured by mistake. Dynamo traces for real;
    the backend counts the graph calls and runs them unchanged."""
    from musetalk_job import compiled

    graph_calls = {"n": 0}

    def counting(gm: Any, example_inputs: list[Any]) -> Any:
        def run(*args: Any) -> Any:
            graph_calls["n"] += 1
            return gm.forward(*args)

        return run

    forward_calls = {"unet": 0, "decoder": 0}
    hooks = [
        pipe.models.unet.register_forward_pre_hook(lambda *_: forward_calls.__setitem__("unet", forward_calls["unet"] + 1)),
        pipe.models.vae.decoder.register_forward_pre_hook(lambda *_: forward_calls.__setitem__("decoder", forward_calls["decoder"] + 1)),
    ]
    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.6)  # 15 frames: 4 batches of 4
    opts = EngineOptions(boxes_file=boxes_file, codec="ffv1", batch_size=4)
    reference = pipe.run(face_video, short, tmp_path / "eager.mkv", opts)
    assert compiled.enable(pipe.models, "regional", backend=counting)
    pipe.compiled = True
    try:
        pipe.run(face_video, short, tmp_path / "first.mkv", opts)  # compiles the job's shapes, then freezes them
        unet_blocks = len(compiled._state(pipe.models.unet).compiled_modules)
        decoder_blocks = sum(1 for b in compiled._state(pipe.models.vae).compiled_modules
                             if any(b is mod for mod in pipe.models.vae.decoder.modules()))
        graph_calls["n"] = 0
        forward_calls.update(unet=0, decoder=0)
        result = pipe.run(face_video, short, tmp_path / "second.mkv", opts)
    finally:
        for h in hooks:
            h.remove()
        compiled.disable(pipe.models)
        pipe.compiled = False
        torch._dynamo.reset()
    assert forward_calls["unet"] >= 4 and forward_calls["decoder"] >= 4
    # every compiled block of every UNet and decoder call went through a graph (none ran eagerly)
    assert graph_calls["n"] >= forward_calls["unet"] * unet_blocks + forward_calls["decoder"] * decoder_blocks
    # The same frames within rounding: the frozen graphs run the ragged last batch (3 frames) padded
    # to the compiled 4, and a CPU GEMM's float sums may depend on the batch size (seen on an AMD
    # EPYC: one value of 3.5 million off by one level).
    got, want = _read(result.output).astype(np.int16), _read(reference.output).astype(np.int16)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


def test_warmup_job_runs_a_whole_job_and_leaves_the_pipeline_as_it_was(pipe: Pipeline, tmp_path: Path) -> None:
    sentinel = object()
    pipe.avatar_cache, saved = sentinel, pipe.avatar_cache
    try:
        seconds = pipe.warmup_job(frame_size=(160, 120), seconds=0.4, preset="ultrafast")
        assert seconds > 0
        assert pipe.avatar_cache is sentinel  # not used by the warm-up job, and put back
        assert pipe.last_timings.get("output_frames") == 10  # 0.4 s at 25 fps went through generate
    finally:
        pipe.avatar_cache = saved


def test_the_log_mel_computed_during_preparation_gives_the_same_video(
    pipe, face_video, speech_wav, boxes_file, tmp_path, monkeypatch
) -> None:
    """The audio's log-mel runs on its own thread from the decode on (the default), or inside the
    audio stage: the same lossless output either way, and the default computes it off the job's thread."""
    from musetalk_job import audio as audiomod

    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.6)
    threads: list[str] = []
    real = audiomod.log_mel
    monkeypatch.setattr(audiomod, "log_mel", lambda *a, **k: (threads.append(threading.current_thread().name), real(*a, **k))[1])
    opts = EngineOptions(boxes_file=boxes_file, codec="ffv1", batch_size=4)
    outputs = [_run_with(pipe, "early_log_mel", early, face_video, short, tmp_path / f"m{int(early)}.mkv", opts) for early in (True, False)]
    assert len(threads) == 2 and threads[0].startswith("log-mel") and threads[1] == threading.current_thread().name
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_latents_encoded_in_the_loop_give_the_same_video_and_cache_entry(
    pipe, face_video, speech_wav, boxes_file, tmp_path, monkeypatch
) -> None:
    """``latents_in_loop``: each chunk of faces is VAE-encoded when a batch first needs it. The chunks
    are those of the up-front encode, so the video is the same; the loop's first batch is done before
    the last chunk is encoded; the avatar cache still stores every latent."""
    from musetalk_job import latents as latmod
    from musetalk_job import pipeline as pipemod
    from musetalk_job.cache import AvatarCache

    short = _wav_slice(speech_wav, tmp_path / "short.wav", 0.6)  # 15 frames: every input frame used
    opts = EngineOptions(boxes_file=boxes_file, codec="ffv1", batch_size=4)
    encodes: list[int] = []
    real_encode = latmod.encode_faces
    monkeypatch.setattr(pipemod, "encode_faces", lambda vae, crops, *a, **k: (encodes.append(len(crops)), real_encode(vae, crops, *a, **k))[1])
    outputs = []
    for lazy in (False, True):
        encodes.clear()
        events: list[tuple[str, int, int]] = []
        pipe.avatar_cache = AvatarCache(tmp_path / f"cache{int(lazy)}")
        saved = pipe.latents_in_loop
        pipe.latents_in_loop = lazy
        try:
            res = pipe.run(face_video, short, tmp_path / f"l{int(lazy)}.mkv", opts, progress=lambda *e: events.append(e))
        finally:
            pipe.latents_in_loop = saved
            pipe.avatar_cache = None
        outputs.append(_read(res.output))
        assert len(encodes) >= 3 and sum(encodes) == res.frames_with_face  # chunks of half the job batch
        stages = [e for e in events if e[0] in ("latents", "generate")]
        first_batch = next(k for k, e in enumerate(stages) if e[0] == "generate")
        last_latents = max(k for k, e in enumerate(stages) if e[0] == "latents")
        assert stages[last_latents][1:] == (res.frames_with_face, res.frames_with_face)
        assert (last_latents > first_batch) == lazy  # lazily: the last chunk after the first batch
        assert len(list((tmp_path / f"cache{int(lazy)}").iterdir())) == 1
    np.testing.assert_array_equal(outputs[0], outputs[1])
    # The entry stored by the lazy job holds every latent: a hit renders the same video.
    pipe.avatar_cache = AvatarCache(tmp_path / "cache1")
    try:
        again = pipe.run(face_video, short, tmp_path / "again.mkv", opts)
    finally:
        pipe.avatar_cache = None
    assert again.stage_seconds["latents"] == 0.0
    np.testing.assert_array_equal(_read(again.output), outputs[0])
