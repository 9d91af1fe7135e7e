"""Moving job files: fetch inputs, upload the output atomically, check existence, redact URLs.

Contract
--------
- URL forms: local path, ``file://``, ``http(s)://`` (presigned URLs included), and the
  fsspec protocols ``s3://`` (any S3-compatible endpoint via ``AWS_ENDPOINT_URL``),
  ``gs://``/``gcs://``, ``az://``/``abfs://``/``abfss://``. Credentials come from each
  backend's standard environment; nothing here reads or logs them.
- ``fetch`` streams a remote input to disk under a size cap (a local input is used in
  place after checks). Transient failures (connection errors, timeouts, truncated bodies,
  HTTP 408/429/5xx) are retried with exponential backoff; 4xx such as 401/403/404 are
  permanent (``InputMediaError``, exit 3). Retries exhausted → ``TransientIOError`` (exit 4).
- ``upload`` makes the object appear only when complete: local temp file + ``os.replace``;
  object stores: fsspec ``put_file`` (single PUT or completed multipart); HTTP(S): one PUT
  (presigned URLs).
- ``TransferPolicy.refuse_private_addresses`` refuses http(s) URLs whose host resolves to
  loopback, link-local (cloud metadata), unspecified, multicast or reserved addresses, at
  every redirect hop. ``allowed_local_dirs`` restricts local paths.
- ``redact_url``/``redact_text`` remove query strings, user info and known secrets; every
  URL in a message or manifest goes through them.
- A ``cancel`` event is checked between chunks and during backoff (``Cancelled``).

Heavy imports (requests, fsspec) happen inside functions so that CLI start-up stays fast.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

from .errors import EXIT_SIGTERM, Cancelled, InputMediaError, JobError, TransientIOError

log = logging.getLogger(__name__)

HTTP_SCHEMES = ("http", "https")
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
CHUNK = 1 << 18  # small enough that a cancel is seen quickly on slow links
MAX_REDIRECTS = 10
MAX_BACKOFF_S = 30.0
PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 411, 412, 413, 414, 415, 416, 451}
METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}
METADATA_NETS = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "SALAD_API_KEY",
    "HF_TOKEN",
)


@dataclass(frozen=True)
class TransferPolicy:
    """How transfers behave; built by the runner from the JobSpec and Settings."""

    max_bytes: int = 2 << 30
    timeout_s: float = 60.0
    retries: int = 5
    retry_base_s: float = 1.0
    allowed_local_dirs: Optional[Sequence[Path]] = None
    refuse_private_addresses: bool = False


# ---------------------------------------------------------------------------------------
# URL forms and redaction


def location_kind(url: str) -> str:
    """``"local"``, ``"http"`` or ``"fsspec"``; ``ValueError`` for an unsupported scheme."""
    scheme = _scheme(url)
    if scheme in ("", "file"):
        return "local"
    if scheme in HTTP_SCHEMES:
        return "http"
    if scheme in FSSPEC_SCHEMES:
        return "fsspec"
    raise ValueError(
        f"unsupported URL scheme {scheme!r}; use a local path, file://, http(s)://, s3://, gs://, az:// or abfs://"
    )


def _scheme(url: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return match.group(1).lower() if match else ""


def check_location(url: str) -> None:
    """Syntax check used by JobSpec validation (``ValueError`` with a readable reason)."""
    kind = location_kind(url)
    if kind == "http":
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"URL {redact_url(url)} has no host")
    elif kind == "fsspec":
        parts = urlsplit(url)
        if not parts.netloc or parts.path in ("", "/"):
            raise ValueError(f"URL {redact_url(url)} must name a bucket/container and an object path")
    elif _scheme(url) == "file" and not urlsplit(url).path:
        raise ValueError("file:// URL has no path")


def local_path(url: str) -> Path:
    if _scheme(url) == "file":
        parts = urlsplit(url)
        return Path(url2pathname(parts.path)).expanduser()
    return Path(url).expanduser()


def redact_url(url: Optional[str]) -> Optional[str]:
    """The URL without user info, query string or fragment (a query becomes ``?<redacted>``)."""
    if url is None:
        return None
    if not _scheme(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        netloc = "<redacted>@" + netloc
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


_URL_QUERY = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s?#\"'<>]+)\?(?!<redacted>)[^\s\"'<>]+")
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^\s/@\"'<>]+@")
_SIGNATURE_PARAM = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential|Signature|sig|AWSAccessKeyId)=[^&\s\"'<>]+"
)


def redact_text(text: str) -> str:
    """Remove query strings, URL user info, signature parameters and known secret values."""
    if not text:
        return text
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    text = _URL_USERINFO.sub(r"\1<redacted>@", text)
    text = _SIGNATURE_PARAM.sub(r"\1=<redacted>", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8 and value in text:
            text = text.replace(value, "<redacted>")
    return text


# ---------------------------------------------------------------------------------------
# Policy checks


def _check_local_allowed(path: Path, policy: TransferPolicy, what: str) -> Path:
    resolved = path.resolve(strict=False)
    if policy.allowed_local_dirs is not None:
        for root in policy.allowed_local_dirs:
            if resolved.is_relative_to(Path(root).resolve(strict=False)):
                return resolved
        raise InputMediaError(
            f"{what}: local path {path} is outside the allowed directories "
            f"({', '.join(str(d) for d in policy.allowed_local_dirs)}); use a URL or an allowed path"
        )
    return resolved


def _refused_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (
        addr.is_loopback
        or addr.is_link_local
        or addr.is_unspecified
        or addr.is_multicast
        or addr.is_reserved
        or any(addr in net for net in METADATA_NETS)
    )


def check_host_allowed(url: str, policy: TransferPolicy, what: str) -> None:
    """Refuse http(s) URLs resolving to loopback/link-local/metadata addresses (when the
    policy asks). DNS failure → ``TransientIOError``-worthy ``OSError`` for the retry loop."""
    if not policy.refuse_private_addresses:
        return
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in METADATA_HOSTS:
        raise InputMediaError(f"{what}: URL host {host} is a cloud metadata service and is refused; use a public URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if _refused_address(addr):
            raise InputMediaError(
                f"{what}: URL host {host} resolves to {addr}, a loopback/link-local/metadata address, "
                f"which this worker refuses; use a publicly reachable URL"
            )


# ---------------------------------------------------------------------------------------
# Retry loop


class _Retry(Exception):
    """A transient failure: retry after backoff (``delay`` overrides, e.g. Retry-After)."""

    def __init__(self, message: str, delay: Optional[float] = None) -> None:
        super().__init__(message)
        self.message = message
        self.delay = delay


def _cancelled(cancel: Optional[threading.Event]) -> Cancelled:
    code = getattr(cancel, "exit_code", None) or EXIT_SIGTERM
    return Cancelled("the job was stopped by a signal during a transfer", exit_code=code)


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise _cancelled(cancel)


def _with_retries(fn: Callable[[], Any], *, policy: TransferPolicy, cancel: Optional[threading.Event], action: str) -> Any:
    attempt = 0
    while True:
        _check_cancel(cancel)
        try:
            return fn()
        except _Retry as exc:
            if attempt >= policy.retries:
                raise TransientIOError(
                    f"{action} failed after {attempt + 1} attempts: {redact_text(exc.message)}; "
                    "the storage or network may be down, retry the job later"
                ) from None
            delay = exc.delay
            if delay is None:
                delay = min(policy.retry_base_s * (2**attempt), MAX_BACKOFF_S) * random.uniform(0.75, 1.0)
            delay = min(delay, MAX_BACKOFF_S)
            log.warning(
                "%s: transient failure (%s); retry %d/%d in %.1f s",
                action,
                redact_text(exc.message),
                attempt + 1,
                policy.retries,
                delay,
            )
            attempt += 1
            if cancel is not None:
                if cancel.wait(delay):
                    raise _cancelled(cancel) from None
            else:
                time.sleep(delay)


ByteProgress = Callable[[int, int], None]  # (bytes done, bytes total or 0 when unknown)


def _copy_stream(
    src: IO[bytes] | Iterator[bytes],
    dest: Path,
    *,
    max_bytes: int,
    cancel: Optional[threading.Event],
    what: str,
    url: str,
    progress: Optional[ByteProgress] = None,
    expected: int = 0,
) -> int:
    """Write chunks to ``dest`` (truncating), enforcing the size cap; returns bytes written."""
    total = 0
    chunks: Iterator[bytes] = iter(lambda: src.read(CHUNK), b"") if hasattr(src, "read") else src  # type: ignore[union-attr]
    with open(dest, "wb") as out:
        for chunk in chunks:
            if cancel is not None and cancel.is_set():
                raise _cancelled(cancel)
            if not chunk:
                continue
            total += len(chunk)
            if total > max_bytes:
                raise InputMediaError(
                    f"{what}: {redact_url(url)} is larger than the {max_bytes / 1e6:.0f} MB limit; "
                    "send a smaller file or raise max_input_mb"
                )
            out.write(chunk)
            if progress is not None:
                progress(total, expected)
    return total


# ---------------------------------------------------------------------------------------
# HTTP(S)


def _http_session():
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = "musetalk-job"
    session.trust_env = True
    return session


def _retry_after(resp) -> Optional[float]:
    value = resp.headers.get("Retry-After")
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _http_send(session, method: str, url: str, policy: TransferPolicy, what: str, **kwargs):
    """Send a request, following redirects by hand so every hop passes ``check_host_allowed``."""
    import requests

    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            check_host_allowed(current, policy, what)
        except OSError as exc:  # DNS failure: transient
            raise _Retry(f"cannot resolve {urlsplit(current).hostname}: {exc}") from None
        try:
            resp = session.request(
                method, current, allow_redirects=False, timeout=(policy.timeout_s, policy.timeout_s), **kwargs
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retry(f"{type(exc).__name__} talking to {urlsplit(current).hostname}") from None
        except requests.RequestException as exc:
            raise _Retry(f"{type(exc).__name__} talking to {urlsplit(current).hostname}") from None
        if resp.is_redirect and "Location" in resp.headers:
            location = requests.compat.urljoin(current, resp.headers["Location"])
            resp.close()
            if urlsplit(location).scheme not in HTTP_SCHEMES:
                raise InputMediaError(f"{what}: {redact_url(url)} redirects to a non-HTTP URL, which is refused")
            current = location
            if resp.status_code == 303:
                method = "GET"
            continue
        return resp
    raise InputMediaError(f"{what}: {redact_url(url)} redirects more than {MAX_REDIRECTS} times")


def _http_status_error(resp, what: str, url: str, action: str) -> None:
    """Raise for a non-2xx response: ``_Retry`` for 408/429/5xx, ``InputMediaError`` otherwise."""
    code = resp.status_code
    if 200 <= code < 300:
        return
    resp.close()
    if code in (408, 429) or code >= 500:
        raise _Retry(f"HTTP {code} from {urlsplit(url).hostname}", delay=_retry_after(resp))
    hint = {
        401: "the URL needs credentials or its signature is invalid",
        403: "access denied: the presigned URL may have expired or lacks permission",
        404: "no such object: check the URL",
        410: "the object is gone",
    }.get(code, "the server refused the request")
    raise InputMediaError(f"{what}: {action} {redact_url(url)} returned HTTP {code} ({hint})")


def _http_fetch(url: str, dest: Path, policy: TransferPolicy, cancel, what: str, progress=None) -> int:
    import requests

    session = _http_session()

    def attempt() -> int:
        resp = _http_send(session, "GET", url, policy, what, stream=True)
        _http_status_error(resp, what, url, "GET")
        with resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise InputMediaError(
                    f"{what}: {redact_url(url)} is {int(length) / 1e6:.0f} MB, over the "
                    f"{policy.max_bytes / 1e6:.0f} MB limit; send a smaller file or raise max_input_mb"
                )
            expected = int(length) if length and length.isdigit() else 0
            try:
                return _copy_stream(
                    resp.iter_content(CHUNK),
                    dest,
                    max_bytes=policy.max_bytes,
                    cancel=cancel,
                    what=what,
                    url=url,
                    progress=progress,
                    expected=expected,
                )
            except (requests.RequestException, OSError) as exc:
                if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)) and exc.errno:
                    raise JobError(f"{what}: cannot write {dest}: {exc.strerror}; check free disk space") from None
                raise _Retry(f"transfer from {urlsplit(url).hostname} broke off mid-body ({type(exc).__name__})") from None

    try:
        return _with_retries(attempt, policy=policy, cancel=cancel, action=f"download of {what} {redact_url(url)}")
    finally:
        session.close()


def _http_upload(local: Path, url: str, policy: TransferPolicy, cancel, what: str, content_type: str) -> None:
    import requests

    session = _http_session()
    size = local.stat().st_size

    def attempt() -> None:
        with open(local, "rb") as body:
            try:
                resp = _http_send(
                    session,
                    "PUT",
                    url,
                    policy,
                    what,
                    data=body,
                    headers={"Content-Length": str(size), "Content-Type": content_type},
                )
            except requests.RequestException as exc:  # pragma: no cover - _http_send maps these
                raise _Retry(type(exc).__name__) from None
        with resp:
            _http_status_error(resp, what, url, "PUT")

    try:
        _with_retries(attempt, policy=policy, cancel=cancel, action=f"upload of {what} to {redact_url(url)}")
    finally:
        session.close()


def _http_exists(url: str, policy: TransferPolicy, what: str) -> bool:
    session = _http_session()

    def attempt() -> bool:
        resp = _http_send(session, "HEAD", url, policy, what)
        with resp:
            if resp.status_code == 404:
                return False
            if 200 <= resp.status_code < 300:
                return True
            if resp.status_code in (408, 429) or resp.status_code >= 500:
                raise _Retry(f"HTTP {resp.status_code} from {urlsplit(url).hostname}", delay=_retry_after(resp))
            # A presigned PUT URL cannot be HEADed (403): the check is not possible.
            log.warning(
                "cannot check whether %s exists (HEAD gave HTTP %d); running the job", redact_url(url), resp.status_code
            )
            return False

    try:
        return _with_retries(attempt, policy=policy, cancel=None, action=f"existence check of {redact_url(url)}")
    finally:
        session.close()


# ---------------------------------------------------------------------------------------
# fsspec object stores


def storage_options(url: str, policy: TransferPolicy) -> dict[str, Any]:
    """Backend options: S3-compatible endpoints from ``AWS_ENDPOINT_URL(_S3)``, timeouts."""
    scheme = _scheme(url)
    if scheme in ("s3", "s3a"):
        options: dict[str, Any] = {
            "config_kwargs": {"connect_timeout": policy.timeout_s, "read_timeout": policy.timeout_s},
            "skip_instance_cache": True,
        }
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {"skip_instance_cache": True}


def _fs(url: str, policy: TransferPolicy):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options(url, policy))
    except ImportError as exc:
        raise InputMediaError(
            f"{redact_url(url)}: the fsspec backend for {_scheme(url)}:// is not installed ({exc.name}); "
            "pip install s3fs / gcsfs / adlfs"
        ) from None


def _classify_fs_error(exc: BaseException, what: str, url: str, action: str) -> Exception:
    """Permanent (missing, denied, no credentials) → InputMediaError; anything else → _Retry."""
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return InputMediaError(f"{what}: {redact_url(url)} does not exist; check the bucket and key")
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return InputMediaError(
            f"{what}: {action} {redact_url(url)} was refused ({name}); check the credentials in the environment "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError", "ClientAuthenticationError", "DefaultCredentialsError"):
        return InputMediaError(
            f"{what}: no usable credentials for {redact_url(url)} ({name}); set the backend's standard "
            "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)"
        )
    if name in ("NoSuchBucket", "ResourceNotFoundError"):
        return InputMediaError(f"{what}: {redact_url(url)} does not exist; check the bucket and key")
    return _Retry(f"{name}: {redact_text(str(exc))[:200]}")


def _fs_call(fn: Callable[[], Any], what: str, url: str, action: str) -> Any:
    try:
        return fn()
    except (JobError, _Retry):
        raise
    except Exception as exc:  # noqa: BLE001 - backends raise many types; classified below
        raise _classify_fs_error(exc, what, url, action) from None


def _fsspec_fetch(url: str, dest: Path, policy: TransferPolicy, cancel, what: str, progress=None) -> int:
    def attempt() -> int:
        fs, path = _fs(url, policy)
        info = _fs_call(lambda: fs.info(path), what, url, "reading")
        if info.get("type") == "directory":
            raise InputMediaError(f"{what}: {redact_url(url)} is a folder, not a file")
        size = info.get("size")
        if size is not None and size > policy.max_bytes:
            raise InputMediaError(
                f"{what}: {redact_url(url)} is {size / 1e6:.0f} MB, over the {policy.max_bytes / 1e6:.0f} MB limit; "
                "send a smaller file or raise max_input_mb"
            )

        def copy() -> int:
            with fs.open(path, "rb", block_size=8 * CHUNK) as src:
                return _copy_stream(
                    src,
                    dest,
                    max_bytes=policy.max_bytes,
                    cancel=cancel,
                    what=what,
                    url=url,
                    progress=progress,
                    expected=int(size or 0),
                )

        return _fs_call(copy, what, url, "reading")

    return _with_retries(attempt, policy=policy, cancel=cancel, action=f"download of {what} {redact_url(url)}")


# ---------------------------------------------------------------------------------------
# Public API


def fetch(
    url: str,
    dest: Path,
    policy: TransferPolicy,
    *,
    cancel: Optional[threading.Event] = None,
    what: str = "input",
    progress: Optional[ByteProgress] = None,
) -> Path:
    """Make ``url`` available as a local file. Remote inputs are streamed to ``dest``; a local
    input is checked and returned in place (no copy). Returns the local path.
    ``progress(bytes_done, bytes_total)`` is called per chunk (total 0 when unknown)."""
    kind = location_kind(url)
    if kind == "local":
        path = _check_local_allowed(local_path(url), policy, what)
        if not path.exists():
            raise InputMediaError(f"{what}: file {local_path(url)} does not exist; check the path")
        if not path.is_file():
            raise InputMediaError(f"{what}: {local_path(url)} is not a regular file")
        size = path.stat().st_size
        if size > policy.max_bytes:
            raise InputMediaError(
                f"{what}: {path} is {size / 1e6:.0f} MB, over the {policy.max_bytes / 1e6:.0f} MB limit; "
                "send a smaller file or raise max_input_mb"
            )
        return path
    dest.parent.mkdir(parents=True, exist_ok=True)
    if kind == "http":
        _http_fetch(url, dest, policy, cancel, what, progress)
    else:
        _fsspec_fetch(url, dest, policy, cancel, what, progress)
    return dest


def upload(
    local: Path,
    url: str,
    policy: TransferPolicy,
    *,
    cancel: Optional[threading.Event] = None,
    what: str = "output",
    content_type: str = "video/mp4",
) -> None:
    """Publish ``local`` at ``url`` so that the object appears only when complete."""
    _check_cancel(cancel)
    kind = location_kind(url)
    if kind == "local":
        target = _check_local_allowed(local_path(url), policy, what)
        _atomic_local_copy(local, target, cancel, what)
    elif kind == "http":
        _http_upload(local, url, policy, cancel, what, content_type)
    else:

        def attempt() -> None:
            fs, path = _fs(url, policy)
            _fs_call(lambda: fs.put_file(str(local), path), what, url, "writing")

        _with_retries(attempt, policy=policy, cancel=cancel, action=f"upload of {what} to {redact_url(url)}")


def upload_bytes(
    data: bytes,
    url: str,
    policy: TransferPolicy,
    *,
    cancel: Optional[threading.Event] = None,
    what: str = "manifest",
    content_type: str = "application/json",
) -> None:
    """Publish a small blob (e.g. the manifest) atomically at ``url``."""
    with tempfile.NamedTemporaryFile(prefix="musetalk-blob-", delete=False) as tmp:
        tmp.write(data)
        tmp_path = Path(tmp.name)
    try:
        upload(tmp_path, url, policy, cancel=cancel, what=what, content_type=content_type)
    finally:
        tmp_path.unlink(missing_ok=True)


_PARTIAL: set[Path] = set()  # temp files of local uploads in progress
_PARTIAL_LOCK = threading.Lock()


def remove_partial_uploads() -> None:
    """Delete temp files of local uploads still in progress (used before an emergency exit)."""
    with _PARTIAL_LOCK:
        for path in list(_PARTIAL):
            path.unlink(missing_ok=True)
            _PARTIAL.discard(path)


def _atomic_local_copy(src: Path, target: Path, cancel, what: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise InputMediaError(f"{what}: cannot write to {target.parent}: {exc.strerror}; check the output path") from None
    tmp = Path(tmp_name)
    with _PARTIAL_LOCK:
        _PARTIAL.add(tmp)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        _check_cancel(cancel)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        with _PARTIAL_LOCK:
            _PARTIAL.discard(tmp)


def exists(url: str, policy: TransferPolicy, *, what: str = "output") -> bool:
    """Whether an object already exists at ``url`` (``False`` when it cannot be checked)."""
    kind = location_kind(url)
    if kind == "local":
        return _check_local_allowed(local_path(url), policy, what).is_file()
    if kind == "http":
        return _http_exists(url, policy, what)

    def attempt() -> bool:
        fs, path = _fs(url, policy)
        try:
            fs.invalidate_cache()
        except Exception:  # noqa: BLE001 - best effort
            pass
        return bool(_fs_call(lambda: fs.exists(path), what, url, "checking"))

    return _with_retries(attempt, policy=policy, cancel=None, action=f"existence check of {redact_url(url)}")


def suffix_of(url: str, default: str = "") -> str:
    """File extension of the URL's path (``.mp4``), ignoring the query string."""
    path = local_path(url) if location_kind(url) == "local" else Path(urlsplit(url).path)
    suffix = path.suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else default
