"""The engine's orchestrator: face video + speech audio → lip-synced MP4 with MuseTalk.

Contract::

    pipe = Pipeline.from_models_dir(models_dir, device=None, dtype=None, version="v15")
    result = pipe.run(video, audio, output, EngineOptions(...), progress=None, cancel=None)

``run`` reads top to bottom (docs/engine.md has the full account):

1. ``decode``    — input frames (RGB uint8, constant fps) and 16 kHz mono audio;
   ``T = floor(audio_s · fps)`` output frames (exact fps), ``T == 0`` → ``InputMediaError``.
2. ``landmarks`` — one face box per *used* input frame, from ``options.boxes_file`` or the landmark
   detector. Output frame ``i`` shows input frame ``pingpong(i)`` over ``L + reversed(L)``; when
   ``T < N`` only the first ``T`` input frames are used, so only those are analysed (all of them
   when ``save_boxes`` is set). No face in any used frame → ``InputMediaError``.
3. ``latents``   — per distinct input frame with a face, once: crop (box + ``extra_margin`` for
   v1.5) → 256² LANCZOS4 → VAE mean latents ``[N_face, 8, 32, 32]`` on the device (by default a
   chunk at a time inside ``generate``, as its batches first need them: ``latents_in_loop``); blend masks
   (BiSeNet) once per distinct frame, in a background thread that runs on into ``generate``
   (``blending.MaskStream``; the time ``generate`` waits for them is timed as ``blend``).
4. ``audio``     — Whisper features → ``[T, 50, 384]`` windows + positional encoding.
5. ``generate``  — batches over output frames: UNet(t=0) + VAE decode for the frames with a face,
   composite on the device (``blend``), copy to pinned host memory, hand to the background
   encoder (``encode``). Frames without a face are passed through untouched.

Everything that does not depend on the audio is built by ``prepare_video`` into a
``PreparedVideo`` so that an avatar cache can keep and reuse it.

Errors: ``SpecError`` (version mismatch), ``InputMediaError`` (no audio frames, no face),
``ModelsError`` (from the loaders), ``EngineRuntimeError`` (out of GPU memory at batch size 1,
encoder/ffmpeg failures), ``Cancelled`` (the ``cancel`` event was set; checked between batches).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from . import compiled, graphs
from .models import upsample
from .blending import MaskStream
from .errors import Cancelled, EngineRuntimeError, InputMediaError, JobError, SpecError
from .latents import crop_faces, decode_latents, encode_chunk, encode_faces
from .options import EngineOptions, ProgressFn, Result

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]

# Device memory model for the automatic batch size (fp16/bf16; fp32 doubles the model terms).
# The VAE decoder's 256² activations dominate (~150 MiB per image unchunked on an H200: 12.4 GiB
# peak at batch 64, of which ~1.8 GiB weights and 0.7 GiB input frames; ~95 MiB chunked). They are
# bounded by GPU_CHUNK images per call whatever the batch, so they are a fixed workspace; what
# grows with the batch is the UNet's small activations, the faces and the composite's buffers.
_WORKSPACE_PER_CHUNK_IMAGE_HALF = 100 * 2**20  # measured ~95 MiB (W1 peak 4.24 GiB at chunks of 16)
_BYTES_PER_FRAME_HALF = 4 * 2**20
_MAX_AUTO_BATCH = 64
_CPU_BATCH = 4
_FREE_MEMORY_FRACTION = 0.6
_ENCODE_BATCH_FACTOR = 2  # VAE encode runs masked+full together: half the frames per call
# On CUDA the memory-heavy 256²/512² convolutions (VAE decode and encode, BiSeNet) run in chunks
# of at most this many images whatever the job's batch size: their activations, not the UNet's,
# set the peak. H200, fp16, W1 at batch 64: unchunked 12.4 GiB peak; chunks of 16 4.2 GiB but the
# eager decoder 25 % slower per frame (3.20 vs 2.56 ms); 32 is the compromise (bench/README.md).
GPU_CHUNK = 32
CUDNN_BENCHMARK = False


def pingpong_indices(num_output: int, num_input: int) -> np.ndarray:
    """Input frame for each output frame: ``i mod 2N`` over ``L + reversed(L)`` (official cycling)."""
    if num_input <= 0:
        raise ValueError("num_input must be positive")
    k = np.arange(num_output, dtype=np.int64) % (2 * num_input)
    return np.where(k < num_input, k, 2 * num_input - 1 - k)


def used_input_frames(num_output: int, num_input: int) -> int:
    """How many leading input frames the output uses: all when ``T >= N``, else the first ``T``."""
    return min(num_output, num_input)


@dataclass
class PreparedVideo:
    """Everything about the input video that does not depend on the audio.

    ``latents``/``masks``/``face_rows`` cover ``frames[:n_used]``; ``boxes`` has one entry per
    input frame (before ``extra_margin``; ``None`` for no face or a frame that was not analysed).
    """

    frames: np.ndarray  # [N, H, W, 3] uint8 RGB
    fps: float
    boxes: list[Optional[Box]]
    n_used: int
    face_rows: np.ndarray  # [n_used] int64: row into ``latents`` or -1 (no face)
    latents: torch.Tensor  # [N_face, 8, 32, 32], model dtype, on the device
    masks: Sequence[Any]  # [n_used] blending.BlendMask | None (box after extra_margin); a MaskStream while in the making
    version: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Latents still to encode (``prepare_video(lazy_latents=True)``): ``generate`` fills the rows
    # each batch needs first; ``complete()`` fills the rest.
    pending: Optional["_FaceLatents"] = field(default=None, repr=False)

    def complete(self) -> "PreparedVideo":
        """Every row of ``latents`` encoded (a no-op unless the latents were left to the loop)."""
        if self.pending is not None:
            with torch.inference_mode():
                self.pending.upto(self.pending.n)
            self.pending = None
        return self

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frames_with_face(self) -> int:
        return int((self.face_rows >= 0).sum())


class _Stages:
    """Wall-clock stage timer; CUDA is synchronised only at stage boundaries."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job was cancelled", exit_code=getattr(cancel, "exit_code", None))


def _clip_box(box: Optional[Sequence[int]], width: int, height: int) -> Optional[Box]:
    if box is None:
        return None
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
    y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return (x1, y1, x2, y2)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def auto_batch_size(
    device: torch.device, dtype: torch.dtype, frame_bytes: int, free_bytes: Optional[int] = None, chunk: int = GPU_CHUNK
) -> int:
    """Batch size from free device memory (``free_bytes``, default: what CUDA reports now):
    ``(free·0.6 − chunk workspace) / per-frame bytes``, between 1 and 64; CPU: 4.

    With the models loaded, a 12 GB card (~9.5 GiB free) gets 64 at 720p and 1080p; the job's
    peak stays near weights + ~4 GiB (bench/README.md, "Memory")."""
    if device.type != "cuda":
        return _CPU_BATCH
    if free_bytes is None:
        free_bytes, _total = torch.cuda.mem_get_info(device)
    scale = 2 if dtype == torch.float32 else 1
    workspace = chunk * _WORKSPACE_PER_CHUNK_IMAGE_HALF * scale
    per_frame = _BYTES_PER_FRAME_HALF * scale + 4 * frame_bytes
    return int(max(1, min(_MAX_AUTO_BATCH, (free_bytes * _FREE_MEMORY_FRACTION - workspace) // per_frame)))


class Pipeline:
    """Loaded MuseTalk models on one device plus lazily loaded landmark detectors."""

    def __init__(self, models: Any, models_dir: Path, avatar_cache: Any = "env") -> None:
        from . import cache

        self.models = models
        self.models_dir = Path(models_dir)
        self.version: str = models.version
        self.device: torch.device = models.device
        self.dtype: torch.dtype = models.dtype
        self._detectors: dict[str, Any] = {}
        self._detector_lock = threading.Lock()
        self._timestep = torch.zeros(1, dtype=torch.long, device=self.device)
        self.last_timings: dict[str, float] = {}  # detail of the last generate() for benchmarks
        # Pad ragged batches to a few fixed shapes (see _bucket): on CUDA each new shape costs
        # first-use set-up (cuDNN plans, lazy kernel loading); on CPU there is nothing to gain.
        self.pad_batches = self.device.type == "cuda"
        self.channels_last = False
        # Images per call of the VAE decoder and BiSeNet on CUDA (half as many crops per VAE encode
        # call); benchmarks vary it. It sets the 256²/512² activations' workspace (see GPU_CHUNK).
        self.gpu_chunk = GPU_CHUNK
        self.compiled = False  # torch.compile active (compiled.maybe_enable_from_env)
        # Encoder hand-off: I420 converted on the device (when the writer takes it) and the writer's
        # parallel segments (None: its own choice from the CPU count). Benchmarks switch them off
        # to measure the before/after in one run. On the CPU, swscale is the faster converter
        # (720p: 2.6 ms/frame against 43 ms for colour.rgb_to_i420 on 2 cores).
        self.device_colour = self.device.type == "cuda"
        self.encoder_workers: Optional[int] = None
        self.encoder_segments_ahead: Optional[int] = None  # VideoWriter(segments_ahead=...); None: its default
        self.encoder_segment_frames: Optional[int] = None  # VideoWriter(segment_frames=...); None: its default
        self.encoder_segment_threads: Optional[int] = None  # VideoWriter(segment_threads=...); None: its default
        self.encoder_stream_segments: Optional[bool] = None  # VideoWriter(stream_segments=...); None: its default
        # The blend masks are made while the job generates (generate waits only for the masks of
        # its batch); False waits for all of them before generating (benchmarks' before/after).
        self.overlap_masks = True
        # The input frames are cropped, encoded and parsed while they decode (_decode; False:
        # decode them all first, the benchmarks' before/after).
        self.stream_decode = True
        # The audio's log-mel (CPU) is computed on a thread from the decode on, so the audio stage
        # after the preparation only runs the Whisper encoder (False: all of it there).
        self.early_log_mel = True
        # The generate loop uploads the input frames a batch's worth at a time, as it needs them
        # (False: every used frame in one copy before the first batch).
        self.upload_on_demand = True
        # Latents encoded a chunk at a time as the generate loop first needs them (False: all of
        # them before the loop starts). The loop, and the encoder after it, then start after one
        # chunk of faces instead of all of them; the chunks, and so the values, are the same. The
        # VAE encode's time is then counted in "generate" (run 70: W1 `medium` 6.01 against 6.27 s).
        self.latents_in_loop = True
        # CUDA: the input frames go up from pinned memory on a copy stream, beside the compute
        # (False: pageable copies on the compute stream, the benchmarks' before/after).
        self.async_upload = self.device.type == "cuda"
        # CUDA: the blend masks' resizes and morphology run as tensor ops on the device, exact to
        # the CPU path (blending.prepare_masks(on_device=True)); False: on the CPU pool.
        self.device_masks = self.device.type == "cuda"
        # CUDA stream priority of the blend masks' work (lower is higher; CUDA clamps it to its
        # range): -1 lets their kernels run ahead of the loop's queued ones; 0: the default priority.
        self.mask_stream_priority = -1
        self._upload_stream: Optional[Any] = None  # the CUDA stream of async_upload's copies
        self._fold_upsampling: Optional[str] = None  # applied now (fold_upsampling: asked for)
        self._fold_request: Optional[str] = None
        # Avatar cache (cache.AvatarCache) for prepare_video's results; "env": from MUSETALK_AVATAR_CACHE.
        self.avatar_cache = cache.from_env() if avatar_cache == "env" else avatar_cache
        # CUDA: the UNet's and VAE decoder's upsamplers (nearest ×2 + 3×3 conv) as one folded conv
        # (models/upsample.py): the same function in 16/36 of their multiply-adds; only the fp16
        # rounding differs (faces within 2 levels, as compiled against eager). Runs 71-74: UNet +
        # decode 3.89 → 3.23 ms/frame eager, 2.08 → 1.90 compiled. None: diffusers' own (CPU, as the reference).
        if self.device.type == "cuda":
            self.fold_upsampling = "auto"
        # CUDA graphs of the two fixed-shape GPU steps (graphs.py; MUSETALK_CUDA_GRAPHS, by default
        # on GPUs with >= 20 GiB): each replay launches a whole step's kernels at once.
        # Both run on the main thread's stream, one after the other: they share one memory pool.
        use_graphs, pool = graphs.enabled_from_env(self.device), graphs.MemoryPool()
        self.face_step = graphs.GraphedStep(
            self._face_step, self.device, "the UNet and VAE decode", enabled=use_graphs, context=self._graph_context, pool=pool,
            variant=self._graph_variant,
        )
        self.encode_step = graphs.GraphedStep(
            self._encode_step, self.device, "the VAE encode", enabled=use_graphs, context=self._graph_context, pool=pool,
            variant=self._graph_variant,
        )

    @classmethod
    def from_models_dir(
        cls,
        models_dir: Path | str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        version: str = "v15",
        landmarks: Optional[str] = None,
        warmup: bool = False,
    ) -> "Pipeline":
        """Load every model once. ``device`` defaults to CUDA when present; ``dtype`` to fp16 on CUDA
        (bf16 selectable) and fp32 on CPU. ``landmarks`` names a detector backend to load now;
        ``warmup`` runs ``warmup()`` so that the first job does not pay the CUDA first-use costs."""
        from .models.loading import MuseTalkModels

        if version not in ("v15", "v1"):
            raise SpecError(f"version must be 'v15' or 'v1', got {version!r}")
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                     "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
            if dtype not in names:
                raise SpecError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
            dtype = names[dtype]
        dt = dtype or default_dtype(dev)
        if dev.type == "cpu" and dt != torch.float32:
            log.warning("%s on CPU is slow and poorly supported; using it as asked", dt)
        if dev.type == "cuda":
            # Off: on an H200 cuDNN's heuristics matched the autotuned algorithms (UNet, VAE encode
            # and decode within 1-4 %, bench/README.md) while autotuning added ~5 s to the first job.
            torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
            # TF32 changes only fp32 matmuls, so it stays at PyTorch's default (off) for fp16/bf16
            # models. Then DWPose, which runs its fp32 matmuls with it off as official, does not flip
            # this process-wide flag around each forward pass: compiled code guards on it (dynamo's
            # global-state guard) and runs eagerly while it differs from its compile-time value.
            torch.backends.cuda.matmul.allow_tf32 = dt == torch.float32
            torch.backends.cudnn.allow_tf32 = True
        models = MuseTalkModels.load(Path(models_dir), version=version, device=dev, dtype=dt)
        pipe = cls(models, Path(models_dir))
        # Opt-in torch.compile of the UNet and VAE decoder (MUSETALK_COMPILE, docs/compile.md).
        pipe.compiled = compiled.maybe_enable_from_env(models)
        if landmarks is not None:
            pipe.detector(landmarks)
        if warmup:
            pipe.warmup()
        return pipe

    @torch.inference_mode()
    def warmup(self, batch_size: Optional[int] = None, frame_size: tuple[int, int] = (1280, 720)) -> float:
        """Run every model once on dummy data at the shapes a job uses (UNet + VAE decode at the
        batch size, VAE encode at half of it, Whisper, BiSeNet, the landmark detectors loaded so
        far): CUDA contexts, cuBLAS/cuDNN plans and lazily loaded kernels are then ready. Returns
        the seconds it took."""
        from .latents import FACE_SIZE, LATENT_SIZE

        t = time.perf_counter()
        w, h = frame_size
        batch = batch_size or auto_batch_size(self.device, self.dtype, w * h * 3, chunk=self.gpu_chunk)
        m = self.models
        latents = torch.zeros((batch, 8, LATENT_SIZE, LATENT_SIZE), device=self.device, dtype=self.dtype)
        cond = torch.zeros((batch, 50, 384), device=self.device, dtype=self.dtype)
        self._ensure_compiled(batch, encoder=True)
        self.face_step(latents, cond)  # with CUDA graphs on, this captures the job's graph
        enc = self._encode_batch(batch)
        crops = torch.zeros((enc, FACE_SIZE, FACE_SIZE, 3), dtype=torch.uint8)
        encode_faces(m.vae, crops, enc, encode=self.encode_step)
        from .audio import whisper_features

        whisper_features(np.zeros(16000, dtype=np.float32), m)
        parse = self._chunk(batch)
        bisenet_dtype = next(m.bisenet.parameters()).dtype
        if self.device_masks:  # BiSeNet with the masks' resizes and morphology around it
            from .blending import _parse_on_device

            crop = torch.zeros((1, 2 * FACE_SIZE, 2 * FACE_SIZE, 3), dtype=torch.uint8, device=self.device)
            _parse_on_device(m.bisenet, crop, [2 * FACE_SIZE], parse, self.device, bisenet_dtype, "jaw", 90, 90)
        else:
            m.bisenet(torch.zeros((parse, 3, 512, 512), device=self.device, dtype=bisenet_dtype))
        with self._detector_lock:
            detectors = list(self._detectors.values())
        for det in detectors:  # the loaded landmark detectors at their batch shape
            if hasattr(det, "warmup"):
                det.warmup()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t

    def warmup_job(
        self, frame_size: tuple[int, int] = (1280, 720), seconds: float = 2.0, preset: str = "medium"
    ) -> float:
        """One short job end to end on a synthetic clip (``samples.make_face_video`` at
        ``frame_size``, ``seconds`` of silence, one fixed box per frame so no detector runs).
        ``warmup()`` runs the models; this runs everything else a job sets up on first use: the
        decoder and its conversion pool, the crop and mask pools, pinned host buffers, the kernels
        of the composite and the colour conversion, the encoder's segment threads and the muxer,
        the allocator's segments at this frame size. The first real job then runs as fast as the
        next (bench/README.md, run 50). The avatar cache is not used. Call it at start-up, not
        while a job runs. Returns the seconds it took."""
        import tempfile
        import wave

        from .landmarks.boxes import write_boxes_file
        from .samples import make_face_video

        t = time.perf_counter()
        w, h = frame_size
        fps = 25.0
        n = max(1, int(round(seconds * fps)))
        side = min(w, h) // 3
        box = (w // 2 - side // 2, h // 2 - side // 2, w // 2 + side // 2, h // 2 + side // 2)
        cache, self.avatar_cache = self.avatar_cache, None
        try:
            with tempfile.TemporaryDirectory(prefix="musetalk-warmup-") as tmp:
                root = Path(tmp)
                video = make_face_video(root / "video.mp4", seconds=n / fps, fps=fps, size=(w, h))
                audio = root / "audio.wav"
                with wave.open(str(audio), "wb") as out:
                    out.setnchannels(1)
                    out.setsampwidth(2)
                    out.setframerate(16000)
                    out.writeframes(b"\x00\x00" * int(16000 * n / fps))
                boxes = write_boxes_file(root / "boxes.json", [box] * n)
                options = EngineOptions(version=self.version, boxes_file=boxes, preset=preset)  # type: ignore[arg-type]
                self.run(video, audio, root / "out.mp4", options)
        finally:
            self.avatar_cache = cache
        return time.perf_counter() - t

    # ------------------------------------------------------------------ helpers

    def _chunk(self, batch: int) -> int:
        """Images per call of the VAE decoder / BiSeNet for a job batch of ``batch`` (see GPU_CHUNK)."""
        return min(batch, self.gpu_chunk) if self.device.type == "cuda" else batch

    def _ensure_compiled(self, batch: int, *, encoder: bool) -> float:
        """With compile on: the graphs for a job batch of ``batch`` (UNet, decoder chunks and, with
        ``encoder``, the VAE encoder's calls), built or loaded once per process; 0 when off or warm."""
        self._sync_fold()  # "auto" follows compile being switched on or off since
        return compiled.ensure_warm(
            self.models, batch, decode_chunk=self._chunk(batch),
            encode_batch=2 * self._encode_batch(batch) if encoder else None, timestep=self._timestep,
        )

    def _encode_batch(self, batch: int) -> int:
        """Crops per VAE-encode call (each call encodes masked + full, i.e. twice as many images)."""
        return max(1, min(batch // _ENCODE_BATCH_FACTOR, self._chunk(batch) // _ENCODE_BATCH_FACTOR or 1))

    def _graph_context(self) -> tuple[bool, bool]:
        """What the captured kernels depend on besides their inputs (see graphs.GraphedStep)."""
        return compiled.is_enabled(self.models), self.channels_last

    def _graph_variant(self) -> tuple[int, Optional[str]]:
        """What selects among the steps' graphs besides the input shapes: the chunk size and the
        upsamplers' fold (each fold's graphs are kept: its folded weights stay alive, see models.upsample)."""
        return self.gpu_chunk, self._fold_upsampling

    @property
    def cuda_graphs(self) -> bool:
        """Whether the face step and the VAE encode replay CUDA graphs (always False on CPU)."""
        return self.face_step.enabled and self.encode_step.enabled

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: bool) -> None:
        # Off keeps the captured graphs, so switching back on does not capture again (benchmarks
        # alternate); a step whose capture failed stays off.
        for step in (self.face_step, self.encode_step):
            step.enabled = bool(enabled) and self.device.type == "cuda" and step.failure is None

    def drop_cuda_graphs(self) -> None:
        """Both steps' graphs go, so their shared pool's memory is returned (and the allocator's
        cache emptied); the next calls capture again (after running out of memory: at the new batch)."""
        self.face_step.reset()
        self.encode_step.reset()

    def _face_step(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """UNet (t=0) + VAE decode: ``[N,8,32,32]`` latents and ``[N,50,384]`` audio → uint8 faces ``[N,256,256,3]``.

        Decoded in chunks of ``_chunk(N)``: for ``N`` up to the job batch, the same chunks as
        ``_chunk(batch)``."""
        pred = self.models.unet(latents, self._timestep, encoder_hidden_states=cond).sample
        return decode_latents(self.models.vae, pred, self._chunk(latents.shape[0]))

    def _encode_step(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 face crops ``[P,256,256,3]`` on the device → scaled latent means ``[2P,4,32,32]`` (masked, then full)."""
        return encode_chunk(self.models.vae, crops)

    def use_channels_last(self, enabled: bool = True) -> None:
        """Store the UNet's and VAE's conv weights channels-last (NHWC), which fp16/bf16 tensor-core
        convolutions prefer on recent NVIDIA GPUs; outputs are then NHWC too."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.models.unet.to(memory_format=fmt)
        self.models.vae.to(memory_format=fmt)
        self.channels_last = enabled
        if self._fold_upsampling:  # the folded weights follow the conv weights' layout
            self._apply_fold(self._fold_upsampling)

    @property
    def fold_upsampling(self) -> Optional[str]:
        """How the UNet's and VAE's upsamplers run: ``"transpose"`` / ``"phases"``, one folded
        convolution (``models.upsample``); ``"auto"``: ``transpose`` when compiled, ``phases`` when
        eager (the faster of the two there, run 71); None: diffusers' own. A change re-captures the
        CUDA graphs; compiled, a fold first used compiles at the next job's warm-up."""
        return self._fold_request

    @fold_upsampling.setter
    def fold_upsampling(self, mode: Optional[str]) -> None:
        mode = None if mode in (None, False, "", "off", "none") else str(mode)
        if mode is not None and mode not in (*upsample.MODES, "auto"):
            raise SpecError(f"fold_upsampling must be one of {', '.join(upsample.MODES)}, auto or None, got {mode!r}")
        self._fold_request = mode
        self._sync_fold()

    def _sync_fold(self) -> None:
        """Apply ``fold_upsampling`` (``auto`` resolved for the models' compile state now)."""
        mode = self._fold_request
        if mode == "auto":
            mode = "transpose" if compiled.is_enabled(self.models) else "phases"
        if mode != self._fold_upsampling:
            self._apply_fold(mode)

    def _apply_fold(self, mode: Optional[str]) -> None:
        for model in (self.models.unet, self.models.vae):
            upsample.unfold(model)
            if mode:
                upsample.fold(model, mode)
        self._fold_upsampling = mode
        if compiled.first_variant(self.models, ("fold_upsampling", mode)):
            compiled.thaw(self.models)  # the compiled regions trace the new forward at the next warm-up

    def detector(self, backend: str) -> Any:
        """The landmark detector for ``backend``, loaded on first use and kept."""
        with self._detector_lock:
            if backend not in self._detectors:
                from .landmarks import load_detector

                self._detectors[backend] = load_detector(backend, self.models_dir, self.device)
            return self._detectors[backend]

    def _frame_feed(self, frames: np.ndarray, ready: Optional[Callable[[int], None]]) -> "_FrameFeed":
        """The used input frames for the generate loop: on the device when memory allows."""
        device: Optional[torch.device] = self.device
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if frames.nbytes > 0.25 * free:
                device = None
        copy_stream = None
        if device is not None and device.type == "cuda" and self.async_upload:
            if self._upload_stream is None:  # made once, kept for the pipeline's jobs
                self._upload_stream = torch.cuda.Stream(self.device)
            copy_stream = self._upload_stream
        return _FrameFeed(frames, device, ready, self.upload_on_demand, copy_stream)

    # ------------------------------------------------------------------ stages

    def _decode(
        self, video: Path, audio: Path, options: EngineOptions, stream_decode: bool = True
    ) -> tuple[np.ndarray, float, np.ndarray, Optional[Any]]:
        """The input frames, their fps, the 16 kHz audio and, when the frames are still decoding,
        their ``media.FrameStream`` (``None`` when ``frames`` is complete).

        With ``stream_decode`` and a file that states its frame count and rate, this returns once
        the audio and the first frame are decoded: the frames fill in while the job prepares
        (``prepare_video(ready=stream.wait)``) or, on an avatar cache hit, while it generates
        (``generate(frames_ready=stream.wait)``); ``run`` checks that the file kept its word."""
        from .media import FrameStream, load_audio, read_frames

        stream: Optional[FrameStream] = None
        # The audio decodes and resamples in a second thread while this one decodes the video.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audio-decode") as pool:
            audio_future = pool.submit(load_audio, audio, 16000)
            try:
                if stream_decode:
                    stream = FrameStream(video, image_fps=options.fps)
                    frames = stream.first()
                if stream is None or frames is None:
                    vf = stream.result() if stream is not None else read_frames(video, image_fps=options.fps)
                    frames, fps, stream = vf.frames, float(vf.fps), None  # its error, if any, is the one reported
                else:
                    fps = float(stream.rate)
                samples = audio_future.result()
            except BaseException:
                if stream is not None:
                    stream.close()
                raise
        if frames.shape[0] == 0:
            raise InputMediaError(f"video {video.name}: no frames could be decoded; check that the file is a video or image")
        return frames, fps, samples, stream

    def _boxes(
        self,
        frames: np.ndarray,
        n_analyse: int,
        options: EngineOptions,
        progress: Optional[ProgressFn],
        fps: float,
        ready: Optional[Callable[[int], None]] = None,
    ) -> list[Optional[Box]]:
        """Face boxes (before extra_margin) for every input frame; frames past ``n_analyse`` → None."""
        from .landmarks import boxes as boxmod

        n, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
        if options.boxes_file is not None:
            raw = list(boxmod.read_boxes_file(Path(options.boxes_file), n))
            n_analyse = n
        else:
            from .landmarks import detect_boxes

            bbox_shift = options.bbox_shift if options.version == "v1" else 0  # v1.5 forces 0 (official)
            raw = list(
                detect_boxes(
                    frames[:n_analyse],
                    backend=options.landmarks,
                    detector=self.detector(options.landmarks),
                    bbox_shift=bbox_shift,
                    progress=progress,
                    ready=ready,  # DWPose works through the frames as they decode
                )
            )
            raw += [None] * (n - len(raw))
        if options.smooth_boxes:
            raw[:n_analyse] = list(boxmod.smooth_boxes(raw[:n_analyse], fps=fps))
        boxes = [_clip_box(b, w, h) for b in raw]
        if options.save_boxes is not None:
            boxmod.write_boxes_file(Path(options.save_boxes), boxes)
        return boxes

    def _blend_boxes(self, boxes: Sequence[Optional[Box]], height: int, options: EngineOptions) -> list[Optional[Box]]:
        """The crop/blend box per frame: v1.5 adds ``extra_margin`` below the chin (clamped)."""
        if self.version != "v15":
            return list(boxes)
        from .blending import apply_extra_margin

        return [None if b is None else tuple(int(v) for v in apply_extra_margin(b, options.extra_margin, height)) for b in boxes]

    @torch.inference_mode()
    def prepare_video(
        self,
        frames: np.ndarray,
        fps: float,
        options: EngineOptions,
        *,
        n_used: Optional[int] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[threading.Event] = None,
        source: str = "the video",
        stages: Optional[_Stages] = None,
        ready: Optional[Callable[[int], None]] = None,
        lazy_latents: bool = False,
    ) -> PreparedVideo:
        """Boxes, latents and blend masks for ``frames[:n_used]`` (all frames by default).

        The masks may still be in the making when this returns: ``masks`` is a
        ``blending.MaskStream`` whose items wait for their mask (and raise the mask thread's error).
        ``ready(k)``, when given, blocks until ``frames[:k]`` hold their pixels (frames still
        decoding, ``media.FrameStream.wait``); every read of the pixels calls it first.
        ``lazy_latents``: only the crops of the first chunk are started; ``generate`` encodes each
        chunk of faces when a batch first needs it (``PreparedVideo.pending``; ``complete()``
        encodes the rest). The chunks are the same, so the latents are too.
        """
        self._check_version(options)
        st = stages or _Stages(self.device)
        n = int(frames.shape[0])
        n_used = n if n_used is None else max(1, min(n_used, n))
        n_analyse = n if options.save_boxes is not None else n_used
        with st.stage("landmarks"):
            boxes = self._boxes(frames, n_analyse, options, progress, fps, ready)
        if not any(b is not None for b in boxes[:n_used]):
            hint = "try landmarks=cascade or a boxes file" if options.boxes_file is None else "check the boxes file"
            raise InputMediaError(
                f"no face found in any frame of {source} (frames 0..{n_used - 1} checked); "
                f"use a video with a clearly visible frontal face, or {hint}"
            )
        _check_cancel(cancel)

        used_boxes = self._blend_boxes(boxes[:n_used], frames.shape[1], options)
        face_idx = [j for j, b in enumerate(used_boxes) if b is not None]
        face_rows = np.full(n_used, -1, dtype=np.int64)
        face_rows[face_idx] = np.arange(len(face_idx))
        batch = options.batch_size or auto_batch_size(self.device, self.dtype, frames[0].nbytes, chunk=self.gpu_chunk)
        mode = options.parsing_mode if self.version == "v15" else "raw"  # v1 blends with the raw parsing mask

        masks = MaskStream(n_used)
        self._start_masks(masks, frames[:n_used], used_boxes, mode, options, batch, ready)
        try:
            # The blend masks (BiSeNet on a side stream, then CPU crops, resizes, morphology) are
            # made in a background thread while this one crops and VAE-encodes, and on into the
            # generate loop, which waits only for the masks of the batch it composites ("blend").
            with st.stage("latents"):
                # With compile on, the encoder's graphs are built (or loaded) here, once per process.
                self._ensure_compiled(batch, encoder=True)
                pending: Optional[_FaceLatents] = _FaceLatents(
                    self, frames, [used_boxes[j] for j in face_idx], face_idx, self._encode_batch(batch), ready,
                    progress if lazy_latents else None,
                )
                latents = pending.tensor
                if not lazy_latents:
                    pending.upto(pending.n)
                    pending = None
                    if progress is not None:
                        progress("latents", len(face_idx), len(face_idx))
            _check_cancel(cancel)
            if not self.overlap_masks:
                with st.stage("blend"):
                    masks.wait_all()
        except BaseException:
            masks.close()
            raise
        return PreparedVideo(
            frames=frames,
            fps=fps,
            boxes=boxes,
            n_used=n_used,
            face_rows=face_rows,
            latents=latents,
            masks=masks,
            version=self.version,
            stage_seconds=dict(st.seconds),
            pending=pending,
        )

    def _start_masks(
        self,
        masks: MaskStream,
        frames: np.ndarray,
        boxes: list[Optional[Box]],
        mode: str,
        options: EngineOptions,
        batch: int,
        ready: Optional[Callable[[int], None]] = None,
    ) -> None:
        """Make the blend masks in a background thread, publishing each chunk into ``masks``."""
        from .blending import prepare_masks

        # A high-priority stream: the generate loop's long graph replays fill the GPU, and the masks
        # its next batch waits for would otherwise queue behind them.
        side = torch.cuda.Stream(self.device, priority=self.mask_stream_priority) if self.device.type == "cuda" else None

        def work() -> None:
            try:
                with torch.inference_mode(), (torch.cuda.stream(side) if side is not None else contextlib.nullcontext()):
                    prepare_masks(
                        frames, boxes, self.models.bisenet, mode=mode,
                        left_cheek_width=options.left_cheek_width, right_cheek_width=options.right_cheek_width,
                        device=self.device, batch_size=self._chunk(batch), on_ready=masks.publish, stop=masks.stop,
                        frames_ready=ready, pad=self.pad_batches, on_device=self.device_masks,
                    )
                if not masks.done and not masks.stop.is_set():
                    raise EngineRuntimeError("blend masks: the mask thread ended without making every mask")
            except JobError as exc:  # handed to the reader: generate raises it
                masks.fail(exc)
            except torch.cuda.OutOfMemoryError:
                masks.fail(EngineRuntimeError("out of GPU memory while making the blend masks; free the GPU or use a smaller batch_size"))
            except BaseException as exc:
                err = EngineRuntimeError(f"blend masks (face parsing) failed: {type(exc).__name__}: {exc}")
                err.__cause__ = exc
                masks.fail(err)

        threading.Thread(target=work, name="blend-masks", daemon=True).start()

    def _compile_off_after_oom(self) -> None:
        """Compiled graphs pad every call to their compiled batch, so halving it needs eager."""
        if self.compiled:
            compiled.disable(self.models)
            self.compiled = False
            log.warning("torch.compile switched off for this pipeline after running out of memory")

    def audio_features(
        self, samples: np.ndarray, fps: float, num_frames: int, options: EngineOptions, mel: Optional["Future[Any]"] = None
    ) -> torch.Tensor:
        """``[T, 50, 384]`` UNet conditioning (windows + positional encoding), model dtype, on the device.
        ``mel``: a future of ``audio.log_mel(samples, models)`` started earlier (``_run``)."""
        from .audio import frame_windows, positional_encoding, whisper_features

        feats = whisper_features(samples, self.models, mel=None if mel is None else mel.result())
        windows = frame_windows(
            feats, fps, num_frames, pad_left=options.audio_padding_left, pad_right=options.audio_padding_right
        )
        return positional_encoding(windows.to(self.device, self.dtype))

    def _check_version(self, options: EngineOptions) -> None:
        if options.version != self.version:
            raise SpecError(
                f"options.version is {options.version!r} but this pipeline was loaded for {self.version!r}; "
                f"load a pipeline with version={options.version!r}"
            )

    # ------------------------------------------------------------------ generation

    def _generate_batch(
        self,
        prep: PreparedVideo,
        feed: "_FrameFeed",
        audio: torch.Tensor,
        plan: "_Plan",
        start: int,
        stop: int,
        timer: "_GpuTimer",
    ) -> torch.Tensor:
        """Output frames ``start..stop-1``, composited, as uint8 ``[B,H,W,3]`` on the device.

        Index tensors live on the device (``plan``): nothing here waits for the GPU.
        """
        in_idx = plan.in_idx[start:stop]
        frames_dev = feed.rows(int(in_idx.max()) + 1)
        if frames_dev is not None:
            frames_b = frames_dev.index_select(0, plan.in_idx_dev[start:stop])
        else:
            host = torch.from_numpy(prep.frames[in_idx]).pin_memory()
            frames_b = host.to(self.device, non_blocking=True)
        a, b = np.searchsorted(plan.face_out, [start, stop])  # output frames of this batch with a face
        n_face = int(b - a)
        if n_face == 0:
            return frames_b
        if prep.pending is not None:  # latents left to the loop: encode the chunks this batch reads first
            prep.pending.upto(int(plan.face_rows[a:b].max()) + 1)
            if prep.pending.done >= prep.pending.n:
                prep.pending = None
        timer.mark("generate_start")
        # Pad the face batch to a bucket size (CUDA) so a few fixed shapes cover every batch:
        # each new shape costs first-use set-up, and ragged tails would add shapes.
        padded = _bucket(n_face, plan.batch) if self.pad_batches else n_face
        take = torch.arange(a, a + padded, device=self.device).clamp_(max=b - 1)
        latents = prep.latents.index_select(0, plan.face_rows_dev.index_select(0, take))
        cond = audio.index_select(0, plan.face_out_dev.index_select(0, take))
        faces_sel = self.face_step(latents, cond)[:n_face]
        timer.mark("generate_end")
        if n_face == stop - start:
            faces = faces_sel
        else:
            faces = torch.zeros((stop - start, *faces_sel.shape[1:]), dtype=torch.uint8, device=self.device)
            faces.index_copy_(0, plan.face_out_dev[a:b] - start, faces_sel)
        from .blending import composite

        out = composite(frames_b, faces, [prep.masks[j] for j in in_idx])
        timer.mark("blend_end")
        return out

    @torch.inference_mode()
    def generate(
        self,
        prep: PreparedVideo,
        audio: torch.Tensor,
        writer: Any,
        batch_size: int,
        *,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[threading.Event] = None,
        stages: Optional[_Stages] = None,
        frames_ready: Optional[Callable[[int], None]] = None,
    ) -> int:
        """Render ``len(audio)`` output frames into ``writer``; returns the batch size finally used.
        ``frames_ready(k)``: blocks until ``prep.frames[:k]`` hold their pixels (still decoding)."""
        st = stages or _Stages(self.device)
        total = int(audio.shape[0])
        plan = _Plan.build(prep, total, batch_size, self.device)
        latents_in_loop = prep.pending is not None
        # With compile on, the graphs for this batch are built (or loaded from the cache) here,
        # once, not inside the loop; a no-op when compile is off or already warm.
        compile_s = self._ensure_compiled(plan.batch, encoder=False)  # a cache hit never runs the encoder
        feed = self._frame_feed(prep.frames[: prep.n_used], frames_ready)
        timer = _GpuTimer(self.device)
        # H.264 output takes I420 frames converted on the device: half the bytes to copy to the
        # host, and no per-frame swscale on the CPU (colour.rgb_to_i420 matches it, see its tests).
        i420 = self.device_colour and bool(getattr(writer, "accepts_i420", False))
        pending: Optional[tuple[torch.Tensor, Any]] = None  # (host tensor, copy-done event)
        encode_s = 0.0
        masks_waited0 = float(getattr(prep.masks, "waited_s", 0.0))
        start = 0
        batch = batch_size
        t0 = time.perf_counter()
        while start < total:
            _check_cancel(cancel)
            stop = min(total, start + batch)
            try:
                timer.begin()
                out_dev = self._generate_batch(prep, feed, audio, plan, start, stop, timer)
                if i420:
                    from .colour import rgb_to_i420

                    out_dev = rgb_to_i420(out_dev)
                    timer.mark("blend_end")  # the conversion is timed with the composite
                timer.end()
            except torch.cuda.OutOfMemoryError:
                timer.discard()
                self.drop_cuda_graphs()
                if batch <= 1:
                    raise EngineRuntimeError(
                        "out of GPU memory while generating even at batch size 1; free the GPU or use a larger one"
                    ) from None
                batch = plan.batch = max(1, batch // 2)
                log.warning("out of GPU memory while generating; retrying with batch size %d", batch)
                self._compile_off_after_oom()
                continue
            host, event = self._to_host(out_dev)
            if pending is not None:  # hand over the previous batch while the GPU works on this one
                encode_s += self._write(writer, *pending, i420=i420)
            pending = (host, event)
            start = stop
            if progress is not None:
                progress("generate", start, total)
        if pending is not None:
            encode_s += self._write(writer, *pending, i420=i420)
        st.sync()
        loop_s = time.perf_counter() - t0
        gen_s, composite_s = timer.totals()
        masks_wait_s = float(getattr(prep.masks, "waited_s", 0.0)) - masks_waited0
        blend_s = composite_s
        if self.device.type == "cuda":  # host time waiting for masks still being made (on CPU the composite span has it)
            blend_s += masks_wait_s
        # On CPU the marks are exact wall-clock spans. On CUDA they are device (event) times; the
        # loop's remaining wall time (frame gathers, copies to the host) is counted as generate, so
        # the stages add up to the wall time. encode = host time blocked handing frames to the encoder.
        st.add("generate", gen_s if self.device.type != "cuda" else max(gen_s, loop_s - blend_s - encode_s))
        st.add("blend", blend_s)
        self.last_timings = {"generate_loop_s": loop_s, "unet_decode_device_s": gen_s, "composite_device_s": composite_s,
                             "encoder_wait_s": encode_s, "masks_wait_s": masks_wait_s, "output_frames": total, "batch_size": batch,
                             "compile_s": compile_s, "cuda_graphs": self.cuda_graphs, "latents_in_loop": latents_in_loop,
                             "cuda_graph_captures": self.face_step.captures + self.encode_step.captures}
        st.add("encode", encode_s)
        return batch

    def _to_host(self, out_dev: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.device.type != "cuda":
            return out_dev, None
        host = torch.empty(out_dev.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(out_dev, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def _write(writer: Any, host: torch.Tensor, event: Any, *, i420: bool = False) -> float:
        if event is not None:
            event.synchronize()
        t = time.perf_counter()
        try:
            if i420:  # host is a fresh pinned buffer per batch, never reused here: no copy needed
                writer.write_i420(host.numpy(), copy=False)
            else:
                writer.write(host.numpy())
        except JobError:
            raise
        except Exception as exc:  # the encoder thread or ffmpeg failed
            raise EngineRuntimeError(f"video encoding failed: {exc}") from exc
        return time.perf_counter() - t

    # ------------------------------------------------------------------ run

    def run(
        self,
        video: Path | str,
        audio: Path | str,
        output: Path | str,
        options: EngineOptions,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Result:
        """Lip-sync ``video`` to ``audio`` and write ``output`` (MP4, the audio muxed in)."""
        video, audio, output = Path(video), Path(audio), Path(output)
        self._check_version(options)
        try:
            return self._run(video, audio, output, options, progress, cancel, self.stream_decode)
        except _HeaderBroken as exc:
            # Rare: an avatar cache hit rendered frames still decoding, and the file then broke
            # its header's word. The output was discarded; the job runs again on decoded frames.
            log.info("video %s: %s; rendering again from the decoded frames", video.name, exc)
            return self._run(video, audio, output, options, progress, cancel, False)

    def _run(
        self,
        video: Path,
        audio: Path,
        output: Path,
        options: EngineOptions,
        progress: Optional[ProgressFn],
        cancel: Optional[threading.Event],
        stream_decode: bool,
    ) -> Result:
        st = _Stages(self.device)
        with torch.inference_mode():
            with st.stage("decode"):
                frames, fps, samples, stream = self._decode(video, audio, options, stream_decode)
            mel = None
            if self.early_log_mel:  # the audio's CPU half runs while the video is prepared
                from .audio import log_mel

                mel = _log_mel_pool().submit(log_mel, samples, self.models)
            try:
                num_out = self._num_output_frames(samples, fps, audio)
                if progress is not None:
                    progress("decode", 1, 1)
                _check_cancel(cancel)
                prep, remember, num_out, decoding = self._prepare_streamed(
                    video, audio, frames, fps, samples, num_out, stream, options, progress, cancel, st
                )
                try:
                    result = self._render(prep, samples, num_out, video, audio, output, options, progress, cancel, st, decoding, mel)
                finally:
                    if isinstance(prep.masks, MaskStream):
                        prep.masks.close()  # stops the mask thread if the job ended before it did
                    if prep.pending is not None:
                        prep.pending.close(wait=False)  # the crop thread of latents left to the loop
            finally:
                if stream is not None:
                    stream.close()
            if remember is not None:
                remember()  # the avatar cache entry, now that every mask is made
            return result

    def _render(
        self,
        prep: PreparedVideo,
        samples: np.ndarray,
        num_out: int,
        video: Path,
        audio: Path,
        output: Path,
        options: EngineOptions,
        progress: Optional[ProgressFn],
        cancel: Optional[threading.Event],
        st: _Stages,
        decoding: Optional[Any] = None,
        mel: Optional["Future[Any]"] = None,
    ) -> Result:
        """Audio features, the generate loop and the encoder: the part of ``run`` after ``prepare``.
        ``decoding``: the ``media.FrameStream`` still filling ``prep.frames`` (see ``_prepare_streamed``);
        ``mel``: the audio's log-mel, computing since the decode (``_run``)."""
        from .media import VideoWriter

        frames, fps = prep.frames, prep.fps

        with torch.inference_mode():
            _check_cancel(cancel)
            with st.stage("audio"):
                cond = self.audio_features(samples, fps, num_out, options, mel)
            if progress is not None:
                progress("audio", num_out, num_out)

            batch = options.batch_size or auto_batch_size(self.device, self.dtype, frames[0].nbytes, chunk=self.gpu_chunk)
            h, w = frames.shape[1], frames.shape[2]
            output.parent.mkdir(parents=True, exist_ok=True)
            try:
                writer = VideoWriter(
                    output, width=w, height=h, fps=fps, audio_path=audio,
                    codec=options.codec, crf=options.crf, preset=options.preset, expected_frames=num_out,
                    **({} if self.encoder_workers is None else {"workers": self.encoder_workers}),
                    **({} if self.encoder_segments_ahead is None else {"segments_ahead": self.encoder_segments_ahead}),
                    **({} if self.encoder_segment_frames is None else {"segment_frames": self.encoder_segment_frames}),
                    **({} if self.encoder_segment_threads is None else {"segment_threads": self.encoder_segment_threads}),
                    **({} if self.encoder_stream_segments is None else {"stream_segments": self.encoder_stream_segments}),
                )
            except JobError:
                raise
            except Exception as exc:
                raise EngineRuntimeError(f"could not start the video encoder for {output.name}: {exc}") from exc
            try:
                batch = self.generate(prep, cond, writer, batch, progress=progress, cancel=cancel, stages=st,
                                      frames_ready=None if decoding is None else decoding.wait)
                if decoding is not None:
                    with st.stage("decode"):
                        decoding.result()  # a decode error is the job's error
                    if not decoding.predicted:
                        raise _HeaderBroken(f"the file holds other frames than its header said ({frames.shape[0]} at {fps:.3f} fps)")
                if progress is not None:
                    progress("blend", len(prep.masks), len(prep.masks))
                t = time.perf_counter()
                writer.close()
                st.add("encode", time.perf_counter() - t)
            except BaseException as exc:
                _abort(writer)
                if isinstance(exc, (JobError, KeyboardInterrupt, SystemExit, _HeaderBroken)):
                    raise
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise EngineRuntimeError(f"out of GPU memory: {exc}") from exc
                raise EngineRuntimeError(f"generation or encoding failed: {type(exc).__name__}: {exc}") from exc
            if progress is not None:
                progress("encode", num_out, num_out)

        return Result(
            output=output,
            frames=num_out,
            fps=fps,
            duration_s=num_out / fps,
            input_frames=int(frames.shape[0]),
            frames_with_face=prep.frames_with_face,
            width=int(w),
            height=int(h),
            stage_seconds={k: st.seconds.get(k, 0.0) for k in ("decode", "landmarks", "latents", "audio", "generate", "blend", "encode")},
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            batch_size=batch,
            boxes=[None if b is None else list(b) for b in prep.boxes],
        )

    def _prepare_streamed(
        self,
        video: Path,
        audio: Path,
        frames: np.ndarray,
        fps: float,
        samples: np.ndarray,
        num_out: int,
        stream: Optional[Any],
        options: EngineOptions,
        progress: Optional[ProgressFn],
        cancel: Optional[threading.Event],
        st: _Stages,
    ) -> tuple[PreparedVideo, Optional[Any], int, Optional[Any]]:
        """``_prepare_cached`` on frames that may still be decoding (``stream``, see ``_decode``);
        also returns the output frame count and, after an avatar cache hit (nothing read the
        pixels yet), the stream still decoding: ``_render`` waits for the rows it needs and checks
        the file at the end. Otherwise, when the file did not keep its header's word
        (``FrameStream.predicted`` is False: fewer or more frames, variable timing), the work is
        redone on the frames it really holds, and an input error met on the predicted frames is
        not trusted either: the redo reports its own. A decode error is reported as such."""
        if stream is None:
            return (*self._prepare_cached(video, frames, fps, num_out, options, progress, cancel, st), num_out, None)
        try:
            prep, remember = self._prepare_cached(video, frames, fps, num_out, options, progress, cancel, st, stream.wait)
        except (InputMediaError, SpecError):
            with st.stage("decode"):
                stream.result()  # raises the decode's error, if any
            if stream.predicted:
                raise
        else:
            if not isinstance(prep.masks, MaskStream):  # a cache hit: no pixel was read
                return prep, remember, num_out, stream
            try:
                with st.stage("decode"):  # the part of the decode the preparation did not hide
                    stream.result()
            except BaseException:
                prep.masks.close()
                if prep.pending is not None:
                    prep.pending.close(wait=False)
                raise
            if stream.predicted:
                return prep, remember, num_out, None
            prep.masks.close()
            if prep.pending is not None:
                prep.pending.close(wait=False)
        vf = stream.result()
        log.info("video %s: the file holds %d frames at %.3f fps, its header said %d at %.3f; preparing them again",
                 video.name, vf.frames.shape[0], vf.fps, frames.shape[0], fps)
        num_out = self._num_output_frames(samples, float(vf.fps), audio)
        _check_cancel(cancel)
        prep, remember = self._prepare_cached(video, vf.frames, float(vf.fps), num_out, options, progress, cancel, st)
        return prep, remember, num_out, None

    def _prepare_cached(
        self,
        video: Path,
        frames: np.ndarray,
        fps: float,
        num_out: int,
        options: EngineOptions,
        progress: Optional[ProgressFn],
        cancel: Optional[threading.Event],
        st: _Stages,
        ready: Optional[Callable[[int], None]] = None,
    ) -> tuple[PreparedVideo, Optional[Any]]:
        """``prepare_video`` through the avatar cache when one is configured (a hit skips the
        landmarks, latents and mask work; the lookup is timed as ``landmarks``). Also returns, on a
        miss, the call that stores the new entry: ``run`` makes it after the job's frames are out,
        as the masks are still being made while the job generates."""
        from . import cache

        n_used = used_input_frames(num_out, frames.shape[0])
        prep = key = None
        if self.avatar_cache is not None:
            with st.stage("landmarks"):
                key = cache.cache_key(
                    video, version=self.version, options=options, dtype_name=str(self.dtype),
                    model_fingerprint=cache.model_fingerprint(self.models_dir, self.version, options.landmarks),
                )
                hit = self.avatar_cache.get(key)
                if hit is not None:
                    prep = cache.apply_cached(hit, frames, fps, options, n_used=n_used, device=self.device, dtype=self.dtype)
        if prep is None:
            prep = self.prepare_video(
                frames, fps, options, n_used=n_used, progress=progress, cancel=cancel, source=video.name, stages=st,
                ready=ready, lazy_latents=self.latents_in_loop,
            )
            if key is not None:
                store, new = self.avatar_cache, prep
                return prep, lambda: store.put(key, cache.to_cached(new.complete(), options))
        elif options.save_boxes is not None:  # a hit skips _boxes(), which writes it otherwise
            from .landmarks.boxes import write_boxes_file

            write_boxes_file(Path(options.save_boxes), prep.boxes)
        return prep, None

    @staticmethod
    def _num_output_frames(samples: np.ndarray, fps: float, audio: Path) -> int:
        from .audio import num_output_frames

        n = num_output_frames(int(samples.shape[0]), fps)
        if n <= 0:
            raise InputMediaError(
                f"audio {audio.name} is too short: {samples.shape[0] / 16000:.3f} s gives no video frame at "
                f"{fps:.3f} fps; use at least {1 / fps:.3f} s of audio"
            )
        return n


@functools.lru_cache(maxsize=1)
def _log_mel_pool() -> ThreadPoolExecutor:
    """One thread for the jobs' log-mel computations (``Pipeline.early_log_mel``)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-mel")


class _FrameFeed:
    """The generate loop's input frames: ``rows(k)`` makes ``frames[:k]`` readable and returns
    them as a uint8 tensor on ``device`` (``None``: the loop copies each batch's frames from the
    host). Rows are uploaded in the order they are needed, a batch's worth at a time, so the first
    batch starts after its own rows' copy, not all of them; rows still decoding (``ready``) are
    waited for first. ``on_demand=False``: complete frames go up in one copy at the first call.

    ``copy_stream`` (CUDA): the rows are staged in pinned memory and copied on that stream, and the
    current stream waits for the copy on the device. Without it, a copy from pageable memory makes
    the host wait for every kernel queued before it, and the GPU then waits for the host."""

    def __init__(
        self,
        frames: np.ndarray,
        device: Optional[torch.device],
        ready: Optional[Callable[[int], None]],
        on_demand: bool = True,
        copy_stream: Optional[Any] = None,
    ) -> None:
        self.frames, self.ready, self.on_demand = frames, ready, on_demand
        self.n = int(frames.shape[0])
        self.done = 0
        self.dev: Optional[torch.Tensor] = None
        self.copy_stream = None
        if device is not None and device.type != "cuda":
            self.dev = torch.from_numpy(frames)  # the same memory: readable once ready says so
            self.done = self.n
        elif device is not None:
            self.dev = torch.empty(frames.shape, dtype=torch.uint8, device=device)
            if copy_stream is not None:
                # The new tensor's memory may have been freed by work still queued on this stream.
                copy_stream.wait_stream(torch.cuda.current_stream(device))
                self.copy_stream = copy_stream

    def rows(self, k: int) -> Optional[torch.Tensor]:
        k = self.n if self.ready is None and not self.on_demand else min(int(k), self.n)
        if self.ready is not None:
            self.ready(k)
        if self.dev is not None and k > self.done:
            src = torch.from_numpy(self.frames[self.done : k])
            if self.copy_stream is None:
                self.dev[self.done : k].copy_(src)
            else:
                # The host copy runs while the GPU works on the batches already queued; the pinned
                # block is not reused before the device copy is done (the host allocator's events).
                staged = src.pin_memory()
                with torch.cuda.stream(self.copy_stream):
                    self.dev[self.done : k].copy_(staged, non_blocking=True)
                torch.cuda.current_stream(self.dev.device).wait_stream(self.copy_stream)
            self.done = k
        return self.dev


class _FaceLatents:
    """The VAE latents of a job's faces, encoded a chunk at a time: ``upto(k)`` makes rows ``[0, k)``
    of ``tensor`` hold their latents. Chunks are always ``[i·batch, (i+1)·batch)``, so the values do
    not depend on when they are asked for; the next chunk's crops are made on a thread meanwhile."""

    def __init__(
        self, pipe: "Pipeline", frames: np.ndarray, boxes: list[Box], rows: list[int], batch: int,
        ready: Optional[Callable[[int], None]] = None, progress: Optional[ProgressFn] = None,
    ) -> None:
        self.pipe, self.frames, self.boxes, self.rows, self.ready = pipe, frames, boxes, rows, ready
        self.progress = progress  # told ("latents", done, n) after each chunk
        self.n, self.batch, self.done = len(rows), max(1, int(batch)), 0
        self.step = self.batch  # crops per encoder call: halved after running out of memory
        p = next(pipe.models.vae.parameters())
        self.tensor = torch.empty((self.n, 8, 32, 32), dtype=p.dtype, device=p.device)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._next: Optional[Future[torch.Tensor]] = None
        self._crops: Optional[torch.Tensor] = None  # the crops of chunk ``done``, once taken
        if self.n:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crop-ahead")
            self._next = self._pool.submit(self._crop, 0)

    def _crop(self, a: int) -> torch.Tensor:
        b = min(a + self.batch, self.n)
        if self.ready is not None:
            self.ready(self.rows[b - 1] + 1)  # rows ascend
        t = torch.from_numpy(crop_faces([self.frames[j] for j in self.rows[a:b]], self.boxes[a:b]))
        return t.pin_memory() if self.pipe.device.type == "cuda" else t

    def upto(self, k: int) -> None:
        k = min(int(k), self.n)
        while self.done < k:
            assert self._pool is not None
            a = self.done
            b = min(a + self.batch, self.n)
            if self._crops is None:  # kept until encoded: a chunk retried after running out of memory reuses them
                assert self._next is not None
                self._crops = self._next.result()
                self._next = self._pool.submit(self._crop, b) if b < self.n else None
            pipe = self.pipe
            try:
                lat = encode_faces(pipe.models.vae, self._crops, self.step, pad=pipe.pad_batches, encode=pipe.encode_step)
            except torch.cuda.OutOfMemoryError:
                # The chunk again, in calls of half as many crops (the same chunks: the same rows).
                pipe.drop_cuda_graphs()
                if self.step <= 1:
                    raise EngineRuntimeError(
                        "out of GPU memory in VAE encode even at batch size 1; free the GPU or use a larger one"
                    ) from None
                self.step = max(1, self.step // 2)
                log.warning("out of GPU memory in VAE encode; retrying with batch size %d", self.step)
                pipe._compile_off_after_oom()
                continue
            self.tensor[a:b] = lat
            self.done, self._crops = b, None
            if self.progress is not None:
                self.progress("latents", b, self.n)
        if self.done >= self.n:
            self.close()

    def close(self, wait: bool = True) -> None:
        """Stop the crop thread (``wait=False``: a job that ended early need not wait for a crop
        still waiting on its frames)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


class _HeaderBroken(Exception):
    """Frames rendered while decoding turned out not to be the file's (``FrameStream.predicted``)."""


def _bucket(n: int, batch: int) -> int:
    """The padded batch for ``n`` items: the next power of two, or ``batch`` when that is smaller."""
    return min(max(batch, n), 1 << (n - 1).bit_length())


@dataclass
class _Plan:
    """Which input frame and which latent row each output frame uses, on host and device."""

    in_idx: np.ndarray  # [T] input frame per output frame (ping-pong)
    in_idx_dev: torch.Tensor
    face_out: np.ndarray  # sorted output indices whose input frame has a face
    face_rows: np.ndarray  # latent row for each entry of face_out (host)
    face_out_dev: torch.Tensor
    face_rows_dev: torch.Tensor  # latent row for each entry of face_out
    batch: int

    @classmethod
    def build(cls, prep: PreparedVideo, total: int, batch: int, device: torch.device) -> "_Plan":
        in_idx = pingpong_indices(total, prep.n_used)
        rows = prep.face_rows[in_idx]
        face_out = np.nonzero(rows >= 0)[0]
        return cls(
            in_idx=in_idx,
            in_idx_dev=torch.from_numpy(in_idx).to(device),
            face_out=face_out,
            face_rows=rows[face_out],
            face_out_dev=torch.from_numpy(face_out).to(device),
            face_rows_dev=torch.from_numpy(rows[face_out]).to(device),
            batch=batch,
        )


def _abort(writer: Any) -> None:
    try:
        writer.abort()
    except Exception:  # already failing; the first error is the one to report
        log.debug("writer.abort() failed", exc_info=True)


class _GpuTimer:
    """Sums the time between marks per batch: CUDA events on GPU (no per-batch sync), wall-clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._batches: list[dict[str, Any]] = []
        self._cur: dict[str, Any] = {}

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def begin(self) -> None:
        self._cur = {}

    def mark(self, name: str) -> None:
        self._cur[name] = self._now()

    def end(self) -> None:
        self._batches.append(self._cur)
        self._cur = {}

    def discard(self) -> None:
        self._cur = {}

    def _span(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def totals(self) -> tuple[float, float]:
        gen = blend = 0.0
        for m in self._batches:
            if "generate_start" in m and "generate_end" in m:
                gen += self._span(m["generate_start"], m["generate_end"])
            if "generate_end" in m and "blend_end" in m:
                blend += self._span(m["generate_end"], m["blend_end"])
        return gen, blend
