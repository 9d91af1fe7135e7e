"""Real servers on 127.0.0.1 for storage and CLI tests: a stdlib HTTP server with fault modes,
and moto's ThreadedMotoServer (S3 and presigned URLs).

Fault HTTP server routes (``GET``/``HEAD`` serve ``files[name]``; ``PUT`` stores into ``files``):
  /ok/<name>              200 with Content-Length
  /chunked/<name>         200, chunked transfer encoding (no Content-Length)
  /fail500x<N>/<name>     500 for the first N requests of this path, then 200
  /status<CODE>/<name>    always CODE (401, 403, 404, 500, ...)
  /retry429/<name>        429 with Retry-After: 0 once, then 200
  /drop/<name>            Content-Length sent, half the body, connection closed (always)
  /dropx<N>/<name>        as /drop for the first N requests, then 200
  /slow/<name>            headers, then one byte every ``slow_delay`` s
  /redirect/<target...>   302 to /<target...>
PUT accepts the same prefixes (/ok, /fail500x<N>, /status<CODE>).
``hits[path]`` counts requests per path (method-agnostic).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


class FaultServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        self.requests: list[str] = []  # raw request lines (path + query) in order
        self.slow_delay = 2.0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _route(self) -> tuple[str, str, str]:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] += 1
                    server.requests.append(self.path)
                parts = path.lstrip("/").split("/", 1)
                mode = parts[0]
                name = parts[1] if len(parts) > 1 else ""
                return path, mode, name

            def _send(self, code: int, body: bytes = b"", headers: Optional[dict] = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _serve_file(self, name: str) -> None:
                if name not in server.files:
                    self._send(404, b"no such file")
                    return
                self._send(200, server.files[name], {"Content-Type": "application/octet-stream"})

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path, mode, name = self._route()
                hits = server.hits[path]
                if mode == "ok":
                    return self._serve_file(name)
                if mode == "chunked":
                    body = server.files.get(name, b"")
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 65536):
                        piece = body[i : i + 65536]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if m := re.fullmatch(r"fail500x(\d+)", mode):
                    if hits <= int(m.group(1)):
                        return self._send(500, b"boom")
                    return self._serve_file(name)
                if m := re.fullmatch(r"status(\d{3})", mode):
                    return self._send(int(m.group(1)), b"status")
                if mode == "retry429":
                    if hits == 1:
                        return self._send(429, b"slow down", {"Retry-After": "0"})
                    return self._serve_file(name)
                if m := re.fullmatch(r"drop(?:x(\d+))?", mode):
                    limit = int(m.group(1)) if m.group(1) else None
                    if limit is None or hits <= limit:
                        body = server.files.get(name, b"x" * 1000)
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    return self._serve_file(name)
                if mode == "slow":
                    body = server.files.get(name, b"x" * 100)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        for i in range(len(body)):
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(server.slow_delay)
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                if mode == "redirect":
                    return self._send(302, b"", {"Location": "/" + name})
                return self._send(404, b"unknown route")

            def do_PUT(self) -> None:
                path, mode, name = self._route()
                hits = server.hits[path]
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if m := re.fullmatch(r"status(\d{3})", mode):
                    return self._send(int(m.group(1)), b"no")
                if m := re.fullmatch(r"fail500x(\d+)", mode):
                    if hits <= int(m.group(1)):
                        return self._send(503, b"busy")
                server.files[name] = body
                self._send(200, b"")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # dropped connections are the point
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, route: str) -> str:
        return self.base + "/" + route.lstrip("/")

    def start(self) -> "FaultServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class MotoS3:
    """moto's real S3 server on loopback, with env vars pointing boto/s3fs at it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def start(self) -> "MotoS3":
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key-0123456789",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def client(self):
        import boto3
        from botocore.config import Config

        env = self.env
        return boto3.client(
            "s3",
            config=Config(signature_version="s3v4"),  # presigned URLs carry X-Amz-Signature
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def stop(self) -> None:
        self.server.stop()
