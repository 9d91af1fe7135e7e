"""CPUs the thread pools are sized for (``musetalk_job.cpus``): affinity, container quota, override."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from musetalk_job import cpus, media
from musetalk_job.errors import SpecError


def _cgroup_v2(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(text + "\n")
    return root


def _cgroup_v1(root: Path, quota: str, period: str, sub: str = "cpu") -> Path:
    (root / sub).mkdir(parents=True, exist_ok=True)
    (root / sub / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / sub / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(
    "text, expected", [("400000 100000", 4.0), ("250000 100000", 2.5), ("max 100000", None), ("garbage", None), ("0 100000", None)]
)
def test_cgroup_v2_quota(tmp_path: Path, text: str, expected: float | None) -> None:
    assert cpus.quota_cpus(_cgroup_v2(tmp_path / "cg", text)) == expected


def test_cgroup_v1_quota_and_no_cgroup_files(tmp_path: Path) -> None:
    assert cpus.quota_cpus(_cgroup_v1(tmp_path / "a", "800000", "100000")) == 8.0
    assert cpus.quota_cpus(_cgroup_v1(tmp_path / "b", "150000", "100000", sub="cpu,cpuacct")) == 1.5
    assert cpus.quota_cpus(_cgroup_v1(tmp_path / "c", "-1", "100000")) is None  # v1's "no quota"
    assert cpus.quota_cpus(tmp_path / "nothing-here") is None


def test_usable_cpus_is_the_smallest_of_affinity_quota_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 64)  # a big host
    assert cpus.compute_usable_cpus(tmp_path / "none", {}) == 64
    # a container given 7.5 CPUs of it: pools sized for 8, not 64
    assert cpus.compute_usable_cpus(_cgroup_v2(tmp_path / "q", "750000 100000"), {}) == 8
    assert cpus.compute_usable_cpus(_cgroup_v2(tmp_path / "q", "750000 100000"), {"MUSETALK_CPUS": "4"}) == 4
    assert cpus.compute_usable_cpus(tmp_path / "none", {"MUSETALK_CPUS": "128"}) == 64  # only ever lowers
    assert cpus.compute_usable_cpus(_cgroup_v2(tmp_path / "tiny", "10000 100000"), {}) == 1  # 0.1 CPU: at least 1


def test_real_affinity_is_this_process_mask() -> None:
    assert cpus.affinity_cpus() == len(os.sched_getaffinity(0))
    assert 1 <= cpus.usable_cpus() <= cpus.affinity_cpus()


@pytest.mark.parametrize("raw", ["0", "-2", "four", "1.5"])
def test_bad_override_names_the_variable(raw: str) -> None:
    with pytest.raises(SpecError, match=f"MUSETALK_CPUS='{raw}'"):
        cpus.compute_usable_cpus(Path("/nonexistent"), {"MUSETALK_CPUS": raw})


def test_the_encoder_sizes_itself_from_the_usable_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-CPU host with MUSETALK_CPUS=8: the segment encoders and their threads are sized for 8."""
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 16)
    monkeypatch.setenv("MUSETALK_CPUS", "8")
    monkeypatch.delenv("MUSETALK_ENCODER_WORKERS", raising=False)
    cpus.usable_cpus.cache_clear()
    try:
        assert media.default_encoder_workers() == media.default_encoder_workers(8)
        w = media.VideoWriter(tmp_path / "o.mp4", width=64, height=64, fps=25)
        try:
            assert w.workers == media.default_encoder_workers(8) and w._seg_threads * w.workers <= 2 * 8
            assert w._tail_rounds == media.tail_rounds(w.workers, 8) == 2
        finally:
            w.abort()
    finally:
        monkeypatch.undo()
        cpus.usable_cpus.cache_clear()
