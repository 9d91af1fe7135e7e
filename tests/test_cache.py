"""The avatar cache: keys, round trips, verification, LRU, atomic writes, the bucket backend.

No models and no GPU: entries are built from random arrays. The bucket tests run against
moto's real S3 server on 127.0.0.1 (``loopback.MotoS3``) through s3fs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loopback import MotoS3
from musetalk_job import cache as cache_mod
from musetalk_job.cache import AvatarCache, CachedAvatar, cache_key, from_env, model_fingerprint
from musetalk_job.errors import InputMediaError, SpecError
from musetalk_job.models import layout
from musetalk_job.options import EngineOptions


def make_avatar(seed: int = 0, *, n_frames: int = 12, n_used: int = 10, dtype: torch.dtype = torch.float16,
                height: int = 120, width: int = 160) -> CachedAvatar:
    """A random but internally consistent avatar; frames 3 and 7 have no face."""
    rng = np.random.default_rng(seed)
    boxes: list = []
    for j in range(n_frames):
        if j in (3, 7) or j >= n_used:
            boxes.append(None)
        else:
            x1, y1 = int(rng.integers(0, 40)), int(rng.integers(0, 30))
            boxes.append((x1, y1, x1 + int(rng.integers(20, 60)), y1 + int(rng.integers(20, 60))))
    face_rows = np.full(n_used, -1, dtype=np.int64)
    face_idx = [j for j in range(n_used) if boxes[j] is not None]
    face_rows[face_idx] = np.arange(len(face_idx))
    masks = []
    for j in range(n_used):
        b = boxes[j]
        if b is None:
            masks.append(None)
        else:
            mb = (b[0], b[1], b[2], min(height, b[3] + 10))
            masks.append((mb, rng.integers(0, 256, size=(mb[3] - mb[1], mb[2] - mb[0]), dtype=np.uint8)))
    latents = torch.from_numpy(rng.standard_normal((len(face_idx), 8, 32, 32)).astype(np.float32)).to(dtype)
    return CachedAvatar(fps=25.0, n_frames=n_frames, n_used=n_used, n_analysed=n_used, frame_size=(height, width),
                        version="v15", boxes=boxes, face_rows=face_rows, latents=latents, masks=masks)


def assert_same(a: CachedAvatar, b: CachedAvatar) -> None:
    assert (a.fps, a.n_frames, a.n_used, a.n_analysed, tuple(a.frame_size), a.version) == (
        b.fps, b.n_frames, b.n_used, b.n_analysed, tuple(b.frame_size), b.version)
    assert a.boxes == b.boxes
    np.testing.assert_array_equal(a.face_rows, b.face_rows)
    la = a.latents if isinstance(a.latents, torch.Tensor) else torch.from_numpy(a.latents)
    lb = b.latents if isinstance(b.latents, torch.Tensor) else torch.from_numpy(b.latents)
    assert la.dtype == lb.dtype and la.shape == lb.shape
    assert torch.equal(la, lb)
    assert len(a.masks) == len(b.masks)
    for ma, mb in zip(a.masks, b.masks):
        assert (ma is None) == (mb is None)
        if ma is not None:
            assert tuple(ma[0]) == tuple(mb[0])
            np.testing.assert_array_equal(ma[1], mb[1])
            assert mb[1].dtype == np.uint8


KEY_A = "a" * 64
KEY_B = "b" * 64
KEY_C = "c" * 64


# ---------------------------------------------------------------------------------------
# Round trip, misses, hits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_miss_put_hit_returns_identical_arrays(tmp_path: Path, dtype: torch.dtype) -> None:
    c = AvatarCache(tmp_path / "c")
    assert c.get(KEY_A) is None
    avatar = make_avatar(1, dtype=dtype)
    c.put(KEY_A, avatar)
    got = c.get(KEY_A)
    assert got is not None
    assert_same(avatar, got)
    assert got.info["key"] == KEY_A and got.info["format"] == cache_mod.FORMAT
    # another process (a new cache object on the same directory) sees it too; other keys miss
    again = AvatarCache(tmp_path / "c").get(KEY_A)
    assert again is not None
    assert_same(avatar, again)
    assert c.get(KEY_B) is None


def test_entry_layout_is_json_and_safetensors_only(tmp_path: Path) -> None:
    c = AvatarCache(tmp_path)
    c.put(KEY_A, make_avatar(2))
    entry = tmp_path / KEY_A
    assert sorted(p.name for p in entry.iterdir()) == sorted([cache_mod.META, cache_mod.LATENTS, cache_mod.MASKS])
    meta = json.loads((entry / cache_mod.META).read_text())
    for name in cache_mod.DATA_FILES:
        assert meta["files"][name]["bytes"] == (entry / name).stat().st_size
    from safetensors import safe_open

    with safe_open(str(entry / cache_mod.LATENTS), framework="pt") as f:
        assert set(f.keys()) == {"latents", "face_rows", "boxes", "has_box"}
    assert not list(tmp_path.glob(".tmp-*"))


def test_numpy_latents_and_blendmask_like_masks_are_accepted(tmp_path: Path) -> None:
    avatar = make_avatar(3, dtype=torch.float32)

    @dataclasses.dataclass
    class Mask:  # duck-typed like blending.BlendMask
        box: tuple
        alpha: np.ndarray

    as_np = dataclasses.replace(avatar, latents=avatar.latents.numpy(),
                                masks=[None if m is None else Mask(*m) for m in avatar.masks])
    c = AvatarCache(tmp_path)
    c.put(KEY_A, as_np)
    got = c.get(KEY_A)
    assert got is not None
    assert_same(avatar, got)


def test_inconsistent_avatar_is_not_stored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = dataclasses.replace(make_avatar(4), masks=make_avatar(4).masks[:-1])
    c = AvatarCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="musetalk_job.cache"):
        c.put(KEY_A, bad)
    assert c.get(KEY_A) is None
    assert "not storing" in caplog.text


def test_put_replaces_an_existing_entry(tmp_path: Path) -> None:
    c = AvatarCache(tmp_path)
    c.put(KEY_A, make_avatar(5, n_used=6))
    bigger = make_avatar(6, n_used=12)
    c.put(KEY_A, bigger)
    got = c.get(KEY_A)
    assert got is not None
    assert_same(bigger, got)
    assert [p.name for p in tmp_path.iterdir()] == [KEY_A]


# ---------------------------------------------------------------------------------------
# Keys


@pytest.fixture
def video_file(tmp_path: Path) -> Path:
    p = tmp_path / "video.mp4"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes())
    return p


def _key(video: Path, options: EngineOptions = EngineOptions(), *, version: str = "v15",
         dtype: str = "float16", fp: str = "models-1") -> str:
    return cache_key(video, version=version, options=options, dtype_name=dtype, model_fingerprint=fp)


def test_key_is_stable_and_follows_the_video_bytes(video_file: Path, tmp_path: Path) -> None:
    k = _key(video_file)
    assert cache_mod._KEY_RE.match(k)
    assert _key(video_file) == k
    copy = tmp_path / "elsewhere" / "renamed.mov"
    copy.parent.mkdir()
    shutil.copyfile(video_file, copy)
    assert _key(copy) == k  # content, not name
    data = bytearray(video_file.read_bytes())
    data[len(data) // 2] ^= 1
    copy.write_bytes(bytes(data))
    assert _key(copy) != k
    with pytest.raises(InputMediaError, match="video"):
        _key(tmp_path / "missing.mp4")


@pytest.mark.parametrize(
    "change",
    [
        {"extra_margin": 20},
        {"parsing_mode": "raw"},
        {"parsing_mode": "neck"},
        {"left_cheek_width": 80},
        {"right_cheek_width": 100},
        {"landmarks": "cascade"},
        {"smooth_boxes": True},
    ],
)
def test_key_changes_with_each_preprocessing_option(video_file: Path, change: dict) -> None:
    base = _key(video_file)
    assert _key(video_file, dataclasses.replace(EngineOptions(), **change)) != base


def test_key_changes_with_version_dtype_fingerprint_and_v1_bbox_shift(video_file: Path) -> None:
    base = _key(video_file)
    assert _key(video_file, version="v1") != base
    assert _key(video_file, dtype="bfloat16") != base
    assert _key(video_file, dtype="torch.float16") == base  # torch's str() is the same dtype
    assert _key(video_file, fp="models-2") != base
    v1 = _key(video_file, EngineOptions(version="v1"), version="v1")
    assert _key(video_file, EngineOptions(version="v1", bbox_shift=5), version="v1") != v1
    # v1 blends with the raw mask: the jaw-only knobs and extra_margin do not apply there
    assert _key(video_file, EngineOptions(version="v1", left_cheek_width=10, extra_margin=30), version="v1") == v1


def test_key_ignores_options_that_do_not_change_preprocessing(video_file: Path, tmp_path: Path) -> None:
    base = _key(video_file)
    same = EngineOptions(bbox_shift=7, crf=30, codec="ffv1", preset="fast", batch_size=3, audio_padding_left=1,
                         audio_padding_right=3, fps=30.0, save_boxes=tmp_path / "b.json")
    assert _key(video_file, same) == base  # v1.5 forces bbox_shift to 0, like the official code
    # with jaw off, the cheek widths do not matter
    raw = _key(video_file, EngineOptions(parsing_mode="raw"))
    assert _key(video_file, EngineOptions(parsing_mode="raw", left_cheek_width=50)) == raw


def test_key_follows_the_boxes_file_content(video_file: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": [[1, 2, 30, 40]]}))
    with_file = _key(video_file, EngineOptions(boxes_file=boxes))
    assert with_file != _key(video_file)
    # a boxes file replaces the detector: the backend no longer matters, the content does
    assert _key(video_file, EngineOptions(boxes_file=boxes, landmarks="cascade")) == with_file
    boxes.write_text(json.dumps({"format": "musetalk-job/boxes", "version": 1, "frames": [[1, 2, 30, 41]]}))
    assert _key(video_file, EngineOptions(boxes_file=boxes)) != with_file
    with pytest.raises(InputMediaError, match="boxes_file"):
        _key(video_file, EngineOptions(boxes_file=tmp_path / "none.json"))


def test_model_fingerprint_tracks_preprocessing_weights_only(tmp_path: Path) -> None:
    def write(rel: str, data: bytes = b"x" * 10) -> Path:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    write(f"{layout.VAE_DIR}/config.json")
    vae = write(f"{layout.VAE_DIR}/diffusion_pytorch_model.safetensors")
    bisenet = write(layout.BISENET)
    dwpose = write(layout.DWPOSE_PTH)
    unet = write(layout.UNET["v15"][0])
    fp = model_fingerprint(tmp_path, "v15", "dwpose")
    fp_cascade = model_fingerprint(tmp_path, "v15", "cascade")
    assert fp != fp_cascade
    assert model_fingerprint(tmp_path, "v15", "dwpose") == fp
    unet.write_bytes(b"changed unet weights")  # the UNet does not touch preprocessing
    assert model_fingerprint(tmp_path, "v15", "dwpose") == fp
    dwpose.write_bytes(b"y" * 11)
    fp2 = model_fingerprint(tmp_path, "v15", "dwpose")
    assert fp2 != fp
    assert model_fingerprint(tmp_path, "v15", "cascade") == fp_cascade  # cascade needs no DWPose file
    st = bisenet.stat()
    os.utime(bisenet, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, new mtime
    fp3 = model_fingerprint(tmp_path, "v15", "dwpose")
    assert fp3 != fp2
    vae.write_bytes(b"z" * 99)
    assert model_fingerprint(tmp_path, "v15", "dwpose") != fp3
    write(layout.FAST["vae"])  # a fast copy, preferred by the loader, counts too
    assert model_fingerprint(tmp_path, "v15", "dwpose") not in (fp, fp2, fp3)


# ---------------------------------------------------------------------------------------
# Verification: corrupt or mismatched entries are removed, never trusted


def _flip_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_meta(entry: Path, **changes) -> None:
    meta = json.loads((entry / cache_mod.META).read_text())
    meta.update(changes)
    (entry / cache_mod.META).write_text(json.dumps(meta))


CORRUPTIONS = {
    "latents byte flipped": lambda e: _flip_byte(e / cache_mod.LATENTS),
    "mask byte flipped": lambda e: _flip_byte(e / cache_mod.MASKS, 500),
    "masks truncated": lambda e: (e / cache_mod.MASKS).write_bytes((e / cache_mod.MASKS).read_bytes()[:-7]),
    "latents missing": lambda e: (e / cache_mod.LATENTS).unlink(),
    "meta truncated": lambda e: (e / cache_mod.META).write_text((e / cache_mod.META).read_text()[:40]),
    "meta missing": lambda e: (e / cache_mod.META).unlink(),
    "wrong key in meta": lambda e: _edit_meta(e, key=KEY_B),
    "other format version": lambda e: _edit_meta(e, format_version=cache_mod.FORMAT_VERSION + 1),
    "shape differs from meta": lambda e: _edit_meta(e, latents_shape=[9, 8, 32, 32]),
    "frame counts inconsistent": lambda e: _edit_meta(e, n_used=11),
    "dtype differs from meta": lambda e: _edit_meta(e, latents_dtype="float32"),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_or_mismatched_entry_is_a_miss_and_removed(tmp_path: Path, corrupt: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    c = AvatarCache(tmp_path)
    c.put(KEY_A, make_avatar(7))
    c.put(KEY_C, make_avatar(8))
    CORRUPTIONS[corrupt](tmp_path / KEY_A)
    with caplog.at_level(logging.WARNING, logger="musetalk_job.cache"):
        assert c.get(KEY_A) is None
    assert "corrupt or mismatched" in caplog.text
    assert not (tmp_path / KEY_A).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no trash left behind
    assert c.get(KEY_C) is not None  # the other entry is untouched
    c.put(KEY_A, make_avatar(7))  # the caller rebuilds
    assert c.get(KEY_A) is not None


def test_entry_copied_under_another_key_is_rejected(tmp_path: Path) -> None:
    c = AvatarCache(tmp_path)
    c.put(KEY_A, make_avatar(9))
    shutil.copytree(tmp_path / KEY_A, tmp_path / KEY_B)
    assert c.get(KEY_B) is None
    assert not (tmp_path / KEY_B).exists()
    assert c.get(KEY_A) is not None


def test_keys_must_be_hashes(tmp_path: Path) -> None:
    c = AvatarCache(tmp_path)
    with pytest.raises(ValueError):
        c.get("../../etc")


# ---------------------------------------------------------------------------------------
# LRU and atomic writes


def _entry_bytes(tmp_path: Path) -> int:
    probe = AvatarCache(tmp_path / "probe")
    probe.put(KEY_A, make_avatar(10))
    return probe.total_bytes()


def test_lru_eviction_keeps_the_most_recently_used(tmp_path: Path) -> None:
    size = _entry_bytes(tmp_path)
    c = AvatarCache(tmp_path / "c", max_bytes=int(size * 2.5))
    c.put(KEY_A, make_avatar(10))
    c.put(KEY_B, make_avatar(10))
    now = time.time()
    os.utime(tmp_path / "c" / KEY_A, (now - 100, now - 100))
    os.utime(tmp_path / "c" / KEY_B, (now - 50, now - 50))
    assert c.get(KEY_A) is not None  # A is now the most recently used; B the least
    c.put(KEY_C, make_avatar(10))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([KEY_A, KEY_C])
    assert c.total_bytes() <= c.max_bytes
    assert c.get(KEY_B) is None


def test_entry_larger_than_the_cache_is_not_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = AvatarCache(tmp_path / "c", max_bytes=1000)
    with caplog.at_level(logging.WARNING, logger="musetalk_job.cache"):
        c.put(KEY_A, make_avatar(11))
    assert "exceeds the local limit" in caplog.text
    assert c.get(KEY_A) is None
    assert list((tmp_path / "c").iterdir()) == []


def test_crash_leftover_temp_dir_is_ignored_and_cleaned(tmp_path: Path) -> None:
    c = AvatarCache(tmp_path)
    # a crashed put: a temp dir holding a partial entry (data, no meta) for KEY_A
    stale = tmp_path / f".tmp-{KEY_A}-dead0001"
    stale.mkdir()
    (stale / cache_mod.LATENTS).write_bytes(b"partial")
    old = time.time() - cache_mod.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    # a put still in progress in another process: recent, must survive
    live = tmp_path / f".tmp-{KEY_B}-live0001"
    live.mkdir()
    assert c.get(KEY_A) is None
    assert c.get(KEY_B) is None
    assert c.total_bytes() == 0
    AvatarCache(tmp_path)  # the next process start cleans stale leftovers
    assert not stale.exists()
    assert live.exists()
    # a process that crashed while this one keeps running: its leftovers go at the next put
    stale2 = tmp_path / f".trash-{KEY_C}-dead0002"
    stale2.mkdir()
    os.utime(stale2, (old, old))
    c.put(KEY_A, make_avatar(12))
    assert not stale2.exists() and live.exists()
    assert c.get(KEY_A) is not None
    assert c.get(KEY_C) is None


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = AvatarCache(tmp_path)
    real = Path.write_text

    def fail_on_meta(self: Path, *a, **k):
        if self.name == cache_mod.META:
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", fail_on_meta)
    c.put(KEY_A, make_avatar(13))  # a warning, not an exception
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert c.get(KEY_A) is None


# ---------------------------------------------------------------------------------------
# Environment


def test_from_env(tmp_path: Path) -> None:
    assert from_env({}) is None
    assert from_env({"MUSETALK_AVATAR_CACHE": "off"}) is None
    c = from_env({"MUSETALK_AVATAR_CACHE": str(tmp_path / "local"), "MUSETALK_AVATAR_CACHE_MAX_GB": "0.5"})
    assert c is not None and c.root == tmp_path / "local" and c.remote is None and c.max_bytes == 2**29
    assert (tmp_path / "local").is_dir()
    c = from_env({"MUSETALK_AVATAR_CACHE": "s3://bucket/avatars/", "MUSETALK_AVATAR_CACHE_DIR": str(tmp_path / "d")})
    assert c is not None and c.remote == "s3://bucket/avatars" and c.root == tmp_path / "d"
    assert c.max_bytes == cache_mod.DEFAULT_MAX_BYTES
    c = from_env({"MUSETALK_AVATAR_CACHE": f"file://{tmp_path / 'f'}"})
    assert c is not None and c.root == tmp_path / "f" and c.remote is None
    with pytest.raises(SpecError, match="MUSETALK_AVATAR_CACHE_MAX_GB"):
        from_env({"MUSETALK_AVATAR_CACHE": str(tmp_path), "MUSETALK_AVATAR_CACHE_MAX_GB": "lots"})
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(SpecError, match="MUSETALK_AVATAR_CACHE"):
        from_env({"MUSETALK_AVATAR_CACHE": str(blocker / "sub")})


# ---------------------------------------------------------------------------------------
# Bucket backend against moto's S3 server on loopback


@pytest.fixture(scope="module")
def moto_s3():
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    name = f"avatars-{secrets.token_hex(6)}"
    moto_s3.client().create_bucket(Bucket=name)
    return name


def test_remote_put_on_node_a_hits_on_node_b(tmp_path: Path, bucket: str, moto_s3: MotoS3) -> None:
    remote = f"s3://{bucket}/team/avatars"
    a = AvatarCache(tmp_path / "node-a", remote=remote)
    b = AvatarCache(tmp_path / "node-b", remote=remote)
    avatar = make_avatar(20)
    assert b.get(KEY_A) is None  # nothing anywhere yet
    a.put(KEY_A, avatar)
    assert a.flush(timeout=60)
    objects = moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in objects) == sorted(f"team/avatars/{KEY_A}/{n}" for n in
                                                       (cache_mod.META, cache_mod.LATENTS, cache_mod.MASKS))
    got = b.get(KEY_A)
    assert got is not None
    assert_same(avatar, got)
    # installed locally on node B: the next lookup needs no bucket
    assert (tmp_path / "node-b" / KEY_A / cache_mod.META).is_file()
    assert AvatarCache(tmp_path / "node-b").get(KEY_A) is not None


@pytest.mark.parametrize("target", [cache_mod.LATENTS, cache_mod.META])
def test_corrupt_remote_object_is_a_miss_and_is_repaired(tmp_path: Path, bucket: str, moto_s3: MotoS3, target: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    remote = f"s3://{bucket}/avatars"
    a = AvatarCache(tmp_path / "a", remote=remote)
    avatar = make_avatar(21)
    a.put(KEY_A, avatar)
    assert a.flush(timeout=60)
    s3 = moto_s3.client()
    obj = f"avatars/{KEY_A}/{target}"
    data = bytearray(s3.get_object(Bucket=bucket, Key=obj)["Body"].read())
    if target == cache_mod.META:
        data = data[: len(data) // 2]  # truncated
    else:
        data[-10] ^= 0xFF  # one flipped byte
    s3.put_object(Bucket=bucket, Key=obj, Body=bytes(data))
    b = AvatarCache(tmp_path / "b", remote=remote)
    with caplog.at_level(logging.WARNING, logger="musetalk_job.cache"):
        assert b.get(KEY_A) is None
    assert "corrupt or incomplete" in caplog.text
    assert list((tmp_path / "b").iterdir()) == []  # nothing installed locally
    # the node that saw the bad copy rebuilds and puts: it is overwritten even though meta.json looked
    # current; an unreadable meta.json is overwritten by any node's put
    repairer = b if target == cache_mod.LATENTS else AvatarCache(tmp_path / "fresh", remote=remote)
    repairer.put(KEY_A, avatar)
    assert repairer.flush(timeout=60)
    got = AvatarCache(tmp_path / "c", remote=remote).get(KEY_A)
    assert got is not None
    assert_same(avatar, got)


def test_partial_remote_upload_is_not_seen(tmp_path: Path, bucket: str, moto_s3: MotoS3) -> None:
    remote = f"s3://{bucket}/avatars"
    a = AvatarCache(tmp_path / "a", remote=remote)
    a.put(KEY_A, make_avatar(22))
    assert a.flush(timeout=60)
    moto_s3.client().delete_object(Bucket=bucket, Key=f"avatars/{KEY_A}/{cache_mod.META}")  # as if cut before meta
    assert AvatarCache(tmp_path / "b", remote=remote).get(KEY_A) is None


def test_unreachable_bucket_is_only_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    c = AvatarCache(tmp_path, remote="s3://nowhere/avatars")
    with caplog.at_level(logging.WARNING, logger="musetalk_job.cache"):
        assert c.get(KEY_A) is None
        c.put(KEY_A, make_avatar(23))
        assert c.flush(timeout=120)
    assert "remote lookup" in caplog.text and "upload" in caplog.text
    assert c.get(KEY_A) is not None  # the local store still works


# ---------------------------------------------------------------------------------------
# Conversions to and from the pipeline's PreparedVideo


def _frames(avatar: CachedAvatar) -> np.ndarray:
    h, w = avatar.frame_size
    return np.zeros((avatar.n_frames, h, w, 3), dtype=np.uint8)


def test_apply_cached_builds_a_prepared_video(tmp_path: Path) -> None:
    pipeline = pytest.importorskip("musetalk_job.pipeline")
    from musetalk_job.blending import BlendMask

    avatar = make_avatar(30, dtype=torch.float16)
    frames = _frames(avatar)
    prep = cache_mod.apply_cached(avatar, frames, 25.0, EngineOptions(), n_used=10, device="cpu", dtype=torch.float32)
    assert isinstance(prep, pipeline.PreparedVideo)
    assert prep.n_used == 10 and prep.frames is frames and prep.latents.dtype == torch.float32
    assert torch.equal(prep.latents, avatar.latents.float())
    assert all(isinstance(m, BlendMask) for m in prep.masks if m is not None)
    # and back: to_cached(PreparedVideo) stores the same thing
    back = cache_mod.to_cached(prep, EngineOptions())
    c = AvatarCache(tmp_path)
    c.put(KEY_A, back)
    got = c.get(KEY_A)
    assert got is not None
    assert_same(dataclasses.replace(avatar, latents=avatar.latents.float()), got)


def test_apply_cached_serves_fewer_frames_and_refuses_more(tmp_path: Path) -> None:
    pytest.importorskip("musetalk_job.pipeline")
    avatar = make_avatar(31, n_frames=12, n_used=10)
    frames = _frames(avatar)
    prep = cache_mod.apply_cached(avatar, frames, 25.0, EngineOptions(), n_used=5, device="cpu", dtype=torch.float16)
    assert prep is not None and prep.n_used == 5
    assert list(prep.face_rows) == [0, 1, 2, -1, 3]
    assert torch.equal(prep.latents, avatar.latents[:4])
    assert prep.boxes[:5] == avatar.boxes[:5] and prep.boxes[5:] == [None] * 7  # as a fresh 5-frame run
    assert len(prep.masks) == 5
    # more frames than were prepared, all boxes (save_boxes), another frame count or size: rebuild
    assert cache_mod.apply_cached(avatar, frames, 25.0, EngineOptions(), n_used=12, device="cpu", dtype=torch.float16) is None
    assert cache_mod.apply_cached(avatar, frames, 25.0, EngineOptions(save_boxes=tmp_path / "b.json"), n_used=5,
                                  device="cpu", dtype=torch.float16) is None
    assert cache_mod.apply_cached(avatar, frames[:11], 25.0, EngineOptions(), n_used=5, device="cpu", dtype=torch.float16) is None
    assert cache_mod.apply_cached(avatar, frames[:, :-1], 25.0, EngineOptions(), n_used=5, device="cpu", dtype=torch.float16) is None
    # smoothed boxes depend on how many frames were analysed: only an exact match is used
    smooth = EngineOptions(smooth_boxes=True)
    assert cache_mod.apply_cached(avatar, frames, 25.0, smooth, n_used=5, device="cpu", dtype=torch.float16) is None
    assert cache_mod.apply_cached(avatar, frames, 25.0, smooth, n_used=10, device="cpu", dtype=torch.float16) is not None
