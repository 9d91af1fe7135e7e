"""``musetalk-job doctor`` on this CPU machine: real torch, PyAV, onnxruntime, real model dirs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk_job import doctor, weights
from musetalk_job.errors import EXIT_MODELS, EXIT_OK, EXIT_RUNTIME, EXIT_SPEC
from musetalk_job.models import layout

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "musetalk_job", "doctor", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def random_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared tiny random-weights dir (this module adds files to it)."""
    dest = tmp_path_factory.mktemp("doctor") / "models"
    shutil.copytree(tiny_models_dir, dest)
    assert (dest / weights.RANDOM_MARKER).is_file()  # `dev random-weights` marks its dirs
    return dest


def _row(d: doctor.Diagnosis, name: str) -> doctor.Check:
    return next(c for c in d.checks if c.name.strip() == name)


def test_no_gpu_and_missing_weights_named(tmp_path: Path) -> None:
    res = _cli(["--models-dir", str(tmp_path / "models"), "--workdir", str(tmp_path)], {"MUSETALK_DEVICE": ""})
    assert res.returncode == EXIT_MODELS, res.stdout + res.stderr
    assert "no CUDA GPU" in res.stdout  # this machine has none
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error[5]:") and "does not exist" in err and "download-weights" in err
    assert "musetalkV15/unet.pth" in res.stdout and "dwpose/dw-ll_ucoco_384.pth" in res.stdout


def test_random_weights_dir_is_complete(random_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUSETALK_DEVICE", raising=False)
    d = doctor.diagnose(models_dir=random_dir, version="all", workspace=tmp_path)
    assert d.exit_code == EXIT_OK, d.table()
    assert _row(d, "gpu").status == "warn" and "no CUDA GPU" in _row(d, "gpu").value
    assert _row(d, "video encoders").status == "ok" and "libx264 yes" in _row(d, "video encoders").value
    assert "RANDOM" in _row(d, "models dir").value
    paths = {m["path"] for m in d.models}
    assert {layout.UNET["v15"][0], layout.UNET["v1"][0], layout.BISENET, layout.DWPOSE_PTH} <= paths
    assert all(m["ok"] and m["present"] for m in d.models)
    assert _row(d, "workspace disk").status in ("ok", "warn")
    assert _row(d, "speed-ups").status == "info" and "CUDA graphs off (no GPU)" in _row(d, "speed-ups").value


def test_invalid_speed_up_settings_fail_naming_the_variable(random_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUSETALK_DEVICE", raising=False)
    monkeypatch.setenv("MUSETALK_CUDA_GRAPHS", "sometimes")
    d = doctor.diagnose(models_dir=random_dir, version="v15", workspace=tmp_path)
    row = _row(d, "speed-ups")
    assert row.status == "fail" and "MUSETALK_CUDA_GRAPHS='sometimes'" in row.value
    assert d.exit_code == EXIT_SPEC and "MUSETALK_CUDA_GRAPHS" in (d.reason or "")
    monkeypatch.setenv("MUSETALK_CUDA_GRAPHS", "0")
    monkeypatch.setenv("MUSETALK_COMPILE", "regional")
    row = _row(doctor.diagnose(models_dir=random_dir, version="v15", workspace=tmp_path), "speed-ups")
    assert row.status == "info" and "torch.compile regional" in row.value


def test_broken_model_file_fails_with_5(random_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "models"
    shutil.copytree(random_dir, broken)
    (broken / layout.BISENET).write_bytes(b"")  # 0-byte file
    (broken / layout.UNET["v15"][1]).unlink()
    d = doctor.diagnose(models_dir=broken, workspace=tmp_path)
    assert d.exit_code == EXIT_MODELS
    assert "79999_iter.pth (empty file)" in d.reason and "musetalkV15/musetalk.json (missing)" in d.reason
    # Without the random-weights marker the real sizes apply: tiny files are reported as truncated.
    (broken / weights.RANDOM_MARKER).unlink()
    (broken / layout.BISENET).write_bytes(b"x" * 10)
    d = doctor.diagnose(models_dir=broken, workspace=tmp_path, landmarks="cascade")
    row = _row(d, layout.BISENET)
    assert row.status == "fail" and "expected 53,289,463 B" in row.value


def test_verify_reports_hashes(tmp_path: Path) -> None:
    """--verify hashes files whose sha256 the manifest knows."""
    models = tmp_path / "m"
    entries = []
    for e in weights.load_manifest().select("v15", "cascade"):
        data = e.path.encode() * 50
        (models / e.path).parent.mkdir(parents=True, exist_ok=True)
        (models / e.path).write_bytes(data)
        import hashlib

        entries.append(weights.ManifestEntry(**{**e.__dict__, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    manifest = weights.write_manifest(tmp_path / "manifest.json", entries)
    d = doctor.diagnose(models_dir=models, landmarks="cascade", verify=True, manifest=manifest, workspace=tmp_path)
    assert d.exit_code == EXIT_OK, d.table()
    assert all(m["sha256_ok"] for m in d.models)
    (models / layout.BISENET).write_bytes(b"Y" * (models / layout.BISENET).stat().st_size)
    res = _cli(["--models-dir", str(models), "--landmarks", "cascade", "--verify", "--manifest", str(manifest),
                "--workdir", str(tmp_path), "--json"])
    assert res.returncode == EXIT_MODELS
    out = json.loads(res.stdout)
    bad = [m for m in out["models"] if not m["ok"]]
    assert [m["path"] for m in bad] == [layout.BISENET] and bad[0]["sha256_ok"] is False


def test_credentials_named_never_shown(random_dir: Path, tmp_path: Path) -> None:
    secret = "AKIAverysecretvalue123"
    res = _cli(["--models-dir", str(random_dir), "--landmarks", "cascade", "--json", "--workdir", str(tmp_path)],
               {"AWS_ACCESS_KEY_ID": secret, "AWS_SECRET_ACCESS_KEY": secret + "x", "HF_TOKEN": secret + "y",
                "SALAD_MACHINE_ID": "machine-" + secret, "MUSETALK_DEVICE": ""})
    assert res.returncode == EXIT_OK, res.stdout + res.stderr
    assert secret not in res.stdout + res.stderr
    checks = {c["name"].strip(): c for c in json.loads(res.stdout)["checks"]}
    assert "AWS_ACCESS_KEY_ID" in checks["credentials"]["value"] and "HF_TOKEN" in checks["credentials"]["value"]
    assert "SALAD_MACHINE_ID" in checks["salad"]["value"]


def test_require_gpu_fails_here_with_6(random_dir: Path, tmp_path: Path) -> None:
    res = _cli(["--models-dir", str(random_dir), "--require-gpu", "--workdir", str(tmp_path)])
    assert res.returncode == EXIT_RUNTIME
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error[6]:") and "gpu:" in err and "GPU is required" in err


def test_broken_torch_is_runtime_failure(random_dir: Path, tmp_path: Path) -> None:
    """A torch whose import fails (a broken install shadowing the real one) → exit 6 naming torch."""
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    res = _cli(["--models-dir", str(random_dir), "--workdir", str(tmp_path)],
               {"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{REPO_ROOT / 'src'}"})
    assert res.returncode == EXIT_RUNTIME, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error[6]:") and "torch: cannot be imported" in err and "libcudart" in err


def test_cpus_row_and_a_bad_override(random_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from musetalk_job import cpus

    monkeypatch.delenv("MUSETALK_DEVICE", raising=False)
    monkeypatch.setenv("MUSETALK_CPUS", "1")
    row = _row(doctor.diagnose(models_dir=random_dir, version="v15", workspace=tmp_path), "cpus")
    assert row.status == "info" and row.value.startswith("1 usable") and f"affinity {cpus.affinity_cpus()}" in row.value
    assert "MUSETALK_CPUS 1" in row.value
    monkeypatch.setenv("MUSETALK_CPUS", "lots")
    d = doctor.diagnose(models_dir=random_dir, version="v15", workspace=tmp_path)
    assert _row(d, "cpus").status == "fail" and d.exit_code == EXIT_SPEC and "MUSETALK_CPUS" in (d.reason or "")
