"""The avatar cache: per-video preprocessing (boxes, latents, blend masks) computed once, reused.

Integration (what ``Pipeline`` needs; ``cache`` is this module)::

    # Pipeline.__init__:  self.avatar_cache = cache.from_env()          # None → disabled
    # Pipeline.run, after decode and num_out, instead of the plain prepare_video call:
    n_used = used_input_frames(num_out, frames.shape[0])
    prep = key = None
    if self.avatar_cache is not None:
        with st.stage("landmarks"):                                     # the lookup replaces that work
            key = cache.cache_key(video, version=self.version, options=options, dtype_name=str(self.dtype),
                                  model_fingerprint=cache.model_fingerprint(self.models_dir, self.version, options.landmarks))
            hit = self.avatar_cache.get(key)                            # None: miss (or a bad entry, removed)
            if hit is not None:                                         # None: entry covers fewer frames
                prep = cache.apply_cached(hit, frames, fps, options, n_used=n_used, device=self.device, dtype=self.dtype)
    if prep is None:
        prep = self.prepare_video(frames, fps, options, n_used=n_used, ...)   # as today
        if key is not None:
            self.avatar_cache.put(key, cache.to_cached(prep, options))  # local now, bucket in the background
    elif options.save_boxes is not None:                                # a hit skips _boxes(), which writes it
        landmarks.boxes.write_boxes_file(Path(options.save_boxes), prep.boxes)

A long-running worker may call ``avatar_cache.flush(timeout)`` before it exits so that the last
upload finishes (the upload thread is also joined at interpreter exit).

``cache_key`` may raise ``InputMediaError`` (video or boxes file unreadable); ``get``/``put``
never raise for cache problems — they log a warning and behave as a miss / a no-op.

Contract
--------
- ``cache_key(video_path, *, version, options, dtype_name, model_fingerprint) -> str``: 64 hex
  chars, sha256 over the video bytes (streamed), a canonical JSON of every option that changes
  preprocessing (only those the pipeline actually uses for ``version``: ``bbox_shift`` for v1
  with detected boxes, ``extra_margin`` for v1.5, the effective parsing mode and — for ``jaw``
  — the cheek widths, the landmark backend unless a boxes file is given, the boxes file's
  content hash, ``smooth_boxes``), the latents' dtype, ``PREPROCESS_REVISION`` and the model
  fingerprint. Options that do not touch preprocessing (codec, crf, batch size, audio
  padding, fps for videos) are left out so that they do not cause misses.
- ``model_fingerprint(models_dir, version, landmarks) -> str``: names, sizes and mtimes of the
  weight files preprocessing reads (VAE, BiSeNet, the DWPose files for ``dwpose``, and their
  ``fast/`` copies) in the official layout.
- ``AvatarCache(root, *, max_bytes=10 GiB, remote=None)``: ``get(key) -> CachedAvatar | None``,
  ``put(key, avatar)``, ``flush(timeout)`` (waits for background uploads).
- ``from_env() -> AvatarCache | None`` from ``MUSETALK_AVATAR_CACHE`` (a directory or a bucket
  URL), ``MUSETALK_AVATAR_CACHE_DIR`` and ``MUSETALK_AVATAR_CACHE_MAX_GB``.
- ``to_cached(prepared, options) -> CachedAvatar`` and ``apply_cached(...) -> PreparedVideo | None``.

Entry format (``FORMAT`` version ``FORMAT_VERSION``), a directory ``<root>/<key>/``:
``meta.json`` (format, key, created, scalars, and the size and sha256 of each data file),
``latents.safetensors`` (``latents`` [N_face, C, h, w] in the model dtype, ``face_rows``
[n_used] int64, ``boxes`` [n_frames, 4] int64 + ``has_box`` [n_frames] uint8) and
``masks.safetensors`` (every alpha concatenated flat in ``alpha`` uint8, ``mask_offsets``
[n_used+1], ``mask_shapes`` [n_used, 2], ``mask_boxes`` [n_used, 4], ``has_mask`` [n_used]).
No pickle anywhere. ``get`` checks the format, the key, each file's size and sha256 and every
shape; anything wrong → warning, the entry is deleted, ``None`` (the caller rebuilds it).

Local store: writes go to ``<root>/.tmp-<key>-<random>/`` and are renamed into place (atomic
on one filesystem); temp dirs older than ``STALE_TMP_SECONDS`` are leftovers of a crash and
are removed. LRU: a hit touches the entry directory's mtime; after each put the oldest
entries are deleted until the total is at most ``max_bytes``.

Remote store (any fsspec URL, e.g. ``s3://bucket/prefix``; S3-compatible endpoints from
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, credentials from the backend's standard
environment): on a local miss the entry is downloaded into a temp dir, verified like a local
one, then installed locally. ``put`` uploads in a background thread, data files first and
``meta.json`` last, so a partial upload never looks complete. Remote failures are warnings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from .errors import InputMediaError, SpecError
from .models import layout
from .options import EngineOptions

if TYPE_CHECKING:  # heavy imports stay inside functions: the CLI may import this module
    import torch

    from .pipeline import PreparedVideo

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]

FORMAT = "musetalk-job/avatar"
FORMAT_VERSION = 1
# Bump when the pipeline's preprocessing changes its results (crop, detector post-processing,
# mask morphology, latent encoding): every existing entry then misses and is rebuilt.
# 2: on CUDA, DWPose and BiSeNet run a short last batch padded to the full shape (a frame there
# may get a keypoint a bin away or a parsing class on a pixel changed against revision 1).
PREPROCESS_REVISION = 2
DEFAULT_MAX_BYTES = 10 * 2**30
STALE_TMP_SECONDS = 600.0
META = "meta.json"
LATENTS = "latents.safetensors"
MASKS = "masks.safetensors"
DATA_FILES = (LATENTS, MASKS)
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20

ENV_CACHE = "MUSETALK_AVATAR_CACHE"
ENV_DIR = "MUSETALK_AVATAR_CACHE_DIR"
ENV_MAX_GB = "MUSETALK_AVATAR_CACHE_MAX_GB"
DEFAULT_DIR = "~/.cache/musetalk-job/avatars"


class CacheEntryError(Exception):
    """An entry failed verification (internal: turned into a warning and a miss)."""


@dataclass
class CachedAvatar:
    """What the cache keeps for one video (the frames themselves are decoded again).

    ``boxes``: one per input frame, before ``extra_margin`` (``None``: no face or not analysed);
    ``n_analysed``: how many leading frames had their boxes computed (``n_used``, or all frames
    when a boxes file was given or ``save_boxes`` was set); ``face_rows`` [n_used] int64 row
    into ``latents`` or -1; ``latents`` [N_face, C, h, w] (torch, or numpy for fp16/fp32);
    ``masks`` [n_used] ``(box after extra_margin, alpha uint8 [h, w])`` or ``None``.
    """

    fps: float
    n_frames: int
    n_used: int
    n_analysed: int
    frame_size: tuple[int, int]  # (height, width)
    version: str
    boxes: list[Optional[Box]]
    face_rows: np.ndarray
    latents: Any
    masks: list[Optional[tuple[Box, np.ndarray]]]
    info: dict[str, Any] = field(default_factory=dict)  # meta.json of a loaded entry


# ---------------------------------------------------------------------------------------
# Keys


def _sha256_file(path: Path, what: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise InputMediaError(f"{what} {path}: cannot be read for the avatar cache key ({exc.strerror or exc})") from None
    return h.hexdigest()


def preprocessing_options(options: EngineOptions, *, version: str) -> dict[str, Any]:
    """The options that change boxes, latents or masks for ``version``, canonicalised as the
    pipeline applies them (v1.5 forces ``bbox_shift`` 0; v1 ignores ``extra_margin`` and blends
    with the ``raw`` parsing mask; cheek widths only shape the ``jaw`` mask)."""
    opts: dict[str, Any] = {"smooth_boxes": bool(options.smooth_boxes)}
    if options.boxes_file is not None:
        opts["boxes_file_sha256"] = _sha256_file(Path(options.boxes_file), "boxes_file")
    else:
        opts["landmarks"] = options.landmarks
        if version == "v1":
            opts["bbox_shift"] = int(options.bbox_shift)
    mode = options.parsing_mode if version == "v15" else "raw"
    opts["parsing_mode"] = mode
    if version == "v15":
        opts["extra_margin"] = int(options.extra_margin)
    if mode == "jaw":
        opts["left_cheek_width"] = int(options.left_cheek_width)
        opts["right_cheek_width"] = int(options.right_cheek_width)
    return opts


def cache_key(
    video_path: Path | str,
    *,
    version: str,
    options: EngineOptions,
    dtype_name: str,
    model_fingerprint: str,
) -> str:
    """The entry key: sha256 of the video bytes + preprocessing options + dtype + model fingerprint."""
    ident = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preprocess_revision": PREPROCESS_REVISION,
        "video_sha256": _sha256_file(Path(video_path), "video"),
        "version": version,
        "options": preprocessing_options(options, version=version),
        "dtype": str(dtype_name).replace("torch.", ""),
        "model": model_fingerprint,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_fingerprint(models_dir: Path | str, version: str, landmarks: str) -> str:
    """sha256 over (relative name, size, mtime_ns) of every weight file preprocessing reads."""
    root = Path(models_dir)
    files: list[Path] = []
    vae = root / layout.VAE_DIR
    if vae.is_dir():
        files += sorted(p for p in vae.rglob("*") if p.is_file())
    else:
        files.append(vae)
    files += [root / layout.BISENET, root / layout.FAST["vae"], root / layout.FAST["bisenet"]]
    if landmarks == "dwpose":
        files += [root / layout.DWPOSE_PTH, root / layout.DWPOSE_ONNX, root / layout.FAST["dwpose"]]
    rows = []
    for p in files:
        try:
            st = p.stat()
            rows.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
        except OSError:
            rows.append([p.relative_to(root).as_posix(), None, None])
    ident = {"version": version, "landmarks": landmarks, "files": rows}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Serialisation


def _encode(key: str, avatar: CachedAvatar) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``(meta, {file name: bytes})`` for one entry; raises ``ValueError`` for inconsistent data."""
    import torch
    from safetensors.torch import save

    n_frames, n_used = int(avatar.n_frames), int(avatar.n_used)
    if len(avatar.boxes) != n_frames:
        raise ValueError(f"{len(avatar.boxes)} boxes for {n_frames} frames")
    if len(avatar.masks) != n_used or int(np.asarray(avatar.face_rows).shape[0]) != n_used:
        raise ValueError("masks and face_rows must have n_used entries")
    latents = avatar.latents
    if isinstance(latents, np.ndarray):
        latents = torch.from_numpy(np.ascontiguousarray(latents))
    latents = latents.detach().to("cpu").contiguous()
    boxes = np.zeros((n_frames, 4), dtype=np.int64)
    has_box = np.zeros(n_frames, dtype=np.uint8)
    for j, b in enumerate(avatar.boxes):
        if b is not None:
            boxes[j] = b
            has_box[j] = 1
    mask_boxes = np.zeros((n_used, 4), dtype=np.int64)
    mask_shapes = np.zeros((n_used, 2), dtype=np.int64)
    has_mask = np.zeros(n_used, dtype=np.uint8)
    offsets = np.zeros(n_used + 1, dtype=np.int64)
    alphas: list[np.ndarray] = []
    for j, m in enumerate(avatar.masks):
        if m is not None:
            box, alpha = _mask_parts(m)
            alpha = np.ascontiguousarray(alpha, dtype=np.uint8)
            if alpha.ndim != 2:
                raise ValueError(f"mask {j}: alpha must be 2-D, got shape {alpha.shape}")
            mask_boxes[j] = box
            mask_shapes[j] = alpha.shape
            has_mask[j] = 1
            alphas.append(alpha.reshape(-1))
        offsets[j + 1] = offsets[j] + (alphas[-1].size if m is not None else 0)
    alpha_flat = np.concatenate(alphas) if alphas else np.zeros(0, dtype=np.uint8)
    t = torch.from_numpy
    data = {
        LATENTS: save({
            "latents": latents,
            "face_rows": t(np.ascontiguousarray(avatar.face_rows, dtype=np.int64)),
            "boxes": t(boxes),
            "has_box": t(has_box),
        }),
        MASKS: save({
            "alpha": t(alpha_flat),
            "mask_offsets": t(offsets),
            "mask_shapes": t(mask_shapes),
            "mask_boxes": t(mask_boxes),
            "has_mask": t(has_mask),
        }),
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fps": float(avatar.fps),
        "n_frames": n_frames,
        "n_used": n_used,
        "n_analysed": int(avatar.n_analysed),
        "frame_size": [int(avatar.frame_size[0]), int(avatar.frame_size[1])],
        "version": avatar.version,
        "latents_shape": list(latents.shape),
        "latents_dtype": str(latents.dtype).replace("torch.", ""),
        "files": {name: {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()} for name, blob in data.items()},
    }
    return meta, data


def _mask_parts(m: Any) -> tuple[Sequence[int], np.ndarray]:
    if isinstance(m, tuple):
        return m[0], m[1]
    return m.box, m.alpha  # blending.BlendMask


def _check_meta(meta: Any, key: str) -> None:
    if not isinstance(meta, dict):
        raise CacheEntryError("meta.json is not an object")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CacheEntryError(f"format {meta.get('format')!r} v{meta.get('format_version')!r}, expected {FORMAT!r} v{FORMAT_VERSION}")
    if meta.get("key") != key:
        raise CacheEntryError(f"meta.json names key {str(meta.get('key'))[:16]}…, not this entry's")
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(DATA_FILES):
        raise CacheEntryError("meta.json does not list the data files")
    for name in DATA_FILES:
        spec = files[name]
        if not isinstance(spec, dict) or not isinstance(spec.get("bytes"), int) or not isinstance(spec.get("sha256"), str):
            raise CacheEntryError(f"meta.json: bad entry for {name}")


def _decode(meta: dict[str, Any], data: dict[str, bytes]) -> CachedAvatar:
    """Verify hashes and shapes and rebuild the avatar; ``CacheEntryError`` when anything is off."""
    from safetensors.torch import load

    for name in DATA_FILES:
        blob, spec = data[name], meta["files"][name]
        if len(blob) != spec["bytes"]:
            raise CacheEntryError(f"{name}: {len(blob)} bytes, meta.json says {spec['bytes']}")
        if hashlib.sha256(blob).hexdigest() != spec["sha256"]:
            raise CacheEntryError(f"{name}: sha256 mismatch")
    try:
        lat = load(data[LATENTS])
        msk = load(data[MASKS])
        n_frames, n_used, n_analysed = int(meta["n_frames"]), int(meta["n_used"]), int(meta["n_analysed"])
        height, width = (int(v) for v in meta["frame_size"])
        fps = float(meta["fps"])
        version = str(meta["version"])
        latents = lat["latents"]
        face_rows = lat["face_rows"].numpy()
        boxes, has_box = lat["boxes"].numpy(), lat["has_box"].numpy()
        alpha = msk["alpha"].numpy()
        offsets, shapes = msk["mask_offsets"].numpy(), msk["mask_shapes"].numpy()
        mask_boxes, has_mask = msk["mask_boxes"].numpy(), msk["has_mask"].numpy()
    except CacheEntryError:
        raise
    except Exception as exc:  # safetensors header errors, missing tensors, bad meta types
        raise CacheEntryError(f"unreadable data: {type(exc).__name__}: {exc}") from None

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CacheEntryError(what)

    need(0 < n_used <= n_frames and n_used <= n_analysed <= n_frames, "frame counts inconsistent")
    need(list(latents.shape) == meta["latents_shape"] and latents.ndim == 4, "latents shape differs from meta.json")
    need(str(latents.dtype).replace("torch.", "") == meta["latents_dtype"], "latents dtype differs from meta.json")
    need(face_rows.shape == (n_used,) and face_rows.dtype == np.int64, "face_rows shape")
    n_face = int((face_rows >= 0).sum())
    need(np.array_equal(face_rows[face_rows >= 0], np.arange(n_face)) and bool((face_rows >= -1).all()), "face_rows not 0..N-1 in order")
    need(latents.shape[0] == n_face, "latents rows differ from faces")
    need(boxes.shape == (n_frames, 4) and has_box.shape == (n_frames,), "boxes shape")
    need(mask_boxes.shape == (n_used, 4) and shapes.shape == (n_used, 2) and has_mask.shape == (n_used,), "mask table shape")
    need(offsets.shape == (n_used + 1,) and offsets[0] == 0 and int(offsets[-1]) == alpha.size, "mask offsets")
    sizes = np.where(has_mask.astype(bool), shapes[:, 0] * shapes[:, 1], 0)
    need(bool((shapes >= 0).all()) and np.array_equal(np.diff(offsets), sizes), "mask sizes differ from offsets")
    need(alpha.dtype == np.uint8, "alpha dtype")
    masks: list[Optional[tuple[Box, np.ndarray]]] = []
    for j in range(n_used):
        if has_mask[j]:
            a = alpha[offsets[j] : offsets[j + 1]].reshape(int(shapes[j, 0]), int(shapes[j, 1]))
            masks.append((tuple(int(v) for v in mask_boxes[j]), a))  # type: ignore[arg-type]
        else:
            masks.append(None)
    return CachedAvatar(
        fps=fps,
        n_frames=n_frames,
        n_used=n_used,
        n_analysed=n_analysed,
        frame_size=(height, width),
        version=version,
        boxes=[tuple(int(v) for v in boxes[j]) if has_box[j] else None for j in range(n_frames)],  # type: ignore[misc]
        face_rows=face_rows.copy(),
        latents=latents,
        masks=masks,
        info=meta,
    )


# ---------------------------------------------------------------------------------------
# The cache


def _redact(url: str) -> str:
    """A bucket URL without user info or query string (never log credentials)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _remote_options(url: str) -> dict[str, Any]:
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("s3", "s3a"):
        opts: dict[str, Any] = {
            "skip_instance_cache": True,
            "config_kwargs": {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3}},
        }
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {"skip_instance_cache": True}


class AvatarCache:
    """A size-bounded LRU directory of avatar entries, optionally backed by a bucket."""

    def __init__(self, root: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES, remote: Optional[str] = None) -> None:
        self.root = Path(root).expanduser()
        self.max_bytes = int(max_bytes)
        self.remote = remote.rstrip("/") if remote else None
        self._fs: Any = None
        self._fs_lock = threading.Lock()
        self._uploader: Optional[ThreadPoolExecutor] = None
        self._pending: list[Future] = []
        self._remote_bad: set[str] = set()  # keys whose remote copy failed verification
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_stale()

    def __repr__(self) -> str:
        return f"AvatarCache({str(self.root)!r}, max_bytes={self.max_bytes}, remote={_redact(self.remote) if self.remote else None!r})"

    # ----------------------------------------------------------------- local layout

    def _entry(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"not an avatar cache key: {key!r}")
        return self.root / key

    def _new_tmp(self, key: str) -> Path:
        tmp = self.root / f".tmp-{key}-{secrets.token_hex(4)}"
        tmp.mkdir()
        return tmp

    def _discard(self, path: Path) -> None:
        """Remove a directory: rename it out of the way first so readers never see half of it."""
        trash = self.root / f".trash-{path.name}-{secrets.token_hex(4)}"
        try:
            os.rename(path, trash)
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_stale(self) -> None:
        """Remove temp/trash dirs left by a crash (older than ``STALE_TMP_SECONDS``)."""
        now = time.time()
        for p in self.root.glob(".t*-*"):
            if not (p.name.startswith(".tmp-") or p.name.startswith(".trash-")):
                continue
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every installed entry."""
        out = []
        for p in self.root.iterdir():
            if not _KEY_RE.fullmatch(p.name):
                continue
            try:
                size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
                out.append((p.stat().st_mtime, size, p))
            except OSError:  # removed meanwhile by another process
                continue
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _evict(self, keep: Optional[Path] = None) -> None:
        self._clean_stale()  # other processes sharing the directory may have crashed mid-put
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        for _mtime, size, path in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            log.info("avatar cache: evicting %s (%.1f MB) to stay under %.1f GB", path.name[:12], size / 1e6, self.max_bytes / 1e9)
            self._discard(path)
            total -= size

    def _read_dir(self, path: Path, key: str) -> CachedAvatar:
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError) as exc:
            raise CacheEntryError(f"meta.json unreadable: {exc}") from None
        _check_meta(meta, key)
        data = {}
        for name in DATA_FILES:
            try:
                data[name] = (path / name).read_bytes()
            except OSError as exc:
                raise CacheEntryError(f"{name} unreadable: {exc}") from None
        return _decode(meta, data)

    def _install(self, tmp: Path, key: str) -> Path:
        """Rename a complete temp dir into place, replacing any older entry for the key."""
        final = self._entry(key)
        try:
            os.rename(tmp, final)
        except OSError:  # an entry exists (maybe a concurrent put): replace it
            if final.exists():
                self._discard(final)
            os.rename(tmp, final)
        os.utime(final)
        return final

    # ----------------------------------------------------------------- public API

    def get(self, key: str) -> Optional[CachedAvatar]:
        """The verified entry for ``key`` (local, else remote), or ``None``. Never raises for cache faults."""
        path = self._entry(key)
        if path.is_dir():
            try:
                avatar = self._read_dir(path, key)
            except CacheEntryError as exc:
                log.warning("avatar cache: entry %s is corrupt or mismatched (%s); removing it, it will be rebuilt", key[:12], exc)
                self._discard(path)
            else:
                try:
                    os.utime(path)  # LRU touch
                except OSError:
                    pass
                log.info("avatar cache: hit %s (local)", key[:12])
                return avatar
        if self.remote is not None:
            return self._remote_get(key)
        return None

    def put(self, key: str, avatar: CachedAvatar, *, upload: bool = True) -> None:
        """Store ``avatar`` under ``key`` locally (atomic) and, in the background, in the bucket."""
        try:
            meta, data = _encode(key, avatar)
        except (ValueError, TypeError) as exc:
            log.warning("avatar cache: not storing %s: %s", key[:12], exc)
            return
        size = sum(len(b) for b in data.values())
        tmp: Optional[Path] = None
        try:
            if size > self.max_bytes:
                log.warning("avatar cache: entry %s (%.1f MB) exceeds the local limit; not kept locally", key[:12], size / 1e6)
            else:
                tmp = self._new_tmp(key)
                for name, blob in data.items():
                    (tmp / name).write_bytes(blob)
                (tmp / META).write_text(json.dumps(meta, indent=1))
                final = self._install(tmp, key)
                tmp = None
                self._evict(keep=final)
        except OSError as exc:
            log.warning("avatar cache: could not store %s locally: %s", key[:12], exc)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.remote is not None and upload:
            self._upload_async(key, meta, data)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait for background uploads; ``True`` when all finished within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending, self._pending = self._pending, []
        done = True
        for fut in pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                fut.result(timeout=left)
            except Exception:  # noqa: BLE001 - _upload logs its own failures; timeouts count as not done
                done = False
        return done

    # ----------------------------------------------------------------- remote

    def _remote_fs(self) -> Any:
        with self._fs_lock:
            if self._fs is None:
                import fsspec

                assert self.remote is not None
                self._fs, self._remote_root = fsspec.core.url_to_fs(self.remote, **_remote_options(self.remote))
            return self._fs

    def _remote_path(self, key: str, name: str) -> str:
        self._remote_fs()
        return f"{self._remote_root.rstrip('/')}/{key}/{name}"

    def _remote_get(self, key: str) -> Optional[CachedAvatar]:
        assert self.remote is not None
        where = _redact(self.remote)
        try:
            fs = self._remote_fs()
            try:
                meta_bytes = fs.cat_file(self._remote_path(key, META))
            except FileNotFoundError:
                return None
            try:
                meta = json.loads(meta_bytes)
            except ValueError as exc:
                raise CacheEntryError(f"meta.json unreadable: {exc}") from None
            _check_meta(meta, key)
            data = {name: fs.cat_file(self._remote_path(key, name)) for name in DATA_FILES}
            avatar = _decode(meta, data)
        except CacheEntryError as exc:
            self._remote_bad.add(key)
            log.warning("avatar cache: remote entry %s in %s is corrupt or incomplete (%s); rebuilding", key[:12], where, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - any backend failure is only a miss
            if isinstance(exc, FileNotFoundError):  # data file missing though meta.json exists
                self._remote_bad.add(key)
            log.warning("avatar cache: remote lookup of %s in %s failed (%s: %s); continuing without it",
                        key[:12], where, type(exc).__name__, str(exc)[:200])
            return None
        log.info("avatar cache: hit %s (remote %s)", key[:12], where)
        if sum(len(b) for b in data.values()) <= self.max_bytes:
            tmp: Optional[Path] = None
            try:  # install the verified bytes locally for the next job
                tmp = self._new_tmp(key)
                for name, blob in data.items():
                    (tmp / name).write_bytes(blob)
                (tmp / META).write_bytes(meta_bytes)
                final = self._install(tmp, key)
                tmp = None
                self._evict(keep=final)
            except OSError as exc:
                log.warning("avatar cache: could not keep remote entry %s locally: %s", key[:12], exc)
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        return avatar

    def _upload_async(self, key: str, meta: dict[str, Any], data: dict[str, bytes]) -> None:
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-upload")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._uploader.submit(self._upload, key, meta, data))

    def _upload(self, key: str, meta: dict[str, Any], data: dict[str, bytes]) -> None:
        assert self.remote is not None
        try:
            fs = self._remote_fs()
            meta_path = self._remote_path(key, META)
            if key not in self._remote_bad:
                try:
                    existing = json.loads(fs.cat_file(meta_path))
                    if isinstance(existing, dict) and existing.get("files") == meta["files"]:
                        return  # the same entry is already there
                except (FileNotFoundError, ValueError):  # absent, or unreadable: (re)write it
                    pass
            for name in DATA_FILES:
                fs.pipe_file(self._remote_path(key, name), data[name])
            fs.pipe_file(meta_path, json.dumps(meta, indent=1).encode())  # last: marks the entry complete
            self._remote_bad.discard(key)
            log.info("avatar cache: uploaded %s to %s", key[:12], _redact(self.remote))
        except Exception as exc:  # noqa: BLE001 - a failed upload never fails a job
            log.warning("avatar cache: upload of %s to %s failed (%s: %s)", key[:12], _redact(self.remote),
                        type(exc).__name__, str(exc)[:200])


def from_env(env: Optional[dict[str, str]] = None) -> Optional[AvatarCache]:
    """The cache configured by ``MUSETALK_AVATAR_CACHE`` (a directory or a bucket URL), or ``None``."""
    env = os.environ if env is None else env
    spec = (env.get(ENV_CACHE) or "").strip()
    if not spec or spec.lower() in ("0", "off", "false", "none", "no"):
        return None
    max_gb_text = (env.get(ENV_MAX_GB) or "").strip()
    max_bytes = DEFAULT_MAX_BYTES
    if max_gb_text:
        try:
            max_gb = float(max_gb_text)
        except ValueError:
            max_gb = -1.0
        if not max_gb > 0:
            raise SpecError(f"{ENV_MAX_GB}={max_gb_text!r}: expected a positive number of gigabytes, e.g. 10")
        max_bytes = int(max_gb * 2**30)
    if "://" in spec and not spec.lower().startswith("file://"):
        root = Path(env.get(ENV_DIR) or DEFAULT_DIR).expanduser()
        remote: Optional[str] = spec
    else:
        root = Path(spec[len("file://"):] if spec.lower().startswith("file://") else spec).expanduser()
        remote = None
    try:
        return AvatarCache(root, max_bytes=max_bytes, remote=remote)
    except OSError as exc:
        raise SpecError(f"{ENV_CACHE}: cannot use {root} as the avatar cache directory ({exc}); "
                        f"set {ENV_DIR} or {ENV_CACHE} to a writable directory") from None


# ---------------------------------------------------------------------------------------
# Conversions to and from the pipeline's PreparedVideo


def _n_analysed(n_frames: int, n_used: int, options: EngineOptions) -> int:
    return n_frames if (options.boxes_file is not None or options.save_boxes is not None) else n_used


def to_cached(prepared: "PreparedVideo", options: EngineOptions) -> CachedAvatar:
    """What to store for a freshly prepared video (latents copied to the CPU)."""
    n_frames = prepared.num_frames
    return CachedAvatar(
        fps=float(prepared.fps),
        n_frames=n_frames,
        n_used=int(prepared.n_used),
        n_analysed=_n_analysed(n_frames, int(prepared.n_used), options),
        frame_size=(int(prepared.frames.shape[1]), int(prepared.frames.shape[2])),
        version=prepared.version,
        boxes=[None if b is None else tuple(int(v) for v in b) for b in prepared.boxes],  # type: ignore[misc]
        face_rows=np.asarray(prepared.face_rows, dtype=np.int64).copy(),
        latents=prepared.latents.detach().to("cpu"),
        masks=[None if m is None else _mask_parts(m) for m in prepared.masks],  # type: ignore[misc]
    )


def apply_cached(
    cached: CachedAvatar,
    frames: np.ndarray,
    fps: float,
    options: EngineOptions,
    *,
    n_used: int,
    device: "torch.device | str",
    dtype: "torch.dtype",
) -> Optional["PreparedVideo"]:
    """A ``PreparedVideo`` for this job from a cache hit, or ``None`` when the entry does not cover it
    (different frame count/size/version, fewer used or analysed frames, no face in the used frames).

    An entry prepared for more frames serves a job that uses fewer: the first ``n_used`` rows are
    taken. With ``smooth_boxes`` the smoothed boxes depend on how many frames were analysed, so then
    the analysed count must match exactly.
    """
    import torch

    from .blending import BlendMask
    from .pipeline import PreparedVideo

    n_frames = int(frames.shape[0])
    if cached.n_frames != n_frames or tuple(cached.frame_size) != (int(frames.shape[1]), int(frames.shape[2])):
        log.warning("avatar cache: entry is for %d frames of %s, the video decoded to %d of %s; rebuilding",
                    cached.n_frames, cached.frame_size, n_frames, tuple(frames.shape[1:3]))
        return None
    if cached.version != options.version:
        return None
    n_used = max(1, min(int(n_used), n_frames))
    need = _n_analysed(n_frames, n_used, options)
    if cached.n_used < n_used or cached.n_analysed < need:
        log.info("avatar cache: entry covers %d frames, this job uses %d; rebuilding", cached.n_used, n_used)
        return None
    if options.smooth_boxes and cached.n_analysed != need:
        return None
    face_rows = np.asarray(cached.face_rows[:n_used], dtype=np.int64).copy()
    n_face = int((face_rows >= 0).sum())
    if n_face == 0:
        return None  # let the pipeline run and report "no face" itself
    latents = cached.latents
    if isinstance(latents, np.ndarray):
        latents = torch.from_numpy(latents)
    latents = latents[:n_face].to(device=device, dtype=dtype)
    boxes = list(cached.boxes[:need]) + [None] * (n_frames - need)
    masks = [None if m is None else BlendMask(tuple(m[0]), m[1]) for m in cached.masks[:n_used]]  # type: ignore[arg-type]
    return PreparedVideo(
        frames=frames,
        fps=fps,
        boxes=boxes,
        n_used=n_used,
        face_rows=face_rows,
        latents=latents,
        masks=masks,
        version=cached.version,
    )
