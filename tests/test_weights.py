"""download-weights / convert-weights against a real loopback HTTP server acting as the hub.

The fake hub implements what huggingface_hub calls for one file: HEAD/GET
``/{repo}/resolve/{revision}/{filename}`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag`` /
``X-Linked-Size`` for LFS files, ``Content-Length``, ``Range`` → 206, and ``X-Error-Code`` 404s.
It serves a small models tree in the official layout built from the real manifest's repos and
filenames; the manifest used in the tests carries the tree's own sizes and hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from musetalk_job import weights
from musetalk_job.errors import EXIT_MODELS, ModelsError
from musetalk_job.models import layout

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """A loopback Hugging Face hub: ``files[(repo, filename)] = bytes``. Files over 1 KiB are LFS."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.drop_first_get: dict[tuple[str, str], int] = {}  # bytes to send before dropping, once
        self.corrupt: dict[tuple[str, str], bytes] = {}  # GET serves these bytes, headers describe files[]
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.hits: Counter[str] = Counter()
        self.auth: set[str | None] = set()  # Authorization headers seen on /resolve/ requests
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                with hub._lock:
                    hub.requests.append((self.command, path, rng))
                    hub.hits[f"{self.command} {path}"] += 1
                    if "/resolve/" in path:
                        hub.auth.add(self.headers.get("Authorization"))
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                key = (m.group(1), m.group(3)) if m else None
                if key is None or key not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound" if m else "RepoNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = hub.files[key]
                sha256 = hashlib.sha256(body).hexdigest()
                git_sha1 = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
                start = 0
                if rng and self.command == "GET":
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                if len(body) > 1024:
                    self.send_header("ETag", f'"{git_sha1}"')
                    self.send_header("X-Linked-Etag", f'"{sha256}"')
                    self.send_header("X-Linked-Size", str(len(body)))
                else:
                    self.send_header("ETag", f'"{git_sha1}"')
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.command == "HEAD":
                    return
                body = hub.corrupt.get(key, body)
                cut = None
                with hub._lock:
                    if key in hub.drop_first_get:
                        cut = hub.drop_first_get.pop(key)
                if cut is not None:
                    self.wfile.write(body[start : start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

            do_GET = _serve
            do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, filename: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith("/" + filename)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _tree(entries: list[weights.ManifestEntry]) -> dict[str, bytes]:
    """Deterministic content per file: big enough to be 'LFS' for weights, small JSON for configs."""
    out = {}
    for i, e in enumerate(entries):
        if e.path.endswith(".json"):
            out[e.path] = json.dumps({"name": e.path, "i": i}).encode()
        else:
            seed = hashlib.sha256(e.path.encode()).digest()
            n = 40_000 + 997 * i
            out[e.path] = (seed * (n // len(seed) + 1))[:n]
    return out


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[FakeHub, Path, dict[str, bytes]]]:
    """(server, manifest file with the fake tree's sizes/hashes, {path: bytes})."""
    real = weights.load_manifest()
    tree = _tree(list(real.entries))
    server = FakeHub()
    entries = []
    for e in real.entries:
        server.files[(e.repo, e.filename)] = tree[e.path]
        entries.append(replace(e, size=len(tree[e.path]), sha256=hashlib.sha256(tree[e.path]).hexdigest()))
    manifest = weights.write_manifest(tmp_path / "manifest.json", entries)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # CI sets HF_HUB_OFFLINE=1 for the whole run; huggingface_hub reads it at import time.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server, manifest, tree
    server.close()


def _cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "musetalk_job", *args], capture_output=True, text=True, env=full_env,
        timeout=timeout, cwd=REPO_ROOT,
    )


def _select(manifest: Path, version: str = "v15", landmarks: str = "dwpose") -> list[weights.ManifestEntry]:
    return weights.load_manifest(manifest).select(version, landmarks)


# ------------------------------------------------------------------------------------------
def test_packaged_manifest_covers_layout_and_known_facts() -> None:
    m = weights.load_manifest()
    paths = {e.path for e in m.entries}
    for v in ("v15", "v1"):
        assert set(layout.UNET[v]) <= paths
    assert {layout.BISENET, layout.DWPOSE_PTH, layout.DWPOSE_ONNX} <= paths
    assert {f"{layout.VAE_DIR}/config.json", f"{layout.VAE_DIR}/diffusion_pytorch_model.bin"} <= paths
    assert {f"{layout.WHISPER_DIR}/{n}" for n in ("config.json", "pytorch_model.bin", "preprocessor_config.json")} <= paths
    by_path = {e.path: e for e in m.entries}
    # Sizes/hashes from the project's upstream report (docs/musetalk-v15.md §1).
    assert by_path["musetalk/pytorch_model.bin"].size == 3_400_076_549
    assert by_path["musetalk/pytorch_model.bin"].sha256.startswith("0ee7d5ea")
    assert by_path[layout.DWPOSE_PTH].size == 406_878_486 and by_path[layout.DWPOSE_PTH].sha256.startswith("0d9408b1")
    assert by_path[layout.DWPOSE_ONNX].size == 134_399_116 and not by_path[layout.DWPOSE_ONNX].required
    assert by_path[layout.BISENET].size == 53_289_463 and by_path[layout.BISENET].sha256.endswith("26567")
    assert by_path[layout.BISENET].repo == "ManyOtherFunctions/face-parse-bisent"
    assert by_path["musetalk/musetalk.json"].sha256 is None  # unknown, left empty
    assert {e.path for e in m.select("v15", "cascade")} == paths - {"musetalk/pytorch_model.bin", "musetalk/musetalk.json",
                                                                     layout.DWPOSE_PTH, layout.DWPOSE_ONNX}


def test_full_download_then_idempotent(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    server, manifest, tree = hub
    models = tmp_path / "models"
    report = weights.download_weights(models, version="all", manifest=manifest, progress=False, include_optional=True)
    entries = _select(manifest, "all")
    assert layout.DWPOSE_ONNX in report.downloaded
    assert sorted(report.downloaded) == sorted(e.path for e in entries)
    for e in entries:
        assert (models / e.path).read_bytes() == tree[e.path], e.path
        assert not (models / (e.path + weights.INCOMPLETE_SUFFIX)).exists()
    assert not (models / ".cache").exists()  # the official layout only
    statuses = weights.check_models_dir(models, version="all", verify=True, manifest=manifest)
    assert statuses and all(s.ok and s.size_ok and s.sha256_ok for s in statuses)

    # Second run: every file's size is known → skipped without touching the hub.
    n = len(server.requests)
    again = weights.download_weights(models, version="all", manifest=manifest, progress=False, include_optional=True)
    assert again.downloaded == [] and sorted(again.skipped) == sorted(e.path for e in entries)
    assert len(server.requests) == n


def test_download_cli_through_hf_endpoint(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    server, manifest, tree = hub
    models = tmp_path / "m"
    res = _cli(["download-weights", "--models-dir", str(models), "--manifest", str(manifest), "--landmarks", "cascade",
                "--no-progress"], {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "h"),
                                   "HF_TOKEN": "hf_secret_token_value"})
    assert res.returncode == 0, res.stderr
    assert "downloaded" in res.stderr and "hf_secret_token_value" not in res.stderr + res.stdout
    assert server.auth == {"Bearer hf_secret_token_value"}  # HF_TOKEN honoured on HEAD and GET
    assert f"from {server.url}/TMElyralab/MuseTalk/resolve/main/musetalkV15/unet.pth" in res.stderr
    assert (models / layout.UNET["v15"][0]).read_bytes() == tree[layout.UNET["v15"][0]]
    assert not (models / layout.DWPOSE_PTH).exists()  # cascade needs no DWPose
    assert not (models / "musetalk").exists()  # v1 not asked for
    assert not (models / layout.DWPOSE_ONNX).exists()  # optional: only with --include-optional


def test_resume_after_dropped_connection(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server drops the connection mid-body; the download continues with a Range request."""
    from huggingface_hub import constants

    server, manifest, tree = hub
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # 10 MiB by default: the test files are smaller
    unet = next(e for e in _select(manifest) if e.path == "musetalkV15/unet.pth")
    server.drop_first_get[(unet.repo, unet.filename)] = 10_000
    models = tmp_path / "models"
    weights.download_weights(models, manifest=manifest, progress=False, landmarks="cascade")
    assert (models / unet.path).read_bytes() == tree[unet.path]
    gets = server.gets(unet.filename)
    assert len(gets) == 2 and gets[0][2] is None and gets[1][2] == "bytes=8192-"  # two whole 4 KiB chunks kept


def test_resume_partial_left_by_an_earlier_run(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    server, manifest, tree = hub
    models = tmp_path / "models"
    path = "sd-vae/diffusion_pytorch_model.bin"
    part = models / (path + weights.INCOMPLETE_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(tree[path][:12_345])  # what a killed process leaves behind
    report = weights.download_weights(models, manifest=manifest, progress=False, landmarks="cascade")
    assert (models / path).read_bytes() == tree[path] and not part.exists()
    assert path in report.repaired
    assert [g[2] for g in server.gets("diffusion_pytorch_model.bin")] == ["bytes=12345-"]


def test_repair_truncated_and_corrupt_files(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    server, manifest, tree = hub
    models = tmp_path / "models"
    weights.download_weights(models, manifest=manifest, progress=False)
    trunc = layout.BISENET
    (models / trunc).write_bytes(tree[trunc][:1])  # 1-byte file: hf_hub_download would call it done
    longer = "whisper/pytorch_model.bin"
    (models / longer).write_bytes(tree[longer] + b"extra")
    bad_prefix = layout.DWPOSE_PTH
    (models / bad_prefix).write_bytes(b"X" * 100 + tree[bad_prefix][100:5000])  # short and wrong
    bad = {s.entry.path: s for s in weights.check_models_dir(models, manifest=manifest) if not s.ok}
    assert set(bad) == {trunc, longer, bad_prefix} and "truncated" in bad[trunc].problem
    with pytest.raises(ModelsError, match="79999_iter.pth: size 1 B"):
        weights.assert_models_dir(models, manifest=manifest)

    server.requests.clear()
    report = weights.download_weights(models, manifest=manifest, progress=False)
    assert set(report.repaired) == {trunc, longer, bad_prefix}
    for p in (trunc, longer, bad_prefix):
        assert (models / p).read_bytes() == tree[p]
    assert [g[2] for g in server.gets("79999_iter.pth")] == ["bytes=1-"]  # continued
    assert [g[2] for g in server.gets("pytorch_model.bin")] == [None]  # too long: replaced
    # Corrupt prefix: continuing gives a bad hash, so it is fetched again from scratch.
    assert [g[2] for g in server.gets("dw-ll_ucoco_384.pth")] == ["bytes=5000-", None]
    weights.assert_models_dir(models, manifest=manifest, verify=True)


def test_verify_catches_hash_mismatch(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    server, manifest, tree = hub
    models = tmp_path / "models"
    weights.download_weights(models, manifest=manifest, progress=False, landmarks="cascade")
    path = "musetalkV15/unet.pth"
    data = bytearray(tree[path])
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (models / path).write_bytes(bytes(data))
    assert all(s.ok for s in weights.check_models_dir(models, manifest=manifest, landmarks="cascade"))  # size only
    bad = [s for s in weights.check_models_dir(models, manifest=manifest, landmarks="cascade", verify=True) if not s.ok]
    assert [s.entry.path for s in bad] == [path] and bad[0].sha256_ok is False

    plain = weights.download_weights(models, manifest=manifest, progress=False, landmarks="cascade")
    assert path in plain.skipped  # without --verify sizes decide
    fixed = weights.download_weights(models, manifest=manifest, progress=False, landmarks="cascade", verify=True)
    assert fixed.downloaded == [path] and (models / path).read_bytes() == tree[path]


def test_hub_file_differs_from_manifest(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    server, manifest, tree = hub
    entries = weights.load_manifest(manifest).entries
    wrong = [replace(e, sha256="0" * 64) if e.path == layout.BISENET else e for e in entries]
    other = weights.write_manifest(tmp_path / "wrong.json", wrong)
    with pytest.raises(ModelsError, match="sha256"):
        weights.download_weights(tmp_path / "m", manifest=other, progress=False, landmarks="cascade")
    assert not (tmp_path / "m" / layout.BISENET).exists()


def test_hub_sha256_checked_when_manifest_has_none(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    """With no size/hash in the manifest, the hub's LFS sha256 (X-Linked-Etag) still catches bad bytes."""
    server, manifest, tree = hub
    entries = [replace(e, size=None, sha256=None) for e in weights.load_manifest(manifest).entries]
    loose = weights.write_manifest(tmp_path / "loose.json", entries)
    e = next(x for x in entries if x.path == layout.BISENET)
    good = server.files[(e.repo, e.filename)]
    server.corrupt[(e.repo, e.filename)] = bytes(b ^ 1 for b in good)  # same size, other bytes
    models = tmp_path / "m"
    with pytest.raises(ModelsError, match="twice with sha256 mismatch"):
        weights.download_weights(models, manifest=loose, progress=False, landmarks="cascade")
    assert not (models / e.path).exists() and not (models / (e.path + weights.INCOMPLETE_SUFFIX)).exists()
    assert len(server.gets(e.filename)) == 2
    del server.corrupt[(e.repo, e.filename)]
    report = weights.download_weights(models, manifest=loose, progress=False, landmarks="cascade")
    assert e.path in report.downloaded and (models / e.path).read_bytes() == good


def test_offline_mode_lists_missing_quickly(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    server, manifest, tree = hub
    models = tmp_path / "models"
    (models / "sd-vae").mkdir(parents=True)
    (models / "sd-vae/config.json").write_bytes(tree["sd-vae/config.json"])
    t0 = time.monotonic()
    res = _cli(["download-weights", "--models-dir", str(models), "--manifest", str(manifest)],
               {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "h")})
    assert time.monotonic() - t0 < 30
    assert res.returncode == EXIT_MODELS, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error[5]:") and "HF_HUB_OFFLINE" in lines[-1]
    listed = [ln for ln in lines if ln.strip().startswith("missing:")]
    expected = {e.path for e in _select(manifest) if e.required} - {"sd-vae/config.json"}
    assert {ln.split()[1] for ln in listed} == expected
    assert f"{server.url}/TMElyralab/MuseTalk/resolve/main/musetalkV15/unet.pth" in res.stderr
    assert server.requests == []  # offline means no request at all


def test_unreachable_hub_fails_within_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    res = _cli(["download-weights", "--models-dir", str(tmp_path / "m"), "--landmarks", "cascade"],
               {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "h")})
    assert res.returncode == EXIT_MODELS, res.stderr
    assert time.monotonic() - t0 < 30
    assert "unreachable" in res.stderr and "musetalkV15/unet.pth" in res.stderr
    assert f"http://127.0.0.1:{port}/openai/whisper-tiny/resolve/main/pytorch_model.bin" in res.stderr


def test_offline_with_complete_dir_succeeds(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    server, manifest, tree = hub
    models = tmp_path / "models"
    weights.download_weights(models, manifest=manifest, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = weights.download_weights(models, manifest=manifest, progress=False)
    assert report.downloaded == [] and sorted(report.skipped) == sorted(e.path for e in _select(manifest) if e.required)


def test_missing_file_on_hub_is_models_error(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    server, manifest, tree = hub
    e = next(x for x in _select(manifest) if x.path == layout.BISENET)
    del server.files[(e.repo, e.filename)]
    with pytest.raises(ModelsError, match="not found on the hub"):
        weights.download_weights(tmp_path / "m", manifest=manifest, progress=False, landmarks="cascade")


def test_random_weights_marker_skips_size_checks(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for e in weights.load_manifest().select("v15", "dwpose"):
        (models / e.path).parent.mkdir(parents=True, exist_ok=True)
        (models / e.path).write_bytes(b"tiny")
    bad = [s for s in weights.check_models_dir(models) if not s.ok]
    assert {s.entry.path for s in bad} == {e.path for e in weights.load_manifest().select("v15") if e.size is not None}
    (models / weights.RANDOM_MARKER).write_text("{}")
    assert all(s.ok and s.size_ok is None for s in weights.check_models_dir(models, verify=True))
    (models / layout.BISENET).unlink()
    with pytest.raises(ModelsError, match=r"79999_iter.pth: missing.*download-weights"):
        weights.assert_models_dir(models)


# ------------------------------------------------------------------------------------------
# convert-weights / fast copies
@pytest.fixture()
def models_copy(tiny_models_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "models"
    shutil.copytree(tiny_models_dir, dest)  # the session fixture must stay free of fast copies
    return dest


def test_convert_weights_round_trip(models_copy: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from musetalk_job.models.loading import MuseTalkModels, read_state_dict

    written = weights.convert_weights(models_copy, version="all")
    keys = ["unet-v15", "unet-v1", "vae", "whisper-encoder", "bisenet", "dwpose"]
    assert set(written) >= {models_copy / layout.FAST[k] for k in keys}
    for k in keys:
        assert weights.fast_copy_valid(models_copy, k) and weights.fast_copy_valid(models_copy, k, dtype="fp16")
        assert not weights.fast_copy_valid(models_copy, k, dtype="bf16")
    original = read_state_dict(models_copy / layout.UNET["v15"][0], models_copy)
    fast = load_file(str(models_copy / layout.FAST["unet-v15"]))
    assert fast.keys() == original.keys()
    for name, t in original.items():
        assert fast[name].dtype == (torch.float16 if t.is_floating_point() else t.dtype)
        assert torch.equal(fast[name], t.to(fast[name].dtype)), name

    # DWPose: the copy holds RTMPose's own keys, loadable strictly.
    from musetalk_job.landmarks.dwpose import load_model

    model = load_model(models_copy / layout.DWPOSE_PTH)
    model.load_state_dict(load_file(str(models_copy / layout.FAST["dwpose"])), strict=True)

    # The engine's loader takes the copies and gets the same modules as from the originals.
    from_fast = MuseTalkModels.load(models_copy, version="v15", device="cpu", dtype=torch.float16)
    assert all(s.fast for s in from_fast.sources.values()), from_fast.sources
    import shutil

    shutil.rmtree(models_copy / layout.FAST_DIR)
    from_orig = MuseTalkModels.load(models_copy, version="v15", device="cpu", dtype=torch.float16)
    for attr in ("unet", "vae", "whisper", "bisenet"):
        a, b = getattr(from_fast, attr).state_dict(), getattr(from_orig, attr).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), attr



def test_fast_copy_goes_stale(models_copy: Path) -> None:
    weights.convert_weights(models_copy, version="v15", dtype="bf16")
    assert weights.fast_copy_valid(models_copy, "bisenet", dtype="bf16")
    assert not weights.fast_copy_valid(models_copy, "unet-v1")  # not converted
    unet = models_copy / layout.UNET["v15"][0]
    st = unet.stat()
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # original rewritten
    assert not weights.fast_copy_valid(models_copy, "unet-v15")
    assert weights.fast_copy_valid(models_copy, "vae")
    fast_vae = models_copy / layout.FAST["vae"]
    fast_vae.write_bytes(fast_vae.read_bytes()[:-10])  # truncated copy
    assert not weights.fast_copy_valid(models_copy, "vae")
    weights.convert_weights(models_copy, version="v15")
    assert weights.fast_copy_valid(models_copy, "unet-v15") and weights.fast_copy_valid(models_copy, "vae")


def test_convert_cli_missing_original(tmp_path: Path) -> None:
    res = _cli(["convert-weights", "--models-dir", str(tmp_path)], {})
    assert res.returncode == EXIT_MODELS
    assert res.stderr.strip().splitlines()[-1].startswith("error[5]:") and "musetalkV15/unet.pth" in res.stderr


def test_alternative_format_counts_as_present(hub: tuple[FakeHub, Path, dict[str, bytes]], tmp_path: Path) -> None:
    """A VAE shipped as .safetensors (which the loader accepts) is not fetched again as .bin."""
    server, manifest, tree = hub
    models = tmp_path / "models"
    alt = models / "sd-vae/diffusion_pytorch_model.safetensors"
    alt.parent.mkdir(parents=True)
    alt.write_bytes(b"safetensors bytes")
    report = weights.download_weights(models, manifest=manifest, progress=False, landmarks="cascade")
    assert "sd-vae/diffusion_pytorch_model.bin" in report.skipped
    assert not (models / "sd-vae/diffusion_pytorch_model.bin").exists()
    assert server.gets("diffusion_pytorch_model.bin") == []
    status = next(s for s in weights.check_models_dir(models, manifest=manifest, landmarks="cascade")
                  if s.entry.path == "sd-vae/diffusion_pytorch_model.bin")
    assert status.ok and status.path == alt and status.size_ok is None


def test_silent_hub_times_out_within_seconds(tmp_path: Path) -> None:
    """A hub that accepts connections but never answers: one 5 s metadata timeout, then exit 5."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        res = _cli(["download-weights", "--models-dir", str(tmp_path / "m"), "--landmarks", "cascade"],
                   {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "h")})
        elapsed = time.monotonic() - t0
    assert res.returncode == EXIT_MODELS, res.stderr
    assert weights.CONNECT_TIMEOUT_S <= elapsed < weights.CONNECT_TIMEOUT_S + 20  # one timeout, not one per file
    assert "unreachable" in res.stderr and res.stderr.count("  missing: ") == 8
