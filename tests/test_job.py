"""JobSpec, Settings and loading from env / job file / flags (precedence, errors, docs)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from musetalk_job.errors import SpecError
from musetalk_job.job import (
    JobSpec,
    Settings,
    add_job_arguments,
    field_table,
    field_table_markdown,
    job_flags_from_args,
    load_job,
    load_settings,
    parse_job,
    unknown_env_warnings,
)
from musetalk_job.options import EngineOptions

BASE_ENV = {"VIDEO_URL": "in/face.mp4", "AUDIO_URL": "in/speech.wav", "OUTPUT_URL": "out/result.mp4"}
DOC = Path(__file__).resolve().parents[1] / "docs" / "job-spec.md"


def test_defaults_match_official_and_engine_options():
    spec = parse_job({"video": "a.mp4", "audio": "b.wav", "output": "c.mp4"})
    assert (spec.version, spec.extra_margin, spec.parsing_mode) == ("v15", 10, "jaw")
    assert (spec.left_cheek_width, spec.right_cheek_width) == (90, 90)
    assert (spec.audio_padding_left, spec.audio_padding_right, spec.fps) == (2, 2, 25.0)
    assert spec.landmarks == "dwpose" and spec.boxes is None and spec.batch_size is None
    assert re.fullmatch(r"[0-9a-f]{16}", spec.job_id)
    # The spec's engine options equal the engine's own defaults.
    assert spec.engine_options() == EngineOptions()
    opts = spec.engine_options(Path("/tmp/boxes.json"))
    assert opts.boxes_file == Path("/tmp/boxes.json")


def test_job_ids_differ_per_job():
    a = parse_job({"video": "a.mp4", "audio": "b.wav", "output": "c.mp4"})
    b = parse_job({"video": "a.mp4", "audio": "b.wav", "output": "c.mp4"})
    assert a.job_id != b.job_id


def test_env_only_seed_interface():
    env = {"VIDEO_URL": "v.mp4", "AUDIO_URL": "a.wav", "OUTPUT_PATH": "/data/o.mp4", "JOB_ID": "job-7",
           "MUSETALK_LANDMARKS": "cascade", "MUSETALK_BATCH_SIZE": "4", "MUSETALK_FP16": "false",
           "MUSETALK_SKIP_EXISTING": "true", "MUSETALK_EXTRA_MARGIN": ""}
    loaded = load_job(env=env)
    spec = loaded.spec
    assert spec.output == "/data/o.mp4" and spec.job_id == "job-7"
    assert spec.landmarks == "cascade" and spec.batch_size == 4 and spec.fp16 is False and spec.skip_existing
    assert spec.extra_margin == 10  # empty env value = unset
    assert loaded.sources["batch_size"] == "env MUSETALK_BATCH_SIZE"
    assert loaded.warnings == []


def test_output_url_wins_over_output_path():
    spec = load_job(env={**BASE_ENV, "OUTPUT_PATH": "other.mp4"}).spec
    assert spec.output == "out/result.mp4"


def test_precedence_flags_over_file_over_env(tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"audio": "file.wav", "batch_size": 8, "extra_margin": 20}))
    env = {**BASE_ENV, "MUSETALK_BATCH_SIZE": "2", "MUSETALK_EXTRA_MARGIN": "5", "MUSETALK_CROF": "1"}
    loaded = load_job(env=env, job_file=job_file, flags={"batch_size": "16"})
    spec = loaded.spec
    assert spec.video == "in/face.mp4"  # env only
    assert spec.audio == "file.wav"  # file beats env
    assert spec.extra_margin == 20  # file beats env
    assert spec.batch_size == 16  # flag beats file and env
    assert loaded.sources["batch_size"] == "flag --batch-size"
    assert loaded.sources["audio"] == f"job file {job_file}"
    assert any("MUSETALK_CROF" in w for w in loaded.warnings)


def test_job_file_from_env(tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"video": "x.png", "audio": "y.mp3", "output": "s3://bucket/key.mp4", "fps": 30}))
    spec = load_job(env={"JOB_FILE": str(job_file)}).spec
    assert spec.output == "s3://bucket/key.mp4" and spec.fps == 30.0


def test_unknown_key_in_job_file_rejected(tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"video": "v.mp4", "audio": "a.wav", "output": "o.mp4", "bbox_shfit": 3}))
    with pytest.raises(SpecError) as info:
        load_job(env={}, job_file=job_file)
    assert "bbox_shfit: unknown field" in info.value.message
    assert info.value.exit_code == 2


def test_every_bad_field_named_in_one_message():
    with pytest.raises(SpecError) as info:
        load_job(
            env={"VIDEO_URL": "v.mp4", "MUSETALK_BATCH_SIZE": "zero", "MUSETALK_LANDMARKS": "mediapipe"},
            flags={"fps": "-1", "version": "v2"},
        )
    message = info.value.message
    for needle in ("audio: required", "output: required", "batch_size (from env MUSETALK_BATCH_SIZE)",
                   "landmarks (from env MUSETALK_LANDMARKS)", "fps (from flag --fps)", "version (from flag --version)"):
        assert needle in message, message
    assert info.value.one_line().startswith("error[2]: invalid job spec:")
    assert "\n" not in info.value.one_line()


def test_bad_json_and_non_object_job_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_job(env={}, job_file=bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(SpecError, match="JSON object"):
        load_job(env={}, job_file=arr)
    with pytest.raises(SpecError, match="cannot read job file"):
        load_job(env={}, job_file=tmp_path / "missing.json")


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("video", "ftp://host/v.mp4", "unsupported URL scheme 'ftp'"),
        ("output", "s3://bucket-only", "must name a bucket"),
        ("audio", "https:///nohost.wav", "has no host"),
        ("job_id", "../../etc", "job_id"),
        ("preset", "turbo", "x264"),
        ("bbox_shift", 5, "v1 only"),
    ],
)
def test_field_validation(field, value, needle):
    data = {"video": "v.mp4", "audio": "a.wav", "output": "o.mp4", field: value}
    with pytest.raises(SpecError) as info:
        parse_job(data)
    assert field in info.value.message or needle in info.value.message
    assert needle.lower() in info.value.message.lower() or field in info.value.message


def test_bbox_shift_allowed_for_v1():
    spec = parse_job({"video": "v.mp4", "audio": "a.wav", "output": "o.mp4", "version": "v1", "bbox_shift": -7})
    assert spec.engine_options().bbox_shift == -7


def test_secret_query_not_echoed_in_errors():
    url = "https://bucket.example.com/v.mp4?X-Amz-Signature=deadbeefsecret"
    with pytest.raises(SpecError) as info:
        parse_job({"video": url, "audio": "a.wav", "output": "o.mp4", "fps": "x"})
    assert "deadbeefsecret" not in info.value.message


def test_manifest_location():
    spec = parse_job({"video": "v.mp4", "audio": "a.wav", "output": "s3://b/k/out.mp4"})
    assert spec.manifest_location() == "s3://b/k/out.mp4.json"
    spec = parse_job({"video": "v.mp4", "audio": "a.wav", "output": "https://h/out.mp4?sig=1"})
    assert spec.manifest_location() is None
    spec = parse_job({"video": "v.mp4", "audio": "a.wav", "output": "https://h/o.mp4", "manifest": "s3://b/m.json"})
    assert spec.manifest_location() == "s3://b/m.json"


def test_flags_cover_every_field_and_parse():
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {"job_" + name for name in JobSpec.model_fields} <= flags
    args = parser.parse_args(["--video", "v.mp4", "--no-fp16", "--skip-existing", "--batch-size", "3"])
    got = job_flags_from_args(args)
    assert got == {"video": "v.mp4", "fp16": False, "skip_existing": True, "batch_size": "3"}


def test_unknown_musetalk_env_warns_not_fails():
    env = {**BASE_ENV, "MUSETALK_MODELS_DIR": "/m", "MUSETALK_BATCHSIZE": "4", "OTHER": "x"}
    warnings = unknown_env_warnings(env)
    assert len(warnings) == 1 and "MUSETALK_BATCHSIZE" in warnings[0]
    assert load_job(env=env).spec.batch_size is None


def test_every_variable_the_package_reads_is_known_and_not_warned_about():
    """Each ``"MUSETALK_..."`` name in the package's source is read somewhere: setting it must not
    print "is ignored" (the engine's tuning variables were missing from the list once)."""
    src = Path(__file__).resolve().parents[1] / "src" / "musetalk_job"
    names = {n for p in src.rglob("*.py") for n in re.findall(r'"(MUSETALK_[A-Z0-9_]+)"', p.read_text())}
    assert {"MUSETALK_CUDA_GRAPHS", "MUSETALK_COMPILE", "MUSETALK_MODELS_DIR", "MUSETALK_LOAD_PARALLEL"} <= names
    assert unknown_env_warnings({n: "1" for n in names}) == []


def test_settings_from_env_and_flags(tmp_path):
    settings = load_settings({"MUSETALK_MODELS_DIR": str(tmp_path), "MUSETALK_LOG_FORMAT": "json"}, {"device": "cpu"})
    assert settings.models_dir == tmp_path and settings.log_format == "json" and settings.device == "cpu"
    assert settings.workdir_for("abc") == settings.workspace_root / "job_abc"
    assert Settings().models_dir == Path("models")
    flagged = load_settings({"MUSETALK_ON_FINISH": "idle"}, {"on_finish": "exit", "workspace_root": str(tmp_path)})
    assert flagged.on_finish == "exit" and flagged.workspace_root == tmp_path
    assert load_settings({"MUSETALK_DEVICE": "auto"}, {}).device is None
    assert load_settings({}, {"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(SpecError) as info:
        load_settings({"MUSETALK_LOG_FORMAT": "xml", "MUSETALK_ON_FINISH": "reboot", "MUSETALK_DEVICE": "gpu"}, {})
    for name in ("MUSETALK_LOG_FORMAT", "MUSETALK_ON_FINISH", "MUSETALK_DEVICE"):
        assert name in info.value.message


def test_field_table_rows():
    rows = {row.name: row for row in field_table()}
    assert rows["video"].env == ("VIDEO_URL",) and rows["output"].env == ("OUTPUT_URL", "OUTPUT_PATH")
    assert rows["batch_size"].env == ("MUSETALK_BATCH_SIZE",) and rows["batch_size"].flag == "--batch-size"
    assert rows["extra_margin"].default == "10" and rows["video"].default == "required"


def test_docs_table_is_generated_from_the_model():
    text = DOC.read_text(encoding="utf-8")
    begin, end = "<!-- BEGIN FIELD TABLE (generated: python -m musetalk_job.job) -->", "<!-- END FIELD TABLE -->"
    assert begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == field_table_markdown(), "docs/job-spec.md is stale: regenerate with `python -m musetalk_job.job`"
