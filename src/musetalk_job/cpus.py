"""How many CPUs this process may really use, for sizing its thread pools.

Contract:
- ``usable_cpus()`` = the smallest of: the CPUs the process may run on (its affinity mask), the
  container's CPU quota (cgroup v2 ``cpu.max``, or cgroup v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``, rounded up), and ``MUSETALK_CPUS`` when set. At least 1.
- ``os.cpu_count()`` counts the host's CPUs. A container given 8 vCPUs on a 64-thread host (a
  CPU quota, as container runtimes enforce ``--cpus``) would otherwise start pools sized for 64
  and be throttled; the encoder, decoder, crop and mask pools size themselves from this instead.
- The result is computed once per process (``functools.lru_cache``); ``usable_cpus.cache_clear()``
  re-reads it. ``MUSETALK_CPUS`` that is not a positive integer is a ``SpecError`` naming it.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Optional

from .errors import SpecError

CPUS_ENV = "MUSETALK_CPUS"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where the platform has none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota_and_period(root: Path) -> Optional[tuple[str, str]]:
    """The raw quota and period: cgroup v2's ``cpu.max``, else cgroup v1's two files."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        return (parts[0], parts[1]) if len(parts) == 2 else None
    for sub in ("cpu", "cpu,cpuacct"):
        quota, period = _read(root / sub / "cpu.cfs_quota_us"), _read(root / sub / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return quota, period
    return None


def quota_cpus(root: Path = CGROUP_ROOT) -> Optional[float]:
    """The cgroup CPU quota in CPUs (``None``: no quota, or no cgroup files to read).

    cgroup v2: ``<root>/cpu.max`` holds ``"QUOTA PERIOD"`` or ``"max PERIOD"``. cgroup v1:
    ``<root>/cpu/cpu.cfs_quota_us`` (``-1``: none) over ``<root>/cpu/cpu.cfs_period_us``
    (``cpu,cpuacct`` is the same directory on most hosts)."""
    raw = _quota_and_period(root)
    if raw is None:
        return None
    try:
        quota, period = int(raw[0]), int(raw[1])
    except ValueError:  # v2's "max": no quota
        return None
    return quota / period if quota > 0 and period > 0 else None


def _from_env(environ: Optional[dict[str, str]] = None) -> Optional[int]:
    raw = (os.environ if environ is None else environ).get(CPUS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SpecError(f"{CPUS_ENV}={raw!r}: must be a positive integer (the CPUs this job may use), or unset")
    return value


def compute_usable_cpus(root: Path = CGROUP_ROOT, environ: Optional[dict[str, str]] = None) -> int:
    """``usable_cpus()`` without the cache, reading ``root`` and ``environ`` (tests)."""
    cpus = affinity_cpus()
    quota = quota_cpus(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    env = _from_env(environ)
    if env is not None:
        cpus = min(cpus, env)
    return max(1, cpus)


@functools.lru_cache(maxsize=1)
def usable_cpus() -> int:
    """The CPUs this process may use (see the module docstring); computed once."""
    return compute_usable_cpus()
