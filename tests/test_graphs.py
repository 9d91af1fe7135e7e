"""CUDA graphs of the engine's fixed-shape steps (``musetalk_job.graphs``).

On this CPU-only CI the steps must be exact pass-throughs (the pipeline's face and encode steps are
compared with the functions they wrap on the tiny models). The tests marked ``cuda`` capture and
replay real graphs; they run on a GPU machine (``pytest tests/test_graphs.py`` on the device).
"""

from __future__ import annotations

import logging
from pathlib import Path
import pytest
import torch

from musetalk_job import graphs
from musetalk_job.errors import SpecError
from musetalk_job.latents import decode_latents, encode_chunk

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "raw, expected",
    [(None, "auto"), ("", "auto"), ("AUTO", "auto"), ("1", "on"), ("on", "on"), ("0", "off"), ("off", "off"), ("No", "off")],
)
def test_env_switch(raw: str | None, expected: str) -> None:
    env = {} if raw is None else {graphs.ENV_GRAPHS: raw}
    assert graphs.mode_from_env(env) == expected


def test_env_switch_rejects_unknown_values_naming_the_variable() -> None:
    with pytest.raises(SpecError, match="MUSETALK_CUDA_GRAPHS='maybe'"):
        graphs.mode_from_env({graphs.ENV_GRAPHS: "maybe"})


def test_auto_uses_graphs_on_large_gpus_only_and_never_on_cpu() -> None:
    gib = 2**30
    gpu = torch.device("cuda")
    assert graphs.decide("auto", gpu, total_bytes=24 * gib) is True  # RTX 3090/4090
    assert graphs.decide("auto", gpu, total_bytes=141 * gib) is True  # H200
    assert graphs.decide("auto", gpu, total_bytes=12 * gib) is False  # RTX 3060/4070: the pool would crowd the job
    assert graphs.decide("auto", gpu, total_bytes=16 * gib) is False
    assert graphs.decide("on", gpu, total_bytes=12 * gib) is True
    assert graphs.decide("off", gpu, total_bytes=141 * gib) is False
    assert graphs.decide("on", torch.device("cpu")) is False
    assert graphs.enabled_from_env(torch.device("cpu"), {graphs.ENV_GRAPHS: "1"}) is False


# ------------------------------------------------------------------------------ CPU: pass-through


def test_on_cpu_a_step_is_the_function_itself() -> None:
    seen: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x * 2

    step = graphs.GraphedStep(fn, torch.device("cpu"), "doubling", enabled=True)
    assert step.enabled is False  # graphs are a CUDA feature
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(step(x), x * 2)
    assert seen == [(2, 3)] and step.captures == 0 and step.shapes == []


def test_a_shared_pool_is_forgotten_only_when_no_step_holds_graphs_in_it() -> None:
    pool = graphs.MemoryPool()
    a, b = object(), object()
    pool.handle = (0, 1)  # as the first capture sets it
    pool.hold(a)
    pool.hold(b)
    pool.release(a)
    assert pool.handle == (0, 1)  # b's graphs still live in it
    pool.release(a)  # releasing twice changes nothing
    assert pool.handle == (0, 1)
    pool.release(b)
    assert pool.handle is None  # the next capture makes a new pool instead of naming a released one


def test_pipeline_steps_compute_what_they_wrap(tiny_models_dir: Path) -> None:
    from musetalk_job.pipeline import Pipeline

    pipe = Pipeline.from_models_dir(tiny_models_dir, device="cpu")
    assert pipe.cuda_graphs is False
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn((3, 8, 32, 32), generator=g), torch.randn((3, 50, 384), generator=g)
    with torch.inference_mode():
        want = decode_latents(pipe.models.vae, pipe.models.unet(latents, pipe._timestep, encoder_hidden_states=cond).sample)
        got = pipe.face_step(latents, cond)
        assert got.dtype == torch.uint8 and got.shape == (3, 256, 256, 3)
        assert torch.equal(got, want)
        crops = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8, generator=g)
        assert torch.equal(pipe.encode_step(crops), encode_chunk(pipe.models.vae, crops))
    pipe.cuda_graphs = True  # asking on CPU changes nothing
    assert pipe.cuda_graphs is False


# ------------------------------------------------------------------------------ CUDA: capture and replay


def _mlp(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)


@cuda
def test_replay_matches_eager_and_results_outlive_later_calls() -> None:
    dev = torch.device("cuda")
    net = _mlp(dev)
    step = graphs.GraphedStep(lambda x: net(x).relu(), dev, "mlp")
    with torch.inference_mode():
        a, b = torch.randn(4, 16, device=dev), torch.randn(4, 16, device=dev)
        ra = step(a)
        rb = step(b)  # replays the graph captured by the first call
        assert step.captures == 1
        assert torch.equal(ra, net(a).relu()) and torch.equal(rb, net(b).relu())
        assert ra.data_ptr() != rb.data_ptr()  # clones: the first result was not overwritten
        step(torch.randn(2, 16, device=dev))  # a new shape: a second graph
        assert step.captures == 2 and len(step.shapes) == 2


@cuda
def test_replay_sees_in_place_weight_changes_and_context_changes_recapture() -> None:
    dev = torch.device("cuda")
    net = _mlp(dev)
    ctx = {"v": 0}
    step = graphs.GraphedStep(lambda x: net(x), dev, "mlp", context=lambda: ctx["v"])
    with torch.inference_mode():
        x = torch.randn(4, 16, device=dev)
        step(x)
        net[0].weight.mul_(2)  # same memory: the captured graph reads it
        assert torch.equal(step(x), net(x)) and step.captures == 1
        ctx["v"] = 1
        assert torch.equal(step(x), net(x)) and step.captures == 2


@cuda
def test_an_uncapturable_step_runs_eagerly_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    dev = torch.device("cuda")

    def syncing(x: torch.Tensor) -> torch.Tensor:
        return x * float(x.sum().item() > -1e9)  # a host sync: not allowed while capturing

    step = graphs.GraphedStep(syncing, dev, "syncing step")
    x = torch.randn(8, device=dev)
    with caplog.at_level(logging.WARNING, logger="musetalk_job.graphs"):
        assert torch.equal(step(x), x)
        assert torch.equal(step(x), x)
    assert step.enabled is False and step.failure
    assert len([r for r in caplog.records if "syncing step" in r.message]) == 1
    torch.cuda.synchronize()  # the device is still usable, its random generator too
    assert torch.randn(4, device=dev).shape == (4,)


@cuda
def test_steps_sharing_a_pool_capture_again_after_both_were_reset() -> None:
    dev = torch.device("cuda")
    net = _mlp(dev)
    pool = graphs.MemoryPool()
    a = graphs.GraphedStep(lambda x: net(x), dev, "a", pool=pool)
    b = graphs.GraphedStep(lambda x: net(x) * 2, dev, "b", pool=pool)
    with torch.inference_mode():
        x = torch.randn(4, 16, device=dev)
        a(x), b(x)
        first = pool.handle
        assert first is not None and a.captures == b.captures == 1
        a.reset()
        assert pool.handle == first  # b still holds graphs in it
        b.reset()
        assert pool.handle is None  # released: a new capture must not name it
        assert torch.equal(a(x), net(x)) and torch.equal(b(x), net(x) * 2)
        assert a.enabled and b.enabled and a.captures == b.captures == 2


@cuda
def test_variants_keep_their_graphs_side_by_side() -> None:
    dev = torch.device("cuda")
    net = _mlp(dev)
    sel = {"v": 1}
    step = graphs.GraphedStep(lambda x: net(x) * sel["v"], dev, "mlp", variant=lambda: sel["v"])
    with torch.inference_mode():
        x = torch.randn(4, 16, device=dev)
        assert torch.equal(step(x), net(x))
        sel["v"] = 2  # same input shape, another variant: its own graph, the first one kept
        assert torch.equal(step(x), net(x) * 2) and step.captures == 2
        sel["v"] = 1
        assert torch.equal(step(x), net(x)) and step.captures == 2  # replayed, not captured again
        assert len(step.shapes) == 2


def _pipe_and_face_inputs(models_dir: Path, seed: int) -> tuple:
    """A CUDA fp16 pipeline, a seeded CPU generator, and UNet inputs for 4 frames."""
    from musetalk_job.pipeline import Pipeline

    pipe = Pipeline.from_models_dir(models_dir, device="cuda", dtype="fp16")
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((4, 8, 32, 32), generator=g).to("cuda", torch.float16)
    cond = torch.randn((4, 50, 384), generator=g).to("cuda", torch.float16)
    return pipe, g, latents, cond


@cuda
def test_pipeline_graphs_per_chunk_size_give_the_eager_frames(tiny_models_dir: Path) -> None:
    pipe, _g, latents, cond = _pipe_and_face_inputs(tiny_models_dir, 1)
    with torch.inference_mode():
        for chunk in (2, 4, 2):  # Pipeline.gpu_chunk: the decoder's images per call
            pipe.gpu_chunk = chunk
            pipe.cuda_graphs = False
            want = pipe.face_step(latents, cond)
            pipe.cuda_graphs = True
            assert torch.equal(pipe.face_step(latents, cond), want), chunk
    assert pipe.face_step.captures == 2  # chunk 2's graph was kept while chunk 4 ran


@cuda
def test_pipeline_graphs_give_the_eager_frames(tiny_models_dir: Path) -> None:
    pipe, g, latents, cond = _pipe_and_face_inputs(tiny_models_dir, 0)
    crops = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8, generator=g).to("cuda")
    with torch.inference_mode():
        pipe.cuda_graphs = False
        want_faces, want_lat = pipe.face_step(latents, cond), pipe.encode_step(crops)
        pipe.cuda_graphs = True
        for _ in range(2):
            assert torch.equal(pipe.face_step(latents, cond), want_faces)
            assert torch.equal(pipe.encode_step(crops), want_lat)
    assert pipe.face_step.captures == 1 and pipe.encode_step.captures == 1


def _voice_like_wav(path: Path, seconds: float = 2.0, rate: int = 16000) -> Path:
    """A gliding harmonic tone with noise: enough for Whisper features (no espeak-ng on GPU hosts)."""
    import wave

    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 60 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    x = 0.3 * x / np.abs(x).max() + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@cuda
def test_a_job_with_graphs_writes_the_frames_of_a_job_without(tiny_models_dir: Path, face_video: Path, tmp_path: Path) -> None:
    """Batches of 4 over frames with and without faces: face batches of 2, 3 and 4 are captured in
    the middle of the job, while the blend-mask thread uses the GPU on its own stream."""
    from musetalk_job.media import read_frames
    from musetalk_job.options import EngineOptions
    from musetalk_job.pipeline import Pipeline

    from musetalk_job.landmarks.boxes import write_boxes_file

    audio = _voice_like_wav(tmp_path / "voice.wav")
    frames = read_frames(face_video).frames
    h, w = frames.shape[1:3]
    box = (w // 3, h // 6, w // 3 + w // 4, h // 6 + h // 3)  # around the face; none on frames 5 and 6
    write_boxes_file(tmp_path / "boxes.json", [None if i in (5, 6) else box for i in range(frames.shape[0])])
    pipe = Pipeline.from_models_dir(tiny_models_dir, device="cuda", dtype="fp16")
    # lossless output: the frames themselves are compared
    opts = EngineOptions(boxes_file=tmp_path / "boxes.json", codec="ffv1", batch_size=4)
    pipe.cuda_graphs = False
    a = pipe.run(face_video, audio, tmp_path / "a.mkv", opts)
    pipe.cuda_graphs = True
    b = pipe.run(face_video, audio, tmp_path / "b.mkv", opts)
    assert pipe.last_timings["cuda_graphs"] is True and pipe.face_step.failure is None
    assert len(pipe.face_step.shapes) >= 2  # the full batch and at least one ragged one
    fa, fb = read_frames(a.output).frames, read_frames(b.output).frames
    assert fa.shape == fb.shape and (fa == fb).all()


@cuda
def test_frames_uploaded_on_demand_or_beside_the_compute_give_the_frames_of_one_upload(tiny_models_dir: Path, face_video: Path, tmp_path: Path) -> None:
    """The generate loop's input frames go to the GPU a batch's rows at a time (the default) or all
    in one copy, from pinned memory on a copy stream (the default) or from pageable memory on the
    compute stream: the feed holds exactly the rows asked for, and every way writes the same frames."""
    import numpy as np

    from musetalk_job.landmarks.boxes import write_boxes_file
    from musetalk_job.media import read_frames
    from musetalk_job.options import EngineOptions
    from musetalk_job.pipeline import Pipeline, _FrameFeed

    frames = read_frames(face_video).frames
    feed = _FrameFeed(frames, torch.device("cuda"), None)
    assert feed.rows(3) is not None and feed.done == 3
    assert np.array_equal(feed.dev[:3].cpu().numpy(), frames[:3])
    feed.rows(2)  # rows already there: nothing copied again
    assert feed.done == 3
    feed.rows(10**6)
    assert feed.done == frames.shape[0] and np.array_equal(feed.dev.cpu().numpy(), frames)
    whole = _FrameFeed(frames, torch.device("cuda"), None, on_demand=False)
    whole.rows(1)
    assert whole.done == frames.shape[0]
    # Staged in pinned memory and copied on a side stream: the compute stream sees the same rows.
    side = _FrameFeed(frames, torch.device("cuda"), None, copy_stream=torch.cuda.Stream())
    assert side.copy_stream is not None
    first = side.rows(3).narrow(0, 0, 3).clone()  # read on the compute stream, after its wait
    side.rows(10**6)
    assert np.array_equal(first.cpu().numpy(), frames[:3])
    assert np.array_equal(side.dev.cpu().numpy(), frames)

    audio = _voice_like_wav(tmp_path / "voice.wav")
    h, w = frames.shape[1:3]
    write_boxes_file(tmp_path / "boxes.json", [(w // 3, h // 6, w // 3 + w // 4, h // 6 + h // 3)] * frames.shape[0])
    pipe = Pipeline.from_models_dir(tiny_models_dir, device="cuda", dtype="fp16")
    pipe.stream_decode = False  # complete frames: the case the one-copy upload covered
    opts = EngineOptions(boxes_file=tmp_path / "boxes.json", codec="ffv1", batch_size=4)
    out = []
    # (on demand, async upload): pageable copies on the compute stream, then pinned ones beside it.
    for on_demand, copies in ((False, False), (True, False), (True, True), (False, True)):
        pipe.upload_on_demand = on_demand
        pipe.async_upload = copies
        name = tmp_path / f"u{int(on_demand)}{int(copies)}.mkv"
        out.append(read_frames(pipe.run(face_video, audio, name, opts).output).frames)
    assert pipe._upload_stream is not None  # the async uploads ran on their stream
    for other in out[1:]:
        assert out[0].shape == other.shape and (out[0] == other).all()


@cuda
def test_jobs_with_the_masks_made_on_the_device_write_the_frames_of_the_cpu_masks(tiny_models_dir: Path, face_video: Path, tmp_path: Path) -> None:
    """``Pipeline.device_masks`` (the default on CUDA) changes where the blend masks are made, not them."""
    from musetalk_job.landmarks.boxes import write_boxes_file
    from musetalk_job.media import read_frames
    from musetalk_job.options import EngineOptions
    from musetalk_job.pipeline import Pipeline

    frames = read_frames(face_video).frames
    audio = _voice_like_wav(tmp_path / "voice.wav")
    h, w = frames.shape[1:3]
    write_boxes_file(tmp_path / "boxes.json", [(w // 3, h // 6, w // 3 + w // 4, h // 6 + h // 3)] * frames.shape[0])
    pipe = Pipeline.from_models_dir(tiny_models_dir, device="cuda", dtype="fp16")
    assert pipe.device_masks is True
    opts = EngineOptions(boxes_file=tmp_path / "boxes.json", codec="ffv1", batch_size=4)
    out = []
    for on_device in (True, False):
        pipe.device_masks = on_device
        out.append(read_frames(pipe.run(face_video, audio, tmp_path / f"m{int(on_device)}.mkv", opts).output).frames)
    assert out[0].shape == out[1].shape and (out[0] == out[1]).all()
