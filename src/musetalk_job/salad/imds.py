"""The SaladCloud instance metadata service (IMDS) and the node checks that use it.

Contract
--------
- ``Imds(base_url=None)`` talks plain HTTP to ``http://169.254.169.254`` (env
  ``SALAD_METADATA_URI`` overrides it, the same variable the Salad job-queue worker reads),
  with the header ``Metadata: true`` on every request, no proxy and short timeouts.
- ``Imds.detect()`` returns an ``Imds`` only inside a SaladCloud container (the injected
  ``SALAD_MACHINE_ID`` is set and not ``local``, or ``SALAD_METADATA_URI`` is set); outside
  SaladCloud it returns None and callers skip every IMDS step quietly. Failures of an IMDS
  call are logged at debug level and never fail a job.
- ``status()``, ``reallocate(reason)``, ``get_deletion_cost()``, ``set_deletion_cost(n)``
  map 1:1 onto ``/v1/status``, ``/v1/reallocate``, ``/v1/deletion-cost``.
- ``busy(imds, cost)`` raises the instance deletion cost while a job runs (so scale-in
  removes idle instances first) and lowers it after.
- ``check_gpu(device, min_free_bytes)`` verifies that CUDA works (a small kernel runs) and
  that enough VRAM is free; it returns a reason string when the node is unfit, else None.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Mapping, Optional

log = logging.getLogger(__name__)

DEFAULT_IMDS_URL = "http://169.254.169.254"
IMDS_URL_ENV = "SALAD_METADATA_URI"
BUSY_DELETION_COST = 100_000
IDLE_DELETION_COST = 0


class ImdsError(Exception):
    """An IMDS call failed (never raised out of the helpers that callers use on the job path)."""


class Imds:
    def __init__(self, base_url: Optional[str] = None, *, timeout_s: float = 2.0) -> None:
        url = base_url or os.environ.get(IMDS_URL_ENV) or DEFAULT_IMDS_URL
        if "://" not in url:
            url = "http://" + url
        self.base_url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: Any = None

    @classmethod
    def detect(cls, env: Optional[Mapping[str, str]] = None) -> Optional["Imds"]:
        env = os.environ if env is None else env
        if env.get(IMDS_URL_ENV):
            return cls(env[IMDS_URL_ENV])
        machine = env.get("SALAD_MACHINE_ID", "")
        if machine and machine != "local":
            return cls()
        return None

    def _request(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        import requests

        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # IMDS must bypass proxies
        try:
            resp = self._session.request(
                method, self.base_url + path, json=body, headers={"Metadata": "true"}, timeout=self.timeout_s
            )
        except requests.RequestException as exc:
            raise ImdsError(f"IMDS {method} {path}: {type(exc).__name__}") from None
        if resp.status_code >= 400:
            raise ImdsError(f"IMDS {method} {path}: HTTP {resp.status_code}")
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise ImdsError(f"IMDS {method} {path}: the answer is not JSON") from None

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status") or {}

    def reallocate(self, reason: str) -> None:
        reason = " ".join(reason.split())[:1000] or "node check failed"
        self._request("POST", "/v1/reallocate", {"reason": reason})

    def get_deletion_cost(self) -> int:
        return int((self._request("GET", "/v1/deletion-cost") or {}).get("deletion_cost", 0))

    def set_deletion_cost(self, cost: int) -> None:
        self._request("PUT", "/v1/deletion-cost", {"deletion_cost": int(cost)})


def quietly(fn: Any, *args: Any) -> bool:
    """Call an IMDS method; log failures at debug level. Returns whether it worked."""
    try:
        fn(*args)
        return True
    except ImdsError as exc:
        log.debug("%s", exc)
        return False


@contextlib.contextmanager
def busy(imds: Optional[Imds], cost: int = BUSY_DELETION_COST) -> Iterator[None]:
    """Raise the instance's deletion cost for the duration of a job (no-op outside Salad)."""
    if imds is not None:
        quietly(imds.set_deletion_cost, cost)
    try:
        yield
    finally:
        if imds is not None:
            quietly(imds.set_deletion_cost, IDLE_DELETION_COST)


def check_gpu(device: Optional[str], min_free_bytes: int) -> Optional[str]:
    """None when CUDA works on ``device`` and at least ``min_free_bytes`` are free; else why not.

    ``device`` None or ``cuda[:N]`` is checked; ``cpu`` is not a GPU node and passes."""
    if device is not None and not device.startswith("cuda"):
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available in the container (driver or GPU problem)"
        dev = torch.device(device or "cuda")
        x = torch.ones((256, 256), device=dev)
        value = float((x @ x).sum().item())
        if value != 256.0 * 256 * 256:
            return f"CUDA computed a wrong result on {dev} (matmul check)"
        free, total = torch.cuda.mem_get_info(dev)
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means the node is unfit
        return f"CUDA check failed: {type(exc).__name__}: {str(exc)[:300]}"
    if free < min_free_bytes:
        return (
            f"only {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB VRAM free, "
            f"{min_free_bytes / 2**30:.1f} GiB needed for the configured batch"
        )
    return None
