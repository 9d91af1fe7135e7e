"""``musetalk_job.salad.api`` and the ``musetalk-job salad ...`` commands against a loopback fake
of the SaladCloud API that validates every request against the published OpenAPI spec."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from salad_fakes import API_SPEC, GPU_CLASSES, MISSING_REASON

pytestmark = pytest.mark.skipif(not API_SPEC.exists(), reason=MISSING_REASON)

KEY = "test-api-key-0123456789"
ORG, PROJECT, QUEUE = "acme", "lipsync", "musetalk-jobs"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def api(monkeypatch):
    from salad_fakes import FakeSaladApi

    from musetalk_job.salad import api as api_mod

    fake = FakeSaladApi(KEY)
    for name in ("SALAD_API_KEY", "SALAD_API_URL", "SALAD_ORGANIZATION_NAME", "SALAD_PROJECT_NAME",
                 "SALAD_CONTAINER_GROUP_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SALAD_API_KEY", KEY)
    monkeypatch.setenv("SALAD_API_URL", fake.url)
    monkeypatch.setenv("SALAD_ORGANIZATION_NAME", ORG)
    monkeypatch.setenv("SALAD_PROJECT_NAME", PROJECT)
    monkeypatch.setattr(api_mod, "DEFAULT_MIN_INTERVAL_S", 0.0)
    yield fake
    fake.stop()
    assert fake.violations == [], fake.violations


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from musetalk_job.cli import main

    code = main(["salad", *argv])
    out, err = capsys.readouterr()
    assert KEY not in out and KEY not in err
    return code, out, err


def job(i: int, **extra) -> dict:
    return {"video": f"s3://media/in/v{i}.mp4", "audio": f"s3://media/in/a{i}.wav", "output": f"s3://media/out/o{i}.mp4",
            **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- client ----------------------------------------------------------------------------------


def test_stop_own_group_uses_injected_names(api, monkeypatch):
    from musetalk_job.errors import SpecError
    from musetalk_job.salad.api import stop_own_group

    api.groups["job-7"] = {"name": "job-7"}
    with pytest.raises(SpecError) as info:
        stop_own_group()  # SALAD_CONTAINER_GROUP_NAME missing
    assert "SALAD_CONTAINER_GROUP_NAME" in info.value.message
    monkeypatch.setenv("SALAD_CONTAINER_GROUP_NAME", "job-7")
    stop_own_group()
    assert api.stopped == ["job-7"]
    req = api.requests[-1]
    assert req["path"] == f"/organizations/{ORG}/projects/{PROJECT}/containers/job-7/stop"
    assert req["headers"]["Salad-Api-Key"] == KEY
    monkeypatch.delenv("SALAD_API_KEY")
    with pytest.raises(SpecError) as info:
        stop_own_group()
    assert "SALAD_API_KEY" in info.value.message


def test_gpu_class_names_resolve_to_ids(api):
    from musetalk_job.errors import SpecError
    from musetalk_job.salad.api import SaladClient

    client = SaladClient.from_env()
    ids = client.resolve_gpu_classes(["rtx 4090 (24 gb)", "RTX 5090"])
    assert ids == [GPU_CLASSES[0]["id"], GPU_CLASSES[3]["id"]]
    with pytest.raises(SpecError, match="ambiguous"):
        client.resolve_gpu_classes(["RTX 3090"])  # 3090 and 3090 Ti
    with pytest.raises(SpecError, match="matches no GPU class"):
        client.resolve_gpu_classes(["H100"])


def test_rate_limited_read_is_retried_but_key_errors_are_not(api, monkeypatch):
    from musetalk_job.salad.api import SaladApiError, SaladClient

    api.throttle_once.add("/organizations/{organization_name}/gpu-classes")
    client = SaladClient.from_env(retry_base_s=0.01)
    assert len(client.list_gpu_classes()) == len(GPU_CLASSES)
    assert api.count("GET", "/gpu-classes") == 2
    bad = SaladClient("wrong-key", ORG, PROJECT, retry_base_s=0.01)
    with pytest.raises(SaladApiError) as info:
        bad.list_gpu_classes()
    assert info.value.status == 401 and info.value.exit_code == 2 and "SALAD_API_KEY" in info.value.message
    assert "wrong-key" not in info.value.message and "wrong-key" not in repr(bad)


# --- queue and group -------------------------------------------------------------------------


def test_create_queue_and_deploy_worker_group(api, capsys):
    assert cli(capsys, "create-queue", "--queue", QUEUE)[0] == 0
    code, out, _ = cli(capsys, "create-queue", "--queue", QUEUE)
    assert code == 0 and "exists" in out and api.count("POST", "/queues") == 1
    code, out, err = cli(capsys, "deploy", "--name", "musetalk-worker", "--queue", QUEUE, "--image",
                         "ghcr.io/acme/musetalk-job:0.1.0-weights", "--gpu", "RTX 4090", "--gpu", "RTX 3090 (24 GB)",
                         "--replicas", "3", "--priority", "low", "--env", "EXTRA=1")
    assert code == 0, err
    body = api.groups["musetalk-worker"]
    assert body["container"]["resources"]["gpu_classes"] == [GPU_CLASSES[0]["id"], GPU_CLASSES[1]["id"]]
    assert body["replicas"] == 3 and body["container"]["priority"] == "low"
    assert body["queue_connection"] == {"queue_name": QUEUE, "port": 8080, "path": "/jobs"}
    assert body["container"]["environment_variables"]["EXTRA"] == "1"
    assert body["container"]["image"] == "ghcr.io/acme/musetalk-job:0.1.0-weights"
    # Deploying again changes nothing.
    assert cli(capsys, "deploy", "--name", "musetalk-worker", "--queue", QUEUE, "--image", "x/y:1")[0] == 0
    assert api.count("POST", "/containers") == 1


def test_deploy_without_image_is_a_usage_error(api, capsys):
    code, _, err = cli(capsys, "deploy", "--name", "w1", "--queue", QUEUE)
    assert code == 2 and "--image" in err and api.count("POST", "/containers") == 0


# --- manifests -------------------------------------------------------------------------------


def test_manifest_with_a_bad_line_sends_nothing(api, capsys, tmp_path):
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [job(1), {"video": "s3://m/v.mp4", "audio": "s3://m/a.wav"},
                                                     "{not json", job(4, crf=99), job(5, video="/local/v.mp4")])
    code, _, err = cli(capsys, "submit", str(manifest), "--queue", QUEUE)
    assert code == 2
    for needle in ("line 2", "output", "line 3", "not valid JSON", "line 4", "crf", "line 5", "URLs"):
        assert needle in err, (needle, err)
    assert api.requests == []  # nothing was sent, not even a GET
    assert not (tmp_path / "jobs.jsonl.salad-state.jsonl").exists()


def test_submit_is_idempotent_and_collect_reads_results(api, capsys, tmp_path):
    cli(capsys, "create-queue", "--queue", QUEUE)
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [job(1), "", job(3, batch_size=8), job(4, job_id="custom-4")])
    code, out, err = cli(capsys, "submit", str(manifest), "--queue", QUEUE)
    assert code == 0, err
    assert api.count("POST", "/jobs") == 3
    inputs = [j["input"] for j in api.jobs[QUEUE].values()]
    assert inputs[1] == job(3, batch_size=8) and inputs[2]["job_id"] == "custom-4" and "job_id" not in inputs[0]
    metas = [j["metadata"] for j in api.jobs[QUEUE].values()]
    assert [m["line"] for m in metas] == [1, 3, 4]
    # Again: nothing new is sent.
    code, out, _ = cli(capsys, "submit", str(manifest), "--queue", QUEUE)
    assert code == 0 and api.count("POST", "/jobs") == 3 and "3 already submitted" in out
    # The worker answered: one success, one permanent failure (422 body stored as output), one running.
    ids = list(api.jobs[QUEUE])
    api.finish(QUEUE, ids[0], {"status": "succeeded", "exit_code": 0, "output": "s3://media/out/o1.mp4"})
    api.finish(QUEUE, ids[1], {"status": "failed", "exit_code": 3, "message": "error[3]: video: no face"})
    api.jobs[QUEUE][ids[2]]["status"] = "running"
    code, out, _ = cli(capsys, "status", str(manifest), "--queue", QUEUE)
    assert code == 0 and "1 failed (input), 1 running, 1 succeeded" in out and "no face" in out
    results = tmp_path / "results.jsonl"
    assert cli(capsys, "collect", str(manifest), "--queue", QUEUE, "--out", str(results))[0] == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["line"], r["outcome"]) for r in rows] == [(1, "succeeded"), (3, "failed (input)"), (4, "running")]
    assert rows[0]["output"]["output"] == "s3://media/out/o1.mp4"


def test_ambiguous_post_is_not_repeated_and_is_recovered(api, capsys, tmp_path):
    cli(capsys, "create-queue", "--queue", QUEUE)
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [job(1), job(2), job(3)])
    api.fail_job_post = {2}  # the second job is created, but the answer is a 502
    code, out, err = cli(capsys, "submit", str(manifest), "--queue", QUEUE)
    assert code == 4 and "not repeated" in err
    assert api.count("POST", "/jobs") == 2 and len(api.jobs[QUEUE]) == 2  # stopped; no automatic retry
    state = [json.loads(line) for line in (tmp_path / "jobs.jsonl.salad-state.jsonl").read_text().splitlines()]
    assert [(r["line"], r["state"]) for r in state] == [(1, "sending"), (1, "created"), (2, "sending")]
    # Next run: line 2 is found in the queue by its token (no second POST), line 3 is sent.
    code, out, err = cli(capsys, "submit", str(manifest), "--queue", QUEUE)
    assert code == 0, err
    assert api.count("POST", "/jobs") == 3 and len(api.jobs[QUEUE]) == 3
    lines = sorted(j["metadata"]["line"] for j in api.jobs[QUEUE].values())
    assert lines == [1, 2, 3]


def test_changed_manifest_line_is_refused(api, capsys, tmp_path):
    cli(capsys, "create-queue", "--queue", QUEUE)
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [job(1)])
    assert cli(capsys, "submit", str(manifest), "--queue", QUEUE)[0] == 0
    write_jsonl(manifest, [job(1, crf=20)])
    code, _, err = cli(capsys, "submit", str(manifest), "--queue", QUEUE)
    assert code == 2 and "changed" in err and api.count("POST", "/jobs") == 1


def test_csv_manifest(api, capsys, tmp_path):
    cli(capsys, "create-queue", "--queue", QUEUE)
    path = tmp_path / "jobs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video", "audio", "output", "batch_size", "skip_existing"])
        writer.writerow(["s3://m/v1.mp4", "s3://m/a1.wav", "s3://m/o1.mp4", "", "true"])
        writer.writerow(["s3://m/v2.mp4", "s3://m/a2.wav", "s3://m/o2.mp4", "16", ""])
    assert cli(capsys, "submit", str(path), "--queue", QUEUE)[0] == 0
    inputs = [j["input"] for j in api.jobs[QUEUE].values()]
    assert inputs == [{"video": "s3://m/v1.mp4", "audio": "s3://m/a1.wav", "output": "s3://m/o1.mp4", "skip_existing": True},
                      {"video": "s3://m/v2.mp4", "audio": "s3://m/a2.wav", "output": "s3://m/o2.mp4", "batch_size": 16}]


def test_one_group_per_job(api, capsys, tmp_path):
    presigned = "https://bucket.example/in/v2.mp4?X-Amz-Signature=deadbeefcafe&X-Amz-Expires=600"
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [job(1, crf=20), job(2, video=presigned)])
    code, out, _ = cli(capsys, "deploy-jobs", str(manifest), "--name-prefix", "lip", "--image", "a/b:1", "--dry-run")
    assert code == 0 and "deadbeefcafe" not in out and api.count("POST", "/containers") == 0
    assert out.count('"name": "lip-') == 2 and "2 group(s) valid" in out
    args = ["deploy-jobs", str(manifest), "--name-prefix", "lip", "--image", "ghcr.io/acme/musetalk-job:0.1.0",
            "--gpu", "RTX 4090"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert sorted(api.groups) == ["lip-1", "lip-2"]
    env = api.groups["lip-1"]["container"]["environment_variables"]
    assert env["VIDEO_URL"] == "s3://media/in/v1.mp4" and env["OUTPUT_URL"] == "s3://media/out/o1.mp4"
    assert env["MUSETALK_CRF"] == "20" and env["JOB_ID"] == "lip-1"
    assert env["MUSETALK_ON_FINISH"] == "stop-group" and env["MUSETALK_SKIP_EXISTING"] == "true"
    assert api.groups["lip-1"]["container"]["command"][-2:] == ["/opt/musetalk/entrypoint.sh", "run"]
    assert env["SALAD_API_KEY"] == KEY
    assert api.groups["lip-1"]["replicas"] == 1
    assert cli(capsys, *args)[0] == 0 and api.count("POST", "/containers") == 2  # idempotent by name
    assert api.groups["lip-2"]["container"]["environment_variables"]["VIDEO_URL"] == presigned
    # Every variable is one the run command knows (no unknown-variable warnings in the container).
    from musetalk_job.job import unknown_env_warnings

    assert unknown_env_warnings(env) == []


def test_plan_command(capsys):
    from musetalk_job.cli import main

    assert main(["salad", "plan", "--fps", "50", "--minutes", "600", "--hours", "2", "--job-seconds", "60",
                 "--overhead-s", "6", "--utilisation", "1", "--price", "0.2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # 60 s at 25 fps = 1500 frames / 50 fps = 30 s + 6 s = 36 s per job -> 100 jobs = 100 min per GPU-hour.
    assert plan["seconds_per_job"] == pytest.approx(36.0) and plan["output_minutes_per_gpu_hour"] == pytest.approx(100.0)
    assert plan["gpus_needed"] == 3 and plan["cost_per_output_minute"] == pytest.approx(0.002)
    assert plan["cost_total"] == pytest.approx(1.2)
    assert main(["salad", "plan", "--fps", "50", "--minutes", "10"]) == 2  # hours missing


def test_the_fake_rejects_what_the_spec_rejects(api, capsys):
    """The validation above can fail: bodies that break the spec are answered 400 and recorded."""
    import requests

    url = f"{api.url}/organizations/{ORG}/projects/{PROJECT}"
    headers = {"Salad-Api-Key": KEY}
    bad_group = {"name": "Bad_Name", "replicas": 1, "restart_policy": "sometimes", "autostart_policy": True,
                 "container": {"image": "x/y:1", "priority": "urgent",
                               "resources": {"cpu": 1, "memory": 1024, "gpu_classes": ["RTX 4090"]}}}
    assert requests.post(url + "/containers", json=bad_group, headers=headers, timeout=5).status_code == 400
    assert requests.post(url + f"/queues/{QUEUE}/jobs", json={"metadata": {}}, headers=headers, timeout=5).status_code == 400
    assert requests.post(url + "/nothing-here", json={}, headers=headers, timeout=5).status_code == 400
    text = " ".join(api.violations)
    for needle in ("Bad_Name", "sometimes", "urgent", "uuid", "'input' is a required property", "not an operation"):
        assert needle in text, (needle, text)
    api.violations.clear()


def test_status_lists_the_queue_instead_of_one_request_per_job(api, capsys, tmp_path):
    cli(capsys, "create-queue", "--queue", QUEUE)
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [job(i) for i in range(1, 6)])
    assert cli(capsys, "submit", str(manifest), "--queue", QUEUE)[0] == 0
    before = len(api.requests)
    code, out, _ = cli(capsys, "status", str(manifest), "--queue", QUEUE, "--json")
    assert code == 0 and "5 pending" in out
    assert len(api.requests) - before == 1 and api.requests[-1]["query"] == "page=1&page_size=100"
