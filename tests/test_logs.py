"""logs: JSON-lines / text / TTY progress and redaction of every emitted line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from musetalk_job.logs import Reporter, resolve_format, setup_logging

SECRET_URL = "https://bucket.example.com/in.mp4?X-Amz-Signature=abcdef0123456789&X-Amz-Credential=AKIAXXXX"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_depends_on_tty():
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("auto", FakeTTY()) == "tty"
    assert resolve_format("text", FakeTTY()) == "text"


def test_json_progress_lines_throttled_with_first_and_last():
    stream = io.StringIO()
    rep = Reporter("job-1", "json", stream, interval_s=60)
    for i in range(1, 101):
        rep.progress("generate", i, 100)
    rep.event(f"fetched {SECRET_URL}", stage="fetch")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    progress = [e for e in lines if e["msg"] == "progress"]
    assert [(e["done"], e["total"]) for e in progress] == [(1, 100), (100, 100)]
    assert all(e["job_id"] == "job-1" and e["stage"] == "generate" and "elapsed_s" in e for e in progress)
    assert "abcdef0123456789" not in stream.getvalue() and "AKIAXXXX" not in stream.getvalue()
    assert lines[-1]["msg"].startswith("fetched https://bucket.example.com/in.mp4?<redacted>")


def test_tty_bar_names_stages():
    stream = FakeTTY()
    rep = Reporter("job-2", "auto", stream)
    rep.progress("landmarks", 5, 10)
    rep.progress("generate", 3, 4)
    rep.close()
    text = stream.getvalue()
    assert "landmarks" in text and "generate" in text and "3/4" in text


def test_text_mode_lines():
    stream = io.StringIO()
    rep = Reporter("job-3", "text", stream, interval_s=0)
    rep.stage("fetch")
    rep.progress("encode", 2, 2)
    assert "[job-3] fetch     started" in stream.getvalue() and "[job-3] encode    2/2" in stream.getvalue()


@pytest.fixture
def restore_logging():
    yield
    for name in ("musetalk_job", None):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, "_musetalk", False)]:
            logger.removeHandler(handler)
    logging.getLogger("musetalk_job").propagate = True


def test_logger_redacts_messages_args_and_tracebacks(monkeypatch, restore_logging):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-secret")
    stream = io.StringIO()
    setup_logging("json", "job-4", stream)
    log = logging.getLogger("musetalk_job.test")
    log.info("GET %s", SECRET_URL)
    logging.getLogger("urllib3.connectionpool").warning("Retrying after broken connection: %s", SECRET_URL)
    try:
        raise RuntimeError(f"boom {SECRET_URL} key wJalrXUtnFEMI-secret")
    except RuntimeError:
        log.exception("failed")
    text = stream.getvalue()
    entries = [json.loads(line) for line in text.splitlines()]
    assert entries[0]["job_id"] == "job-4" and entries[0]["msg"].endswith("?<redacted>")
    assert "urllib3" in entries[1]["logger"] and entries[1]["msg"].endswith("?<redacted>")
    assert "boom" in entries[2]["exc"]
    for secret in ("abcdef0123456789", "AKIAXXXX", "wJalrXUtnFEMI-secret"):
        assert secret not in text
    setup_logging("text", None, stream)  # idempotent: one handler each, now text
    for name in ("musetalk_job", None):
        assert len([h for h in logging.getLogger(name).handlers if getattr(h, "_musetalk", False)]) == 1
