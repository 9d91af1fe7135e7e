"""storage: fetch/upload/exists against a real fault-injecting HTTP server and moto S3 on loopback."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from loopback import FaultServer, MotoS3
from musetalk_job import storage
from musetalk_job.errors import Cancelled, InputMediaError, TransientIOError
from musetalk_job.storage import TransferPolicy, redact_text, redact_url

FAST = TransferPolicy(max_bytes=10_000_000, timeout_s=1.0, retries=2, retry_base_s=0.01)
PAYLOAD = os.urandom(300_000)


@pytest.fixture(scope="module")
def http():
    server = FaultServer().start()
    server.files["clip.bin"] = PAYLOAD
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3():
    server = MotoS3().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.client().create_bucket(Bucket="media")
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


# --- redaction ---------------------------------------------------------------------------


def test_redact_url_removes_query_userinfo_fragment():
    url = "https://user:pw@bucket.s3.amazonaws.com/a/b.mp4?X-Amz-Signature=abc123&X-Amz-Credential=K#frag"
    assert redact_url(url) == "https://<redacted>@bucket.s3.amazonaws.com/a/b.mp4?<redacted>"
    assert redact_url("s3://bucket/key.mp4") == "s3://bucket/key.mp4"
    assert redact_url("/local/path.mp4") == "/local/path.mp4"
    assert redact_url(None) is None


def test_redact_text_covers_embedded_urls_and_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    text = (
        "GET https://h.example/x.wav?sig=ZZZ&se=2030 failed; "
        "also X-Amz-Signature=feedface and key s3cr3t-value-xyz and ftp://u:p@host/x"
    )
    out = redact_text(text)
    for secret in ("ZZZ", "feedface", "s3cr3t-value-xyz", "u:p@"):
        assert secret not in out
    assert "https://h.example/x.wav?<redacted>" in out


def test_check_location_forms():
    for ok in ("a.mp4", "/abs/a.mp4", "file:///abs/a.mp4", "https://h/a", "s3://b/k", "gs://b/k", "az://c/b", "abfs://c/b"):
        storage.check_location(ok)
    for bad in ("ftp://h/a", "s3://bucket", "http:///x"):
        with pytest.raises(ValueError):
            storage.check_location(bad)


# --- HTTP fetch ----------------------------------------------------------------------------


def test_fetch_ok_streams_to_disk(http, tmp_path):
    seen: list[tuple[int, int]] = []
    out = storage.fetch(http.url("/ok/clip.bin?X-Amz-Signature=s1"), tmp_path / "v.bin", FAST, what="video",
                        progress=lambda done, total: seen.append((done, total)))
    assert out.read_bytes() == PAYLOAD
    assert len(seen) > 1 and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_fetch_chunked_body(http, tmp_path):
    out = storage.fetch(http.url("/chunked/clip.bin"), tmp_path / "v.bin", FAST)
    assert out.read_bytes() == PAYLOAD


def test_fetch_retries_500_then_ok(http, tmp_path):
    url = http.url("/fail500x1/clip.bin")
    out = storage.fetch(url, tmp_path / "v.bin", FAST)
    assert out.read_bytes() == PAYLOAD
    assert http.hits["/fail500x1/clip.bin"] == 2


def test_fetch_honours_429_retry_after(http, tmp_path):
    out = storage.fetch(http.url("/retry429/clip.bin"), tmp_path / "v.bin", FAST)
    assert out.read_bytes() == PAYLOAD and http.hits["/retry429/clip.bin"] == 2


def test_fetch_500_forever_is_transient_after_retries(http, tmp_path):
    with pytest.raises(TransientIOError) as info:
        storage.fetch(http.url("/status500/a.bin?sig=SECRETSIG"), tmp_path / "v.bin", FAST, what="video")
    assert info.value.exit_code == 4
    assert http.hits["/status500/a.bin"] == FAST.retries + 1
    assert "SECRETSIG" not in info.value.one_line() and "3 attempts" in info.value.message


@pytest.mark.parametrize("code", [401, 403, 404])
def test_fetch_permanent_http_errors_not_retried(http, tmp_path, code):
    path = f"/status{code}/x.bin"
    with pytest.raises(InputMediaError) as info:
        storage.fetch(http.url(path + "?X-Amz-Signature=HIDDEN"), tmp_path / "v.bin", FAST, what="audio")
    assert info.value.exit_code == 3 and f"HTTP {code}" in info.value.message and "audio" in info.value.message
    assert "HIDDEN" not in info.value.message
    assert http.hits[path] == 1


def test_fetch_connection_dropped_mid_body(http, tmp_path):
    with pytest.raises(TransientIOError):
        storage.fetch(http.url("/drop/clip.bin"), tmp_path / "v.bin", FAST)
    assert http.hits["/drop/clip.bin"] == FAST.retries + 1
    # Dropped once, then fine: the retry succeeds and the file is complete.
    out = storage.fetch(http.url("/dropx1/clip.bin"), tmp_path / "w.bin", FAST)
    assert out.read_bytes() == PAYLOAD


def test_fetch_slow_body_times_out(http, tmp_path):
    http.files["slow.bin"] = b"abcdefgh"
    policy = TransferPolicy(timeout_s=0.3, retries=1, retry_base_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(TransientIOError):
        storage.fetch(http.url("/slow/slow.bin"), tmp_path / "v.bin", policy)
    assert time.monotonic() - t0 < 10
    assert http.hits["/slow/slow.bin"] == 2


def test_fetch_size_cap(http, tmp_path):
    small = TransferPolicy(max_bytes=100_000, timeout_s=1.0, retries=2, retry_base_s=0.01)
    with pytest.raises(InputMediaError, match="MB limit|over the"):
        storage.fetch(http.url("/ok/clip.bin"), tmp_path / "a.bin", small)  # Content-Length check
    with pytest.raises(InputMediaError, match="limit"):
        storage.fetch(http.url("/chunked/clip.bin"), tmp_path / "b.bin", small)  # counted while streaming
    assert http.hits["/chunked/clip.bin"] >= 1


def test_fetch_follows_redirects(http, tmp_path):
    out = storage.fetch(http.url("/redirect/ok/clip.bin"), tmp_path / "v.bin", FAST)
    assert out.read_bytes() == PAYLOAD


def test_refuse_private_addresses(http, tmp_path):
    strict = TransferPolicy(timeout_s=1.0, retries=0, refuse_private_addresses=True)
    with pytest.raises(InputMediaError) as info:
        storage.fetch(http.url("/ok/clip.bin"), tmp_path / "v.bin", strict, what="video")
    assert "127.0.0.1" in info.value.message and info.value.exit_code == 3
    for url in ("http://169.254.169.254/latest/meta-data", "http://localhost:9/x", "http://[::1]/x",
                "http://metadata.google.internal/computeMetadata/v1/"):
        with pytest.raises(InputMediaError, match="refuse"):
            storage.fetch(url, tmp_path / "m.bin", strict)
    assert http.hits["/ok/clip.bin"] >= 0  # permissive policy still reaches loopback:
    assert storage.fetch(http.url("/ok/clip.bin"), tmp_path / "ok.bin", FAST).stat().st_size == len(PAYLOAD)


def test_cancel_during_backoff_stops_quickly(http, tmp_path):
    slow_retry = TransferPolicy(timeout_s=1.0, retries=5, retry_base_s=20.0)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        storage.fetch(http.url("/status503/x.bin"), tmp_path / "v.bin", slow_retry, cancel=cancel)
    assert time.monotonic() - t0 < 3


# --- local paths ---------------------------------------------------------------------------


def test_local_fetch_in_place_and_errors(tmp_path):
    src = tmp_path / "face.mp4"
    src.write_bytes(b"data")
    assert storage.fetch(str(src), tmp_path / "unused", FAST) == src.resolve()
    assert storage.fetch(src.as_uri(), tmp_path / "unused", FAST) == src.resolve()
    assert not (tmp_path / "unused").exists()
    with pytest.raises(InputMediaError, match="does not exist"):
        storage.fetch(str(tmp_path / "nope.mp4"), tmp_path / "x", FAST, what="video")
    with pytest.raises(InputMediaError, match="not a regular file"):
        storage.fetch(str(tmp_path), tmp_path / "x", FAST)
    with pytest.raises(InputMediaError, match="limit"):
        storage.fetch(str(src), tmp_path / "x", TransferPolicy(max_bytes=2))


def test_allowed_local_dirs(tmp_path):
    inside = tmp_path / "in"
    inside.mkdir()
    (inside / "a.wav").write_bytes(b"x")
    (tmp_path / "b.wav").write_bytes(b"x")
    policy = TransferPolicy(allowed_local_dirs=[inside])
    assert storage.fetch(str(inside / "a.wav"), tmp_path / "x", policy).name == "a.wav"
    with pytest.raises(InputMediaError, match="outside the allowed"):
        storage.fetch(str(tmp_path / "b.wav"), tmp_path / "x", policy)
    with pytest.raises(InputMediaError, match="outside the allowed"):
        storage.fetch(str(inside / ".." / "b.wav"), tmp_path / "x", policy)
    with pytest.raises(InputMediaError, match="outside the allowed"):
        storage.upload(inside / "a.wav", str(tmp_path / "out.mp4"), policy)


def test_local_upload_is_atomic_and_cancellable(tmp_path):
    src = tmp_path / "render.mp4"
    src.write_bytes(PAYLOAD)
    target = tmp_path / "out" / "deep" / "result.mp4"
    storage.upload(src, str(target), FAST)
    assert target.read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.mp4"]  # no temp left
    assert storage.exists(str(target), FAST) and not storage.exists(str(tmp_path / "none.mp4"), FAST)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        storage.upload(src, str(tmp_path / "cancelled.mp4"), FAST, cancel=cancel)
    assert not (tmp_path / "cancelled.mp4").exists()


# --- HTTP upload / exists ------------------------------------------------------------------


def test_http_put_upload_retry_and_errors(http, tmp_path):
    src = tmp_path / "render.mp4"
    src.write_bytes(PAYLOAD)
    storage.upload(src, http.url("/fail500x1/up.mp4?X-Amz-Signature=abc"), FAST)
    assert http.files["up.mp4"] == PAYLOAD and http.hits["/fail500x1/up.mp4"] == 2
    with pytest.raises(InputMediaError, match="HTTP 403"):
        storage.upload(src, http.url("/status403/up2.mp4"), FAST)
    assert "up2.mp4" not in http.files


def test_http_exists(http):
    assert storage.exists(http.url("/ok/clip.bin"), FAST)
    assert not storage.exists(http.url("/ok/missing.bin"), FAST)
    assert not storage.exists(http.url("/status403/x.mp4"), FAST)  # cannot check: treated as absent


# --- S3 (moto) -----------------------------------------------------------------------------


def test_s3_roundtrip_and_errors(s3, tmp_path):
    src = tmp_path / "render.mp4"
    src.write_bytes(PAYLOAD)
    url = "s3://media/jobs/1/out.mp4"
    assert not storage.exists(url, FAST)
    storage.upload(src, url, FAST)
    assert storage.exists(url, FAST)
    assert s3.client().get_object(Bucket="media", Key="jobs/1/out.mp4")["Body"].read() == PAYLOAD
    back = storage.fetch(url, tmp_path / "back.mp4", FAST)
    assert back.read_bytes() == PAYLOAD
    storage.upload_bytes(b'{"a": 1}', "s3://media/jobs/1/out.mp4.json", FAST)
    assert s3.client().get_object(Bucket="media", Key="jobs/1/out.mp4.json")["Body"].read() == b'{"a": 1}'
    with pytest.raises(InputMediaError, match="does not exist"):
        storage.fetch("s3://media/jobs/none.mp4", tmp_path / "n.mp4", FAST, what="video")
    with pytest.raises(InputMediaError):
        storage.fetch("s3://no-such-bucket/x.mp4", tmp_path / "n.mp4", FAST)


def test_s3_size_cap(s3, tmp_path):
    s3.client().put_object(Bucket="media", Key="big.bin", Body=PAYLOAD)
    with pytest.raises(InputMediaError, match="limit"):
        storage.fetch("s3://media/big.bin", tmp_path / "b.bin", TransferPolicy(max_bytes=1000))


def test_s3_presigned_get_and_put(s3, tmp_path):
    client = s3.client()
    client.put_object(Bucket="media", Key="in/speech.wav", Body=PAYLOAD)
    get_url = client.generate_presigned_url("get_object", Params={"Bucket": "media", "Key": "in/speech.wav"}, ExpiresIn=600)
    assert "Signature=" in get_url
    assert storage.fetch(get_url, tmp_path / "a.wav", FAST).read_bytes() == PAYLOAD
    put_url = client.generate_presigned_url("put_object", Params={"Bucket": "media", "Key": "out/p.mp4"}, ExpiresIn=600)
    src = tmp_path / "render.mp4"
    src.write_bytes(PAYLOAD[:1000])
    storage.upload(src, put_url, FAST)
    assert client.get_object(Bucket="media", Key="out/p.mp4")["Body"].read() == PAYLOAD[:1000]


def test_suffix_of():
    assert storage.suffix_of("https://h/a/b.MP4?x=1") == ".mp4"
    assert storage.suffix_of("s3://b/k/voice.m4a") == ".m4a"
    assert storage.suffix_of("/x/noext", ".bin") == ".bin"
    assert Path(storage.local_path("file:///tmp/a%20b.wav")) == Path("/tmp/a b.wav")
