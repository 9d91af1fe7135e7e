"""IMDS helpers and the serve-mode node checks against a loopback fake of the SaladCloud
instance metadata service that checks each request against the IMDS OpenAPI spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from salad_fakes import IMDS_SPEC, MISSING_REASON

pytestmark = pytest.mark.skipif(not IMDS_SPEC.exists(), reason=MISSING_REASON)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def imds():
    from salad_fakes import FakeImds

    fake = FakeImds()
    yield fake
    fake.stop()
    assert fake.violations == [], fake.violations


def test_detect_only_inside_salad(imds):
    from musetalk_job.salad.imds import DEFAULT_IMDS_URL, Imds

    assert Imds.detect({}) is None
    assert Imds.detect({"SALAD_MACHINE_ID": "local"}) is None
    assert Imds.detect({"SALAD_MACHINE_ID": "abc123"}).base_url == DEFAULT_IMDS_URL
    assert Imds.detect({"SALAD_METADATA_URI": imds.url}).base_url == imds.url


def test_calls_follow_the_spec(imds):
    from musetalk_job.salad.imds import Imds

    client = Imds(imds.url)
    assert client.status() == {"ready": True, "started": True}
    client.set_deletion_cost(250)
    assert client.get_deletion_cost() == 250
    client.reallocate("only 1.0 GiB VRAM free\n" + "x" * 2000)
    assert len(imds.reallocations) == 1 and len(imds.reallocations[0]) == 1000 and "\n" not in imds.reallocations[0]
    assert all(r["headers"].get("Metadata") == "true" for r in imds.requests)
    assert [r["method"] for r in imds.requests] == ["GET", "PUT", "GET", "POST"]


def test_busy_raises_then_lowers_the_deletion_cost(imds):
    from musetalk_job.salad.imds import BUSY_DELETION_COST, Imds, busy

    with pytest.raises(RuntimeError):
        with busy(Imds(imds.url)):
            assert imds.deletion_cost == BUSY_DELETION_COST
            raise RuntimeError("job failed")
    assert imds.cost_history == [BUSY_DELETION_COST, 0]


def test_unreachable_imds_is_skipped_quietly():
    import socket

    from musetalk_job.salad.imds import Imds, ImdsError, busy, quietly

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = Imds(dead, timeout_s=0.5)
    with pytest.raises(ImdsError):
        client.status()
    assert quietly(client.set_deletion_cost, 5) is False
    with busy(client):  # no exception: a job must not fail because IMDS is away
        pass
    with busy(None):
        pass


def test_check_gpu_on_this_machine():
    import torch

    from musetalk_job.salad.imds import check_gpu

    assert check_gpu("cpu", 10**15) is None  # a CPU device is not a GPU node
    problem = check_gpu(None, 1)
    if torch.cuda.is_available():
        assert problem is None
        assert "VRAM" in check_gpu(None, 10**15)
    else:
        assert "CUDA is not available" in problem


def _serve(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    script = Path(sys.executable).parent / "musetalk-job"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "musetalk_job"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MUSETALK_", "SALAD_"))}
    base.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MUSETALK_LOG_FORMAT": "json", **env})
    return subprocess.Popen(cmd + ["serve", "--port", "0", *args], env=base, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_serve_on_an_unfit_node_asks_imds_to_reallocate(imds, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a working GPU; the unfit-node path needs one without")
    proc = _serve(["--preload", "", "--device", "cuda", "--workdir", str(tmp_path)], {"SALAD_METADATA_URI": imds.url})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 6, err[-3000:]
    assert len(imds.reallocations) == 1 and "CUDA is not available" in imds.reallocations[0]
    assert "error[6]:" in err and "cannot run jobs" in err


def test_serve_raises_deletion_cost_while_a_job_runs(imds, tmp_path):
    proc = _serve(["--preload", "", "--device", "cpu", "--workdir", str(tmp_path)], {"SALAD_METADATA_URI": imds.url})
    try:
        port = None
        for line in proc.stderr:
            if '"event": "listening"' in line:
                port = json.loads(line)["port"]
                break
        assert port is not None
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while requests.get(base + "/health/startup", timeout=2).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert imds.cost_history == [0]  # start-up: idle cost
        # A job that fails at once (refused URL) still runs under the raised cost.
        resp = requests.post(base + "/jobs", json={"video": "http://169.254.169.254/x", "audio": "s3://b/a.wav",
                                                   "output": "s3://b/o.mp4"}, timeout=60)
        assert resp.status_code == 422
        assert imds.cost_history == [0, 100_000, 0]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
