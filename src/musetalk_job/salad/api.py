"""A small client for the SaladCloud public REST API, used through ``requests`` directly.

Contract
--------
- ``SaladClient(api_key, organization, project, base_url=None, ...)`` sends every request
  with the ``Salad-Api-Key`` header to ``base_url`` (default
  ``https://api.salad.com/api/public``; env ``SALAD_API_URL`` overrides it, e.g. for a
  proxy or a test fake). The key never appears in a message, log line or exception.
- Retries: reads and idempotent actions (GET, DELETE, start/stop) are retried on connection
  errors, 429 and 5xx with backoff (``Retry-After`` honoured). Creating requests (POST of a
  queue, container group or job) are **never** retried after an ambiguous failure (timeout,
  dropped connection, 5xx): the server may have acted, and a second POST could create a
  second job. They are retried only on 429, which the API answers before acting.
- Requests are spaced by ``min_interval_s`` (default 0.25 s: the documented 240
  requests/minute per key).
- Failures raise ``SaladApiError`` (a ``JobError``): ``status`` is the HTTP status (None for
  a network failure), ``ambiguous`` says whether a creating request may have been applied;
  exit code 4 for transient failures, 2 for a refused request (bad key, unknown name, invalid
  body). Non-JSON (HTML) error bodies are reduced to their status line.
- ``stop_own_group()`` stops the container group this process runs in, from the variables
  SaladCloud injects (``SALAD_ORGANIZATION_NAME``, ``SALAD_PROJECT_NAME``,
  ``SALAD_CONTAINER_GROUP_NAME``) and a user-provided ``SALAD_API_KEY``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Iterator, Mapping, Optional, Sequence
from urllib.parse import quote

from ..errors import EXIT_SPEC, EXIT_TRANSIENT, JobError, SpecError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.salad.com/api/public"
API_URL_ENV = "SALAD_API_URL"
API_KEY_ENV = "SALAD_API_KEY"
ORG_ENV = "SALAD_ORGANIZATION_NAME"
PROJECT_ENV = "SALAD_PROJECT_NAME"
GROUP_ENV = "SALAD_CONTAINER_GROUP_NAME"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,61}[a-z0-9]$")
UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0
DEFAULT_MIN_INTERVAL_S = 0.25  # 240 requests/minute per API key


class SaladApiError(JobError):
    """A SaladCloud API request failed. ``status`` is None for network failures."""

    def __init__(self, message: str, *, status: Optional[int] = None, ambiguous: bool = False) -> None:
        transient = status is None or status in RETRY_STATUS
        super().__init__(message, exit_code=EXIT_TRANSIENT if transient else EXIT_SPEC)
        self.status = status
        self.ambiguous = ambiguous


def check_name(value: str, what: str) -> str:
    """SaladCloud resource names: 2-63 chars, lowercase letters, digits and '-', starting with a letter."""
    if not NAME_PATTERN.fullmatch(value or ""):
        raise SpecError(
            f"{what} {value!r} is not a valid SaladCloud name: use 2-63 lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-'"
        )
    return value


def _error_text(resp: Any) -> str:
    """The API's own explanation when the body is JSON (problem details), else the status line."""
    try:
        data = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code} {resp.reason or ''}".strip()
    if isinstance(data, dict):
        parts = [str(data[k]) for k in ("title", "detail") if data.get(k)]
        errors = data.get("errors")
        if isinstance(errors, dict):
            parts.append("; ".join(f"{k}: {v}" for k, v in list(errors.items())[:10]))
        if parts:
            return f"HTTP {resp.status_code}: " + " - ".join(parts)[:800]
    return f"HTTP {resp.status_code}"


def _retry_after(resp: Any) -> Optional[float]:
    value = resp.headers.get("Retry-After") if resp is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class SaladClient:
    """SaladCloud REST API for one organization and project."""

    def __init__(
        self,
        api_key: str,
        organization: str,
        project: str,
        *,
        base_url: Optional[str] = None,
        timeout_s: float = 30.0,
        retries: int = 4,
        retry_base_s: float = 1.0,
        min_interval_s: Optional[float] = None,
        session: Any = None,
    ) -> None:
        if not api_key:
            raise SpecError(f"no SaladCloud API key: set {API_KEY_ENV} (Portal → Account → API Access)")
        self._api_key = api_key
        self.organization = check_name(organization, "organization")
        self.project = check_name(project, "project")
        self.base_url = (base_url or os.environ.get(API_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_base_s = retry_base_s
        self.min_interval_s = DEFAULT_MIN_INTERVAL_S if min_interval_s is None else min_interval_s
        self._session = session
        self._lock = threading.Lock()
        self._last_request = 0.0

    def __repr__(self) -> str:  # never show the key
        return f"SaladClient(org={self.organization!r}, project={self.project!r}, base_url={self.base_url!r})"

    @classmethod
    def from_env(
        cls, organization: Optional[str] = None, project: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
        **kwargs: Any,
    ) -> "SaladClient":
        env = os.environ if env is None else env
        org = organization or env.get(ORG_ENV, "")
        proj = project or env.get(PROJECT_ENV, "")
        missing = [name for name, value in ((f"--organization / {ORG_ENV}", org), (f"--project / {PROJECT_ENV}", proj)) if not value]
        if missing:
            raise SpecError("missing SaladCloud " + " and ".join(missing))
        return cls(env.get(API_KEY_ENV, ""), org, proj, base_url=kwargs.pop("base_url", None) or env.get(API_URL_ENV), **kwargs)

    # ------------------------------------------------------------------ transport

    @property
    def session(self) -> Any:
        if self._session is None:
            import requests

            self._session = requests.Session()
            self._session.trust_env = True
        return self._session

    def _pace(self) -> None:
        with self._lock:
            wait = self._last_request + self.min_interval_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_request = time.monotonic()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Optional[Mapping[str, Any]] = None,
        creates: bool = False,
        content_type: str = "application/json",
        not_found_ok: bool = False,
    ) -> Any:
        """One API call; returns the decoded JSON body (None for an empty body, or for 404
        when ``not_found_ok``). ``creates``: a POST that must not be repeated on ambiguity."""
        import requests

        url = self.base_url + path
        headers = {"Salad-Api-Key": self._api_key, "Accept": "application/json"}
        data = None
        if body is not None:
            import json

            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":")).encode()
        attempt = 0
        while True:
            attempt += 1
            self._pace()
            resp = None
            try:
                resp = self.session.request(method, url, data=data, headers=headers, params=params, timeout=self.timeout_s)
            except requests.RequestException as exc:
                reason = f"{method} {path}: {type(exc).__name__} talking to {self.base_url}"
                sent_maybe = not isinstance(exc, requests.ConnectTimeout) and not _refused(exc)
                if creates and sent_maybe:
                    raise SaladApiError(
                        f"{reason}; the request may or may not have been applied - it is not repeated "
                        "automatically (check with the matching list/status command)",
                        ambiguous=True,
                    ) from None
                if attempt > self.retries:
                    raise SaladApiError(f"{reason} after {attempt} attempts; check the network and retry later") from None
                self._backoff(attempt, None)
                continue
            if resp.status_code < 400:
                if resp.status_code == 204 or not resp.content:
                    return None
                try:
                    return resp.json()
                except ValueError:
                    return None
            if resp.status_code == 404 and not_found_ok:
                return None
            retryable = resp.status_code in RETRY_STATUS and (not creates or resp.status_code == 429)
            if retryable and attempt <= self.retries:
                self._backoff(attempt, _retry_after(resp))
                continue
            text = _error_text(resp)
            hint = {
                401: f"; check {API_KEY_ENV}",
                403: f"; check that the key may use organization {self.organization!r} / project {self.project!r}",
                404: "; check the organization, project and resource names",
                429: "; the API allows 240 requests/minute per key - wait and retry",
            }.get(resp.status_code, "")
            ambiguous = creates and resp.status_code >= 500
            if ambiguous:
                hint += "; the request may or may not have been applied - it is not repeated automatically"
            raise SaladApiError(f"{method} {path}: {text}{hint}", status=resp.status_code, ambiguous=ambiguous)

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> None:
        delay = retry_after if retry_after is not None else self.retry_base_s * (2 ** (attempt - 1))
        time.sleep(min(MAX_BACKOFF_S, delay))

    def _project_path(self, *parts: str) -> str:
        tail = "/".join(quote(p, safe="") for p in parts)
        return f"/organizations/{self.organization}/projects/{self.project}/{tail}"

    # ------------------------------------------------------------------ organization

    def list_gpu_classes(self) -> list[dict[str, Any]]:
        data = self.request("GET", f"/organizations/{self.organization}/gpu-classes")
        return list((data or {}).get("items", []))

    def resolve_gpu_classes(self, names: Sequence[str], classes: Optional[list[dict[str, Any]]] = None) -> list[str]:
        """GPU class names (or ids) → ids. A name matches exactly (case and spacing ignored)
        or as the unique prefix of one class name, e.g. ``RTX 4090`` → ``RTX 4090 (24 GB)``."""
        wanted = [n for n in names if n]
        if all(UUID_PATTERN.fullmatch(n) for n in wanted):
            return list(wanted)
        classes = classes if classes is not None else self.list_gpu_classes()
        return resolve_gpu_class_names(wanted, classes)

    # ------------------------------------------------------------------ queues

    def get_queue(self, name: str) -> Optional[dict[str, Any]]:
        return self.request("GET", self._project_path("queues", check_name(name, "queue")), not_found_ok=True)

    def create_queue(self, name: str, *, display_name: Optional[str] = None, description: Optional[str] = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": check_name(name, "queue")}
        if display_name:
            body["display_name"] = display_name
        if description:
            body["description"] = description
        return self.request("POST", self._project_path("queues"), body=body, creates=True)

    def create_job(
        self, queue: str, job_input: Any, *, metadata: Optional[Mapping[str, Any]] = None, webhook: Optional[str] = None
    ) -> dict[str, Any]:
        """POST one queue job. Never retried after an ambiguous failure (see module doc)."""
        body: dict[str, Any] = {"input": job_input}
        if metadata:
            body["metadata"] = dict(metadata)
        if webhook:
            body["webhook"] = webhook
        return self.request("POST", self._project_path("queues", check_name(queue, "queue"), "jobs"), body=body, creates=True)

    def get_job(self, queue: str, job_id: str) -> Optional[dict[str, Any]]:
        return self.request("GET", self._project_path("queues", queue, "jobs", job_id), not_found_ok=True)

    def iter_jobs(self, queue: str, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        page = 1
        while True:
            data = self.request("GET", self._project_path("queues", queue, "jobs"), params={"page": page, "page_size": page_size})
            items = list((data or {}).get("items", []))
            yield from items
            if len(items) < page_size:
                return
            page += 1

    def cancel_job(self, queue: str, job_id: str) -> None:
        self.request("DELETE", self._project_path("queues", queue, "jobs", job_id), not_found_ok=True)

    # ------------------------------------------------------------------ container groups

    def create_container_group(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", self._project_path("containers"), body=dict(body), creates=True)

    def get_container_group(self, name: str) -> Optional[dict[str, Any]]:
        return self.request("GET", self._project_path("containers", check_name(name, "container group")), not_found_ok=True)

    def start_container_group(self, name: str) -> None:
        self.request("POST", self._project_path("containers", check_name(name, "container group"), "start"))

    def stop_container_group(self, name: str) -> None:
        self.request("POST", self._project_path("containers", check_name(name, "container group"), "stop"))

    def delete_container_group(self, name: str) -> None:
        self.request("DELETE", self._project_path("containers", check_name(name, "container group")), not_found_ok=True)


def _refused(exc: BaseException) -> bool:
    """A connection that was refused outright never carried the request."""
    text = str(exc)
    return "Connection refused" in text or "Errno 111" in text or "NewConnectionError" in text


def _norm(name: str) -> str:
    return " ".join(name.lower().split())


def resolve_gpu_class_names(names: Sequence[str], classes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Map names (or ids) to GPU class ids using a ``GET /gpu-classes`` item list."""
    by_name = {_norm(str(c.get("name", ""))): str(c["id"]) for c in classes if c.get("id")}
    ids = {str(c["id"]) for c in classes if c.get("id")}
    out: list[str] = []
    for name in names:
        if UUID_PATTERN.fullmatch(name):
            if ids and name not in ids:
                raise SpecError(f"GPU class id {name} is not offered to this organization; run `musetalk-job salad gpu-classes`")
            out.append(name)
            continue
        key = _norm(name)
        if key in by_name:
            out.append(by_name[key])
            continue
        matches = sorted(n for n in by_name if n.startswith(key))
        if len(matches) == 1:
            out.append(by_name[matches[0]])
            continue
        known = ", ".join(sorted(str(c.get("name")) for c in classes)) or "none"
        why = f"is ambiguous ({', '.join(matches)})" if matches else "matches no GPU class"
        raise SpecError(f"GPU class {name!r} {why}; known classes: {known}")
    return out


def stop_own_group(env: Optional[Mapping[str, str]] = None, *, client: Optional[SaladClient] = None) -> None:
    """Stop the container group this container runs in (one-shot jobs, ``--on-finish stop-group``).

    Needs ``SALAD_API_KEY`` (a user env var on the group) and the names SaladCloud injects:
    ``SALAD_ORGANIZATION_NAME``, ``SALAD_PROJECT_NAME``, ``SALAD_CONTAINER_GROUP_NAME``.
    Raises ``SpecError`` naming what is missing, ``SaladApiError`` when the API refuses."""
    env = os.environ if env is None else env
    group = env.get(GROUP_ENV, "")
    missing = [n for n in (API_KEY_ENV, ORG_ENV, PROJECT_ENV, GROUP_ENV) if not env.get(n)]
    if missing and client is None:
        raise SpecError(
            "cannot stop the container group: " + ", ".join(missing) + " not set; SaladCloud injects the "
            f"organization/project/group names, {API_KEY_ENV} must be added to the group's environment"
        )
    if not group:
        raise SpecError(f"cannot stop the container group: {GROUP_ENV} is not set")
    client = client or SaladClient.from_env(env=env)
    log.info("stopping container group %s (project %s)", group, client.project)
    client.stop_container_group(group)
