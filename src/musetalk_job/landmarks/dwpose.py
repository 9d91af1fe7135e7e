"""DWPose wholebody (RTMPose-l, 384×288, 133 keypoints) in plain PyTorch, no mmcv/mmpose/mmdet.

Contract:

* ``RTMPose`` is a re-implementation of mmdet's CSPNeXt-P5 backbone and mmpose's RTMCCHead
  (large-kernel conv → ScaleNorm+Linear → one GAU block → SimCC x/y classifiers) whose
  ``state_dict`` keys equal the official ``dw-ll_ucoco_384.pth`` keys (``backbone.*``,
  ``head.*``), so that file loads key for key. Widths, depths and head sizes are *read from
  the checkpoint's tensor shapes* (``ArchConfig.from_state_dict``), so the official model and
  a tiny random one load through the same code. Things the weights cannot tell are the
  DWPose config's: SiLU everywhere, BatchNorm eps 1e-5 (``SyncBN`` defaults), identity
  shortcuts in every stage except the SPP stage, no relative-position bias in the GAU.
* ``load_checkpoint`` reads with ``torch.load(weights_only=True)`` only (numpy arrays in an
  mmengine ``meta`` are allow-listed through ``torch.serialization.safe_globals``); it accepts
  a bare state dict or ``{"state_dict": ..., "meta": ...}``, strips ``module.``/``student.``
  prefixes, ignores teacher/distillation/EMA/data-preprocessor extras and requires every
  student key with the right shape. Anything wrong → ``ModelsError`` naming the file.
* ``DWPoseDetector.keypoints(frames)`` runs the official top-down recipe (``topdown.py``) on
  every frame in batches: CPU ``cv2.warpAffine`` to 288×384 (bit parity with mmpose), then on
  the device: normalise, one forward pass over ``[batch, flipped batch]``, flip-average,
  SimCC decode. ``DWPoseDetector.detect(frames)`` turns the 68 face points into boxes. On CUDA
  every forward pass has the same shape: a short last batch is padded with black frames
  (``pad_batches``). cuDNN picks its algorithms per shape, so a frame's result then does not
  depend on the video's length or on where the frame falls in a batch, and a job never meets
  a shape for the first time (building its plans took ~0.7 s on an H200; ``warmup()`` builds
  the one shape in start-up). A frame's keypoints depend only on that frame
  (``independent_frames``), so callers may analyse a video in pieces as it decodes.
* Face presence (official runs S3FD for this): a frame has a face when the mean score of the
  68 face keypoints is ≥ ``FACE_SCORE_THRESHOLD`` (0.3) *and* the landmark box is valid;
  otherwise ``None`` (no S3FD fallback box).
* ``write_random_checkpoint(path, size="tiny"|"full", seed=0)`` writes random weights in the
  official key layout, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelsError
from . import topdown
from .boxes import Box, bbox_from_landmarks

FACE_SCORE_THRESHOLD = 0.3
BN_EPS = 1e-5
SPP_KERNELS = (5, 9, 13)
CUDA_BATCH = 32
CPU_BATCH = 4


# =========================================================================== network


class ConvBNAct(nn.Module):
    """Conv (no bias) → BatchNorm → SiLU; keys ``conv.*``, ``bn.*`` as mmcv's ConvModule."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNAct(cin, cin, k, groups=cin)
        self.pointwise_conv = ConvBNAct(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    def __init__(self, channels: int, hidden: int, kernel: int, add_identity: bool) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, hidden, 3)
        self.conv2 = DepthwiseSeparable(hidden, channels, kernel)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.hardsigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))
        return x * w


class CSPLayer(nn.Module):
    def __init__(self, channels: int, mid: int, num_blocks: int, block_hidden: int, kernel: int,
                 add_identity: bool, attention: bool) -> None:
        super().__init__()
        self.main_conv = ConvBNAct(channels, mid, 1)
        self.short_conv = ConvBNAct(channels, mid, 1)
        self.final_conv = ConvBNAct(2 * mid, channels, 1)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, block_hidden, kernel, add_identity) for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], dim=1)
        if self.attention is not None:
            y = self.attention(y)
        return self.final_conv(y)


class SPPBottleneck(nn.Module):
    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, mid, 1)
        self.poolings = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in SPP_KERNELS])
        self.conv2 = ConvBNAct(mid * (len(SPP_KERNELS) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [p(x) for p in self.poolings], dim=1))


class ScaleNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class Scale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class GAU(nn.Module):
    """Gated attention unit, self-attention form without relative bias (RTMCCBlock's keys)."""

    def __init__(self, dims: int, e: int, s: int) -> None:
        super().__init__()
        self.e, self.s = e, s
        self.uv = nn.Linear(dims, 2 * e + s, bias=False)
        self.o = nn.Linear(e, dims, bias=False)
        self.gamma = nn.Parameter(torch.ones(2, s))
        self.beta = nn.Parameter(torch.zeros(2, s))
        self.ln = ScaleNorm(dims)
        self.res_scale = Scale(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uv = F.silu(self.uv(self.ln(x)))
        u, v, base = torch.split(uv, [self.e, self.e, self.s], dim=-1)
        base = base.unsqueeze(2) * self.gamma + self.beta  # [B, K, 2, s]
        q, k = base.unbind(dim=2)
        kernel = torch.square(F.relu(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.s)))
        return self.res_scale(x) + self.o(u * torch.bmm(kernel, v))


@dataclass(frozen=True)
class StageConfig:
    cin: int
    cout: int
    mid: int  # CSP layer half width
    block_hidden: int
    num_blocks: int
    spp: bool


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to build the network; read from checkpoint shapes."""

    stem: tuple[int, int, int]
    stages: tuple[StageConfig, ...]
    kernel: int  # depthwise kernel of the CSPNeXt blocks
    attention: bool
    num_keypoints: int
    final_kernel: int
    hidden: int
    gau_e: int
    gau_s: int
    simcc_w: int
    simcc_h: int

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.simcc_w / topdown.SIMCC_SPLIT_RATIO), int(self.simcc_h / topdown.SIMCC_SPLIT_RATIO)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.stages) + 1)

    @property
    def featuremap(self) -> tuple[int, int]:
        w, h = self.input_size
        return w // self.stride, h // self.stride

    @classmethod
    def preset(cls, size: str) -> "ArchConfig":
        """``full`` = RTMPose-l (deepen/widen 1.0) as in DWPose; ``tiny`` = a narrow, shallow test net
        with the same input and output signature."""
        if size == "full":
            widen, depths, hidden, e, s = 1.0, (3, 6, 6, 3), 256, 512, 128
        elif size == "tiny":
            widen, depths, hidden, e, s = 0.0625, (1, 1, 1, 1), 32, 64, 16
        else:
            raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
        chans = [int(c * widen) for c in (64, 128, 256, 512, 1024)]
        stages = tuple(
            StageConfig(chans[i], chans[i + 1], chans[i + 1] // 2, chans[i + 1] // 2, depths[i], i == 3) for i in range(4)
        )
        return cls(
            stem=(int(64 * widen // 2), int(64 * widen // 2), chans[0]), stages=stages, kernel=5, attention=True,
            num_keypoints=topdown.NUM_KEYPOINTS, final_kernel=7, hidden=hidden, gau_e=e, gau_s=s,
            simcc_w=int(topdown.INPUT_SIZE[0] * topdown.SIMCC_SPLIT_RATIO),
            simcc_h=int(topdown.INPUT_SIZE[1] * topdown.SIMCC_SPLIT_RATIO),
        )

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "ArchConfig":
        """Infer the architecture from tensor shapes (KeyError if a needed key is absent)."""
        stem = tuple(int(sd[f"backbone.stem.{i}.conv.weight"].shape[0]) for i in range(3))
        n_stages = 0
        while f"backbone.stage{n_stages + 1}.0.conv.weight" in sd:
            n_stages += 1
        stages = []
        kernel = 5
        attention = False
        for i in range(1, n_stages + 1):
            pre = f"backbone.stage{i}"
            spp = f"{pre}.1.conv1.conv.weight" in sd
            csp = f"{pre}.{2 if spp else 1}"
            conv = sd[f"{pre}.0.conv.weight"]
            mid = int(sd[f"{csp}.main_conv.conv.weight"].shape[0])
            blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(csp) + r"\.blocks\.(\d+)\.", k))}
            hidden = int(sd[f"{csp}.blocks.0.conv1.conv.weight"].shape[0])
            kernel = int(sd[f"{csp}.blocks.0.conv2.depthwise_conv.conv.weight"].shape[-1])
            attention = f"{csp}.attention.fc.weight" in sd
            stages.append(StageConfig(int(conv.shape[1]), int(conv.shape[0]), mid, hidden, len(blocks), spp))
        uv = sd["head.gau.uv.weight"]
        e = int(sd["head.gau.o.weight"].shape[1])
        return cls(
            stem=stem,  # type: ignore[arg-type]
            stages=tuple(stages),
            kernel=kernel,
            attention=attention,
            num_keypoints=int(sd["head.final_layer.weight"].shape[0]),
            final_kernel=int(sd["head.final_layer.weight"].shape[-1]),
            hidden=int(sd["head.mlp.1.weight"].shape[0]),
            gau_e=e,
            gau_s=int(uv.shape[0]) - 2 * e,
            simcc_w=int(sd["head.cls_x.weight"].shape[0]),
            simcc_h=int(sd["head.cls_y.weight"].shape[0]),
        )


class CSPNeXt(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        s0, s1, s2 = cfg.stem
        self.stem = nn.Sequential(ConvBNAct(3, s0, 3, 2), ConvBNAct(s0, s1, 3), ConvBNAct(s1, s2, 3))
        self.num_stages = len(cfg.stages)
        for i, st in enumerate(cfg.stages, start=1):
            layers: list[nn.Module] = [ConvBNAct(st.cin, st.cout, 3, 2)]
            if st.spp:
                layers.append(SPPBottleneck(st.cout, st.cout // 2))
            # mmdet's P5/P6 settings: identity shortcuts everywhere except the SPP (last) stage
            layers.append(CSPLayer(st.cout, st.mid, st.num_blocks, st.block_hidden, cfg.kernel, not st.spp, cfg.attention))
            self.add_module(f"stage{i}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return x


class RTMCCHead(nn.Module):
    def __init__(self, cfg: ArchConfig, in_channels: int) -> None:
        super().__init__()
        fw, fh = cfg.featuremap
        self.final_layer = nn.Conv2d(in_channels, cfg.num_keypoints, cfg.final_kernel, 1, cfg.final_kernel // 2)
        self.mlp = nn.Sequential(ScaleNorm(fw * fh), nn.Linear(fw * fh, cfg.hidden, bias=False))
        self.gau = GAU(cfg.hidden, cfg.gau_e, cfg.gau_s)
        self.cls_x = nn.Linear(cfg.hidden, cfg.simcc_w, bias=False)
        self.cls_y = nn.Linear(cfg.hidden, cfg.simcc_h, bias=False)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.gau(self.mlp(torch.flatten(self.final_layer(feats), 2)))
        return self.cls_x(x), self.cls_y(x)


class RTMPose(nn.Module):
    """Image ``[B,3,384,288]`` (ImageNet-normalised RGB) → SimCC ``x [B,K,576]``, ``y [B,K,768]``."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = CSPNeXt(cfg)
        self.head = RTMCCHead(cfg, cfg.stages[-1].cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(x))


# =========================================================================== checkpoint I/O

_EXTRA_PREFIXES = ("teacher.", "distill", "ema_", "data_preprocessor.", "head.loss_module.")


class _Inert:
    """Stand-in for a non-tensor class in a checkpoint (mmengine ``HistoryBuffer``, numpy arrays in
    ``meta``...): it accepts any constructor arguments and state and runs nothing from the file."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) was not an allowed global")


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with inert stand-ins for the non-tensor globals it names.

    Official mmengine checkpoints carry ``meta``/``message_hub`` entries (numpy arrays, mmengine
    classes) that the weights-only unpickler refuses. Each refused global is allow-listed as an
    ``_Inert`` placeholder — never the real class — and the load retried, so only tensors and
    plain containers are ever built from the file.
    """
    import pickle
    import zipfile

    # mmap: a retry costs no re-read of the (400 MB) file, and tensors we ignore are never paged in
    mmap = zipfile.is_zipfile(path)
    stand_ins: dict[str, type] = {}
    while True:
        try:
            with torch.serialization.safe_globals([(cls, name) for name, cls in stand_ins.items()]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            match = _GLOBAL_RE.search(str(exc))
            if match is None or match.group(1) in stand_ins or len(stand_ins) >= 64:
                raise ModelsError(
                    f"DWPose checkpoint {path} cannot be read safely ({' '.join(str(exc).split())[-300:]}); "
                    "download dw-ll_ucoco_384.pth again"
                ) from exc
            name = match.group(1)
            stand_ins[name] = type(f"Inert_{name.replace('.', '_')}", (_Inert,), {})
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ModelsError(f"DWPose checkpoint {path} is unreadable or truncated ({exc}); download dw-ll_ucoco_384.pth again") from exc


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The student ``backbone.*``/``head.*`` tensors of a loaded checkpoint (see module doc)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ModelsError(f"DWPose checkpoint {path} is not a state dict (no tensors found); download dw-ll_ucoco_384.pth again")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        for prefix in ("module.", "student."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(_EXTRA_PREFIXES) or not isinstance(value, torch.Tensor):
            continue
        out[key] = value
    return out


def load_model(path: Path | str, device: torch.device | str = "cpu") -> RTMPose:
    """Build the network from the checkpoint's shapes and load it strictly (fp32, eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise ModelsError(f"DWPose checkpoint {path} is missing")
    sd = extract_state_dict(_torch_load(path), path)
    try:
        cfg = ArchConfig.from_state_dict(sd)
    except (KeyError, IndexError) as exc:
        raise ModelsError(f"DWPose checkpoint {path} lacks the RTMPose key {exc}; it is not an RTMPose/DWPose checkpoint") from exc
    if cfg.input_size != topdown.INPUT_SIZE or cfg.num_keypoints != topdown.NUM_KEYPOINTS:
        raise ModelsError(
            f"DWPose checkpoint {path} is for input {cfg.input_size} with {cfg.num_keypoints} keypoints; "
            f"need the wholebody 288x384 model with {topdown.NUM_KEYPOINTS} keypoints (dw-ll_ucoco_384.pth)"
        )
    if "head.gau.w" in sd:
        raise ModelsError(f"DWPose checkpoint {path} uses a GAU relative-position bias, which DWPose's config does not; wrong checkpoint")
    model = RTMPose(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad_shape = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
        raise ModelsError(f"DWPose checkpoint {path} does not match RTMPose: {'; '.join(parts)}; download dw-ll_ucoco_384.pth again")
    model.load_state_dict({k: sd[k].to(torch.float32) if sd[k].is_floating_point() else sd[k] for k in expected}, strict=True)
    del sd  # drop the file mapping before moving to the device
    return model.to(device).eval()


def write_random_checkpoint(path: Path | str, *, size: str = "tiny", seed: int = 0) -> Path:
    """Random RTMPose weights in the official key layout: ``{"state_dict": ..., "meta": ...}``.

    ``tiny`` (0.5 M parameters, ≈ 2 MB) has the official 288×384 → 133×(576, 768) signature;
    ``full`` is RTMPose-l sized (33.6 M parameters, ≈ 135 MB). BatchNorm statistics are
    calibrated on noise so outputs depend on the image. Loads with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    cfg = ArchConfig.preset(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RTMPose(cfg)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.1)
                m.momentum = None  # cumulative average over the calibration pass below
                m.reset_running_stats()
            elif isinstance(m, GAU):
                nn.init.xavier_uniform_(m.uv.weight)
                m.gamma.data.normal_(1.0, 0.1)
                m.beta.data.normal_(0.0, 0.1)
        # Calibrate BatchNorm statistics on noise so activations keep unit scale through the
        # depth: outputs then depend on the image, as a trained model's do.
        model.train()
        with torch.no_grad():
            noise = F.interpolate(torch.randn(2, 3, 48, 36), size=(topdown.INPUT_SIZE[1], topdown.INPUT_SIZE[0]), mode="bilinear")
            model(noise * 2.0)
        model.eval()
    meta = {
        "musetalk_job": {"random": True, "size": size, "seed": seed},
        "dataset_meta": {"dataset_name": "coco_wholebody", "num_keypoints": topdown.NUM_KEYPOINTS,
                         "flip_indices": topdown.flip_indices()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}, "meta": meta}, tmp)
    tmp.replace(path)
    return path


# =========================================================================== detector


class _official_matmul_precision:
    """On CUDA, run with PyTorch's default matmul precision (no TF32), as official mmpose did;
    cuDNN convolutions keep PyTorch's default (TF32 allowed), also as official. Restores the
    process-wide flag afterwards (the engine turns matmul TF32 on only for fp32 MuseTalk models; with
    it off, as for fp16/bf16, this context changes nothing)."""

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cuda"
        self.saved = False

    def __enter__(self) -> None:
        if self.active:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        if self.active:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


@dataclass
class WholebodyResult:
    """Per-frame keypoints in frame pixels ``[N,133,2]`` float64 and scores ``[N,133]`` float32."""

    keypoints: np.ndarray
    scores: np.ndarray

    def face_landmarks(self) -> np.ndarray:
        """The 68 iBUG face points ``[N,68,2]`` truncated to int32 as official."""
        return self.keypoints[:, topdown.FACE_SLICE].astype(np.int32)

    def face_scores(self) -> np.ndarray:
        return self.scores[:, topdown.FACE_SLICE]


@dataclass
class DWPoseDetector:
    """DWPose on one device; ``detect`` gives one face box (or None) per frame."""

    model: RTMPose
    device: torch.device
    face_score_threshold: float = FACE_SCORE_THRESHOLD
    backend: str = "dwpose"
    # None: pad on CUDA only (on the CPU a padded frame costs more than a new shape does)
    pad_batches: Optional[bool] = None
    independent_frames: bool = True
    _flip: list[int] = field(default_factory=topdown.flip_indices)

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> "DWPoseDetector":
        dev = torch.device(device)
        return cls(model=load_model(path, dev), device=dev)

    def default_batch_size(self) -> int:
        return CUDA_BATCH if self.device.type == "cuda" else CPU_BATCH

    def _pads(self) -> bool:
        return self.device.type == "cuda" if self.pad_batches is None else bool(self.pad_batches)

    def warmup(self, batch_size: Optional[int] = None) -> None:
        """One forward pass at the batch shape jobs use (with padding, the only one), so that the
        first job does not build its cuDNN plans."""
        bs = max(1, int(batch_size or self.default_batch_size()))
        w, h = topdown.INPUT_SIZE
        self._forward(np.zeros((bs, h, w, 3), dtype=np.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _forward(self, warped: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B,384,288,3]`` RGB → flip-averaged SimCC decoded keypoints/scores (input pixels)."""
        x = torch.from_numpy(warped)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        mean = torch.tensor(topdown.MEAN_RGB, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(topdown.STD_RGB, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        b = x.shape[0]
        with _official_matmul_precision(self.device):
            sx, sy = self.model(torch.cat([x, x.flip(-1)], dim=0))
        fx, fy = topdown.flip_simcc(sx[b:], sy[b:], self._flip)
        sx = (sx[:b] + fx) * 0.5
        sy = (sy[:b] + fy) * 0.5
        return topdown.decode_simcc(sx, sy)

    def keypoints(
        self,
        frames: np.ndarray,
        *,
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> WholebodyResult:
        """Wholebody keypoints of every frame ``[N,H,W,3]`` RGB uint8, whole frame as the person box.

        The CPU warp of the next batch runs in a worker thread (OpenCV releases the GIL) while the
        device works on the current one. With ``pad_batches`` a short batch is filled up with
        black frames to ``batch_size`` (their results are dropped).
        """
        from concurrent.futures import ThreadPoolExecutor

        n, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
        bs = max(1, int(batch_size or self.default_batch_size()))
        center, scale = topdown.frame_center_scale(w, h)
        mat = topdown.warp_matrix(center, scale)
        rows = bs if self._pads() else None

        def warp(part: np.ndarray) -> np.ndarray:
            return topdown.warp_frames(part, mat, rows=rows)
        kps = np.empty((n, topdown.NUM_KEYPOINTS, 2), dtype=np.float64)
        scores = np.empty((n, topdown.NUM_KEYPOINTS), dtype=np.float32)
        starts = list(range(0, n, bs))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dwpose-warp") as pool:
            pending = pool.submit(warp, frames[0:bs]) if starts else None
            for i, start in enumerate(starts):
                stop = min(n, start + bs)
                warped = pending.result()  # type: ignore[union-attr]
                if i + 1 < len(starts):
                    pending = pool.submit(warp, frames[stop:stop + bs])
                locs, vals = self._forward(warped)
                k = stop - start
                kps[start:stop] = topdown.keypoints_to_frame(locs[:k].cpu().numpy(), center, scale)
                scores[start:stop] = vals[:k].float().cpu().numpy()
                if progress is not None:
                    progress(stop, n)
        return WholebodyResult(kps, scores)

    def boxes_from_result(self, result: WholebodyResult, *, bbox_shift: int = 0) -> list[Optional[Box]]:
        """Face presence rule + the official landmark box, per frame."""
        lms = result.face_landmarks()
        mean_scores = result.face_scores().mean(axis=1)
        out: list[Optional[Box]] = []
        for lm, score in zip(lms, mean_scores):
            out.append(bbox_from_landmarks(lm, bbox_shift) if score >= self.face_score_threshold else None)
        return out

    def detect(
        self,
        frames: np.ndarray,
        *,
        bbox_shift: int = 0,
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> list[Optional[Box]]:
        return self.boxes_from_result(self.keypoints(frames, batch_size=batch_size, progress=progress), bbox_shift=bbox_shift)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__: Sequence[str] = (
    "ArchConfig", "RTMPose", "DWPoseDetector", "WholebodyResult", "load_model", "write_random_checkpoint",
    "extract_state_dict", "FACE_SCORE_THRESHOLD",
)
