"""Deployment files: the Dockerfile parses and runs only commands the installed package has,
the entry script supervises its two processes, and the SaladCloud container-group templates
validate against the SaladCloud OpenAPI spec. (No Docker engine runs in CI.)"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from salad_fakes import API_SPEC, GPU_CLASSES, MISSING_REASON

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
TEMPLATES = ROOT / "deploy" / "salad"
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "EXPOSE",
                "LABEL", "HEALTHCHECK", "SHELL", "VOLUME", "STOPSIGNAL", "ONBUILD"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.strip().partition(" ")
        out.append((keyword, args.strip()))
        buffer = ""
    assert buffer == "", "the Dockerfile ends inside a continued line"
    return out


def test_dockerfile_parses():
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    keywords = [k for k, _ in steps]
    assert set(keywords) <= INSTRUCTIONS, set(keywords) - INSTRUCTIONS
    first_from = keywords.index("FROM")
    assert all(k == "ARG" for k in keywords[:first_from]) and keywords.count("FROM") == 1
    args = dict(steps)
    entry = json.loads(args["ENTRYPOINT"])
    assert entry[:3] == ["/usr/bin/tini", "-g", "--"] and entry[3] == "/opt/musetalk/entrypoint.sh"
    assert json.loads(args["CMD"]) == []
    assert args["USER"] not in ("root", "0")
    base = re.search(r"ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text()).group(1)
    assert "cuda12.8" in base
    # The worker binary is pinned and its archive checked before use.
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG SALAD_WORKER_VERSION=\d+\.\d+\.\d+", text)
    assert "sha256sum" in text and "ARG SALAD_WORKER_SHA256" in text
    assert "ARG BAKE_WEIGHTS=0" in text


def _dockerignore_patterns() -> list[str]:
    return [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    for pattern in patterns:
        pat = pattern.lstrip("/").removeprefix("**/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) or fnmatch.fnmatch(parts[i], pat) for i in range(len(parts))):
            return True
    return False


def test_copy_sources_exist_and_are_in_the_build_context():
    patterns = _dockerignore_patterns()
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword != "COPY":
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist in the repo"
            assert not _ignored(source, patterns), f"COPY source {source} is excluded by .dockerignore"
    # Things that must never reach the image's build context.
    for path in (".venv", ".git", "models", "tests", "x.pth", "a/b/c.safetensors", "w.mp4"):
        assert _ignored(path, patterns), path


def _commands(text: str) -> list[list[str]]:
    """Every ``musetalk-job ...`` invocation, shell variables replaced by a dummy value."""
    found = []
    text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("#")).replace('"$@"', "")
    for match in re.finditer(r"(?:^|&&|\bRUN|\bexec)\s*musetalk-job((?:[ \t]+(?!&&|\|\||;|>|\\)[^\s;&|>]+)*)", text, re.M):
        words = shlex.split(re.sub(r"\"?\$\{?[A-Za-z_][A-Za-z0-9_:\-/.]*\}?\"?", "VALUE", match.group(1)))
        if words and words[0] not in ("VALUE",) and not words[0].startswith("{"):
            found.append(words)
    return found


def test_entry_commands_exist_in_the_installed_package():
    """Each ``musetalk-job`` command the image runs parses with the package's own CLI parser."""
    from musetalk_job.cli import build_parser

    parser = build_parser()
    commands = _commands(DOCKERFILE.read_text()) + _commands(ENTRYPOINT.read_text())
    subcommands = {words[0] for words in commands}
    assert {"serve", "run", "download-weights", "convert-weights", "--version"} <= subcommands, subcommands
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit as exc:
            assert exc.code == 0, f"`musetalk-job {' '.join(words)}` is not a valid command of this package"


def test_entrypoint_syntax():
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    assert os.access(ENTRYPOINT, os.X_OK)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(ENTRYPOINT)], check=True)


def _stand_ins(tmp_path: Path, worker_exit_after: str, worker_code: int = 3) -> tuple[Path, dict[str, str]]:
    """Stand-ins for the two processes (the real worker binary only runs on a SaladCloud node):
    ``musetalk-job`` records its arguments and, for ``serve``, runs until signalled."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "musetalk-job").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        'if [ "$1" = serve ]; then\n'
        f'  trap \'echo serve-terminated >> {log}; exit 143\' TERM\n'
        "  while true; do sleep 0.1; done\n"
        "fi\n"
    )
    (bin_dir / "worker").write_text(
        "#!/usr/bin/env bash\n"
        f"trap 'echo worker-terminated >> {log}; exit 143' TERM\n"
        f"sleep {worker_exit_after} & wait $!\n"
        f"exit {worker_code}\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SALAD_WORKER_BIN": str(bin_dir / "worker"),
           "SALAD_MACHINE_ID": "node-1", "MUSETALK_MODELS_DIR": str(tmp_path / "models"), "HOME": str(tmp_path)}
    return log, env


def test_entrypoint_exits_when_the_worker_exits(tmp_path):
    log, env = _stand_ins(tmp_path, "0.5", worker_code=3)
    proc = subprocess.run(["bash", str(ENTRYPOINT), "serve", "--port", "9000"], env=env, capture_output=True,
                          text=True, timeout=30)
    calls = log.read_text().splitlines()
    assert proc.returncode == 3, proc.stderr
    assert calls[0].startswith("download-weights --models-dir") and "serve --port 9000" in calls
    assert "serve-terminated" in calls  # the server was stopped when the worker exited


def test_entrypoint_forwards_sigterm_to_both(tmp_path):
    log, env = _stand_ins(tmp_path, "60")
    proc = subprocess.Popen(["bash", str(ENTRYPOINT)], env={**env, "MUSETALK_MODE": "serve"}, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 20
    while not (log.exists() and "serve" in log.read_text().splitlines()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the worker stand-in start too
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 143
    calls = log.read_text().splitlines()
    assert "serve-terminated" in calls and "worker-terminated" in calls


def test_entrypoint_outside_salad_starts_no_worker(tmp_path):
    log, env = _stand_ins(tmp_path, "0.2")
    env.pop("SALAD_MACHINE_ID")
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "serve"], env={**env, "MUSETALK_FETCH_WEIGHTS": "0"},
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the stand-in worker would have exited by now
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 143
    calls = log.read_text().splitlines()
    assert "worker-terminated" not in calls and not any(c.startswith("download-weights") for c in calls)


# --- templates -------------------------------------------------------------------------------


@pytest.mark.skipif(not API_SPEC.exists(), reason=MISSING_REASON)
@pytest.mark.parametrize("template", ["queue-worker.json", "job-group.json"])
def test_template_validates_against_the_spec(template):
    from salad_fakes import OpenApi

    from musetalk_job.job import unknown_env_warnings
    from musetalk_job.salad.api import resolve_gpu_class_names
    from musetalk_job.salad.cli import load_template, render_group
    from musetalk_job.worker import ENTRYPOINT_ENV, SERVE_ENV

    spec = OpenApi(API_SPEC)
    raw = load_template(TEMPLATES / template)
    names = raw["container"]["resources"]["gpu_classes"]
    ids = resolve_gpu_class_names(names, GPU_CLASSES)
    body = render_group(raw, name=raw["name"], gpu_ids=ids, image="ghcr.io/acme/musetalk-job:0.1.0")
    operation = spec.operation("POST", "/organizations/acme/projects/p/containers")[1]
    assert spec.validate_body(operation, "application/json", body) == []
    # Names instead of ids would be refused by the API: resolution is needed.
    assert spec.validate_body(operation, "application/json", render_group(raw, name=raw["name"], image="a/b:1"))
    resources = body["container"]["resources"]
    assert resources["storage_amount"] >= 2**30 and resources["storage_amount"] % 2**30 == 0  # bytes, whole GiB
    assert body["container"]["priority"] in ("high", "medium", "low", "batch")
    env = body["container"]["environment_variables"]
    read_elsewhere = set(SERVE_ENV.values()) | ENTRYPOINT_ENV  # read by serve / the entry script
    assert unknown_env_warnings({k: v for k, v in env.items() if k not in read_elsewhere}) == []
    if template == "queue-worker.json":
        port = int(env["MUSETALK_SERVE_PORT"])
        assert env["MUSETALK_MODE"] == "serve"
        assert body["queue_connection"]["port"] == port and body["queue_connection"]["path"] == "/jobs"
        probes = {k: body[k]["http"] for k in ("startup_probe", "readiness_probe", "liveness_probe")}
        assert {k: p["path"] for k, p in probes.items()} == {
            "startup_probe": "/health/startup", "readiness_probe": "/health/ready", "liveness_probe": "/health/live"}
        assert all(p["port"] == port for p in probes.values())
    else:
        # The entry script in run mode (a command, not MUSETALK_MODE, which `run` would warn about).
        assert body["container"]["command"] == ["/usr/bin/tini", "-g", "--", "/opt/musetalk/entrypoint.sh", "run"]
        assert unknown_env_warnings(env) == [] and env["MUSETALK_ON_FINISH"] == "stop-group"
        assert env["MUSETALK_SKIP_EXISTING"] == "true" and body["replicas"] == 1
        assert "queue_connection" not in body
