"""The job specification: one typed, validated model used by every entry point.

Contract
--------
- ``JobSpec`` (pydantic, ``extra="forbid"``) is the only description of a job. The CLI
  (``musetalk-job run``), the queue worker and the benchmark all build one, through
  ``load_job`` (env vars, a JSON job file and CLI flags) or ``parse_job`` (a dict, e.g. a
  queue message). Any invalid input raises ``SpecError`` (exit 2) whose one message names
  every bad field and where its value came from.
- Sources and precedence: **flags > JSON job file > environment**. Environment names are
  ``VIDEO_URL``, ``AUDIO_URL``, ``OUTPUT_URL`` (``OUTPUT_PATH`` accepted), ``JOB_ID`` and
  ``MUSETALK_<FIELD>`` for every other field; flags are ``--<field-with-dashes>``.
- ``Settings`` holds process settings (models dir, workspace root, device, log format,
  on-finish, URL policy). They are not job fields and come from flags or the environment.
  A ``MUSETALK_*`` variable that is neither a field nor a setting is reported as a warning.
- ``field_table()`` is generated from the model, so the CLI flags and ``docs/job-spec.md``
  cannot drift from it (a test checks the doc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError
from .options import EngineOptions, LandmarkBackend, ParsingMode, Version

LogFormat = Literal["auto", "json", "text"]
OnFinish = Literal["exit", "idle", "stop-group"]

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

# Fields whose environment variable does not follow MUSETALK_<FIELD> (the seed's interface).
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "video": ("VIDEO_URL",),
    "audio": ("AUDIO_URL",),
    "output": ("OUTPUT_URL", "OUTPUT_PATH"),
    "job_id": ("JOB_ID",),
}
ENV_PREFIX = "MUSETALK_"
JOB_FILE_ENV = "JOB_FILE"


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


class JobSpec(BaseModel):
    """One lip-sync job: inputs, output, MuseTalk's knobs (official defaults) and runner knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # --- inputs and output -------------------------------------------------------------
    video: str = Field(
        description="Face video or single image: local path, file://, http(s):// (presigned OK), s3://, gs://, az://, abfs://"
    )
    audio: str = Field(description="Speech: any common audio file, or a video whose audio track is used (same URL forms)")
    output: str = Field(description="Where the MP4 goes: local path, file://, presigned https:// PUT URL, s3://, gs://, az://")
    job_id: str = Field(
        default_factory=new_job_id,
        description="Job id used in logs, the manifest and the workspace name (default: random)",
    )
    manifest: Optional[str] = Field(
        default=None,
        description="Where to write the JSON result manifest (default: <output>.json; none for http(s) outputs)",
    )
    # --- MuseTalk knobs ----------------------------------------------------------------
    version: Version = Field(default="v15", description="MuseTalk model version")
    bbox_shift: int = Field(default=0, ge=-100, le=100, description="v1 only: shift of the face box bottom, pixels")
    extra_margin: int = Field(default=10, ge=0, le=200, description="v15: pixels added below the face box")
    parsing_mode: ParsingMode = Field(default="jaw", description="Face-parsing blend mask mode")
    left_cheek_width: int = Field(default=90, ge=0, le=256, description="Left cheek band of the jaw mask, px of 512")
    right_cheek_width: int = Field(default=90, ge=0, le=256, description="Right cheek band of the jaw mask, px of 512")
    audio_padding_left: int = Field(default=2, ge=0, le=10, description="Audio feature frames of left context")
    audio_padding_right: int = Field(default=2, ge=0, le=10, description="Audio feature frames of right context")
    fps: float = Field(default=25.0, gt=0, le=120, description="Output fps for single-image inputs")
    batch_size: Optional[int] = Field(default=None, ge=1, le=1024, description="Frames per GPU batch (default: from free memory)")
    fp16: Optional[bool] = Field(default=None, description="Half precision (default: on for CUDA, off for CPU)")
    landmarks: LandmarkBackend = Field(default="dwpose", description="Face box detector")
    boxes: Optional[str] = Field(default=None, description="Boxes file (URL or path); when given no landmarks run")
    smooth_boxes: bool = Field(default=False, description="Temporal smoothing of face boxes (off = official)")
    crf: int = Field(default=18, ge=0, le=51, description="H.264 quality (lower = better)")
    preset: str = Field(default="medium", description="x264 preset")
    # --- runner knobs ------------------------------------------------------------------
    skip_existing: bool = Field(default=False, description="Exit 0 without work when the output already exists")
    keep_workdir: bool = Field(default=False, description="Keep the job workspace after the job")
    max_input_mb: float = Field(default=2048, gt=0, description="Largest input file accepted, MB")
    max_duration_s: float = Field(default=600, gt=0, description="Longest video/audio input accepted, seconds")
    max_side_px: int = Field(default=4096, ge=16, description="Largest video width or height accepted, pixels")
    io_timeout_s: float = Field(default=60, gt=0, description="Connect/read timeout of one transfer request, seconds")
    io_retries: int = Field(default=5, ge=0, le=20, description="Retries of a transient transfer failure")
    job_timeout_s: Optional[float] = Field(default=None, gt=0, description="Stop the job after this many seconds (exit 6)")

    @field_validator("video", "audio", "output", "manifest", "boxes")
    @classmethod
    def _check_location(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        from .storage import check_location

        check_location(value)  # ValueError naming the problem
        return value

    @field_validator("job_id")
    @classmethod
    def _check_job_id(cls, value: str) -> str:
        if not re.fullmatch(JOB_ID_PATTERN, value):
            raise ValueError(
                "must be 1-128 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value: str) -> str:
        if value not in X264_PRESETS:
            raise ValueError(f"must be one of {', '.join(X264_PRESETS)}")
        return value

    @model_validator(mode="after")
    def _check_version_knobs(self) -> "JobSpec":
        if self.version == "v15" and self.bbox_shift != 0:
            raise ValueError("bbox_shift applies to version v1 only (v15 ignores it); remove it or set version=v1")
        return self

    def engine_options(self, boxes_file: Optional[Path] = None) -> EngineOptions:
        """The engine's options for this job; ``boxes_file`` is the fetched local boxes file."""
        return EngineOptions(
            version=self.version,
            bbox_shift=self.bbox_shift if self.version == "v1" else 0,
            extra_margin=self.extra_margin,
            parsing_mode=self.parsing_mode,
            left_cheek_width=self.left_cheek_width,
            right_cheek_width=self.right_cheek_width,
            audio_padding_left=self.audio_padding_left,
            audio_padding_right=self.audio_padding_right,
            fps=self.fps,
            batch_size=self.batch_size,
            landmarks=self.landmarks,
            boxes_file=boxes_file,
            smooth_boxes=self.smooth_boxes,
            crf=self.crf,
            preset=self.preset,
        )

    def manifest_location(self) -> Optional[str]:
        """Where the manifest is written: ``manifest`` if set, else ``<output>.json`` unless the
        output is an http(s) URL (a presigned URL cannot be extended)."""
        if self.manifest:
            return self.manifest
        if self.output.lower().startswith(("http://", "https://")):
            return None
        return self.output + ".json"


# ---------------------------------------------------------------------------------------
# Process settings


@dataclass
class Settings:
    """Process settings (not job fields): from flags or ``MUSETALK_*`` env vars."""

    models_dir: Path = Path("models")
    workspace_root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    device: Optional[str] = None  # None: cuda if available else cpu
    log_format: LogFormat = "auto"
    on_finish: OnFinish = "exit"
    allowed_local_dirs: Optional[list[Path]] = None  # None: any local path; the worker passes a list
    refuse_private_addresses: bool = False  # the worker sets True (no loopback/link-local/metadata URLs)
    retry_base_s: float = 1.0  # first backoff delay; doubles per retry, capped at 30 s
    stop_grace_s: float = 3.0  # after SIGTERM/SIGINT, exit at the latest after this long

    def workdir_for(self, job_id: str) -> Path:
        return Path(self.workspace_root) / f"job_{job_id}"


# setting name -> (env var, flag, help)
SETTINGS_SOURCES: dict[str, tuple[str, str, str]] = {
    "models_dir": ("MUSETALK_MODELS_DIR", "--models-dir", "Models directory (default ./models)"),
    "workspace_root": ("MUSETALK_WORKDIR", "--workdir", "Directory under which job_<id>/ is created (default /tmp)"),
    "device": ("MUSETALK_DEVICE", "--device", "auto, cuda, cuda:N or cpu (default auto: cuda if available)"),
    "log_format": ("MUSETALK_LOG_FORMAT", "--log-format", "auto (bar on a TTY, else JSON lines), json or text"),
    "on_finish": ("MUSETALK_ON_FINISH", "--on-finish", "exit, idle (wait for a signal) or stop-group (Salad)"),
    "retry_base_s": ("MUSETALK_RETRY_BASE_S", "--retry-base-s", "First retry delay in seconds (doubles each retry)"),
    "stop_grace_s": ("MUSETALK_STOP_GRACE_S", "--stop-grace-s", "Seconds allowed for a clean stop after SIGTERM"),
}
SETTINGS_CHOICES: dict[str, tuple[str, ...]] = {
    "log_format": get_args(LogFormat),
    "on_finish": get_args(OnFinish),
}
# MUSETALK_* variables read by other parts of the project (not warned about).
OTHER_KNOWN_ENV = frozenset(
    {
        "MUSETALK_SERVE_PORT",
        "MUSETALK_SERVE_HOST",
        "MUSETALK_SERVE_PATH",
        "MUSETALK_SERVE_PRELOAD",
        "MUSETALK_SERVE_LANDMARKS",
        "MUSETALK_MIN_FREE_VRAM_GB",
        "MUSETALK_MODE",
        "MUSETALK_FETCH_WEIGHTS",
        "MUSETALK_QUEUE_WORKER",
        "MUSETALK_HF_REPO",
        "MUSETALK_HF_REVISION",
        "MUSETALK_ALLOWED_DIRS",
        "MUSETALK_AVATAR_CACHE",
        "MUSETALK_AVATAR_CACHE_DIR",
        "MUSETALK_AVATAR_CACHE_MAX_GB",
        "MUSETALK_NVENC",
        "MUSETALK_COMPILE",  # engine: compiled.py (docs/compile.md)
        "MUSETALK_COMPILE_MODE",
        "MUSETALK_COMPILE_CACHE",
        "MUSETALK_ENCODER_WORKERS",  # engine: media.VideoWriter
        "MUSETALK_CPUS",  # engine: cpus.usable_cpus (thread pools)
        "MUSETALK_X264_AVX512",  # engine: media.x264_cpu_options
        "MUSETALK_CUDA_GRAPHS",  # engine: graphs.py (docs/cuda-graphs.md)
        "MUSETALK_DEFER_IMPORTS",  # models.lazy_packages
        "MUSETALK_LOAD_CHUNK_MB",  # models.fastio (docs/engine-models.md)
        "MUSETALK_LOAD_IO_THREADS",
        "MUSETALK_LOAD_PARALLEL",
        "MUSETALK_LOAD_WARM_CUDA_LIBS",
        "MUSETALK_PACKAGE_MAP",
        "MUSETALK_PREFETCH",  # models.fastio.warm_early, from the run/serve entry points
        "MUSETALK_WARM_MANIFEST",
        "MUSETALK_WARM_PROCESS",
    }
)


def load_settings(env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None) -> Settings:
    """Settings from flags > env > defaults. Bad values raise ``SpecError`` naming the source."""
    env = os.environ if env is None else env
    flags = flags or {}
    values: dict[str, Any] = {}
    errors: list[str] = []
    for name, (env_name, flag, _help) in SETTINGS_SOURCES.items():
        raw: Any = None
        source = ""
        if flags.get(name) is not None:
            raw, source = flags[name], flag
        elif env.get(env_name):
            raw, source = env[env_name], env_name
        if raw is None:
            continue
        try:
            values[name] = _convert_setting(name, raw)
        except ValueError as exc:
            errors.append(f"{source}: {exc}")
    if errors:
        raise SpecError("invalid settings: " + "; ".join(errors))
    return Settings(**values)


def _convert_setting(name: str, raw: Any) -> Any:
    if name in ("models_dir", "workspace_root"):
        return Path(str(raw)).expanduser()
    if name in SETTINGS_CHOICES:
        if str(raw) not in SETTINGS_CHOICES[name]:
            raise ValueError(f"{raw!r} is not one of {', '.join(SETTINGS_CHOICES[name])}")
        return str(raw)
    if name in ("retry_base_s", "stop_grace_s"):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{raw!r} is not a number") from None
        if value < 0:
            raise ValueError(f"{raw!r} must be >= 0")
        return value
    if name == "device":
        value = str(raw).strip().lower()
        if value in ("", "auto"):
            return None
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"{raw!r} is not a device; use auto, cpu, cuda or cuda:N")
        return value
    return str(raw)


# ---------------------------------------------------------------------------------------
# Field table (single source for flags, env names and docs)


@dataclass(frozen=True)
class FieldRow:
    name: str
    env: tuple[str, ...]
    flag: str
    default: str
    type: str
    description: str
    required: bool


def env_names(name: str) -> tuple[str, ...]:
    return ENV_ALIASES.get(name, (ENV_PREFIX + name.upper(),))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_text(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args and origin is not None:  # Optional[X]
        return _type_text(args[0])
    return getattr(annotation, "__name__", str(annotation))


def field_table() -> list[FieldRow]:
    rows = []
    for name, info in JobSpec.model_fields.items():
        if info.is_required():
            default = "required"
        elif info.default_factory is not None:
            default = "random"
        elif info.default is None:
            default = "auto" if name in ("batch_size", "fp16") else "none"
        elif isinstance(info.default, bool):
            default = str(info.default).lower()
        else:
            default = str(info.default)
        rows.append(
            FieldRow(
                name=name,
                env=env_names(name),
                flag=flag_name(name),
                default=default,
                type=_type_text(info.annotation),
                description=info.description or "",
                required=info.is_required(),
            )
        )
    return rows


def field_table_markdown() -> str:
    lines = ["| field | env var | flag | type | default | meaning |", "|---|---|---|---|---|---|"]
    for row in field_table():
        env = ", ".join(f"`{e}`" for e in row.env)
        lines.append(f"| `{row.name}` | {env} | `{row.flag}` | {row.type} | {row.default} | {row.description} |")
    return "\n".join(lines)


def _is_bool_field(name: str) -> bool:
    annotation = JobSpec.model_fields[name].annotation
    return annotation is bool or (get_origin(annotation) is not None and bool in get_args(annotation))


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--job`` and one flag per JobSpec field. Values stay strings (or bools) so that
    pydantic validates them all at once; absent flags are ``None``."""
    parser.add_argument("--job", metavar="FILE", default=None, help=f"JSON job file (env {JOB_FILE_ENV})")
    group = parser.add_argument_group("job fields (flags > job file > env; see docs/job-spec.md)")
    for row in field_table():
        dest = "job_" + row.name
        helptext = f"{row.description} [env {', '.join(row.env)}; default {row.default}]"
        if _is_bool_field(row.name):
            group.add_argument(row.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            metavar = row.type.replace("`", "").replace(" \\| ", ",")
            metavar = "{" + metavar + "}" if "," in metavar else row.name.upper()
            group.add_argument(row.flag, dest=dest, default=None, metavar=metavar, help=helptext)


def job_flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for name in JobSpec.model_fields:
        value = getattr(args, "job_" + name, None)
        if value is not None:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedJob:
    spec: JobSpec
    sources: dict[str, str]  # field -> where its value came from
    warnings: list[str] = field(default_factory=list)


def unknown_env_warnings(env: Mapping[str, str]) -> list[str]:
    known = {e for name in JobSpec.model_fields for e in env_names(name)}
    known |= {env_name for env_name, _f, _h in SETTINGS_SOURCES.values()}
    known |= OTHER_KNOWN_ENV
    return [
        f"environment variable {key} is not a job field or setting and is ignored (see docs/job-spec.md)"
        for key in sorted(env)
        if key.startswith(ENV_PREFIX) and key not in known
    ]


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in JobSpec.model_fields:
        for env_name in env_names(name):
            raw = env.get(env_name)
            if raw is not None and raw.strip() != "":
                values[name] = raw.strip()
                sources[name] = f"env {env_name}"
                break
    return values, sources


def _read_job_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read job file {path}: {exc.strerror or exc}; check the --job / {JOB_FILE_ENV} path") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"job file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise SpecError(f"job file {path} must contain a JSON object with the job fields, not {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, sources: Mapping[str, str] | None = None, what: str = "job spec") -> str:
    """One message naming every bad field (and where its value came from)."""
    sources = sources or {}
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"{loc}: unknown field (valid fields: see docs/job-spec.md)")
            continue
        if kind == "missing":
            env = " or ".join(env_names(loc)) if loc in JobSpec.model_fields else ""
            hint = f" (set {env}, {flag_name(loc)} or \"{loc}\" in the job file)" if env else ""
            parts.append(f"{loc}: required{hint}")
            continue
        msg = msg.removeprefix("Value error, ")
        where = f" (from {sources[loc]})" if loc in sources else ""
        if not loc:
            parts.append(msg)
            continue
        value = err.get("input")
        shown = ""
        if kind not in ("value_error",) and isinstance(value, (str, int, float, bool)) and loc not in (
            "video",
            "audio",
            "output",
            "manifest",
            "boxes",
        ):
            shown = f", got {value!r}"
        parts.append(f"{loc}{where}: {msg}{shown}")
    return f"invalid {what}: " + "; ".join(parts)


def parse_job(data: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> JobSpec:
    """Validate a dict (e.g. a queue message) into a JobSpec; ``SpecError`` names every bad field."""
    if not isinstance(data, Mapping):
        raise SpecError(f"a job must be a JSON object with the job fields, not {type(data).__name__}")
    try:
        return JobSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, sources)) from None


def load_job(
    *,
    env: Mapping[str, str] | None = None,
    job_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
) -> LoadedJob:
    """Build a JobSpec from env < job file < flags. ``job_file`` defaults to ``$JOB_FILE``."""
    env = os.environ if env is None else env
    values, sources = _from_env(env)
    if job_file is None and env.get(JOB_FILE_ENV):
        job_file = env[JOB_FILE_ENV]
    if job_file is not None:
        file_values = _read_job_file(Path(job_file))
        values.update(file_values)
        sources.update({k: f"job file {job_file}" for k in file_values})
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = value
            sources[name] = f"flag {flag_name(name)}"
    spec = parse_job(values, sources)
    return LoadedJob(spec=spec, sources=sources, warnings=unknown_env_warnings(env))



if __name__ == "__main__":  # regenerate the table in docs/job-spec.md
    print(field_table_markdown())
