"""``musetalk-job salad ...``: run batches on SaladCloud through its REST API.

Subcommands
-----------
- ``gpu-classes``     list the GPU classes (name, id, prices) offered to the organization.
- ``create-queue``    create the Job Queue (no-op when it exists).
- ``deploy``          create the queue-worker container group from a template
                      (``deploy/salad/queue-worker.json``); GPU class names → ids via the API.
- ``submit``          validate every line of a JSONL/CSV manifest with the job schema, then
                      create one queue job per line.
- ``status``          the queue status of every submitted line.
- ``collect``         write each line's result (the worker's JSON output) to a JSONL file.
- ``deploy-jobs``     one-shot mode: one container group per manifest line
                      (``deploy/salad/job-group.json``; the container stops its own group).
- ``plan``            GPUs needed / cost for N minutes of video in T hours.

Idempotency of ``submit``: a state file (default ``<manifest>.salad-state.jsonl``,
append-only, fsync'd) records ``sending`` (with a random token that also goes into the job's
metadata) *before* each POST and ``created`` (with the job id) after it. A line already
``created`` is never sent again; a line left ``sending`` (crash or ambiguous failure) is
looked up in the queue by its token, and only re-sent with ``--resend-unconfirmed``. POSTs
are not retried automatically after ambiguous failures. ``deploy-jobs`` is idempotent by
name: group ``<prefix>-<line>`` is created only when it does not exist.

The API key comes from ``SALAD_API_KEY`` only (never a flag), and is never printed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..errors import EXIT_OK, JobError, SpecError

DEPLOY_DIR_HINT = "deploy/salad/"
TERMINAL = ("succeeded", "failed", "cancelled")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "salad",
        help="SaladCloud: create queue and container groups, submit manifests, collect results, plan",
        description="Run musetalk-job batches on SaladCloud (docs/salad.md). API key: env SALAD_API_KEY.",
    )
    sub = parser.add_subparsers(dest="salad_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])

    def api_parser(name: str, helptext: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--organization", default=None, help="organization name [env SALAD_ORGANIZATION_NAME]")
        p.add_argument("--project", default=None, help="project name [env SALAD_PROJECT_NAME]")
        return p

    p = api_parser("gpu-classes", "list GPU classes with ids and prices")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_gpu_classes)

    p = api_parser("create-queue", "create the Job Queue (no-op when it exists)")
    p.add_argument("--queue", required=True, help="queue name")
    p.add_argument("--description", default="musetalk-job lip-sync jobs")
    p.set_defaults(func=cmd_create_queue)

    p = api_parser("deploy", "create the queue-worker container group from a template")
    _group_args(p, default_template="queue-worker.json")
    p.add_argument("--name", required=True, help="container group name")
    p.add_argument("--queue", default=None, help="queue to attach (sets queue_connection.queue_name)")
    p.add_argument("--replicas", type=int, default=None, help="replicas (default: the template's)")
    p.set_defaults(func=cmd_deploy)

    p = api_parser("submit", "validate a JSONL/CSV manifest, then create one queue job per line")
    p.add_argument("manifest", type=Path, help="JSONL (one job object per line) or CSV (header = field names)")
    p.add_argument("--queue", required=True)
    p.add_argument("--state", type=Path, default=None, help="state file (default <manifest>.salad-state.jsonl)")
    p.add_argument("--webhook", default=None, help="webhook URL called when each job completes")
    p.add_argument("--allow-local", action="store_true",
                   help="accept local paths (only for workers started with --allow-dir)")
    p.add_argument("--resend-unconfirmed", action="store_true",
                   help="send again lines whose earlier POST had an unknown outcome and are not in the queue")
    p.add_argument("--dry-run", action="store_true", help="validate and print the jobs; send nothing")
    p.set_defaults(func=cmd_submit)

    for name, helptext in (("status", "queue status of every submitted line"),
                           ("collect", "write every line's result to a JSONL file")):
        p = api_parser(name, helptext)
        p.add_argument("manifest", type=Path)
        p.add_argument("--queue", required=True)
        p.add_argument("--state", type=Path, default=None)
        p.add_argument("--json", action="store_true", help="one JSON line per job on stdout")
        if name == "collect":
            p.add_argument("--out", type=Path, default=None, help="results file (default <manifest>.results.jsonl)")
            p.add_argument("--wait", action="store_true", help="poll until every job has finished")
            p.add_argument("--poll-s", type=float, default=30.0)
            p.set_defaults(func=cmd_collect)
        else:
            p.set_defaults(func=cmd_status)

    p = api_parser("deploy-jobs", "one-shot mode: one container group per manifest line")
    p.add_argument("manifest", type=Path)
    _group_args(p, default_template="job-group.json")
    p.add_argument("--name-prefix", required=True, help="groups are named <prefix>-<line>")
    p.add_argument("--no-api-key-in-env", action="store_true",
                   help="do not pass SALAD_API_KEY to the groups (they then idle instead of stopping themselves)")
    p.add_argument("--allow-local", action="store_true")
    p.set_defaults(func=cmd_deploy_jobs)

    p = sub.add_parser("plan", help="GPUs and cost for N minutes of video in T hours",
                       description="Throughput/cost model (docs/salad.md). Measure --fps with the benchmark.")
    p.add_argument("--fps", type=float, default=None,
                   help="output frames/s of one GPU from the benchmark (default: H200 measured, see docs/salad.md)")
    p.add_argument("--minutes", type=float, default=None, help="minutes of output video to produce")
    p.add_argument("--hours", type=float, default=None, help="hours available")
    p.add_argument("--job-seconds", type=float, default=60.0, help="typical output length of one job (default 60)")
    p.add_argument("--video-fps", type=float, default=25.0)
    p.add_argument("--overhead-s", type=float, default=10.0, help="per-job non-GPU time: fetch, probe, upload (default 10)")
    p.add_argument("--utilisation", type=float, default=0.85, help="share of billed time spent on jobs (default 0.85)")
    p.add_argument("--gpu-class", default=None, help="price from the built-in snapshot table, e.g. 'RTX 4090'")
    p.add_argument("--priority", default="batch", choices=("high", "medium", "low", "batch"))
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour (overrides --gpu-class)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)


def _group_args(p: argparse.ArgumentParser, default_template: str) -> None:
    p.add_argument("--template", type=Path, default=None,
                   help=f"container group template (default {DEPLOY_DIR_HINT}{default_template})")
    p.set_defaults(default_template=default_template)
    p.add_argument("--image", default=None, help="container image (default: the template's)")
    p.add_argument("--gpu", action="append", default=None, metavar="CLASS",
                   help="GPU class name or id, repeatable, in order of preference (default: the template's)")
    p.add_argument("--priority", default=None, choices=("high", "medium", "low", "batch"))
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable")
    p.add_argument("--dry-run", action="store_true", help="print the request body; send nothing")


# ---------------------------------------------------------------------------------------
# Shared helpers


def _client(args: argparse.Namespace) -> Any:
    from .api import SaladClient

    return SaladClient.from_env(args.organization, args.project)


def _run(fn: Any) -> Any:
    """Decorator: JobError → ``error[<code>]: ...`` on stderr and its exit code."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or EXIT_OK)
        except JobError as exc:
            from ..storage import redact_text

            sys.stderr.write(redact_text(exc.one_line()) + "\n")
            return exc.exit_code

    wrapper.__name__ = fn.__name__
    return wrapper


def _out(text: str) -> None:
    """stdout, with presigned query strings, URL user info and known secrets removed."""
    from ..storage import redact_text

    sys.stdout.write(redact_text(text) + "\n")
    sys.stdout.flush()


def default_template_path(name: str) -> Path:
    """``deploy/salad/<name>`` of the source tree, or of the current directory."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        path = root / "deploy" / "salad" / name
        if path.is_file():
            return path
    raise SpecError(f"template {DEPLOY_DIR_HINT}{name} not found; pass --template PATH")


def load_template(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"cannot read template {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"template {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or "container" not in data:
        raise SpecError(f"template {path} must be a container group create request (a JSON object with 'container')")
    return data


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--env {pair!r} must be KEY=VALUE")
        out[key] = value
    return out


def render_group(
    template: Mapping[str, Any],
    *,
    name: str,
    gpu_ids: Optional[Sequence[str]] = None,
    image: Optional[str] = None,
    priority: Optional[str] = None,
    replicas: Optional[int] = None,
    queue: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    display_name: Optional[str] = None,
) -> dict[str, Any]:
    """A container group create request from a template and overrides. ``gpu_ids`` replaces
    the template's ``gpu_classes`` (which may hold names, resolved by the caller)."""
    from .api import check_name

    body = json.loads(json.dumps(template))  # deep copy
    body["name"] = check_name(name, "container group")
    if display_name:
        body["display_name"] = display_name
    container = body.setdefault("container", {})
    if image:
        container["image"] = image
    if priority:
        container["priority"] = priority
    if gpu_ids is not None:
        container.setdefault("resources", {})["gpu_classes"] = list(gpu_ids)
    if replicas is not None:
        body["replicas"] = replicas
    if queue:
        body.setdefault("queue_connection", {})["queue_name"] = check_name(queue, "queue")
    if env:
        variables = dict(container.get("environment_variables") or {})
        variables.update(env)
        container["environment_variables"] = variables
    for key, value in (container.get("environment_variables") or {}).items():
        if not isinstance(value, str) or not 1 <= len(value) <= 1000:
            raise SpecError(
                f"environment variable {key}: SaladCloud accepts values of 1-1000 characters "
                f"(got {len(value) if isinstance(value, str) else type(value).__name__}); shorten the URL or drop the variable"
            )
    image_value = str(container.get("image", ""))
    if not image_value or "OWNER" in image_value:
        raise SpecError("the container image is not set: pass --image REGISTRY/NAME:TAG (the one you pushed)")
    return body


def _resolved_gpu_ids(args: argparse.Namespace, template: Mapping[str, Any], client: Any) -> list[str]:
    names = args.gpu or list(((template.get("container") or {}).get("resources") or {}).get("gpu_classes") or [])
    if not names:
        raise SpecError("no GPU class: pass --gpu CLASS (see `musetalk-job salad gpu-classes`)")
    if client is None:  # dry run without an API key: keep names, say so
        return list(names)
    return client.resolve_gpu_classes(names)


def _redacted_body(body: Mapping[str, Any]) -> dict[str, Any]:
    from .api import API_KEY_ENV

    shown = json.loads(json.dumps(body))
    env = (shown.get("container") or {}).get("environment_variables") or {}
    for key in list(env):
        if key == API_KEY_ENV or "SECRET" in key or "TOKEN" in key or key.endswith("_KEY"):
            env[key] = "<redacted>"
    return shown


# ---------------------------------------------------------------------------------------
# Manifests


@dataclass(frozen=True)
class ManifestLine:
    number: int  # 1-based line number in the file (CSV: data row number + 1 for the header)
    digest: str  # sha256 of the line's canonical JSON
    job: dict[str, Any]  # the validated job input (fields as given, types normalised)


def read_manifest(path: Path, *, allow_local: bool = False) -> list[ManifestLine]:
    """Parse and validate every line; one ``SpecError`` lists every bad line. Nothing is sent
    by the callers unless this returns."""
    from ..job import parse_job
    from ..storage import location_kind

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    rows: list[tuple[int, Any]] = []
    errors: list[str] = []
    if Path(path).suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise SpecError(f"manifest {path}: the CSV has no header row with field names")
        for row in reader:
            values = {k.strip(): v.strip() for k, v in row.items() if k and v is not None and v.strip() != ""}
            if None in row:
                errors.append(f"line {reader.line_num}: more cells than header fields")
                continue
            rows.append((reader.line_num, values))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                errors.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
    lines: list[ManifestLine] = []
    outputs: dict[str, int] = {}
    for number, data in rows:
        try:
            spec = parse_job(data)
        except SpecError as exc:
            errors.append(f"line {number}: {exc.message}")
            continue
        job = spec.model_dump(mode="json", exclude_unset=True)
        if not allow_local:
            local = [f for f in ("video", "audio", "output", "boxes", "manifest")
                     if job.get(f) and location_kind(job[f]) == "local"]
            if local:
                errors.append(f"line {number}: {', '.join(local)} must be URLs (s3://, gs://, az://, https://) - "
                              "queue workers refuse local paths")
                continue
        if spec.output in outputs:
            errors.append(f"line {number}: same output as line {outputs[spec.output]} ({spec.output})")
            continue
        outputs[spec.output] = number
        canonical = json.dumps(job, sort_keys=True, separators=(",", ":"))
        lines.append(ManifestLine(number, hashlib.sha256(canonical.encode()).hexdigest(), job))
    if errors:
        shown = errors[:50] + ([f"... and {len(errors) - 50} more"] if len(errors) > 50 else [])
        raise SpecError(f"manifest {path}: {len(errors)} bad line(s), nothing was sent:\n  " + "\n  ".join(shown))
    if not lines:
        raise SpecError(f"manifest {path} has no jobs")
    return lines


# ---------------------------------------------------------------------------------------
# Submission state (append-only JSONL)


class SubmitState:
    """Line → job records. Each record is appended and fsync'd before the next step."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[int, dict[str, Any]] = {}
        if self.path.exists():
            for n, raw in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                    self.records[int(rec["line"])] = rec
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    if n == len(self.path.read_text(encoding="utf-8").splitlines()):
                        continue  # a torn last line from a crash: the step before it stands
                    raise SpecError(f"state file {self.path} line {n} is corrupt; fix or move it") from None

    def append(self, record: dict[str, Any]) -> None:
        record = {**record, "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records[int(record["line"])] = record


def state_path(manifest: Path, state: Optional[Path]) -> Path:
    return state if state is not None else manifest.with_name(manifest.name + ".salad-state.jsonl")


def _find_by_token(client: Any, queue: str, tokens: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    if not tokens:
        return found
    for job in client.iter_jobs(queue):
        token = (job.get("metadata") or {}).get("submit_token")
        if token in tokens:
            found[token] = job["id"]
    return found


@_run
def cmd_submit(args: argparse.Namespace) -> int:
    from .api import SaladApiError, check_name

    check_name(args.queue, "queue")
    lines = read_manifest(args.manifest, allow_local=args.allow_local)
    if args.dry_run:
        for line in lines:
            _out(json.dumps({"line": line.number, "input": line.job}))
        _out(f"{len(lines)} job(s) valid; nothing sent (--dry-run)")
        return EXIT_OK
    state = SubmitState(state_path(args.manifest, args.state))
    for line in lines:
        rec = state.records.get(line.number)
        if rec is not None and rec.get("sha256") != line.digest:
            raise SpecError(
                f"manifest line {line.number} changed since it was submitted (state file {state.path}); "
                "submit a changed manifest with a new --state file"
            )
        if rec is not None and rec.get("queue") != args.queue:
            raise SpecError(f"state file {state.path} belongs to queue {rec.get('queue')!r}, not {args.queue!r}")
    client = _client(args)
    unconfirmed = {rec["token"]: n for n, rec in state.records.items() if rec.get("state") == "sending"}
    if unconfirmed:
        for token, job_id in _find_by_token(client, args.queue, set(unconfirmed)).items():
            n = unconfirmed.pop(token)
            state.append({**state.records[n], "state": "created", "job_id": job_id, "recovered": True})
    sent = skipped = 0
    for line in lines:
        rec = state.records.get(line.number)
        if rec is not None and rec.get("state") == "created":
            skipped += 1
            continue
        if rec is not None and rec.get("state") == "sending" and not args.resend_unconfirmed:
            sys.stderr.write(
                f"line {line.number}: an earlier POST had an unknown outcome and the job is not in the queue; "
                "not sent again (use --resend-unconfirmed to send it)\n"
            )
            continue
        token = uuid.uuid4().hex
        base = {"line": line.number, "sha256": line.digest, "queue": args.queue, "token": token}
        state.append({**base, "state": "sending"})
        metadata = {"manifest": args.manifest.name[:200], "line": line.number, "submit_token": token}
        try:
            job = client.create_job(args.queue, line.job, metadata=metadata, webhook=args.webhook)
        except SaladApiError as exc:
            if not exc.ambiguous:
                state.append({**base, "state": "not-created", "error": exc.message[:300]})
            raise
        state.append({**base, "state": "created", "job_id": job["id"]})
        sent += 1
        _out(json.dumps({"line": line.number, "job_id": job["id"], "status": job.get("status", "pending")}))
    waiting = sum(1 for r in state.records.values() if r.get("state") == "sending")
    _out(f"submitted {sent} job(s), {skipped} already submitted, {waiting} unconfirmed; state: {state.path}")
    return EXIT_OK if not waiting else 4


def _jobs_of(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    state = SubmitState(state_path(args.manifest, args.state))
    if not state.records:
        raise SpecError(f"no submission state at {state.path}; run `musetalk-job salad submit` first")
    client = _client(args)
    # One listing (100 jobs per request) instead of one request per job: the API allows
    # 240 requests/minute. Jobs missing from the listing are fetched one by one.
    listed = {job.get("id"): job for job in client.iter_jobs(args.queue)}
    rows = []
    for n in sorted(state.records):
        rec = state.records[n]
        row: dict[str, Any] = {"line": n, "job_id": rec.get("job_id"), "status": rec.get("state")}
        if rec.get("state") == "created":
            job = listed.get(rec["job_id"]) or client.get_job(args.queue, rec["job_id"]) or {}
            row["status"] = job.get("status", "missing")
            output = job.get("output")
            if isinstance(output, dict):
                row["result"] = output.get("status")  # the worker's verdict: succeeded / failed
                row["output"] = output.get("output")
                row["exit_code"] = output.get("exit_code")
                if output.get("message"):
                    row["message"] = output["message"]
            row["_job"] = job
        rows.append(row)
    return client, rows


def _outcome(row: Mapping[str, Any]) -> str:
    if row["status"] == "succeeded" and row.get("result") == "failed":
        return "failed (input)"
    return str(row["status"])


def _summary(rows: Iterable[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[_outcome(row)] = counts.get(_outcome(row), 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


@_run
def cmd_status(args: argparse.Namespace) -> int:
    _, rows = _jobs_of(args)
    for row in rows:
        public = {k: v for k, v in row.items() if not k.startswith("_")}
        if args.json:
            _out(json.dumps(public))
        else:
            _out(f"line {row['line']:>5}  {_outcome(row):<16} {row.get('job_id') or '-'}  {row.get('message', '')}")
    _out(_summary(rows))
    return EXIT_OK


@_run
def cmd_collect(args: argparse.Namespace) -> int:
    while True:
        _, rows = _jobs_of(args)
        pending = [r for r in rows if r["status"] not in TERMINAL]
        if not args.wait or not pending:
            break
        sys.stderr.write(f"{len(pending)} job(s) not finished; next poll in {args.poll_s:g} s\n")
        time.sleep(args.poll_s)
    out = args.out or args.manifest.with_name(args.manifest.name + ".results.jsonl")
    with open(out, "w", encoding="utf-8") as fh:
        for row in rows:
            job = row.get("_job") or {}
            record = {"line": row["line"], "job_id": row.get("job_id"), "queue_status": row["status"],
                      "outcome": _outcome(row), "output": job.get("output")}
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            if args.json:
                _out(json.dumps(record))
    _out(f"{_summary(rows)}; results: {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# Queue and groups


@_run
def cmd_gpu_classes(args: argparse.Namespace) -> int:
    classes = _client(args).list_gpu_classes()
    if args.json:
        _out(json.dumps({"items": classes}))
        return EXIT_OK
    for c in sorted(classes, key=lambda c: str(c.get("name"))):
        prices = {p.get("priority"): p.get("price") for p in c.get("prices") or []}
        text = " ".join(f"{k}={v}" for k, v in prices.items())
        _out(f"{c.get('name', '?'):<28} {c.get('id')}  {text}")
    return EXIT_OK


@_run
def cmd_create_queue(args: argparse.Namespace) -> int:
    from .api import check_name

    client = _client(args)
    existing = client.get_queue(check_name(args.queue, "queue"))
    if existing is not None:
        _out(f"queue {args.queue} exists (id {existing.get('id')})")
        return EXIT_OK
    queue = client.create_queue(args.queue, description=args.description)
    _out(f"queue {args.queue} created (id {(queue or {}).get('id')})")
    return EXIT_OK


@_run
def cmd_deploy(args: argparse.Namespace) -> int:
    template = load_template(args.template or default_template_path(args.default_template))
    client = None if args.dry_run and not os.environ.get("SALAD_API_KEY") else _client(args)
    body = render_group(template, name=args.name, gpu_ids=_resolved_gpu_ids(args, template, client), image=args.image,
                        priority=args.priority, replicas=args.replicas, queue=args.queue,
                        env=parse_env_pairs(args.env))
    if "queue_connection" in body and not body["queue_connection"].get("queue_name"):
        raise SpecError("the template attaches a queue: pass --queue NAME")
    if args.dry_run:
        _out(json.dumps(_redacted_body(body), indent=2))
        return EXIT_OK
    assert client is not None
    if client.get_container_group(args.name) is not None:
        _out(f"container group {args.name} exists; not changed (delete it or choose another --name)")
        return EXIT_OK
    group = client.create_container_group(body)
    _out(f"container group {args.name} created (id {(group or {}).get('id')}, "
         f"status {((group or {}).get('current_state') or {}).get('status')})")
    return EXIT_OK


def job_env(job: Mapping[str, Any]) -> dict[str, str]:
    """A job's fields as the environment variables ``musetalk-job run`` reads."""
    from ..job import env_names

    env: dict[str, str] = {}
    for field, value in job.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        env[env_names(field)[0]] = text
    return env


@_run
def cmd_deploy_jobs(args: argparse.Namespace) -> int:
    from .api import API_KEY_ENV, check_name

    lines = read_manifest(args.manifest, allow_local=args.allow_local)
    template = load_template(args.template or default_template_path(args.default_template))
    extra = parse_env_pairs(args.env)
    client = None if args.dry_run and not os.environ.get(API_KEY_ENV) else _client(args)
    gpu_ids = _resolved_gpu_ids(args, template, client)
    bodies = []
    for line in lines:
        name = check_name(f"{args.name_prefix}-{line.number}", "container group name (prefix + line)")
        env = {**job_env(line.job), **extra}
        env.setdefault("JOB_ID", name)
        env["MUSETALK_SKIP_EXISTING"] = "true"  # a restarted container must find the output and do nothing
        if not args.no_api_key_in_env and os.environ.get(API_KEY_ENV):
            env[API_KEY_ENV] = os.environ[API_KEY_ENV]
        elif (template.get("container") or {}).get("environment_variables", {}).get("MUSETALK_ON_FINISH") == "stop-group":
            env["MUSETALK_ON_FINISH"] = "idle"  # without a key the group cannot stop itself
        bodies.append((line, name, render_group(template, name=name, gpu_ids=gpu_ids, image=args.image,
                                                priority=args.priority, replicas=1, env=env)))
    if args.dry_run:
        for line, name, body in bodies:
            _out(json.dumps(_redacted_body(body)))
        _out(f"{len(bodies)} group(s) valid; nothing sent (--dry-run)")
        return EXIT_OK
    assert client is not None
    created = existing = 0
    for line, name, body in bodies:
        if client.get_container_group(name) is not None:
            existing += 1
            continue
        client.create_container_group(body)
        created += 1
        _out(json.dumps({"line": line.number, "container_group": name, "status": "created"}))
    _out(f"created {created} group(s), {existing} already existed")
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# Plan


@_run
def cmd_plan(args: argparse.Namespace) -> int:
    from . import plan as planmod

    fps = args.fps if args.fps is not None else planmod.H200_MEASURED_FPS
    if fps is None:
        raise SpecError("no measured output fps yet: pass --fps (the benchmark's output_fps for your GPU class)")
    price = args.price
    label = ""
    try:
        if price is None and args.gpu_class:
            price = planmod.price_for(args.gpu_class, args.priority)
            label = f"{args.gpu_class}, {args.priority} priority (prices of {planmod.PRICE_SNAPSHOT_DATE})"
        result = planmod.make_plan(output_fps=fps, video_fps=args.video_fps, job_seconds=args.job_seconds,
                                   overhead_s=args.overhead_s, utilisation=args.utilisation,
                                   price_per_gpu_hour=price, minutes=args.minutes, hours=args.hours)
    except ValueError as exc:
        raise SpecError(f"plan: {exc}") from None
    _out(json.dumps(result.as_dict()) if args.json else planmod.format_plan(result, label))
    return EXIT_OK
