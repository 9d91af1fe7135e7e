"""media: probe / read_frames / load_audio / VideoWriter on real files made by ffmpeg and espeak-ng.

Expectations come from independent tools: the ffmpeg CLI (decode, autorotate, ``fps``
filter), ffprobe (what the writer produced), the ``wave`` module (sample counts).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from musetalk_job import media
from musetalk_job.errors import EngineRuntimeError, InputMediaError

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
ESPEAK = shutil.which("espeak-ng")
pytestmark = pytest.mark.skipif(FFMPEG is None or FFPROBE is None, reason="ffmpeg/ffprobe are required")


def _ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _ffmpeg_rgb(path: Path, width: int, height: int, *extra: str) -> np.ndarray:
    """Frames as the ffmpeg CLI decodes them (autorotate on), rgb24."""
    out = subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(path), *extra, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)


def _ffprobe(path: Path) -> dict:
    out = subprocess.run([FFPROBE, "-v", "error", "-print_format", "json", "-show_streams", "-show_format", str(path)],
                         capture_output=True, check=True, text=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    c = {name: root / f"{name}.mp4" for name in ("cfr", "rotated", "vfr")}
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-frames:v", "25", "-pix_fmt", "yuv420p",
            "-c:v", "libx264", str(c["cfr"]))
    # Same stream, display matrix says "rotate 90": the CLI autorotates it to 120x160.
    _ffmpeg("-i", str(c["cfr"]), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(c["rotated"]))
    # 30 frames at 25 fps with a 0.12 s gap after frame 15: average 250/11 = 22.73 fps.
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-frames:v", "30",
            "-vf", "setpts='PTS+gte(N,15)*0.12/TB'", "-fps_mode", "vfr", "-pix_fmt", "yuv420p", "-c:v", "libx264",
            str(c["vfr"]))
    c["png"] = root / "still.png"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=161x97:rate=1", "-frames:v", "1", str(c["png"]))
    c["noext"] = root / "still_without_extension"
    shutil.copy(c["png"], c["noext"])
    c["garbage"] = root / "garbage.mp4"
    c["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    c["empty"] = root / "empty.wav"
    c["empty"].write_bytes(b"")
    c["text_png"] = root / "notes.png"
    c["text_png"].write_text("this is not an image\n")
    return c


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Path]:
    if ESPEAK is None:
        pytest.skip("espeak-ng is required")
    from musetalk_job.samples import make_speech

    root = tmp_path_factory.mktemp("speech")
    s = {"wav": make_speech(root / "speech.wav", text="Testing one two three.")}
    for ext in ("mp3", "m4a", "flac", "ogg"):
        s[ext] = root / f"speech.{ext}"
        _ffmpeg("-i", str(s["wav"]), str(s[ext]))
    s["stereo44k"] = root / "stereo44k.wav"
    _ffmpeg("-i", str(s["wav"]), "-ac", "2", "-ar", "44100", str(s["stereo44k"]))
    s["video"] = root / "talking.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-i", str(s["wav"]), "-t", "1", "-pix_fmt", "yuv420p",
            "-c:v", "libx264", "-c:a", "aac", str(s["video"]))
    return s


# --- probe ---------------------------------------------------------------------------------


def test_probe_video_image_audio(clips, speech):
    info = media.probe(clips["cfr"])
    assert (info.kind, info.width, info.height, info.fps, info.n_frames) == ("video", 160, 120, 25.0, 25)
    assert info.has_video and not info.has_audio and info.duration_s == pytest.approx(1.0, abs=0.01)
    rot = media.probe(clips["rotated"])
    assert (rot.width, rot.height, rot.rotation) == (120, 160, 90)
    img = media.probe(clips["png"])
    assert (img.kind, img.width, img.height, img.n_frames, img.has_video) == ("image", 161, 97, 1, True)
    assert media.probe(clips["noext"]).kind == "image"  # recognised by content
    audio = media.probe(speech["wav"])
    with wave.open(str(speech["wav"])) as w:
        seconds = w.getnframes() / w.getframerate()
    assert audio.kind == "audio" and audio.has_audio and not audio.has_video
    assert audio.audio_duration_s == pytest.approx(seconds, abs=1e-3)
    talking = media.probe(speech["video"])
    assert talking.kind == "video" and talking.has_audio and talking.audio_duration_s == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name, words", [("garbage", "not a readable media file"), ("empty", "empty"),
                                         ("text_png", "not a readable image")])
def test_bad_files_raise_input_media_error(clips, name, words):
    for fn in (media.probe, media.read_frames):
        with pytest.raises(InputMediaError) as err:
            fn(clips[name])
        assert clips[name].name in err.value.message and words in err.value.message
        assert err.value.exit_code == 3
    with pytest.raises(InputMediaError, match="not found"):
        media.probe(clips["cfr"].with_name("missing.mp4"))


# --- frames --------------------------------------------------------------------------------


def test_read_frames_cfr_equals_ffmpeg(clips):
    got = media.read_frames(clips["cfr"])
    assert got.frames.shape == (25, 120, 160, 3) and got.frames.dtype == np.uint8
    assert got.fps == 25.0 and got.rate == 25
    np.testing.assert_array_equal(got.frames, _ffmpeg_rgb(clips["cfr"], 160, 120))


def test_read_frames_grows_its_buffer_while_conversions_are_in_flight(clips, monkeypatch):
    # No frame count and no duration: the buffer starts at 16 frames and doubles twice while the
    # conversion pool is still writing rows (the old buffer is drained before it is replaced).
    monkeypatch.setattr(media, "_stream_duration", lambda *a: None)
    out = clips["cfr"].with_name("long.mkv")
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (45, 48, 64, 3), dtype=np.uint8)
    with media.VideoWriter(out, width=64, height=48, fps=25, codec="ffv1") as w:
        w.write(frames)
    import av

    with av.open(str(out)) as c:
        assert not c.streams.video[0].frames  # Matroska stores no frame count
    got = media.read_frames(out).frames
    np.testing.assert_array_equal(got, frames)


def test_read_frames_honours_rotation(clips):
    plain = media.read_frames(clips["cfr"]).frames
    rotated = media.read_frames(clips["rotated"]).frames
    assert rotated.shape == (25, 160, 120, 3)
    np.testing.assert_array_equal(rotated, _ffmpeg_rgb(clips["rotated"], 120, 160))  # CLI autorotates
    np.testing.assert_array_equal(rotated, np.rot90(plain, 1, axes=(1, 2)))


def test_read_frames_vfr_resampled_like_ffmpeg_fps_filter(clips):
    got = media.read_frames(clips["vfr"])
    assert got.rate == Fraction(250, 11) and got.fps == pytest.approx(22.7272727)
    ref = _ffmpeg_rgb(clips["vfr"], 160, 120, "-vf", "fps=fps=250/11")
    assert got.frames.shape == ref.shape == (30, 120, 160, 3)
    np.testing.assert_array_equal(got.frames, ref)
    # It really resampled: one input frame is dropped and one repeated around the gap.
    raw = _ffmpeg_rgb(clips["vfr"], 160, 120, "-fps_mode", "passthrough")
    assert not np.array_equal(got.frames, raw)
    assert np.array_equal(got.frames[14], got.frames[15])


def test_frame_stream_gives_rows_while_decoding_and_then_what_read_frames_gives(tmp_path):
    from musetalk_job.samples import make_face_video

    video = make_face_video(tmp_path / "long.mp4", seconds=6, fps=25.0, size=(320, 240))
    expected = media.read_frames(video)
    stream = media.FrameStream(video)
    frames = stream.first()
    # The array exists after the first frame, with the header's 150 rows, long before the end.
    assert frames is not None and frames.shape == expected.frames.shape == (150, 240, 320, 3)
    assert stream.decoded < 150 and stream.rate == 25
    stream.wait(40)
    assert stream.decoded >= 40
    np.testing.assert_array_equal(frames[:40], expected.frames[:40])
    got = stream.result()
    assert stream.predicted and got.frames is not None and got.fps == expected.fps and got.rate == expected.rate
    np.testing.assert_array_equal(got.frames, expected.frames)
    np.testing.assert_array_equal(frames, expected.frames)  # the rows were filled in place


@pytest.mark.parametrize("name", ["vfr", "truncated", "mkv", "png"])
def test_frame_stream_reports_files_that_break_their_header(clips, tmp_path, name):
    """Variable timing (resampled), a damaged tail (fewer frames than the header's count), no
    frame count (Matroska), a still image: ``result()`` is still exactly ``read_frames``; only a
    file whose rows went into the predicted array as they are is ``predicted``."""
    if name == "truncated":
        whole = tmp_path / "faststart.mp4"  # the sample table up front states 25 frames
        _ffmpeg("-i", str(clips["cfr"]), "-c", "copy", "-movflags", "+faststart", str(whole))
        data = whole.read_bytes()
        path = tmp_path / "truncated.mp4"
        path.write_bytes(data[: len(data) * 2 // 3])
    elif name == "mkv":
        path = tmp_path / "cfr.mkv"
        _ffmpeg("-i", str(clips["cfr"]), "-c", "copy", str(path))
    else:
        path = clips[name]
    expected = media.read_frames(path)
    stream = media.FrameStream(path)
    first = stream.first()
    got = stream.result()
    np.testing.assert_array_equal(got.frames, expected.frames)
    assert got.rate == expected.rate
    assert not stream.predicted
    if name in ("vfr", "truncated"):  # MP4 states a count: it streamed, then disagreed
        assert first is not None and (name != "truncated" or got.frames.shape[0] < first.shape[0])
    else:
        assert first is None


def test_frame_stream_errors_and_close(clips, tmp_path):
    stream = media.FrameStream(clips["garbage"])
    assert stream.first() is None
    with pytest.raises(InputMediaError, match="garbage.mp4"):
        stream.result()
    with pytest.raises(InputMediaError, match="missing.mp4"):
        media.FrameStream(clips["cfr"].with_name("missing.mp4"))
    from musetalk_job.samples import make_face_video

    video = make_face_video(tmp_path / "long.mp4", seconds=8, fps=25.0, size=(320, 240))
    stream = media.FrameStream(video)
    stream.first()
    stream.close()  # stops the decode early: the job that opened it has failed or is cancelled
    assert stream.result().frames.shape[0] < 200 and not stream.predicted


def test_read_frames_size_change_is_scaled_to_first_size(tmp_path):
    parts = []
    for i, size in enumerate(("160x120", "128x96")):
        part = tmp_path / f"part{i}.ts"
        _ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size}:rate=25", "-frames:v", "5", "-pix_fmt", "yuv420p",
                "-c:v", "libx264", str(part))
        parts.append(str(part))
    mixed = tmp_path / "mixed.ts"
    _ffmpeg("-i", "concat:" + "|".join(parts), "-c", "copy", str(mixed))
    got = media.read_frames(mixed)
    assert got.frames.shape == (10, 120, 160, 3)
    small = media.read_frames(parts[1]).frames
    assert not np.array_equal(got.frames[5], got.frames[4])
    # The second part is its own picture, upscaled: close to a plain resize of it.
    import cv2

    approx = cv2.resize(small[0], (160, 120), interpolation=cv2.INTER_CUBIC)
    assert np.abs(got.frames[5].astype(int) - approx.astype(int)).mean() < 12


def test_cfr_indices_rule():
    # 25 fps timestamps with a gap and a burst: gap slots repeat, a crowded slot keeps the last.
    times = np.array([0.0, 0.04, 0.08, 0.20, 0.21, 0.24])
    assert media.cfr_indices(times, 25).tolist() == [0, 1, 2, 2, 2, 4, 5]
    assert media.cfr_indices(np.arange(10) / 25.0, 25).tolist() == list(range(10))


def test_read_frames_image(clips):
    from PIL import Image

    got = media.read_frames(clips["png"], image_fps=30.0)
    assert got.frames.shape == (1, 97, 161, 3) and got.fps == 30.0
    np.testing.assert_array_equal(got.frames[0], np.asarray(Image.open(clips["png"]).convert("RGB")))
    assert media.read_frames(clips["noext"]).frames.shape == (1, 97, 161, 3)


# --- audio ---------------------------------------------------------------------------------


def _wav_samples(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())
        return data.astype(np.float32) / 32768.0, w.getframerate()


def test_load_audio_length_rule_and_formats(speech):
    pcm, rate = _wav_samples(speech["wav"])
    assert rate == 22050  # espeak-ng's native rate, so every format is resampled
    ref = media.load_audio(speech["wav"])
    assert ref.dtype == np.float32 and ref.ndim == 1
    assert len(ref) == math.ceil(len(pcm) * 16000 / 22050)  # librosa's fix_length rule
    assert np.abs(ref).max() > 0.05
    # Same decoded PCM -> same output, bit for bit.
    np.testing.assert_array_equal(media.load_audio(speech["flac"]), ref)
    # At the native rate nothing is resampled: the samples are exactly the PCM values.
    np.testing.assert_array_equal(media.load_audio(speech["wav"], sr=22050), pcm[:, 0])
    for ext in ("mp3", "m4a", "ogg"):
        got = media.load_audio(speech[ext])
        assert abs(len(got) - len(ref)) < 0.06 * 16000, ext  # codec padding only
        n = min(len(got), len(ref))
        # Lossy codecs may shift by their priming delay: best correlation within +-50 ms.
        best = max(np.corrcoef(got[max(0, -lag):n - max(0, lag)], ref[max(0, lag):n - max(0, -lag)])[0, 1]
                   for lag in range(-800, 801, 8))
        assert best > 0.9, (ext, best)


def test_load_audio_stereo_is_channel_mean(speech, tmp_path):
    left = (np.sin(np.arange(16000) * 0.05) * 12000).astype(np.int16)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / "st.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(stereo.tobytes())
    np.testing.assert_array_equal(media.load_audio(path), left.astype(np.float32) / 32768.0 / 2)
    got = media.load_audio(speech["stereo44k"])
    pcm, _ = _wav_samples(speech["stereo44k"])
    assert len(got) == math.ceil(len(pcm) * 16000 / 44100)


def test_load_audio_from_video_and_errors(speech, clips):
    got = media.load_audio(speech["video"])
    assert len(got) == pytest.approx(16000, abs=0.03 * 16000) and np.abs(got).max() > 0.05
    with pytest.raises(InputMediaError, match="no audio stream") as err:
        media.load_audio(clips["cfr"])
    assert "cfr.mp4" in err.value.message
    with pytest.raises(InputMediaError):
        media.load_audio(clips["garbage"])


# --- writer --------------------------------------------------------------------------------


def _smooth_frames(n: int, width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [np.stack([(xx * 255 // width + 3 * i) % 256, yy * 255 // height,
                        np.full_like(xx, 40 + i)], axis=-1) for i in range(n)]
    return np.asarray(frames, dtype=np.uint8)


def test_writer_h264_aac_ntsc_odd_size(speech, tmp_path):
    out = tmp_path / "out.mp4"
    frames = _smooth_frames(30, 161, 121)
    with media.VideoWriter(out, width=161, height=121, fps=30000 / 1001, audio_path=speech["wav"]) as writer:
        writer.write(frames[:7])
        writer.write(frames[7])  # a single [H, W, 3] frame
        writer.write(frames[8:])
    probe = _ffprobe(out)
    video = next(s for s in probe["streams"] if s["codec_type"] == "video")
    audio = next(s for s in probe["streams"] if s["codec_type"] == "audio")
    assert video["codec_name"] == "h264" and video["pix_fmt"] == "yuv420p"
    assert (video["width"], video["height"]) == (162, 122)  # padded by one pixel to even
    assert video["r_frame_rate"] == "30000/1001" and int(video["nb_frames"]) == 30
    assert float(video["duration"]) == pytest.approx(30 * 1001 / 30000, abs=1e-3)
    assert audio["codec_name"] == "aac"
    # Audio longer than the video is cut one frame after the video's end.
    assert float(audio["duration"]) <= 31 * 1001 / 30000 + 0.03
    assert float(audio["duration"]) >= 30 * 1001 / 30000
    decoded = _ffmpeg_rgb(out, 162, 122)
    assert decoded.shape[0] == 30
    err = np.abs(decoded[:, :121, :161].astype(int) - frames.astype(int))
    assert err.mean() < 2.0  # crf 18 on smooth content
    assert np.abs(decoded[:, :121, 161].astype(int) - frames[:, :, 160].astype(int)).mean() < 3.0  # edge copy
    data = out.read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")  # +faststart: the index precedes the media data
    assert media.probe(out).fps == pytest.approx(29.97002997)


@pytest.mark.parametrize("codec, suffix", [("ffv1", ".mkv"), ("h264-lossless", ".mp4")])
def test_writer_lossless_round_trip(tmp_path, codec, suffix):
    frames = np.random.default_rng(1).integers(0, 256, (5, 37, 53, 3), dtype=np.uint8)
    out = tmp_path / f"lossless{suffix}"
    with media.VideoWriter(out, width=53, height=37, fps=25, codec=codec) as writer:
        writer.write(frames)
    back = media.read_frames(out)
    assert back.fps == 25.0
    np.testing.assert_array_equal(back.frames, frames)


def test_writer_encodes_in_a_background_thread(tmp_path):
    import threading

    out = tmp_path / "bg.mp4"
    writer = media.VideoWriter(out, width=64, height=48, fps=25, queue_frames=2)
    assert any(t.name == "video-encoder" and t.is_alive() for t in threading.enumerate())
    writer.write(_smooth_frames(20, 64, 48))  # more frames than the queue holds: write waits, no loss
    writer.close()
    assert writer.frames_written == 20 and media.probe(out).n_frames == 20
    assert not writer._thread.is_alive()


def test_writer_abort_and_errors(tmp_path, clips):
    out = tmp_path / "partial.mp4"
    writer = media.VideoWriter(out, width=64, height=48, fps=25)
    writer.write(_smooth_frames(40, 64, 48))
    writer.abort()
    assert not out.exists()
    with pytest.raises(RuntimeError):
        with media.VideoWriter(out, width=64, height=48, fps=25) as writer:
            writer.write(_smooth_frames(3, 64, 48))
            raise RuntimeError("caller failed")
    assert not out.exists()
    with media.VideoWriter(out, width=64, height=48, fps=25) as writer:
        with pytest.raises(EngineRuntimeError, match="uint8"):
            writer.write(np.zeros((2, 48, 63, 3), np.uint8))
        writer.write(_smooth_frames(2, 64, 48))
    assert media.probe(out).n_frames == 2
    writer.abort()  # after a successful close: nothing to undo
    assert out.exists()
    with pytest.raises(InputMediaError, match="no audio stream"):
        media.VideoWriter(tmp_path / "noaudio.mp4", width=64, height=48, fps=25, audio_path=clips["cfr"])
    assert not (tmp_path / "noaudio.mp4").exists()
    from musetalk_job.errors import SpecError

    for bad in ({"preset": "warp"}, {"crf": 99}, {"codec": "vp9"}, {"fps": 0}):
        with pytest.raises(SpecError, match=next(iter(bad))):
            media.VideoWriter(tmp_path / "bad.mp4", **{"width": 64, "height": 48, "fps": 25, **bad})
    assert not (tmp_path / "bad.mp4").exists()
    with pytest.raises(SpecError, match="mkv"):
        media.VideoWriter(tmp_path / "bad.mp4", width=64, height=48, fps=25, codec="ffv1")
    empty = media.VideoWriter(tmp_path / "empty.mp4", width=64, height=48, fps=25)
    with pytest.raises(EngineRuntimeError, match="no frames"):
        empty.close()
    assert not (tmp_path / "empty.mp4").exists()


def test_encoders_available():
    found = media.encoders_available()
    assert set(found) == {"libx264", "h264_nvenc", "libx264rgb", "ffv1", "aac"}
    assert found["libx264"] and found["aac"] and found["ffv1"]
    assert all(isinstance(v, bool) for v in found.values())


def test_writer_owns_queued_frames_when_the_caller_reuses_its_buffer(tmp_path) -> None:
    """write() returns while frames still wait in the queue; a caller that refills one buffer
    (as the engine does with pinned host memory) must not change frames already written."""
    from musetalk_job.media import VideoWriter, read_frames

    rng = np.random.default_rng(3)
    expected = rng.integers(0, 256, size=(12, 48, 64, 3), dtype=np.uint8)
    buf = np.empty((1, 48, 64, 3), dtype=np.uint8)
    out = tmp_path / "reuse.mkv"
    with VideoWriter(out, width=64, height=48, fps=25.0, codec="ffv1") as w:
        for frame in expected:
            buf[0] = frame
            w.write(buf)
            buf[0] = 0  # reuse at once
    assert np.array_equal(read_frames(out).frames, expected)


# ---------------------------------------------------------------------------------------
# Segment-parallel libx264 and I420 input


def _packets(path: Path) -> list[tuple[int, int, bytes]]:
    import av

    with av.open(str(path)) as c:
        return [(p.pts, p.dts, bytes(p)) for p in c.demux(video=0) if p.size]


@pytest.mark.parametrize("height", [120, 128])
def test_writer_output_is_deterministic(tmp_path, height):
    # swscale's padding used to leak into libx264 at 160x120, and libx264's AVX-512 kernels made
    # the same frames give different files on AVX-512 CPUs (media.x264_cpu_options).
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (10, height, 160, 3), dtype=np.uint8)
    for kw in ({"workers": 1}, {"workers": 2, "segment_frames": 4}):
        runs = []
        for k in range(5):
            out = tmp_path / f"d{k}.mp4"
            with media.VideoWriter(out, width=160, height=height, fps=25, **kw) as w:
                w.write(frames)
            runs.append(_packets(out))
        assert len(runs[0]) == 10
        assert all(r == runs[0] for r in runs[1:]), kw


def test_segmented_writer_equals_one_stream_losslessly_with_audio(speech, tmp_path):
    frames = _smooth_frames(37, 96, 64)
    outs = {}
    for name, kw in (("one", {"workers": 1}), ("seg", {"workers": 3, "segment_frames": 8})):
        out = tmp_path / f"{name}.mp4"
        with media.VideoWriter(out, width=96, height=64, fps=25, audio_path=speech["wav"], crf=0, **kw) as w:
            assert w.workers == kw["workers"]
            w.write(frames[:20])
            w.write(frames[20:])
        info = media.probe(out)
        assert info.n_frames == 37 and info.has_audio and abs(info.duration_s - 37 / 25) < 0.05
        outs[name] = media.read_frames(out).frames
        pk = _packets(out)
        dts = [d for _, d, _ in pk]
        assert dts == sorted(set(dts))  # strictly increasing across the segment joins
        assert len(pk) == 37 and len({p for p, _, _ in pk}) == 37
    # crf 0 is lossless in YUV: five segments joined decode to exactly the one-stream frames
    np.testing.assert_array_equal(outs["seg"], outs["one"])
    assert _ffprobe(tmp_path / "seg.mp4")["streams"][0]["nb_frames"] == "37"


def test_segmented_writer_uses_one_idr_per_segment(tmp_path):
    import av

    out = tmp_path / "idr.mp4"
    with media.VideoWriter(out, width=64, height=48, fps=25, workers=2, segment_frames=10) as w:
        w.write(_smooth_frames(35, 64, 48))
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        packets = [p for p in c.demux(video=0) if p.size]
        keys = [round(p.pts * stream.time_base * 25) for p in packets if p.is_keyframe]
        pts = [round(p.pts * stream.time_base * 25) for p in packets]
        dts = [p.dts for p in packets]
    assert keys == [0, 10, 20, 30]
    # crf 18 `medium` uses B-frames (decode order != display order) and the dts still increase
    # strictly across the joins, the short last segment (5 frames) included.
    assert pts != sorted(pts) and sorted(pts) == list(range(35))
    assert all(a < b for a, b in zip(dts, dts[1:]))


def test_expected_frames_shrink_the_last_segments_only(tmp_path):

    frames = _smooth_frames(100, 64, 48)
    outs = {}
    for name, kw in (("plain", {}), ("tail", {"expected_frames": 100})):
        out = tmp_path / f"{name}.mp4"
        with media.VideoWriter(out, width=64, height=48, fps=25, workers=2, segment_frames=30, crf=0, tail_rounds=2, **kw) as w:
            w.write(frames)
        outs[name] = (w.segment_sizes, media.read_frames(out).frames)
        import av

        with av.open(str(out)) as c:
            tb = c.streams.video[0].time_base
            keys = {round(p.pts * tb * 25) for p in c.demux(video=0) if p.size and p.is_keyframe}
        assert set(np.cumsum([0] + w.segment_sizes[:-1]).tolist()) <= keys  # every segment starts with an IDR
    assert outs["plain"][0] == [30, 30, 30, 10]
    # The last 2 rounds (<= workers * 30 frames left) take half of what is left, never below 12.
    assert outs["tail"][0] == [30, 30, 20, 12, 8]
    np.testing.assert_array_equal(outs["tail"][1], outs["plain"][1])  # crf 0: the same frames
    # A wrong hint only changes where segments end, not the video.
    with media.VideoWriter(tmp_path / "short.mp4", width=64, height=48, fps=25, workers=2, segment_frames=30,
                           crf=0, expected_frames=40, tail_rounds=2) as w:
        w.write(frames)
    assert sum(w.segment_sizes) == 100 and w.segment_sizes[:2] == [20, 12] and max(w.segment_sizes) == 30
    np.testing.assert_array_equal(media.read_frames(tmp_path / "short.mp4").frames, outs["plain"][1])
    # More segments in flight (the writer runs further ahead of the encoders): the same video.
    with media.VideoWriter(tmp_path / "ahead.mp4", width=64, height=48, fps=25, workers=2, segment_frames=30,
                           crf=0, segments_ahead=5) as w:
        assert w.segments_ahead == 5
        w.write(frames)
    np.testing.assert_array_equal(media.read_frames(tmp_path / "ahead.mp4").frames, outs["plain"][1])
    clamped = media.VideoWriter(tmp_path / "x.mp4", width=64, height=48, fps=25, workers=3, segments_ahead=1)
    assert clamped.segments_ahead == 3  # never fewer in flight than encoders
    clamped.abort()


def _decoded_i420(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray() for f in c.decode(video=0)])  # yuv420p as coded


@pytest.mark.parametrize("kw", [{"workers": 1}, {"workers": 2, "segment_frames": 5}])
def test_i420_input_matches_rgb_input_within_colour_rounding(tmp_path, kw):
    torch = pytest.importorskip("torch")
    from musetalk_job.colour import rgb_to_i420
    from musetalk_job.samples import _astronaut, _face_frame

    src = _astronaut()
    frames = np.stack([_face_frame(src, 97, 63, i / 25) for i in range(12)])  # odd: padded to 98x64
    out_rgb, out_yuv = tmp_path / "rgb.mp4", tmp_path / "yuv.mp4"
    with media.VideoWriter(out_rgb, width=97, height=63, fps=25, crf=0, workers=1) as w:
        w.write(frames)
    i420 = rgb_to_i420(torch.from_numpy(frames)).numpy()
    assert i420.shape == (12, 96, 98)
    buf = np.empty((1, 96, 98), np.uint8)
    with media.VideoWriter(out_yuv, width=97, height=63, fps=25, crf=0, **kw) as w:
        assert w.accepts_i420 and w.workers == kw["workers"]
        w.write_i420(i420[:7])
        for frame in i420[7:]:
            buf[0] = frame
            w.write_i420(buf)
            buf[0] = 0  # the writer owns what it queued: reusing the buffer changes nothing
    # crf 0 keeps the YUV exactly: the coded planes differ only by rgb_to_i420 vs swscale
    # rounding (<= 1 level, tests/test_colour.py).
    ya, yb = _decoded_i420(out_rgb), _decoded_i420(out_yuv)
    assert ya.shape == yb.shape == (12, 96, 98)
    # The encoder got exactly the arrays' pixels (frames wrap the arrays' memory; crf 0 is lossless).
    np.testing.assert_array_equal(yb, i420)
    dy = np.abs(ya.astype(np.int16) - yb.astype(np.int16))
    assert dy.max() <= 1 and dy.mean() < 0.1, (dy.max(), dy.mean())
    a, b = media.read_frames(out_rgb).frames, media.read_frames(out_yuv).frames
    assert a.shape == b.shape == (12, 64, 98, 3)  # H.264 pads odd sizes by one repeated row/column
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.mean() < 0.5 and d.max() <= 4, (d.max(), d.mean())
    # Handed over without a copy (copy=False; the engine's fresh pinned buffers): the same video.
    out_owned = tmp_path / "owned.mp4"
    with media.VideoWriter(out_owned, width=97, height=63, fps=25, crf=0, **kw) as w:
        for k in range(0, 12, 5):
            w.write_i420(i420[k : k + 5].copy(), copy=False)
    np.testing.assert_array_equal(_decoded_i420(out_owned), yb)


def test_write_i420_errors(tmp_path):
    with media.VideoWriter(tmp_path / "a.mp4", width=64, height=48, fps=25) as w:
        with pytest.raises(EngineRuntimeError, match=r"uint8 \[B, 72, 64\]"):
            w.write_i420(np.zeros((2, 48, 64), dtype=np.uint8))
        w.write_i420(np.zeros((2, 72, 64), dtype=np.uint8))
    lossless = media.VideoWriter(tmp_path / "b.mkv", width=64, height=48, fps=25, codec="ffv1")
    assert not lossless.accepts_i420
    with pytest.raises(EngineRuntimeError, match="takes RGB frames"):
        lossless.write_i420(np.zeros((1, 72, 64), dtype=np.uint8))
    lossless.abort()


def test_streamed_segments_write_the_bytes_of_whole_segments_and_encode_while_filling(tmp_path):
    import time

    frames = _smooth_frames(47, 64, 48)
    packets = {}
    for streamed in (True, False):
        out = tmp_path / f"s{int(streamed)}.mp4"
        with media.VideoWriter(out, width=64, height=48, fps=25, workers=3, segment_frames=10, expected_frames=47,
                               tail_rounds=2, stream_segments=streamed) as w:
            w.write(frames[:25])
            if streamed:  # the third segment is open with 5 frames: its encoder has taken them already
                assert w._seg_count == 5
                deadline = time.monotonic() + 10
                while w._seg_feed.qsize() and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert w._seg_feed.qsize() == 0
            w.write(frames[25:])
        packets[streamed] = (w.segment_sizes, _packets(out))
    assert packets[True][0] == packets[False][0] == [10, 10, 10, 10, 7]
    assert packets[True][1] == packets[False][1]  # same segments, same libx264 options: the same packets


def test_a_streamed_segment_left_without_frames_stops_its_encoder(tmp_path, monkeypatch):
    import threading
    import time

    monkeypatch.setattr(media, "SEGMENT_IDLE_S", 0.4)
    out = tmp_path / "idle.mp4"
    w = media.VideoWriter(out, width=64, height=48, fps=25, workers=2, segment_frames=10)
    w.write(_smooth_frames(3, 64, 48))  # a segment open, its encoder waiting for frame 4
    deadline = time.monotonic() + 10
    while w._error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(EngineRuntimeError, match="no frame for"):
        w.write(_smooth_frames(1, 64, 48))
    w.abort()
    assert not out.exists()
    assert not any(t.name.startswith("x264-segment") and t.is_alive() for t in threading.enumerate())


def test_segmented_writer_abort_removes_the_file_and_stops_threads(tmp_path):
    import threading

    out = tmp_path / "ab.mp4"
    w = media.VideoWriter(out, width=64, height=48, fps=25, workers=2, segment_frames=4)
    w.write(_smooth_frames(13, 64, 48))
    w.abort()
    assert not out.exists()
    assert not any(t.name.startswith("x264-segment") and t.is_alive() for t in threading.enumerate())
    with pytest.raises(EngineRuntimeError, match="after close"):
        w.write(_smooth_frames(1, 64, 48))


def test_encoder_workers_default_and_env(tmp_path, monkeypatch):
    assert media.default_encoder_workers(2) == 1 and media.default_encoder_workers(4) == 1
    # one encoder per 2 CPUs (at most 8), each with SEGMENT_THREADS threads: 2 threads per CPU
    assert media.default_encoder_workers(16) == 8 and media.default_encoder_workers(8) == 4
    assert media.default_encoder_workers(12) == 6 and media.default_encoder_workers(64) == 8
    # the tail shrinks over the rounds the CPUs run at full speed at once
    assert media.tail_rounds(8, 16) == 4 and media.tail_rounds(4, 8) == 2 and media.tail_rounds(8, 64) == 8
    assert media.tail_rounds(2, 2) == 1 and media.tail_rounds(3, 64) == 3
    # twice as many encoder threads as CPUs, at least 4 per encoder
    assert media.segment_threads(8, 16) == 4 and media.segment_threads(4, 8) == 4 and media.segment_threads(8, 64) == 16
    assert media.segment_threads(2, 2) == 4 and media.segment_threads(3, 16) == 10
    monkeypatch.setenv("MUSETALK_ENCODER_WORKERS", "3")
    w = media.VideoWriter(tmp_path / "e.mp4", width=64, height=48, fps=25)
    assert w.workers == 3
    w.abort()
    lossless = media.VideoWriter(tmp_path / "e.mkv", width=64, height=48, fps=25, codec="ffv1")
    assert lossless.workers == 1  # segments are for libx264 only
    lossless.abort()
    monkeypatch.setenv("MUSETALK_ENCODER_WORKERS", "many")
    with pytest.raises(Exception, match="MUSETALK_ENCODER_WORKERS"):
        media.VideoWriter(tmp_path / "f.mp4", width=64, height=48, fps=25)


class _MismatchedSegments(media.VideoWriter):
    """A writer whose segment encoders use another preset than the stream: different SPS/PPS."""

    def _segment_context(self):
        preset, self._preset = self._preset, "ultrafast"
        try:
            return super()._segment_context()
        finally:
            self._preset = preset


def test_segment_headers_must_match_the_stream_or_the_job_fails(tmp_path):
    out = tmp_path / "mismatch.mp4"
    w = _MismatchedSegments(out, width=64, height=48, fps=25, workers=2, segment_frames=4)
    w.write(_smooth_frames(8, 64, 48))  # two segments handed to the workers
    with pytest.raises(EngineRuntimeError, match="SPS/PPS"):
        for _ in range(50):  # the next write after the failure raises; close() at the latest
            w.write(_smooth_frames(4, 64, 48))
        w.close()
    w.abort()
    assert not out.exists()
    with pytest.raises(EngineRuntimeError, match="after close"):
        w.write(_smooth_frames(1, 64, 48))


_AVX512_CPU = "processor\t: 0\nflags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 abm avx fma avx2 bmi1 bmi2 clflush avx512f avx512bw\n"


def test_x264_cpu_options_drop_only_avx512(monkeypatch):
    monkeypatch.delenv("MUSETALK_X264_AVX512", raising=False)
    opts = media.x264_cpu_options(_AVX512_CPU)
    names = opts["x264-params"].removeprefix("asm=").split(",")
    assert "AVX512" not in names and {"AVX2", "FMA3", "BMI2", "SSE4.2", "LZCNT"} <= set(names)
    # a CPU without AVX-512 (or a non-x86 one) keeps x264's own detection
    assert media.x264_cpu_options(_AVX512_CPU.replace(" avx512f avx512bw", "")) == {}
    assert media.x264_cpu_options("processor : 0\nFeatures : fp asimd\n") == {}
    # only levels the CPU has: no AVX2 without avx2
    no_avx2 = media.x264_cpu_options(_AVX512_CPU.replace(" avx2", ""))["x264-params"]
    assert "AVX2" not in no_avx2 and "AVX," in no_avx2
    monkeypatch.setenv("MUSETALK_X264_AVX512", "1")
    assert media.x264_cpu_options(_AVX512_CPU) == {}


def test_x264_options_open_on_this_machine():
    # whatever this CPU gets, libx264 accepts it (an x264 that rejected the list would get ())
    expected = media.x264_cpu_options()
    assert dict(media._x264_options()) == expected
