#!/usr/bin/env python3
"""GPU benchmark of the musetalk-job engine: one command, one JSON file.

    python bench/bench.py --out bench.json                 # everything (GPU machine)
    python bench/bench.py make-media --media .bench/media  # only the inputs (any machine, needs ffmpeg)

What it measures (bench/README.md explains the figures):
- the device's ceilings in the same run: dense fp16/bf16 matmul 8192³ and fp16 3x3 convolutions
  shaped like the VAE decoder's (NCHW and channels-last);
- writing full-size random weights in the official layout, and loading them (``Pipeline.from_models_dir``);
- W1: a 1280x720 25 fps 10 s face video + 30 s of speech → 750 output frames, run twice in one
  process (cold = first run after load, warm = second): wall seconds, seconds per stage, output
  frames/s, peak GPU memory;
- per-model micro-benchmarks at the run's batch size (UNet, VAE decode, VAE encode) against their
  FLOP floors (UNet ≈170 GFLOP and VAE decode ≈620 GFLOP per output frame, VAE encode ≈541 GFLOP
  per distinct input frame, masked + full);
- landmark frames/s at a couple of batch sizes (DWPose and the cascade backend).

W1 takes its face boxes from a boxes file made by the cascade backend (``make-media``), because
random DWPose weights find no real face; the landmark stage is timed separately on the same frames.
Weights are random: the figures are about speed, not quality.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GFLOP_UNET = 169.6  # per output frame (doc §9.2, torch FlopCounter, multiply-add = 2)
GFLOP_VAE_DECODE = 620.0  # per output frame at 256²
GFLOP_VAE_ENCODE = 541.0  # per distinct input frame (masked + full, 2 × 270.6)

VIDEO_NAME = "face_1280x720_25fps_10s.mp4"
AUDIO_NAME = "speech_30s.wav"
BOXES_NAME = "boxes.json"


# --------------------------------------------------------------------------- media


def synthetic_speech(path: Path, seconds: float, sr: int = 16000, seed: int = 0) -> Path:
    """A speech-like signal: voiced harmonics with a wandering pitch, syllable-rate amplitude
    modulation, two moving formant peaks and short pauses. Used only when espeak-ng is missing."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.3 * t) + 10 * np.sin(2 * np.pi * 2.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    f1 = 500 + 300 * np.sin(2 * np.pi * 1.7 * t + 1.0)
    f2 = 1500 + 500 * np.sin(2 * np.pi * 1.1 * t + 2.0)
    sig = np.zeros(n)
    for k in range(1, 30):
        fk = k * f0
        gain = np.exp(-((fk - f1) ** 2) / (2 * 150.0**2)) + 0.6 * np.exp(-((fk - f2) ** 2) / (2 * 250.0**2)) + 0.02
        sig += gain * np.sin(k * phase) / k**0.5
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t) * 0.5 + 0.5, 0, 1) ** 1.5
    pauses = (np.sin(2 * np.pi * 0.23 * t + 0.5) > -0.8).astype(float)
    sig = sig * syllables * pauses + 0.01 * rng.standard_normal(n)
    pcm = np.clip(sig / np.abs(sig).max() * 0.8 * 32767, -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return path


def make_media(media: Path) -> dict[str, Any]:
    """The W1 inputs: 1280x720 25 fps 10 s face video, ~30 s of speech, cascade face boxes."""
    import shutil

    from musetalk_job.samples import make_face_video, make_speech

    media.mkdir(parents=True, exist_ok=True)
    video, audio, boxes = media / VIDEO_NAME, media / AUDIO_NAME, media / BOXES_NAME
    info: dict[str, Any] = {}
    if not video.exists():
        make_face_video(video, seconds=10.0, fps=25.0, size=(1280, 720))
    if not audio.exists():
        if shutil.which("espeak-ng"):
            text = (
                "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
                "Peter Piper picked a peck of pickled peppers. How much wood would a woodchuck chuck. "
                "Lip sync models map speech sounds to mouth shapes, frame by frame, twenty five times a second. "
                "This benchmark speaks for about thirty seconds so that the engine renders seven hundred and fifty frames."
            )
            make_speech(audio, text=text, seconds=30.0)
            info["speech"] = "espeak-ng"
        else:
            synthetic_speech(audio, 30.0)
            info["speech"] = "synthetic"
    if not boxes.exists():
        from musetalk_job.landmarks import detect_boxes, load_detector
        from musetalk_job.landmarks.boxes import write_boxes_file
        from musetalk_job.media import read_frames

        frames = read_frames(video).frames
        det = load_detector("cascade", media, "cpu")
        found = detect_boxes(frames, backend="cascade", detector=det)
        write_boxes_file(boxes, found)
        info["faces"] = sum(b is not None for b in found)
    return info


# --------------------------------------------------------------------------- GPU helpers


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cuda_time(fn: Callable[[], Any], warmup: int = 2, iters: int = 5) -> float:
    """Mean seconds per call: CUDA events around ``iters`` calls after ``warmup`` (wall clock on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def ceilings() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    n = 8192
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        s = _cuda_time(lambda: a @ b, warmup=3, iters=10)
        out[f"matmul_{name}_8192_tflops"] = round(2 * n**3 / s / 1e12, 1)
        del a, b
    # 3x3 convs shaped like the VAE decoder's two largest levels, batch 16
    torch.backends.cudnn.benchmark = True
    for label, (c, hw) in {"c256_128px": (256, 128), "c128_256px": (128, 256), "c512_64px": (512, 64)}.items():
        x = torch.randn(16, c, hw, hw, device="cuda", dtype=torch.float16)
        conv = torch.nn.Conv2d(c, c, 3, padding=1).cuda().half()
        flop = 2 * 16 * hw * hw * c * c * 9
        with torch.inference_mode():
            s = _cuda_time(lambda: conv(x), warmup=3, iters=10)
            out[f"conv3x3_fp16_{label}_nchw_tflops"] = round(flop / s / 1e12, 1)
            xc, convc = x.to(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
            s = _cuda_time(lambda: convc(xc), warmup=3, iters=10)
            out[f"conv3x3_fp16_{label}_channels_last_tflops"] = round(flop / s / 1e12, 1)
        del x, conv
    torch.cuda.empty_cache()
    return out


def micro(pipe: Any, batch: int) -> dict[str, Any]:
    """UNet, VAE decode and VAE encode alone at ``batch`` frames: ms/frame and TFLOP/s."""
    import torch

    from musetalk_job.latents import decode_latents

    m = pipe.models
    dev, dtype = pipe.device, pipe.dtype
    t0 = pipe._timestep  # the engine's own (made outside inference mode, as compile warm-up's)
    out: dict[str, Any] = {"batch": batch}
    with torch.inference_mode():
        # Inputs made in inference mode, as the engine's are: dynamo guards on a tensor's
        # inference flag, so tensors made outside it would run the frozen compiled models eagerly.
        lat = torch.randn(batch, 8, 32, 32, device=dev, dtype=dtype)
        cond = torch.randn(batch, 50, 384, device=dev, dtype=dtype)
        img = torch.randn(2 * batch, 3, 256, 256, device=dev, dtype=dtype).clamp(-1, 1)
        s = _cuda_time(lambda: m.unet(lat, t0, encoder_hidden_states=cond).sample)
        out["unet_ms_per_frame"] = round(s / batch * 1e3, 3)
        out["unet_tflops"] = round(GFLOP_UNET * batch / s / 1e3, 1)
        s = _cuda_time(lambda: decode_latents(m.vae, lat[:, :4]))
        out["vae_decode_ms_per_frame"] = round(s / batch * 1e3, 3)
        out["vae_decode_tflops"] = round(GFLOP_VAE_DECODE * batch / s / 1e3, 1)
        from musetalk_job.pipeline import GPU_CHUNK

        if batch > GPU_CHUNK:  # what the engine runs: the decoder in chunks (memory)
            s = _cuda_time(lambda: decode_latents(m.vae, lat[:, :4], GPU_CHUNK))
            out[f"vae_decode_chunk{GPU_CHUNK}_ms_per_frame"] = round(s / batch * 1e3, 3)
        s = _cuda_time(lambda: m.vae.encode(img).latent_dist.mean)
        out["vae_encode_ms_per_input_frame"] = round(s / batch * 1e3, 3)
        out["vae_encode_tflops"] = round(GFLOP_VAE_ENCODE * batch / s / 1e3, 1)
        enc = 2 * pipe._encode_batch(batch)  # images per encoder call in the engine (masked + full)
        if enc < 2 * batch:  # the same images in the engine's calls (compiled at this shape only)
            s = _cuda_time(lambda: [m.vae.encode(img[a : a + enc]).latent_dist.mean for a in range(0, 2 * batch, enc)])
            out[f"vae_encode_calls{enc}_ms_per_input_frame"] = round(s / batch * 1e3, 3)
            out[f"vae_encode_calls{enc}_tflops"] = round(GFLOP_VAE_ENCODE * batch / s / 1e3, 1)
    return out


def landmark_fps(pipe: Any, frames: np.ndarray, batch_sizes: list[int]) -> dict[str, Any]:
    from musetalk_job.landmarks import detect_boxes

    out: dict[str, Any] = {}
    for backend in ("dwpose", "cascade"):
        try:
            det = pipe.detector(backend)
        except Exception as exc:  # report, don't fail the whole benchmark
            out[backend] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        res: dict[str, Any] = {}
        sizes = batch_sizes if backend == "dwpose" else [batch_sizes[0]]
        for bs in sizes:
            sub = frames if backend == "dwpose" else frames[:50]
            detect_boxes(sub[: min(8, len(sub))], backend=backend, detector=det, batch_size=bs)  # warm-up
            _sync()
            t = time.perf_counter()
            boxes = detect_boxes(sub, backend=backend, detector=det, batch_size=bs)
            _sync()
            s = time.perf_counter() - t
            res[f"batch_{bs}"] = {"frames": len(sub), "seconds": round(s, 3), "fps": round(len(sub) / s, 1),
                                  "faces": sum(b is not None for b in boxes)}
        out[backend] = res
    return out


def encoder_micro(frames: np.ndarray, work: Path) -> dict[str, Any]:
    """Where the encoder's time goes (CPU only): RGB→yuv420p conversion, libx264 alone, VideoWriter."""
    import av

    from musetalk_job.media import VideoWriter

    n, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
    out: dict[str, Any] = {"frames": n, "size": f"{w}x{h}"}
    t = time.perf_counter()
    yuv = [
        av.VideoFrame.from_ndarray(f, format="rgb24").reformat(
            format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG", interpolation="BICUBIC"
        )
        for f in frames
    ]
    out["rgb_to_yuv420p_bicubic_ms_per_frame"] = round((time.perf_counter() - t) / n * 1e3, 3)
    planes = [f.to_ndarray() for f in yuv[:50]]
    t = time.perf_counter()
    for a in planes:
        av.VideoFrame.from_ndarray(a, format="yuv420p")
    out["yuv420p_from_ndarray_ms_per_frame"] = round((time.perf_counter() - t) / len(planes) * 1e3, 3)
    import torch

    if torch.cuda.is_available():  # the same conversion as a tensor op on the GPU, for comparison
        x = torch.from_numpy(frames[:64]).cuda()
        m = torch.tensor([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]],
                         device="cuda") / 255.0

        def to_yuv() -> torch.Tensor:
            yuv = x.float() @ m.T + torch.tensor([16.0, 128.0, 128.0], device="cuda")
            y = yuv[..., 0].round().clamp(0, 255).to(torch.uint8)
            uv = torch.nn.functional.avg_pool2d(yuv[..., 1:].permute(0, 3, 1, 2), 2).round().clamp(0, 255)
            return torch.cat([y.flatten(1), uv.to(torch.uint8).flatten(1)], dim=1)

        out["gpu_rgb_to_yuv420p_ms_per_frame"] = round(_cuda_time(to_yuv) / x.shape[0] * 1e3, 4)
    for preset in ("medium", "veryfast", "ultrafast"):
        path = work / f"enc_{preset}.mp4"
        c = av.open(str(path), "w")
        st = c.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"crf": "18", "preset": preset}
        st.codec_context.thread_count = 0
        t = time.perf_counter()
        for i, f in enumerate(yuv):
            f.pts = i
            for pkt in st.encode(f):
                c.mux(pkt)
        for pkt in st.encode(None):
            c.mux(pkt)
        c.close()
        out[f"libx264_{preset}_fps"] = round(n / (time.perf_counter() - t), 1)
    for preset in ("medium", "veryfast"):
        t = time.perf_counter()
        vw = VideoWriter(work / f"vw_{preset}.mp4", width=w, height=h, fps=25.0, preset=preset)
        for k in range(0, n, 64):
            vw.write(frames[k : k + 64])
        vw.close()
        out[f"videowriter_{preset}_fps"] = round(n / (time.perf_counter() - t), 1)
    return out


def probe_pipeline(
    models: Path, media: Path, *, device: str = "cuda", size: str = "full", compile_mode: str = ""
) -> tuple[Any, tuple[Path, Path, Path], dict[str, Any]]:
    """What the probes (``bench/probes/``) start from: the W1 media (made when missing), random
    weights written when missing, the pipeline loaded, compiled when ``compile_mode`` is given and
    warmed up once (compiling at the job batch). Returns the pipeline, (video, audio, boxes) and
    ``{"compile", "warmup_s"}``."""
    from musetalk_job.models.random_weights import write_random_weights
    from musetalk_job.pipeline import Pipeline

    make_media(media)
    if not (models / "musetalkV15" / "unet.pth").exists():
        write_random_weights(models, size=size, version="v15", seed=0)
    pipe = Pipeline.from_models_dir(models, device=device, dtype="fp16" if device.startswith("cuda") else None, version="v15")
    if compile_mode:
        from musetalk_job import compiled

        pipe.compiled = compiled.enable(pipe.models, mode=compile_mode)
    info = {"compile": compile_mode or "eager", "warmup_s": round(pipe.warmup(), 2)}
    return pipe, (media / VIDEO_NAME, media / AUDIO_NAME, media / BOXES_NAME), info


def probe_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``probe_setup`` reads, and ``--out``: what the W1 probes share."""
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--media", type=Path, default=ROOT / ".bench" / "media")
    p.add_argument("--models", type=Path, default=Path("/tmp/musetalk-bench-models"))
    p.add_argument("--compile", default="", help="regional|full (default: eager)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--audio-seconds", type=float, default=None, help="cut W1's speech to this length")


def probe_setup(args: Any, prefix: str) -> tuple[Any, Path, Path, Path, dict[str, Any], Path]:
    """``probe_pipeline`` from a probe's parsed arguments (``models``, ``media``, ``device``, ``size``,
    ``compile``, ``audio_seconds``), plus a fresh work dir and the speech cut to ``audio_seconds``
    when given. Returns the pipeline, video, audio, boxes file, ``info`` and the work dir."""
    pipe, (video, audio, boxes), info = probe_pipeline(
        args.models, args.media, device=args.device, size=args.size, compile_mode=args.compile
    )
    work = Path(tempfile.mkdtemp(prefix=prefix))
    if args.audio_seconds:
        audio = trimmed_audio(audio, work / "speech.wav", args.audio_seconds)
    return pipe, video, audio, boxes, info, work


def graph_pool_gib(pipe: Any) -> Optional[float]:
    """GiB the pipeline's CUDA graph memory pool holds (None without one)."""
    import torch

    handle = pipe.face_step.pool.handle
    if handle is None or not torch.cuda.is_available():
        return None
    held = sum(seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", ())) == tuple(handle))
    return round(held / 2**30, 2)


def run_alone(pipe: Any, batch: int, video: Path, audio: Path, boxes: Optional[Path], out_dir: Path, label: str) -> dict[str, Any]:
    """``w1_run`` at ``batch`` as in a process that only ever runs that batch: the captured CUDA
    graphs of other batches dropped, this batch's captured by a warm-up, the allocator's cache
    emptied before the timed job (so its peak reserved memory is its own)."""
    pipe.drop_cuda_graphs()
    pipe.warmup(batch)
    return w1_run(pipe, video, audio, boxes, out_dir, label, batch_size=batch, empty_cache=True)


def video_frame_copied(original: Callable[..., Any]) -> Callable[..., Any]:
    """``media.VideoWriter._video_frame`` before commit a49d4c4 for I420 input: the frame's planes
    copied from the array by ``from_ndarray`` (with the GIL held); ``original`` for other input.
    For the before/after run only (``--frame-copy-compare``)."""
    import av

    def video_frame(self: Any, data: np.ndarray, kind: str = "rgb") -> Any:
        if kind == "i420":
            return av.VideoFrame.from_ndarray(data, format="yuv420p")
        return original(self, data, kind)

    return video_frame


def composite_per_frame(frames: Any, faces: Any, masks: Any) -> Any:
    """The engine's composite before it was batched (commit c596504): a few tensor operations per
    frame (bilinear resize with ``F.interpolate``, PIL-rounded blend, write-back). For the
    before/after run only (``--composite-compare``)."""
    import torch
    import torch.nn.functional as F

    from musetalk_job.blending import blend_pil

    out = frames.clone()
    height, width = frames.shape[1], frames.shape[2]
    for b, mask in enumerate(masks):
        if mask is None:
            continue
        x1, y1, x2, y2 = mask.box
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        x = faces[b].permute(2, 0, 1).unsqueeze(0).float()
        y = F.interpolate(x, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False, antialias=False)
        face = y.squeeze(0).permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8)
        face = face[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        alpha = mask.to(frames.device)[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        region = out[b, cy1:cy2, cx1:cx2]
        region.copy_(blend_pil(face, region, alpha))
    return out


def prepare_masks_serial(
    frames: np.ndarray,
    boxes: Any,
    bisenet: Any,
    *,
    mode: str = "jaw",
    left_cheek_width: int = 90,
    right_cheek_width: int = 90,
    device: Any = "cpu",
    batch_size: int = 16,
    workers: Optional[int] = None,
    on_ready: Optional[Callable[[dict[int, Any]], None]] = None,
    stop: Any = None,
    frames_ready: Optional[Callable[[int], None]] = None,
    pad: bool = False,
    on_device: bool = False,
) -> list[Any]:
    """``blending.prepare_masks`` before its chunks were pipelined (commit b055a13): each chunk's
    parser inputs, parse and mask finishing one after the other. For the before/after run only
    (``--masks-pipeline-compare``). ``frames_ready`` and ``pad`` as in ``prepare_masks``; the
    masks are made on the CPU pool as then, whatever ``on_device`` says."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from musetalk_job.blending import _finish_mask, _masks_to_make, _module_dtype, _parse, _parser_input, upload_masks

    todo = _masks_to_make(frames, boxes, mode, on_ready)
    device = torch.device(device)
    dtype = _module_dtype(bisenet)
    result: list[Any] = [None] * len(boxes)
    if not todo:
        return result
    batch_size = max(1, int(batch_size))
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(todo), batch_size):
            if stop is not None and stop.is_set():
                return result
            chunk = todo[start : start + batch_size]
            if frames_ready is not None:
                frames_ready(chunk[-1][0] + 1)
            inputs = np.stack(list(pool.map(lambda item: _parser_input(frames[item[0]], item[1]), chunk)))
            if pad and len(inputs) < batch_size:
                inputs = np.concatenate([inputs, np.zeros((batch_size - len(inputs), *inputs.shape[1:]), inputs.dtype)])
            classes = _parse(bisenet, inputs, device, dtype).cpu().numpy()
            masks = pool.map(
                lambda j: _finish_mask(classes[j], chunk[j][1], mode, left_cheek_width, right_cheek_width),
                range(len(chunk)),
            )
            for (i, _), m in zip(chunk, masks):
                result[i] = m
            if on_ready is not None:
                ready = [result[i] for i, _ in chunk]
                upload_masks(ready, device)
                if device.type == "cuda":
                    # The consumer may be another thread on another stream: the copies must be done.
                    torch.cuda.current_stream(device).synchronize()
                on_ready({i: result[i] for i, _ in chunk})
    # Masks are reused for many output frames: put them on the device now, in one copy.
    upload_masks(result, device)
    return result


def engine_function(name: str, replacement: Callable[..., Any]) -> Any:
    """``musetalk_job.blending.<name>`` replaced for the runs inside (the engine looks it up per call)."""
    from musetalk_job import blending

    return patched(blending, name, replacement)


def _frame_key(frame: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(frame[::16, ::16]).tobytes(), digest_size=16).digest()


def dwpose_known_boxes(video: Path, boxes: Path) -> Callable[..., Any]:
    """A ``DWPoseDetector.detect`` that runs the real network on the frames it is given (warp,
    forward pass, flip average, SimCC decode) and returns the boxes file's box for each of them.
    Random DWPose weights find no face, so this is how W1 runs with the landmark stage's real
    cost (``--dwpose-w1``); the frames are recognised by their content."""
    from musetalk_job.landmarks.boxes import read_boxes_file
    from musetalk_job.media import read_frames

    frames = read_frames(video).frames
    table = {_frame_key(f): b for f, b in zip(frames, read_boxes_file(boxes, len(frames)))}

    def detect(self: Any, frames: np.ndarray, *, bbox_shift: int = 0, batch_size: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> list[Any]:
        self.keypoints(frames, batch_size=batch_size, progress=progress)
        return [table[_frame_key(f)] for f in frames]

    return detect


def trimmed_video(video: Path, boxes: Path, out_dir: Path, frames: int) -> tuple[Path, Path]:
    """The first ``frames`` frames of ``video`` (re-encoded with PyAV, crf 12) and their boxes file."""
    import av

    from musetalk_job.landmarks.boxes import read_boxes_file, write_boxes_file
    from musetalk_job.media import read_frames

    src = read_frames(video)
    dst = out_dir / f"face_{frames}f.mp4"
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=int(round(src.fps)))
        stream.width, stream.height, stream.pix_fmt = src.frames.shape[2], src.frames.shape[1], "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for f in src.frames[:frames]:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode(None))
    cut = out_dir / f"boxes_{frames}f.json"
    write_boxes_file(cut, list(read_boxes_file(boxes, len(src.frames)))[:frames])
    return dst, cut


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far, all its threads (x264's included)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def host_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def compare_summary(runs: dict[str, Any], names: tuple[str, str], rounds: int, fast_preset: str) -> dict[str, Any]:
    """Median wall time of each variant ``warm_{name}_r{round}`` per preset, and whether every run
    of a preset wrote the same bytes."""
    summary: dict[str, Any] = {}
    for sfx in [""] + ([f"_preset_{fast_preset}"] if fast_preset else []):
        if f"warm_{names[0]}_r0{sfx}" not in runs:  # a compare run at one preset only
            continue
        walls = {name: [runs[f"warm_{name}_r{r}{sfx}"]["wall_s"] for r in range(rounds)] for name in names}
        summary[sfx.lstrip("_") or "default_preset"] = {
            "median_wall_s": {name: round(statistics.median(v), 3) for name, v in walls.items()},
            "walls_s": walls,
            "same_output": len({runs[f"warm_{n}_r{r}{sfx}"]["output_sha256"] for n in names for r in range(rounds)}) == 1,
        }
    return summary


@contextlib.contextmanager
def patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """``owner.name`` replaced for the duration (a before/after run of an engine method)."""
    saved = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def w1_run(
    pipe: Any, video: Path, audio: Path, boxes: Optional[Path], out_dir: Path, label: str, *, empty_cache: bool = False, **opts: Any
) -> dict[str, Any]:
    """One job, timed. ``empty_cache``: release the allocator's cached blocks first, so that the
    peak reserved memory is this job's own (plus the CUDA graph pool, which stays)."""
    import torch

    from musetalk_job.options import EngineOptions

    options = EngineOptions(boxes_file=boxes, **opts)
    cuda = torch.cuda.is_available()
    _sync()
    if cuda:
        if empty_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t, cpu0 = time.perf_counter(), cpu_seconds()
    result = pipe.run(video, audio, out_dir / f"w1_{label}.mp4", options)
    wall = time.perf_counter() - t
    cpu_s = cpu_seconds() - cpu0
    from musetalk_job.media import probe

    info = probe(result.output)
    size_bytes = Path(result.output).stat().st_size
    digest = hashlib.sha256(Path(result.output).read_bytes()).hexdigest()[:16]
    stats = result.stats()
    stats["output_probe"] = {"duration_s": info.duration_s, "fps": info.fps, "n_frames": info.n_frames,
                             "has_audio": info.has_audio, "video_codec": info.video_codec}
    stats.update(
        wall_s=round(wall, 3),
        output_fps=round(result.frames / wall, 1),
        # the host's CPUs the job kept busy: near 1.0 means the CPU side bounds the job
        cpu_s=round(cpu_s, 2),
        cpu_busy=round(cpu_s / (wall * host_cpus()), 3),
        peak_gpu_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        # reserved: what the process holds from the driver (CUDA graph pools included)
        peak_gpu_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        output_bytes=size_bytes,
        output_sha256=digest,  # same frames in, same bytes out: before/after runs compare this
        detail={k: (round(v, 4) if isinstance(v, float) else v) for k, v in pipe.last_timings.items()},
        options={k: str(v) for k, v in opts.items()},
    )
    if cuda:
        stats["graph_pool_gib"] = graph_pool_gib(pipe)
    return stats


def trimmed_audio(src: Path, dst: Path, seconds: float) -> Path:
    with wave.open(str(src), "rb") as r:
        params = r.getparams()
        data = r.readframes(int(seconds * params.framerate))
    with wave.open(str(dst), "wb") as w:
        w.setparams(params)
        w.writeframes(data)
    return dst


def op_floors(pipe: Any, batch: int) -> dict[str, Any]:
    """Each model's op floor at the engine's call shapes (``bench/probes/gpu_floor.py``): every
    conv/linear/attention timed alone with cuDNN's best algorithm and layout, summed."""
    import torch

    sys.path.insert(0, str(ROOT / "bench" / "probes"))
    import gpu_floor

    from musetalk_job.pipeline import GPU_CHUNK

    m, dev, dtype = pipe.models, pipe.device, pipe.dtype
    calls = gpu_floor.model_calls(m, dev, dtype, batch, min(batch, GPU_CHUNK), 2 * pipe._encode_batch(batch))
    models = {"unet": m.unet, "vae_decode": m.vae, "vae_encode": m.vae}
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        out = {k: gpu_floor.op_floor(k, models[k], fn, dev, dtype, n, None) for k, (fn, n) in calls.items()}
    finally:
        torch.backends.cudnn.benchmark = prev
    for v in out.values():
        v.pop("ops_by_floor_time", None)
        v.pop("frames_per_call", None)
    return out


def floors(run: dict[str, Any], ceil: dict[str, Any], mic: dict[str, Any], ops: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each GPU stage against its FLOP floor at the measured fp16 matmul ceiling and, with
    ``ops`` (``op_floors``), against the sum of its ops' own best times at the engine's shapes."""
    peak = ceil.get("matmul_fp16_8192_tflops") or ceil.get("matmul_bf16_8192_tflops")
    frames, faces = run["frames"], run["frames_with_face"]
    st = dict(run["stage_seconds"])
    # The VAE encode ran inside the generate loop (Pipeline.latents_in_loop): its device time is in
    # "generate" there. Its own figures come from the micro-benchmarks; the loop is compared with
    # the UNet + decode floor plus the encode's floor. (A cache hit encodes nothing: flag off.)
    in_loop = bool(run.get("detail", {}).get("latents_in_loop"))
    if in_loop:
        st["generate"], st["latents"] = st["generate"] + st["latents"], 0.0
    gen_floor = (GFLOP_UNET + GFLOP_VAE_DECODE) * frames / peak / 1e3
    enc_floor = GFLOP_VAE_ENCODE * faces / peak / 1e3
    if in_loop:
        gen_floor += enc_floor
    by_op: dict[str, Any] = {}
    if ops:
        gen_op = (ops["unet"]["op_floor_ms_per_frame"] + ops["vae_decode"]["op_floor_ms_per_frame"]) * frames / 1e3
        lat_op = ops["vae_encode"]["op_floor_ms_per_frame"] * 2 * faces / 1e3  # masked + full crop
        if in_loop:
            gen_op += lat_op
        by_op = {
            "generate_op_floor_s": round(gen_op, 3),
            "generate_vs_op_floor": round(gen_op / st["generate"], 3) if st["generate"] else None,
            "latents_op_floor_s": round(lat_op, 3),
            "latents_vs_op_floor": round(lat_op / st["latents"], 3) if st["latents"] else None,
            **{f"{k}_vs_op_floor": round(ops[m]["op_floor_ms_per_frame"] / mic[k], 3)
               for k, m in (("unet_ms_per_frame", "unet"), ("vae_decode_chunk32_ms_per_frame", "vae_decode"))
               if mic.get(k)},
        }
        enc_key = next((k for k in mic if k.startswith("vae_encode_calls") and k.endswith("_ms_per_input_frame")), None)
        if enc_key:
            by_op["vae_encode_calls_vs_op_floor"] = round(2 * ops["vae_encode"]["op_floor_ms_per_frame"] / mic[enc_key], 3)
    return {
        **by_op,
        "ceiling_tflops": peak,
        "generate_floor_s": round(gen_floor, 3),
        "generate_s": st["generate"],
        "generate_efficiency": round(gen_floor / st["generate"], 3) if st["generate"] else None,
        "latents_floor_s": round(enc_floor, 3),
        "latents_s": st["latents"],
        "latents_efficiency": round(enc_floor / st["latents"], 3) if st["latents"] else None,
        "unet_efficiency": round(mic["unet_tflops"] / peak, 3),
        "vae_decode_efficiency": round(mic["vae_decode_tflops"] / peak, 3),
        "vae_encode_efficiency": round(mic["vae_encode_tflops"] / peak, 3),
        # At the call sizes the engine uses (chunked decode, encoder calls): what compile covers.
        **{k.replace("_tflops", "_efficiency"): round(v / peak, 3) for k, v in mic.items() if k.endswith("_tflops") and "calls" in k},
        **{f"vae_decode_chunk{c}_efficiency": round(GFLOP_VAE_DECODE / (v / 1e3) / 1e3 / peak, 3)
           for k, v in mic.items() if k.startswith("vae_decode_chunk") and (c := k.split("chunk")[1].split("_")[0])},
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return os.environ.get("BENCH_COMMIT", "unknown")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from musetalk_job.media import read_frames
    from musetalk_job.models.random_weights import write_random_weights
    from musetalk_job.pipeline import Pipeline

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench: no CUDA device; use --device cpu --size tiny for a smoke run")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or _commit(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "weights": f"random, {args.size}",
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(report, indent=2))

    report["media"] = make_media(args.media)
    out_dir = Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    video, boxes = args.media / VIDEO_NAME, args.media / BOXES_NAME
    audio = args.media / AUDIO_NAME
    if args.audio_seconds:
        audio = trimmed_audio(audio, out_dir / "speech_trimmed.wav", args.audio_seconds)
    if cuda and not args.skip_ceilings:
        report["ceilings"] = ceilings()
    save()

    models = Path(args.models)
    t = time.perf_counter()
    if not (models / "musetalkV15" / "unet.pth").exists():
        write_random_weights(models, size=args.size, version="v15", seed=0)
        report["weights_write_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    pipe = Pipeline.from_models_dir(models, device=args.device, dtype=args.dtype if cuda else None, version="v15")
    if cuda:
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
        report["cudnn_benchmark"] = bool(args.cudnn_benchmark)
    if args.warmup:
        report["warmup_s"] = round(pipe.warmup(args.batch_size), 2)
    _sync()
    report["model_load_s"] = round(time.perf_counter() - t, 2)
    report["dtype"] = str(pipe.dtype).replace("torch.", "")
    save()

    runs: dict[str, Any] = {}
    report["w1"] = runs
    if args.compile:
        # Every run below with torch.compile (MUSETALK_COMPILE's modes); eager repeats at the end.
        from musetalk_job import compiled

        t = time.perf_counter()
        pipe.compiled = compiled.enable(pipe.models, mode=args.compile)
        report["compile_enabled"] = pipe.compiled
        report["compile_cache"] = str(compiled.cache_dir())
        report["compile_warmup_s"] = round(pipe.warmup(args.batch_size), 2)  # compiles at the job batch
        report["compile_failure"] = compiled.failure(pipe.models)
        save()
    report["cuda_graphs"] = {"enabled": pipe.cuda_graphs, "face_step_failure": pipe.face_step.failure,
                             "encode_failure": pipe.encode_step.failure}
    runs["cold"] = w1_run(pipe, video, audio, boxes, out_dir, "cold", batch_size=args.batch_size)
    save()
    runs["warm"] = w1_run(pipe, video, audio, boxes, out_dir, "warm", batch_size=args.batch_size)
    save()

    def preset_runs(key: str, label: str, speech: Path, *, fast: bool = True, **attrs: Any) -> None:
        """W1-style runs at the default (and, with ``fast``, the fast) preset with ``pipe`` attributes
        set for them and restored afterwards."""
        presets = ["", args.fast_preset] if fast and args.fast_preset else [""]
        saved = {name: getattr(pipe, name) for name in attrs}
        for name, value in attrs.items():
            setattr(pipe, name, value)
        try:
            for preset in presets:
                runs[key + (f"_preset_{preset}" if preset else "")] = w1_run(
                    pipe, video, speech, boxes, out_dir, label + preset, batch_size=args.batch_size,
                    **({"preset": preset} if preset else {}),
                )
        finally:
            for name, value in saved.items():
                setattr(pipe, name, value)
        save()

    if args.baseline:
        # The encoder hand-off as before this round (CPU colour conversion, one libx264 stream),
        # in the same process: the before/after of the encoder levers from one run.
        preset_runs("warm_baseline_encoder", "base", audio, fast=False, device_colour=False, encoder_workers=1)
    if args.fast_preset and not args.only_cold_warm:
        runs["warm_preset_" + args.fast_preset] = w1_run(
            pipe, video, audio, boxes, out_dir, "fast", batch_size=args.batch_size, preset=args.fast_preset
        )
        save()
    for variant in [v for v in args.encoder_variants.split(",") if v]:
        # W1 warm with another segment-encoder layout: "WORKERS[:AHEAD[:THREADS]]" (segments in
        # flight, libx264 threads per segment; empty: the writer's default).
        w, ahead, threads = (variant.split(":") + ["", ""])[:3]
        preset_runs(f"warm_encoder_{w}x{ahead or 'default'}" + (f"x{threads}t" if threads else ""), f"ev{w}{ahead}{threads}", audio,
                    encoder_workers=int(w), encoder_segments_ahead=int(ahead) if ahead else None,
                    encoder_segment_threads=int(threads) if threads else None)
    if args.short_segment_variants:
        # The 10 s job (250 frames) with other encoder segment sizes: its encoder tail against file size.
        short = trimmed_audio(args.media / AUDIO_NAME, out_dir / "speech_10s.wav", 10.0)
        for k, seg in enumerate(int(v) for v in args.short_segment_variants.split(",") if v):
            preset_runs(f"short_segments_{seg}_{k}", f"ss{seg}", short, encoder_segment_frames=seg)
    if args.graphs_compare and cuda:
        # The face step and the VAE encode launched op by op instead of replayed from CUDA graphs.
        preset_runs("warm_no_graphs", "ng", audio, cuda_graphs=False)
    if args.composite_compare and not args.only_cold_warm:
        # The composite as it was: a few tensor operations per frame instead of per batch.
        with engine_function("composite", composite_per_frame):
            preset_runs("warm_composite_per_frame", "cpf", audio)
    if args.masks_pipeline_compare and not args.only_cold_warm:
        # The blend masks made chunk after chunk, each chunk's CPU and device work one after the other.
        with engine_function("prepare_masks", prepare_masks_serial):
            preset_runs("warm_masks_serial", "ms", audio)
    if args.frame_copy_compare and not args.only_cold_warm:
        # The encoder's I420 frames wrapped around the arrays (the default) against copied into
        # new frames with the GIL held; the rounds alternate which goes first.
        from musetalk_job.media import VideoWriter

        for r in range(args.frame_copy_compare):
            for wrapped in ((True, False) if r % 2 == 0 else (False, True)):
                if wrapped:
                    preset_runs(f"warm_frames_wrapped_r{r}", f"fw{r}", audio)
                else:
                    with patched(VideoWriter, "_video_frame", video_frame_copied(VideoWriter._video_frame)):
                        preset_runs(f"warm_frames_copied_r{r}", f"fc{r}", audio)
        report["frame_copy_compare"] = compare_summary(runs, ("frames_wrapped", "frames_copied"), args.frame_copy_compare, args.fast_preset)
        save()
    if args.stream_decode_compare and not args.only_cold_warm:
        # Crops, VAE encode and masks reading each frame as soon as it is decoded (the default)
        # against decoding every frame first; the rounds alternate which goes first.
        for r in range(args.stream_decode_compare):
            for streamed in ((True, False) if r % 2 == 0 else (False, True)):
                name = "streamed" if streamed else "decode_first"
                preset_runs(f"warm_{name}_r{r}", f"sd{int(streamed)}{r}", audio, stream_decode=streamed)
        report["stream_decode_compare"] = compare_summary(runs, ("streamed", "decode_first"), args.stream_decode_compare, args.fast_preset)
        save()
    if args.dwpose_w1 and not args.only_cold_warm:
        # W1 detecting its faces with DWPose (the default landmarks; the network's real work,
        # the boxes file's boxes), at the fast preset, in two variants (below) in alternating rounds.
        from musetalk_job.landmarks.dwpose import DWPoseDetector

        det = pipe.detector("dwpose")
        det.warmup()  # as Pipeline.warmup() does for a loaded detector
        fast = {"preset": args.fast_preset} if args.fast_preset else {}
        sfx = f"_preset_{args.fast_preset}" if args.fast_preset else ""

        # after: padded batches, analysed a batch at a time as the frames decode; before: unpadded
        # batches once every frame has decoded.
        variants = {"after": (None, True), "before": (False, False)}

        def dw_run(key: str, label: str, variant: str) -> None:
            saved = det.pad_batches, det.independent_frames
            det.pad_batches, det.independent_frames = variants[variant]
            try:
                runs[key + sfx] = w1_run(pipe, video, audio, None, out_dir, label, landmarks="dwpose", **fast)
            finally:
                det.pad_batches, det.independent_frames = saved
            save()

        with patched(DWPoseDetector, "detect", dwpose_known_boxes(video, boxes)):
            # first: the unpadded last batch (250 = 7 x 32 + 26) meets its shape for the first time
            dw_run("dwpose_before_first_job", "dwb", "before")
            order = list(variants)
            for r in range(args.dwpose_w1):
                for k, variant in enumerate(order[r % 2:] + order[: r % 2]):
                    dw_run(f"warm_dwpose_{variant}_r{r}", f"dw{k}{r}", variant)
        report["dwpose_compare"] = compare_summary(runs, tuple(f"dwpose_{v}" for v in variants), args.dwpose_w1, args.fast_preset)
        save()
    if args.decode_threads and not args.only_cold_warm:
        # The video decode's YUV->RGB conversion on --decode-threads threads against the default
        # pool (media._DECODE_POOL): read_frames alone, then W1 with DWPose (whose landmarks wait
        # for the decode) in alternating rounds.
        from concurrent.futures import ThreadPoolExecutor

        from musetalk_job import media
        from musetalk_job.landmarks.dwpose import DWPoseDetector

        wide = ThreadPoolExecutor(max_workers=args.decode_threads, thread_name_prefix="yuv2rgb-wide")
        name = f"decode_threads_{args.decode_threads}"

        def decode_pool(variant: str) -> Any:
            return patched(media, "_DECODE_POOL", lambda: wide) if variant == name else contextlib.nullcontext()

        def alternating(r: int) -> tuple[str, str]:
            return ("decode_default", name) if r % 2 == 0 else (name, "decode_default")

        alone: dict[str, list[float]] = {"decode_default": [], name: []}
        for r in range(3):
            for variant in alternating(r):
                with decode_pool(variant):
                    t = time.perf_counter()
                    read_frames(video)
                    alone[variant].append(round(time.perf_counter() - t, 3))
        report["decode_threads"] = {"read_frames_s": alone, "default_threads": media._DECODE_POOL()._max_workers}
        det = pipe.detector("dwpose")
        det.warmup()
        fast = {"preset": args.fast_preset} if args.fast_preset else {}
        sfx = f"_preset_{args.fast_preset}" if args.fast_preset else ""
        with patched(DWPoseDetector, "detect", dwpose_known_boxes(video, boxes)):
            for r in range(2):
                for variant in alternating(r):
                    with decode_pool(variant):
                        runs[f"warm_{variant}_r{r}{sfx}"] = w1_run(pipe, video, audio, None, out_dir, f"{variant}{r}",
                                                                   landmarks="dwpose", **fast)
                    save()
        report["decode_threads_compare"] = compare_summary(runs, ("decode_default", name), 2, args.fast_preset)
        wide.shutdown()
        save()
    if args.new_length and not args.only_cold_warm:
        # Jobs on a video of a length no job in this process had, as most jobs of a worker are:
        # the first job at that length against the second at it, detecting faces with DWPose
        # (as --dwpose-w1). "after": the engine as it is (DWPose and BiSeNet at one padded shape);
        # "before": both at the video's own last-batch shape, on another new length.
        from musetalk_job import blending
        from musetalk_job.landmarks.dwpose import DWPoseDetector

        det = pipe.detector("dwpose")
        det.warmup()
        fast = {"preset": args.fast_preset} if args.fast_preset else {}
        prepare_masks = blending.prepare_masks

        def unpadded_masks(*a: Any, **k: Any) -> Any:
            return prepare_masks(*a, **{**k, "pad": False})

        for variant, length in (("after", args.new_length), ("before", args.new_length - 16)):
            cut, cut_boxes = trimmed_video(video, boxes, out_dir, length)
            saved = det.pad_batches, det.independent_frames
            with contextlib.ExitStack() as stack:
                stack.enter_context(patched(DWPoseDetector, "detect", dwpose_known_boxes(cut, cut_boxes)))
                if variant == "before":
                    stack.enter_context(engine_function("prepare_masks", unpadded_masks))
                    det.pad_batches, det.independent_frames = False, False
                try:
                    for k in ("first", "second"):
                        runs[f"new_length_{variant}_{k}"] = w1_run(pipe, cut, audio, None, out_dir, f"nl{variant}{k}",
                                                                   landmarks="dwpose", **fast)
                        runs[f"new_length_{variant}_{k}"]["input_frames"] = length
                        save()
                finally:
                    det.pad_batches, det.independent_frames = saved
    if args.masks_compare and not args.only_cold_warm:
        # The blend masks made before generating (the previous behaviour) against during it.
        preset_runs("warm_masks_first", "mf", audio, overlap_masks=False)
    if args.avatar_cache:
        # The same video twice through the avatar cache: the first job builds the entry (miss),
        # the second reuses boxes, latents and masks (hit). Once per preset of --cache-presets.
        import tempfile

        from musetalk_job.cache import AvatarCache

        saved = pipe.avatar_cache
        for preset in [p for p in args.cache_presets.split(",") if p] or [""]:
            sfx = f"_{preset}" if preset else ""
            popts = {"preset": preset} if preset else {}

            def pair(name: str, tag: str, a: Path, b: Optional[Path], **kw: Any) -> None:
                pipe.avatar_cache = AvatarCache(Path(root) / f"{name}{sfx}")
                first = runs[f"{name}_first{sfx}"] = w1_run(pipe, video, a, b, out_dir, f"{tag}1", batch_size=args.batch_size, **popts, **kw)
                rep = runs[f"{name}_repeat{sfx}"] = w1_run(pipe, video, a, b, out_dir, f"{tag}2", batch_size=args.batch_size, **popts, **kw)
                rep["speedup_vs_first"] = round(first["wall_s"] / rep["wall_s"], 2)
                # More repeats, alternating: rendering the frames while they decode (the default)
                # against decoding them all first.
                for r in range(args.cache_stream_compare):
                    for streamed in ((True, False) if r % 2 == 0 else (False, True)):
                        variant = "streamed" if streamed else "decode_first"
                        saved_stream, pipe.stream_decode = pipe.stream_decode, streamed
                        try:
                            runs[f"{name}_repeat_{variant}_r{r}{sfx}"] = w1_run(
                                pipe, video, a, b, out_dir, f"{tag}{r}{int(streamed)}", batch_size=args.batch_size, **popts, **kw)
                        finally:
                            pipe.stream_decode = saved_stream

            with tempfile.TemporaryDirectory(prefix="musetalk-bench-cache-") as root:
                pair("cache", "c", audio, boxes)
                # A first job that really detects its faces (the cascade backend: random DWPose
                # weights find none), then a repeat that takes everything from the cache.
                pair("cache_detect", "cd", audio, None, landmarks="cascade")
                # A short job (10 s of speech over the same 10 s video): preprocessing is a larger share.
                short = trimmed_audio(args.media / AUDIO_NAME, out_dir / "speech_10s.wav", 10.0)
                pair("short_cache", "s", short, boxes)
            save()
        pipe.avatar_cache = saved
    if args.memory_batches:
        # Peak device memory and speed per batch size on a 10 s job (250 output frames).
        short = trimmed_audio(args.media / AUDIO_NAME, out_dir / "speech_10s.wav", 10.0)
        keys = ("wall_s", "output_fps", "peak_gpu_mem_gib", "peak_gpu_reserved_gib", "graph_pool_gib", "batch_size")
        report["memory"] = {}
        for b in args.memory_batches:  # each batch alone (run_alone)
            r = run_alone(pipe, b, video, short, boxes, out_dir, f"mem{b}")
            report["memory"][str(b)] = {k: r.get(k) for k in keys}
        save()
    batch = runs["warm"]["batch_size"]
    report["micro"] = micro(pipe, batch)
    save()
    if cuda and args.channels_last and not args.only_cold_warm:
        pipe.use_channels_last(True)
        report["micro_channels_last"] = micro(pipe, batch)
        runs["warm_channels_last"] = w1_run(pipe, video, audio, boxes, out_dir, "cl", batch_size=args.batch_size)
        pipe.use_channels_last(False)
        save()
    if cuda and args.op_floor:
        report["op_floor"] = op_floors(pipe, batch)
    if cuda and "ceilings" in report:
        report["floors"] = floors(runs["warm"], report["ceilings"], report["micro"], report.get("op_floor"))
    save()
    if args.compile and args.eager_compare:
        # The same build eager, in the same process: the compile before/after from one run.
        from musetalk_job import compiled

        compiled.disable(pipe.models)
        pipe.compiled = False
        report["eager_warmup_s"] = round(pipe.warmup(args.batch_size), 2)  # captures the eager CUDA graphs
        preset_runs("warm_eager", "eager", audio)
        if args.graphs_compare:
            preset_runs("warm_eager_no_graphs", "eng", audio, cuda_graphs=False)
        report["micro_eager"] = micro(pipe, batch)
        save()
    if args.compile and args.compile_channels_last and cuda:
        # Channels-last weights compiled afresh: inductor fuses the GroupNorm/SiLU that made
        # channels-last slower eagerly (run 1); the convolutions are 1.3-1.6x faster in NHWC.
        from musetalk_job import compiled

        compiled.disable(pipe.models)
        pipe.use_channels_last(True)
        try:
            pipe.compiled = compiled.enable(pipe.models, mode=args.compile)
            report["compile_channels_last_warmup_s"] = round(pipe.warmup(args.batch_size), 2)
            report["compile_channels_last_failure"] = compiled.failure(pipe.models)
            save()
            preset_runs("warm_compiled_channels_last", "ccl", audio)
            report["micro_compiled_channels_last"] = micro(pipe, batch)
        finally:
            compiled.disable(pipe.models)
            pipe.use_channels_last(False)
            pipe.compiled = False
        save()
    frames = read_frames(video).frames
    if args.encoder_micro:
        report["encoder"] = encoder_micro(frames if cuda else frames[:20], out_dir)
        save()
    if cuda and args.cudnn_compare:
        # cudnn heuristics (no autotuning) against the autotuned algorithms kept from the runs above
        torch.backends.cudnn.benchmark = False
        report["micro_cudnn_heuristics"] = micro(pipe, batch)
        torch.backends.cudnn.benchmark = True
        save()
    report["landmarks"] = landmark_fps(pipe, frames if cuda else frames[:16], args.landmark_batches)
    save()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="bench", choices=["bench", "make-media"])
    p.add_argument("--out", default="bench.json", help="JSON report path")
    p.add_argument("--media", type=Path, default=ROOT / ".bench" / "media", help="input media folder (made if missing)")
    p.add_argument("--models", default="/tmp/musetalk-bench-models", help="models dir (random full weights written if missing)")
    p.add_argument("--work", default="/tmp/musetalk-bench-out", help="where the output videos go")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run with --size tiny)")
    p.add_argument("--size", default="full", choices=["full", "tiny"], help="random weights size")
    p.add_argument("--audio-seconds", type=float, default=None, help="trim the speech (smoke runs)")
    p.add_argument("--batch-size", type=int, default=None, help="default: chosen from free GPU memory")
    p.add_argument("--fast-preset", default="veryfast", help="an extra warm run with this x264 preset ('' to skip)")
    p.add_argument("--channels-last", type=int, default=1, help="also measure channels-last UNet/VAE (1/0)")
    p.add_argument("--warmup", type=int, default=1, help="Pipeline.warmup() after loading, before the cold run (1/0)")
    p.add_argument("--cudnn-benchmark", type=int, default=0, help="torch.backends.cudnn.benchmark for the runs (1/0)")
    p.add_argument("--cudnn-compare", type=int, default=1, help="also time the models with cudnn heuristics (1/0)")
    p.add_argument("--encoder-micro", type=int, default=1, help="time RGB->YUV conversion and libx264 alone (1/0)")
    p.add_argument("--avatar-cache", type=int, default=1, help="also run the same video twice through the avatar cache (1/0)")
    p.add_argument("--memory-batches", type=int, nargs="*", default=[8, 16, 32, 64],
                   help="peak GPU memory and speed of a 10 s job at each batch size ('' to skip)")
    p.add_argument("--baseline", type=int, default=1, help="also run W1 with the old encoder hand-off (1/0)")
    p.add_argument("--compile", default="", help="regional|full: every run with torch.compile")
    p.add_argument("--eager-compare", type=int, default=1, help="with --compile: also W1 warm and micro eager at the end (1/0)")
    p.add_argument("--compile-channels-last", type=int, default=0, help="with --compile: also compile channels-last weights afresh and run W1 warm (1/0)")
    p.add_argument("--encoder-variants", default="", help="comma list WORKERS[:AHEAD[:THREADS]] of segment-encoder layouts to run W1 warm with")
    p.add_argument("--short-segment-variants", default="", help="comma list of encoder segment sizes to run the 10 s job with")
    p.add_argument("--graphs-compare", type=int, default=1, help="also W1 warm without CUDA graphs (CUDA; 1/0)")
    p.add_argument("--composite-compare", type=int, default=1, help="also W1 warm with the per-frame composite of before (1/0)")
    p.add_argument("--cache-stream-compare", type=int, default=0,
                   help="rounds of extra avatar-cache repeats, streamed decode against decoded first")
    p.add_argument("--frame-copy-compare", type=int, default=1,
                   help="rounds of W1 warm with the encoder's I420 frames wrapped against copied (0: skip)")
    p.add_argument("--stream-decode-compare", type=int, default=1,
                   help="rounds of W1 warm with the frames used while they decode against decoded first (0: skip)")
    p.add_argument("--masks-pipeline-compare", type=int, default=1, help="also W1 warm with the mask chunks made one after the other (1/0)")
    p.add_argument("--dwpose-w1", type=int, default=1,
                   help="rounds of W1 detecting faces with DWPose, padded and while decoding against before (0: skip)")
    p.add_argument("--new-length", type=int, default=233,
                   help="W1 twice on the video cut to this many frames, and (before) to 16 fewer: first jobs at a new length (0: skip)")
    p.add_argument("--decode-threads", type=int, default=0,
                   help="also decode with this many YUV->RGB threads against the default: read_frames and W1 with DWPose (0: skip)")
    p.add_argument("--masks-compare", type=int, default=1, help="also W1 warm with the blend masks made before generating (1/0)")
    p.add_argument("--cache-presets", default="", help="comma list of x264 presets for the avatar-cache pairs ('' = the default)")
    p.add_argument("--skip-ceilings", action="store_true")
    p.add_argument("--op-floor", type=int, default=1, help="time every model op alone at the engine's shapes (CUDA; 1/0)")
    p.add_argument("--only-cold-warm", action="store_true", help="skip the preset/channels-last extra runs")
    p.add_argument("--landmark-batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if args.command == "make-media":
        print(json.dumps(make_media(args.media)))
        return 0
    report = bench(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
