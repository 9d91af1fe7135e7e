# syntax=docker/dockerfile:1
# musetalk-job: one MuseTalk v1.5 lip-sync job per GPU (SaladCloud queue worker or one-shot job).
#
#   docker build --platform linux/amd64 -t REGISTRY/musetalk-job:0.1.0 .                 # weights fetched at start
#   docker build --platform linux/amd64 --build-arg BAKE_WEIGHTS=1 -t REGISTRY/musetalk-job:0.1.0-weights .
#
# Sizes, modes and the worker binary checksum: docs/salad.md ("Image").
ARG BASE_IMAGE=pytorch/pytorch:2.7.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG BAKE_WEIGHTS=0
# SaladCloud Job Queue worker (https://github.com/SaladTechnologies/salad-cloud-job-queue-worker).
ARG SALAD_WORKER_VERSION=0.6.0
# sha256 of salad-http-job-queue-worker_x86_64.tar.gz for SALAD_WORKER_VERSION. Empty: the build
# checks the archive against the .sha256 file published with the release and prints the sum, so
# that it can be pinned here (docs/salad.md, "Pinning the worker binary").
ARG SALAD_WORKER_SHA256=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MUSETALK_MODELS_DIR=/opt/musetalk/models \
    MUSETALK_WORKDIR=/workspace \
    MUSETALK_SERVE_HOST=127.0.0.1 \
    MUSETALK_SERVE_PORT=8080 \
    MUSETALK_LOG_FORMAT=json \
    HF_HOME=/workspace/.cache/huggingface

# System packages: the same apt line as .ci/run, plus tini (PID 1) and curl/ca-certificates.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ffmpeg espeak-ng sox tini curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The Job Queue worker binary, version pinned, archive checked before it is unpacked.
RUN set -eu; \
    base="https://github.com/SaladTechnologies/salad-cloud-job-queue-worker/releases/download/v${SALAD_WORKER_VERSION}"; \
    curl -fsSL -o /tmp/worker.tar.gz "${base}/salad-http-job-queue-worker_x86_64.tar.gz"; \
    expected="${SALAD_WORKER_SHA256}"; \
    if [ -z "${expected}" ]; then \
      expected="$(curl -fsSL "${base}/salad-http-job-queue-worker_x86_64.tar.gz.sha256" | cut -d' ' -f1)"; \
    fi; \
    actual="$(sha256sum /tmp/worker.tar.gz | cut -d' ' -f1)"; \
    echo "salad-http-job-queue-worker v${SALAD_WORKER_VERSION} sha256 ${actual}"; \
    [ "${actual}" = "${expected}" ] || { echo "worker archive sha256 ${actual} != expected ${expected}" >&2; exit 1; }; \
    tar -C /usr/local/bin -xzf /tmp/worker.tar.gz salad-http-job-queue-worker; \
    chmod 0755 /usr/local/bin/salad-http-job-queue-worker; \
    rm -f /tmp/worker.tar.gz

# The project with every storage backend (the install command of the README, without test extras;
# torch comes from the base image and satisfies the requirement).
WORKDIR /opt/musetalk/src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m pip install -q --upgrade pip \
 && python -m pip install -q . \
 && musetalk-job --version \
 && musetalk-job serve --help >/dev/null \
 && musetalk-job run --help >/dev/null \
 && musetalk-job download-weights --help >/dev/null
# Bytecode for every installed package, written now: the container runs as a user that cannot
# write __pycache__ into site-packages, and without .pyc files each process compiles the sources
# it imports (measured on the H200 VM: process start -> models ready 13-17 s without, 7.7-9.2 s
# with; bench/README.md, runs 14-15). compileall exits non-zero on any unparsable file some
# packages ship (py2 test data); those are the only ones left uncompiled.
RUN python -m compileall -q -j 0 $(python -c "import site; print(' '.join(site.getsitepackages()))") >/dev/null || true

# Non-root user; models and workspace belong to it.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin musetalk \
 && mkdir -p /opt/musetalk/models /workspace \
 && chown -R musetalk:musetalk /opt/musetalk/models /workspace
COPY --chmod=0755 docker/entrypoint.sh /opt/musetalk/entrypoint.sh
USER musetalk
WORKDIR /workspace

# Optional: weights baked into the image (about 4.5 GB more; no download at start).
RUN if [ "${BAKE_WEIGHTS}" = "1" ]; then \
      musetalk-job download-weights --models-dir "${MUSETALK_MODELS_DIR}" --no-progress \
   && musetalk-job convert-weights --models-dir "${MUSETALK_MODELS_DIR}"; \
    fi

ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/opt/musetalk/entrypoint.sh"]
CMD []
