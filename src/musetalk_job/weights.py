"""Model weights: the manifest, checking a models dir, downloading from the hub, fast copies.

Contract:
- ``weights_manifest.json`` (package data) lists every file the engine and the DWPose landmark
  stage read: its path in the official layout, the Hugging Face repo/file it comes from, its
  size and sha256 where known (``null`` where unknown). ``load_manifest(path=None)`` reads it (or
  a replacement: tests and mirrors pass their own).
- ``check_models_dir(models_dir, *, version, landmarks, verify=False, manifest=None)`` returns
  one ``FileStatus`` per file a job of that version/landmark backend needs (plus optional files
  that are present): present, size ok, sha256 ok (only with ``verify``). Sizes are compared only
  when the manifest knows them and the dir is not a random-weights dir (``RANDOM_WEIGHTS.json`` at
  its root, written by ``dev random-weights``). Stat-only unless ``verify``.
  ``assert_models_dir(...)`` raises ``ModelsError`` naming every bad required file.
- ``download_weights(models_dir, *, version, landmarks, manifest, endpoint, token, verify)``
  fetches what is missing with huggingface_hub (``hf_hub_url``, ``get_hf_file_metadata``,
  ``build_hf_headers``, ``http_get``), honouring ``HF_ENDPOINT``, ``HF_TOKEN`` and
  ``HF_HUB_OFFLINE``. Idempotent and resumable: complete files are skipped without a network
  call when their size is known; a download goes to ``<file>.incomplete`` which a later run
  continues with an HTTP Range request; a short file is continued, a long or corrupt one
  replaced; every downloaded file is checked for size and sha256 (the manifest's, else the
  hub's LFS sha256) before it is renamed into place. Offline or unreachable hub (connect timeout
  ``CONNECT_TIMEOUT_S``) → ``WeightsMissing`` (exit 5) listing each missing file and its URL.
- ``convert_weights(models_dir, *, version, dtype)`` writes ``layout.FAST`` safetensors copies
  holding each module's own ``state_dict()`` keys (what ``models.loading`` fills), and
  ``fast/fast.json`` with the size and mtime of every source file; ``fast_copy_valid(models_dir,
  key)`` tells a loader whether a copy is current.
- CLI: ``download-weights`` and ``convert-weights`` (``register``). Heavy imports are lazy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit

from .errors import EXIT_OK, JobError, ModelsError, SpecError, TransientIOError
from .models import layout

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "musetalk-job/weights-manifest"
RANDOM_MARKER = "RANDOM_WEIGHTS.json"  # written by `dev random-weights` at the models-dir root
FAST_META = f"{layout.FAST_DIR}/fast.json"
FAST_FORMAT = "musetalk-job/fast-weights"
INCOMPLETE_SUFFIX = ".incomplete"
LOCK_NAME = ".download-weights.lock"
CONNECT_TIMEOUT_S = 5.0
DEFAULT_ENDPOINT = "https://huggingface.co"
VERSIONS = ("v15", "v1", "all")
LANDMARKS = ("dwpose", "cascade")
DTYPES = ("fp16", "bf16")
_HASH_CHUNK = 8 * 1024 * 1024


# ---------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestEntry:
    """One file of the models dir and where it comes from."""

    path: str  # relative to the models dir (official layout)
    repo: str  # Hugging Face repo id
    filename: str  # path inside the repo
    group: str  # "unet-v15" | "unet-v1" | "base" | "dwpose"
    revision: str = "main"
    required: bool = True
    size: int | None = None
    sha256: str | None = None
    alternatives: tuple[str, ...] = ()  # other accepted file names (e.g. .safetensors)

    def url(self, endpoint: str | None = None) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, self.filename, revision=self.revision, endpoint=endpoint or hub_endpoint())


@dataclass(frozen=True)
class Manifest:
    entries: tuple[ManifestEntry, ...]
    source: str = "package"

    def select(self, version: str = "v15", landmarks: str = "dwpose") -> list[ManifestEntry]:
        """The files a job of ``version`` ("v15", "v1" or "all") with ``landmarks`` reads."""
        if version not in VERSIONS:
            raise SpecError(f"version {version!r}: expected one of {', '.join(VERSIONS)}")
        if landmarks not in LANDMARKS:
            raise SpecError(f"landmarks {landmarks!r}: expected one of {', '.join(LANDMARKS)}")
        groups = {"base"}
        groups |= {"unet-v15", "unet-v1"} if version == "all" else {f"unet-{version}"}
        if landmarks == "dwpose":
            groups.add("dwpose")
        return [e for e in self.entries if e.group in groups]


def load_manifest(path: Path | str | None = None) -> Manifest:
    """The package manifest, or the one at ``path`` (same format). Bad file → ``SpecError``."""
    try:
        if path is None:
            text = resources.files("musetalk_job").joinpath("weights_manifest.json").read_text(encoding="utf-8")
            source = "package"
        else:
            text = Path(path).read_text(encoding="utf-8")
            source = str(path)
        data = json.loads(text)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"weights manifest {path or 'weights_manifest.json'}: unreadable ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), list):
        raise SpecError(f"weights manifest {source}: expected an object with format {MANIFEST_FORMAT!r} and a 'files' list")
    entries = []
    for i, item in enumerate(data["files"]):
        try:
            sha = item.get("sha256") or None
            if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
                raise ValueError(f"sha256 {sha!r} is not 64 hex digits")
            size = item.get("size")
            if size is not None and (not isinstance(size, int) or size < 0):
                raise ValueError(f"size {size!r} is not a non-negative integer")
            entries.append(
                ManifestEntry(
                    path=str(item["path"]),
                    repo=str(item["repo"]),
                    filename=str(item["filename"]),
                    group=str(item["group"]),
                    revision=str(item.get("revision") or "main"),
                    required=bool(item.get("required", True)),
                    size=size,
                    sha256=sha.lower() if sha else None,
                    alternatives=tuple(item.get("alternatives") or ()),
                )
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise SpecError(f"weights manifest {source}: files[{i}] is invalid ({exc})") from exc
    return Manifest(tuple(entries), source)


def write_manifest(path: Path | str, entries: Iterable[ManifestEntry]) -> Path:
    """Write a manifest file (for mirrors and tests) that ``load_manifest`` reads back."""
    files = []
    for e in entries:
        item: dict[str, Any] = {
            "path": e.path,
            "repo": e.repo,
            "filename": e.filename,
            "group": e.group,
            "revision": e.revision,
            "required": e.required,
            "size": e.size,
            "sha256": e.sha256,
        }
        if e.alternatives:
            item["alternatives"] = list(e.alternatives)
        files.append(item)
    path = Path(path)
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, "files": files}, indent=1) + "\n", encoding="utf-8")
    return path


def _as_manifest(manifest: Manifest | Path | str | None) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


# ---------------------------------------------------------------------------------------
# Checking a models dir
# ---------------------------------------------------------------------------------------
def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def is_random_weights_dir(models_dir: Path | str) -> bool:
    """Whether ``models_dir`` holds generated random weights (``dev random-weights`` marker)."""
    return (Path(models_dir) / RANDOM_MARKER).is_file()


@dataclass
class FileStatus:
    """What ``check_models_dir`` found for one manifest file."""

    entry: ManifestEntry
    path: Path  # the file checked (the entry's path or a present alternative)
    present: bool
    size: int | None = None
    size_ok: bool | None = None  # None: not checked (size unknown, or random weights)
    sha256_ok: bool | None = None  # None: not checked (no --verify, hash unknown, or random weights)
    problem: str | None = None  # one phrase when not ok

    @property
    def required(self) -> bool:
        return self.entry.required

    @property
    def ok(self) -> bool:
        return self.present and self.size_ok is not False and self.sha256_ok is not False

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.entry.path,
            "file": str(self.path),
            "required": self.required,
            "present": self.present,
            "size": self.size,
            "expected_size": self.entry.size,
            "size_ok": self.size_ok,
            "sha256_ok": self.sha256_ok,
            "ok": self.ok,
            "problem": self.problem,
            "source": f"{self.entry.repo}/{self.entry.filename}",
        }


def check_file(
    models_dir: Path, entry: ManifestEntry, *, verify: bool = False, random_weights: bool = False
) -> FileStatus:
    """Stat (and with ``verify`` hash) one file; never raises for a bad file."""
    path = models_dir / entry.path
    alternative = False
    if not path.is_file():
        for alt in entry.alternatives:
            if (models_dir / alt).is_file():
                path, alternative = models_dir / alt, True
                break
        else:
            return FileStatus(entry, path, present=False, problem="missing")
    size = path.stat().st_size
    status = FileStatus(entry, path, present=True, size=size)
    # Known sizes/hashes describe the official file, not a random one or another format.
    comparable = not random_weights and not alternative
    if comparable and entry.size is not None:
        status.size_ok = size == entry.size
        if not status.size_ok:
            status.problem = f"size {size:,} B, expected {entry.size:,} B ({'truncated' if size < entry.size else 'too long'})"
            return status
    if size == 0:
        status.size_ok = False
        status.problem = "empty file"
        return status
    if verify and comparable and entry.sha256:
        status.sha256_ok = sha256_file(path) == entry.sha256
        if not status.sha256_ok:
            status.problem = f"sha256 mismatch (expected {entry.sha256[:12]}…)"
    return status


def check_models_dir(
    models_dir: Path | str,
    *,
    version: str = "v15",
    landmarks: str = "dwpose",
    verify: bool = False,
    manifest: Manifest | Path | str | None = None,
) -> list[FileStatus]:
    """One ``FileStatus`` per file needed by ``version``/``landmarks``; optional files only when
    present. Sizes/hashes are skipped for a random-weights dir (see the module docstring)."""
    models_dir = Path(models_dir)
    random_weights = is_random_weights_dir(models_dir)
    out = []
    for entry in _as_manifest(manifest).select(version, landmarks):
        status = check_file(models_dir, entry, verify=verify, random_weights=random_weights)
        if status.present or entry.required:
            out.append(status)
    return out


def assert_models_dir(
    models_dir: Path | str,
    *,
    version: str = "v15",
    landmarks: str = "dwpose",
    verify: bool = False,
    manifest: Manifest | Path | str | None = None,
) -> None:
    """Raise ``ModelsError`` naming every missing/bad required file (for loaders and ``run``)."""
    models_dir = Path(models_dir)
    bad = [s for s in check_models_dir(models_dir, version=version, landmarks=landmarks, verify=verify, manifest=manifest)
           if s.required and not s.ok]
    if bad:
        items = "; ".join(f"{s.entry.path}: {s.problem}" for s in bad)
        raise ModelsError(f"models dir {models_dir}: {items}; {layout.DOWNLOAD_HINT.format(dir=models_dir)}")


# ---------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------
def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value in ("1", "on", "yes", "true") or bool(constants.HF_HUB_OFFLINE)


class WeightsMissing(ModelsError):
    """Files are missing and the hub cannot be reached (exit 5); ``missing`` lists (entry, url)."""

    def __init__(self, message: str, missing: list[tuple[ManifestEntry, str]]) -> None:
        super().__init__(message)
        self.missing = missing

    def listing(self) -> str:
        return "\n".join(f"  missing: {e.path}  <-  {url}" for e, url in self.missing)


@dataclass
class DownloadReport:
    models_dir: Path
    downloaded: list[str] = field(default_factory=list)  # fetched (or finished) in this run
    repaired: list[str] = field(default_factory=list)  # subset of downloaded: replaced or continued a bad file
    skipped: list[str] = field(default_factory=list)  # already complete
    unverified: list[str] = field(default_factory=list)  # present, kept without a size check (hub unreachable)
    optional_missing: list[str] = field(default_factory=list)


@dataclass
class _Remote:
    url: str  # where to GET (after hub redirects)
    size: int | None
    sha256: str | None  # the hub's LFS sha256, when the file is an LFS file
    commit: str | None


class _HubUnreachable(Exception):
    pass


def _fetch_metadata(entry: ManifestEntry, endpoint: str, headers: dict[str, str]) -> _Remote:
    """HEAD the file through huggingface_hub; map failures to our errors."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = entry.url(endpoint)
    try:
        meta = get_hf_file_metadata(url, timeout=CONNECT_TIMEOUT_S, headers=dict(headers), token=False, endpoint=endpoint)
    except (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError) as exc:
        raise _HubUnreachable(f"{type(exc).__name__}: {exc}") from exc
    except GatedRepoError as exc:
        raise ModelsError(
            f"{entry.repo} is gated: accept its terms on the hub and set HF_TOKEN, then run download-weights again"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as exc:
        raise ModelsError(
            f"{url}: not found on the hub ({type(exc).__name__}); check HF_ENDPOINT ({endpoint}), HF_TOKEN for "
            "private mirrors, or pass --manifest with the right repo/file"
        ) from exc
    except HfHubHTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if code in (401, 403):
            raise ModelsError(f"{url}: HTTP {code}; set HF_TOKEN to a token with read access") from exc
        raise _HubUnreachable(f"HTTP {code}") from exc
    if meta.etag is None or meta.commit_hash is None:
        raise _HubUnreachable(f"{url}: the response has no ETag/X-Repo-Commit (is HF_ENDPOINT a Hugging Face hub?)")
    etag = meta.etag.strip('"').lower()
    lfs_sha = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
    return _Remote(url=meta.location or url, size=meta.size, sha256=lfs_sha, commit=meta.commit_hash)


def _download_one(
    entry: ManifestEntry,
    dest: Path,
    remote: _Remote,
    headers: dict[str, str],
    endpoint: str,
    expected_size: int | None,
    expected_sha: str | None,
    show_progress: bool,
) -> bool:
    """Fetch ``remote`` into ``dest`` via ``dest.incomplete`` (continued when present).
    Returns True when an existing partial/bad file was continued or replaced."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    part = dest.with_name(dest.name + INCOMPLETE_SUFFIX)
    dest.parent.mkdir(parents=True, exist_ok=True)
    repaired = False
    if dest.exists():
        # A wrong-size file: continue it when it is short and a hash will vouch for the result.
        size = dest.stat().st_size
        if expected_size is not None and size < expected_size and expected_sha and not part.exists():
            os.replace(dest, part)
        else:
            dest.unlink()
        repaired = True
    get_headers = dict(headers)
    if urlsplit(remote.url).netloc != urlsplit(endpoint).netloc:
        get_headers.pop("authorization", None)  # a signed CDN URL must not receive the hub token
    for attempt in (1, 2):
        resume = part.stat().st_size if part.exists() else 0
        # Continue a partial file only when a hash will vouch for the joined result.
        if resume and (not expected_sha or (expected_size is not None and resume > expected_size)):
            part.unlink()
            resume = 0
        if resume:
            repaired = True
            log.info("continuing %s at %d bytes", entry.path, resume)
        try:
            with open(part, "ab") as f:
                http_get(
                    remote.url,
                    f,
                    resume_size=resume,
                    headers=get_headers,
                    expected_size=expected_size,
                    displayed_filename=entry.path if show_progress else None,
                    tqdm_class=None if show_progress else _NoBar,
                )
        except (httpx2.HTTPError, HfHubHTTPError, OSError) as exc:
            # The partial file stays: the next run continues it.
            raise TransientIOError(
                f"download of {entry.path} from {entry.url(endpoint)} failed ({type(exc).__name__}: {_short(exc)}); "
                "run download-weights again to continue"
            ) from exc
        size = part.stat().st_size
        if expected_size is not None and size != expected_size:
            part.unlink()
            problem = f"size {size} B, expected {expected_size} B"
        elif expected_sha and sha256_file(part) != expected_sha:
            part.unlink()
            problem = "sha256 mismatch"
        else:
            os.replace(part, dest)
            return repaired
        repaired = True
        log.warning("%s: %s after download (attempt %d)", entry.path, problem, attempt)
    raise ModelsError(
        f"{entry.path} downloaded from {entry.url(endpoint)} twice with {problem}; the hub file differs from the "
        "manifest — check HF_ENDPOINT or pass --manifest with the right sizes/hashes"
    )


class _NoBar:
    """A do-nothing tqdm stand-in for ``--no-progress``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def download_weights(
    models_dir: Path | str,
    *,
    version: str = "v15",
    landmarks: str = "dwpose",
    manifest: Manifest | Path | str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    verify: bool = False,
    progress: bool = True,
    include_optional: bool = False,
    notify: Callable[[str], None] | None = None,
) -> DownloadReport:
    """Make ``models_dir`` complete for ``version``/``landmarks`` (see the module docstring);
    optional manifest files (``required: false``) only with ``include_optional``. ``notify``
    receives one line per file fetched.

    Raises ``WeightsMissing`` (offline/unreachable hub and files missing), ``ModelsError`` (not on
    the hub, auth, bad hash after retry), ``TransientIOError`` (download broke off)."""
    from filelock import FileLock, Timeout
    from huggingface_hub.utils import build_hf_headers

    models_dir = Path(models_dir)
    entries = [e for e in _as_manifest(manifest).select(version, landmarks) if e.required or include_optional]
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    offline = hub_offline()
    report = DownloadReport(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    random_weights = is_random_weights_dir(models_dir)
    if random_weights:
        raise ModelsError(
            f"models dir {models_dir} holds random test weights ({RANDOM_MARKER}); download real weights into another dir"
        )
    lock = FileLock(str(models_dir / LOCK_NAME))
    try:
        lock.acquire(timeout=1)
    except Timeout as exc:
        raise TransientIOError(f"another download-weights is running on {models_dir} (lock {lock.lock_file}); wait for it") from exc
    try:
        headers = build_hf_headers(token=token)  # token None → HF_TOKEN / stored login
        unreachable: str | None = "offline mode (HF_HUB_OFFLINE=1)" if offline else None
        missing: list[tuple[ManifestEntry, str]] = []
        for entry in entries:
            local = check_file(models_dir, entry, verify=verify)
            if local.present and local.ok and local.path != models_dir / entry.path:
                report.skipped.append(entry.path)  # an accepted alternative (e.g. .safetensors) is there
                continue
            if local.present and local.ok and local.size_ok and (entry.sha256 is None or not verify or local.sha256_ok):
                report.skipped.append(entry.path)  # size known and right: no network needed
                continue
            remote = None
            if unreachable is None:
                try:
                    remote = _fetch_metadata(entry, endpoint, headers)
                except _HubUnreachable as exc:
                    unreachable = f"{endpoint} unreachable ({_short(exc, 120)})"
            if remote is None:
                if local.present and local.ok:
                    report.unverified.append(entry.path)  # size unknown here: keep what is there
                elif entry.required:
                    missing.append((entry, entry.url(endpoint)))
                else:
                    report.optional_missing.append(entry.path)
                continue
            expected_size = entry.size if entry.size is not None else remote.size
            if entry.size is not None and remote.size is not None and remote.size != entry.size:
                raise ModelsError(
                    f"{remote.url}: the hub has {remote.size:,} B, the manifest expects {entry.size:,} B for {entry.path}; "
                    "pass --manifest with the right size/hash if the hub file changed"
                )
            if entry.sha256 and remote.sha256 and remote.sha256 != entry.sha256:
                raise ModelsError(
                    f"{remote.url}: the hub's sha256 {remote.sha256} differs from the manifest's {entry.sha256} for "
                    f"{entry.path}; pass --manifest with the right hash if the hub file changed"
                )
            expected_sha = entry.sha256 or remote.sha256
            if local.present and local.ok and (expected_size is None or local.size == expected_size):
                if not verify or expected_sha is None or sha256_file(local.path) == expected_sha:
                    report.skipped.append(entry.path)
                    continue
            if notify is not None:
                size_text = f"{expected_size / 1e6:,.1f} MB" if expected_size is not None else "size unknown"
                notify(f"fetching {entry.path} ({size_text}) from {entry.url(endpoint)}")
            repaired = _download_one(
                entry, models_dir / entry.path, remote, headers, endpoint, expected_size, expected_sha, progress
            )
            report.downloaded.append(entry.path)
            if repaired:
                report.repaired.append(entry.path)
        if missing:
            names = ", ".join(e.path for e, _ in missing)
            raise WeightsMissing(
                f"{len(missing)} model file(s) missing in {models_dir} and the hub cannot be reached: {unreachable}. "
                f"Missing: {names}. Get them from the URLs listed above (set HF_ENDPOINT for a mirror, HF_TOKEN "
                "for private ones) or copy them into place, then run download-weights again",
                missing,
            )
        return report
    finally:
        lock.release()  # the lock file stays: unlinking it could let two processes in at once


# ---------------------------------------------------------------------------------------
# Fast copies
# ---------------------------------------------------------------------------------------
def _fast_sources(models_dir: Path, key: str) -> list[Path]:
    """The original files a fast copy is made from (those that exist, first match for folders)."""
    if key.startswith("unet-"):
        return list(layout.unet_paths(models_dir, key[len("unet-"):]))
    if key == "vae":
        folder = models_dir / layout.VAE_DIR
        weights = next((folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if (folder / n).is_file()), folder / "diffusion_pytorch_model.bin")
        return [weights, folder / "config.json"]
    if key == "whisper-encoder":
        folder = models_dir / layout.WHISPER_DIR
        weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()),
                       folder / "pytorch_model.bin")
        return [weights, folder / "config.json"]
    if key == "bisenet":
        return [models_dir / layout.BISENET]
    if key == "dwpose":
        return [models_dir / layout.DWPOSE_PTH]
    raise KeyError(key)


def _stamp(path: Path, models_dir: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": path.relative_to(models_dir).as_posix(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_fast_meta(models_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((models_dir / FAST_META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FAST_FORMAT or not isinstance(data.get("copies"), dict):
        return {}
    return data["copies"]


def fast_copy_valid(models_dir: Path | str, key: str, *, dtype: str | None = None) -> bool:
    """Whether ``layout.FAST[key]`` was written by ``convert-weights`` from the current originals
    (same sizes and mtimes as recorded) and is complete; with ``dtype`` ("fp16"/"bf16") also
    whether it holds that dtype. Cheap: stats only."""
    models_dir = Path(models_dir)
    if key not in layout.FAST:
        return False
    record = _read_fast_meta(models_dir).get(key)
    fast = models_dir / layout.FAST[key]
    if not isinstance(record, dict) or not fast.is_file():
        return False
    if dtype is not None and record.get("dtype") != dtype:
        return False
    if fast.stat().st_size != record.get("size"):
        return False
    for src in record.get("sources", []):
        path = models_dir / src["path"]
        if not path.is_file():
            return False
        st = path.stat()
        if st.st_size != src["size"] or st.st_mtime_ns != src["mtime_ns"]:
            return False
    return bool(record.get("sources"))


def _fast_state_dict(models_dir: Path, key: str) -> dict[str, Any]:
    """The module's own ``state_dict()`` keys for ``key``, read from the originals (no unpickling)."""
    from .models import loading

    sources = _fast_sources(models_dir, key)
    if key == "vae":
        return loading.convert_legacy_vae_keys(loading.read_state_dict(sources[0], models_dir))
    if key == "whisper-encoder":
        sd = loading.read_state_dict(sources[0], models_dir)
        for prefix in loading.WHISPER_ENCODER_PREFIXES:
            enc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if enc:
                return enc
        raise ModelsError(f"model file {sources[0]}: no Whisper encoder tensors")
    if key == "dwpose":
        from .landmarks.dwpose import load_model

        return load_model(sources[0]).state_dict()  # the module's keys, whatever prefixes the file has
    return loading.read_state_dict(sources[0], models_dir)


def convert_weights(
    models_dir: Path | str,
    *,
    version: str = "v15",
    dtype: str = "fp16",
    landmarks: str = "dwpose",
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the ``layout.FAST`` copies for ``version`` (and DWPose with ``landmarks="dwpose"``
    when its checkpoint is present). Floating tensors are cast to ``dtype``; others kept.
    Returns the files written. Originals missing/corrupt → ``ModelsError``."""
    import torch
    from safetensors.torch import save_file

    models_dir = Path(models_dir)
    if dtype not in DTYPES:
        raise SpecError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if version not in VERSIONS:
        raise SpecError(f"version {version!r}: expected one of {', '.join(VERSIONS)}")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    keys = [f"unet-{v}" for v in (("v15", "v1") if version == "all" else (version,))]
    keys += ["vae", "whisper-encoder", "bisenet"]
    if landmarks == "dwpose" and (models_dir / layout.DWPOSE_PTH).is_file():
        keys.append("dwpose")
    (models_dir / layout.FAST_DIR).mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        sources = _fast_sources(models_dir, key)
        for src in sources:
            if not src.is_file():
                raise ModelsError(f"model file {src}: missing; {layout.DOWNLOAD_HINT.format(dir=models_dir)}")
        stamps = [_stamp(s, models_dir) for s in sources]  # before reading: a concurrent rewrite makes it stale
        t0 = time.perf_counter()
        sd = _fast_state_dict(models_dir, key)
        out = {
            k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()
        }
        # safetensors refuses shared storage (e.g. tied weights): give every tensor its own.
        seen: set[int] = set()
        for k, v in out.items():
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen:
                out[k] = v.clone()
            seen.add(ptr)
        dest = models_dir / layout.FAST[key]
        tmp = dest.with_name(dest.name + ".partial")
        save_file(out, str(tmp), metadata={"format": FAST_FORMAT, "key": key, "dtype": dtype})
        os.replace(tmp, dest)
        meta = _read_fast_meta(models_dir)
        meta[key] = {"file": layout.FAST[key], "size": dest.stat().st_size, "dtype": dtype, "sources": stamps}
        meta_path = models_dir / FAST_META
        meta_tmp = meta_path.with_name(meta_path.name + ".partial")
        meta_tmp.write_text(json.dumps({"format": FAST_FORMAT, "version": 1, "copies": meta}, indent=1) + "\n", encoding="utf-8")
        os.replace(meta_tmp, meta_path)
        written.append(dest)
        if progress is not None:
            progress(f"{layout.FAST[key]}: {len(out)} tensors, {dest.stat().st_size:,} B in {time.perf_counter() - t0:.1f}s")
    return written


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def _default_models_dir() -> Path:
    return Path(os.environ.get("MUSETALK_MODELS_DIR") or "models")


def _cmd_download(args: argparse.Namespace) -> int:
    try:
        report = download_weights(
            args.models_dir,
            version=args.version,
            landmarks=args.landmarks,
            manifest=args.manifest,
            verify=args.verify,
            progress=not args.no_progress,
            include_optional=args.include_optional,
            notify=lambda line: print(f"download-weights: {line}", file=sys.stderr, flush=True),
        )
        bad = [s for s in check_models_dir(args.models_dir, version=args.version, landmarks=args.landmarks,
                                           manifest=args.manifest) if s.required and not s.ok]
        if bad:  # cannot happen after a clean download; a last guard against a racing writer
            raise ModelsError("; ".join(f"{s.entry.path}: {s.problem}" for s in bad))
    except WeightsMissing as exc:
        print(exc.listing(), file=sys.stderr)
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_code
    except JobError as exc:
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_code
    print(
        f"download-weights: {args.models_dir}: {len(report.downloaded)} downloaded"
        f" ({len(report.repaired)} repaired), {len(report.skipped)} already complete"
        + (f", {len(report.unverified)} kept unchecked (hub unreachable: {', '.join(report.unverified)})" if report.unverified else "")
        + (f", optional not available: {', '.join(report.optional_missing)}" if report.optional_missing else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        written = convert_weights(
            args.models_dir, version=args.version, dtype=args.dtype, landmarks=args.landmarks,
            progress=lambda line: print(f"convert-weights: {line}", file=sys.stderr),
        )
    except JobError as exc:
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_code
    print(f"convert-weights: {len(written)} fast copies in {Path(args.models_dir) / layout.FAST_DIR}", file=sys.stderr)
    return EXIT_OK


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, default=_default_models_dir(),
                   help="models directory (default $MUSETALK_MODELS_DIR or ./models)")
    p.add_argument("--landmarks", choices=LANDMARKS, default="dwpose",
                   help="include the DWPose files (dwpose, default) or not (cascade)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "download-weights",
        help="download the official weights into the models dir (resumable; checks sizes and hashes)",
        description="Fetch every file the engine and the landmark stage need from the Hugging Face hub into the "
        "official layout. Complete files are skipped, partial ones continued, bad ones replaced. Honours "
        "HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE. Exit 5 lists missing files when the hub is unreachable.",
    )
    _common(p)
    p.add_argument("--version", choices=VERSIONS, default="v15", help="UNet version(s) to fetch (default v15)")
    p.add_argument("--verify", action="store_true", help="also hash files already present (slow for 3.4 GB)")
    p.add_argument("--manifest", type=Path, default=None, help="use this manifest instead of the packaged one")
    p.add_argument("--include-optional", action="store_true",
                   help="also fetch files no job reads (dw-ll_ucoco_384.onnx, for other runtimes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_download)

    c = subparsers.add_parser(
        "convert-weights",
        help="write fp16 safetensors copies of the weights for a fast cold start",
        description="Write layout.FAST copies (safetensors, module state-dict keys) of the UNet, VAE, Whisper "
        "encoder, BiSeNet and DWPose; loaders use them while the originals are unchanged.",
    )
    _common(c)
    c.add_argument("--version", choices=VERSIONS, default="v15", help="UNet version(s) to convert (default v15)")
    c.add_argument("--dtype", choices=DTYPES, default="fp16", help="storage dtype of the copies (default fp16)")
    c.set_defaults(func=_cmd_convert)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    from .cli import main as cli_main

    return cli_main(argv)
