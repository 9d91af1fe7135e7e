"""Loopback fakes of the SaladCloud public API and of the instance metadata service (IMDS).

Both check every request against the OpenAPI specs in ``../shared/salad/`` (the path and
method must exist, required headers must be present, the JSON body must validate against the
operation's request-body schema with ``openapi-schema-validator`` / OAS 3.1, $refs resolved
within the spec, formats checked). A request that does not conform is answered 400 and
recorded in ``violations``; tests assert that list stays empty.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

SHARED_SALAD = Path(__file__).resolve().parents[2] / "shared" / "salad"
API_SPEC = SHARED_SALAD / "salad-cloud.yaml"
IMDS_SPEC = SHARED_SALAD / "salad-cloud-imds.yaml"
MISSING_REASON = f"SaladCloud OpenAPI specs not found at {SHARED_SALAD} (they live in the shared/ folder beside the repo)"


class OpenApi:
    """Route matching and request-body validation for one OpenAPI 3.1 document."""

    def __init__(self, path: Path) -> None:
        import yaml
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.doc = yaml.safe_load(Path(path).read_text())
        self.uri = "urn:spec:" + Path(path).name
        self.registry = Registry().with_resource(self.uri, Resource.from_contents(self.doc, default_specification=DRAFT202012))
        self.routes: list[tuple[re.Pattern[str], str, dict[str, Any]]] = []
        for template, item in self.doc["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")
            self.routes.append((pattern, template, item))

    def _deref(self, node: Any) -> tuple[Any, str]:
        """Follow a local $ref; returns (node, JSON pointer of the node)."""
        pointer = ""
        while isinstance(node, dict) and "$ref" in node:
            pointer = node["$ref"].lstrip("#")
            node = self.doc
            for part in pointer.strip("/").split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
        return node, pointer

    def operation(self, method: str, path: str) -> tuple[Optional[str], Optional[dict[str, Any]]]:
        for pattern, template, item in self.routes:
            if pattern.match(path):
                return template, item.get(method.lower())
        return None, None

    def parameters(self, template: str, operation: dict[str, Any]) -> list[dict[str, Any]]:
        params = list(self.doc["paths"][template].get("parameters", [])) + list(operation.get("parameters", []))
        return [self._deref(p)[0] for p in params]

    def validate_body(self, operation: dict[str, Any], content_type: str, body: Any) -> list[str]:
        from openapi_schema_validator import OAS31Validator

        request_body = operation.get("requestBody")
        if request_body is None:
            return [] if body is None else ["this operation takes no request body"]
        rb, rb_pointer = self._deref(request_body)
        if body is None:
            return ["request body missing"] if rb.get("required") else []
        content = rb.get("content", {})
        media = content_type.split(";")[0].strip()
        if media not in content:
            return [f"content type {media!r} not accepted (expected one of {sorted(content)})"]
        base = rb_pointer or None
        if base is None:
            return ["inline request bodies are not supported by this fake"]
        pointer = f"{base}/content/{media.replace('/', '~1')}/schema"
        validator = OAS31Validator({"$ref": f"{self.uri}#{pointer}"}, registry=self.registry,
                                   format_checker=OAS31Validator.FORMAT_CHECKER)
        return [f"{'/'.join(str(p) for p in e.absolute_path) or '<body>'}: {e.message}" for e in validator.iter_errors(body)]

    def check(self, method: str, path: str, headers: Any, content_type: str, body: Any) -> tuple[Optional[str], list[str]]:
        template, operation = self.operation(method, path)
        if operation is None:
            return template, [f"{method} {path} is not an operation of the spec"]
        problems = []
        for param in self.parameters(template, operation):
            if param.get("in") == "header" and param.get("required") and headers.get(param["name"]) is None:
                problems.append(f"required header {param['name']} missing")
            const = (param.get("schema") or {}).get("const")
            if param.get("in") == "header" and const is not None and headers.get(param["name"]) not in (None, const):
                problems.append(f"header {param['name']} must be {const!r}")
        problems += self.validate_body(operation, content_type, body)
        return template, problems


class _Base:
    """A ThreadingHTTPServer on 127.0.0.1 that decodes JSON and dispatches to ``handle``."""

    def __init__(self, spec: OpenApi) -> None:
        self.spec = spec
        self.requests: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = None
                if raw:
                    try:
                        body = json.loads(raw)
                    except json.JSONDecodeError:
                        body = raw.decode(errors="replace")
                path, _, query = self.path.partition("?")
                record = {"method": self.command, "path": path, "query": query, "body": body,
                          "headers": dict(self.headers.items())}
                template, problems = fake.spec.check(self.command, path, self.headers,
                                                     self.headers.get("Content-Type", ""), body)
                record["template"] = template
                with fake.lock:
                    fake.requests.append(record)
                    if problems:
                        fake.violations.append(f"{self.command} {path}: " + "; ".join(problems))
                if problems:
                    return self._send(400, {"title": "Bad Request", "detail": "; ".join(problems)})
                status, payload, extra = fake.handle(record)
                if status == -1:  # drop the connection without an answer
                    self.close_connection = True
                    return
                self._send(status, payload, extra)

            def _send(self, status: int, payload: Any, headers: Optional[dict[str, str]] = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def handle(self, record: dict[str, Any]) -> tuple[int, Any, Optional[dict[str, str]]]:
        raise NotImplementedError

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, method: str, template_suffix: str) -> int:
        return sum(1 for r in self.requests if r["method"] == method and (r["template"] or "").endswith(template_suffix))


GPU_CLASSES = [
    {"id": "ed563892-aacd-40f5-80b7-90c9be6c759b", "name": "RTX 4090 (24 GB)",
     "prices": [{"priority": "batch", "price": "0.16"}, {"priority": "high", "price": "0.30"}]},
    {"id": "a5db5c50-cbcb-4596-ae80-6a0c8090d80f", "name": "RTX 3090 (24 GB)",
     "prices": [{"priority": "batch", "price": "0.09"}]},
    {"id": "9998fe42-04a5-4807-b3a5-849943f16c38", "name": "RTX 3090 Ti (24 GB)",
     "prices": [{"priority": "batch", "price": "0.10"}]},
    {"id": "851399fb-7329-4195-a042-d6514b28cf33", "name": "RTX 5090 (32 GB)",
     "prices": [{"priority": "batch", "price": "0.25"}]},
]


class FakeSaladApi(_Base):
    """Queues, queue jobs, container groups and GPU classes, in memory.

    Fault hooks: ``fail_job_post`` (set of 1-based POST /jobs call numbers): the job is
    created, then the answer is a 502 (the client cannot know it was created);
    ``throttle_once`` (set of templates): answer 429 with Retry-After: 0 once."""

    def __init__(self, api_key: str = "test-api-key-0123456789") -> None:
        super().__init__(OpenApi(API_SPEC))
        self.api_key = api_key
        self.queues: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, dict[str, Any]]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.stopped: list[str] = []
        self.fail_job_post: set[int] = set()
        self.throttle_once: set[str] = set()
        self._job_posts = 0

    def handle(self, record: dict[str, Any]) -> tuple[int, Any, Optional[dict[str, str]]]:
        if record["headers"].get("Salad-Api-Key") != self.api_key:
            return 401, {"title": "Unauthorized"}, None
        method, path, template = record["method"], record["path"], record["template"] or ""
        if template in self.throttle_once:
            self.throttle_once.discard(template)
            return 429, {"title": "Too Many Requests"}, {"Retry-After": "0"}
        parts = path.strip("/").split("/")
        if template.endswith("/gpu-classes"):
            return 200, {"items": GPU_CLASSES}, None
        if template.endswith("/queues") and method == "POST":
            name = record["body"]["name"]
            if name in self.queues:
                return 409, {"title": "Conflict"}, None
            self.queues[name] = {"id": str(uuid.uuid4()), "name": name, "display_name": name, "container_groups": [],
                                 "current_queue_length": 0, "create_time": "2026-01-01T00:00:00Z",
                                 "update_time": "2026-01-01T00:00:00Z"}
            self.jobs[name] = {}
            return 201, self.queues[name], None
        if template.endswith("/queues/{queue_name}") and method == "GET":
            queue = self.queues.get(parts[5])
            return (200, queue, None) if queue else (404, {"title": "Not Found"}, None)
        if template.endswith("/jobs") and method == "POST":
            queue = parts[5]
            if queue not in self.queues:
                return 404, {"title": "Not Found"}, None
            self._job_posts += 1
            job = {"id": str(uuid.uuid4()), "input": record["body"]["input"], "metadata": record["body"].get("metadata"),
                   "status": "pending", "events": [{"action": "created", "time": "2026-01-01T00:00:00Z"}],
                   "create_time": "2026-01-01T00:00:00Z", "update_time": "2026-01-01T00:00:00Z"}
            self.jobs[queue][job["id"]] = job
            if self._job_posts in self.fail_job_post:
                return 502, None, None
            return 201, job, None
        if template.endswith("/jobs") and method == "GET":
            queue = parts[5]
            query = dict(p.split("=", 1) for p in record["query"].split("&") if "=" in p)
            page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
            items = list(self.jobs.get(queue, {}).values())[(page - 1) * size: page * size]
            return 200, {"items": items}, None
        if template.endswith("/jobs/{queue_job_id}") and method == "GET":
            job = self.jobs.get(parts[5], {}).get(parts[7])
            return (200, job, None) if job else (404, {"title": "Not Found"}, None)
        if template.endswith("/containers") and method == "POST":
            body = record["body"]
            if body["name"] in self.groups:
                return 409, {"title": "Conflict"}, None
            self.groups[body["name"]] = {**body, "id": str(uuid.uuid4()), "current_state": {"status": "pending"}}
            return 201, self.groups[body["name"]], None
        if template.endswith("/containers/{container_group_name}") and method == "GET":
            group = self.groups.get(parts[5])
            return (200, group, None) if group else (404, {"title": "Not Found"}, None)
        if template.endswith("/stop") and method == "POST":
            if parts[5] not in self.groups:
                return 404, {"title": "Not Found"}, None
            self.stopped.append(parts[5])
            return 202, None, None
        return 501, {"title": f"fake does not implement {method} {template}"}, None

    def finish(self, queue: str, job_id: str, output: Any, status: str = "succeeded") -> None:
        self.jobs[queue][job_id].update(status=status, output=output)


class FakeImds(_Base):
    """``/v1/status``, ``/v1/deletion-cost``, ``/v1/reallocate`` of one instance, in memory."""

    def __init__(self) -> None:
        super().__init__(OpenApi(IMDS_SPEC))
        self.deletion_cost = 0
        self.cost_history: list[int] = []
        self.reallocations: list[str] = []
        self.on_request: Optional[Callable[[dict[str, Any]], None]] = None

    def handle(self, record: dict[str, Any]) -> tuple[int, Any, Optional[dict[str, str]]]:
        if any(h.lower().startswith("x-forwarded-") for h in record["headers"]):
            return 403, {"title": "Forbidden"}, None
        template, method = record["template"], record["method"]
        if template == "/v1/status":
            return 200, {"ready": True, "started": True}, None
        if template == "/v1/deletion-cost" and method == "GET":
            return 200, {"deletion_cost": self.deletion_cost}, None
        if template == "/v1/deletion-cost" and method == "PUT":
            self.deletion_cost = record["body"]["deletion_cost"]
            self.cost_history.append(self.deletion_cost)
            return 204, None, None
        if template == "/v1/reallocate":
            self.reallocations.append(record["body"]["reason"])
            return 204, None, None
        return 501, {"title": "not implemented"}, None
