#!/usr/bin/env bash
# Container entry point (PID 1 is tini, which forwards signals to this script's process group).
#
#   entrypoint.sh [serve|run|<command> ...]      (default: $MUSETALK_MODE, else serve)
#
# serve: fetch missing weights, start `musetalk-job serve` on loopback and the SaladCloud
#        Job Queue worker beside it; exit when either exits (with its status), stopping the other.
# run:   fetch missing weights, then exec `musetalk-job run` (one job from env vars; see
#        docs/job-spec.md; MUSETALK_ON_FINISH decides what happens after it).
# other: exec the command as given (e.g. `musetalk-job doctor`, `bash`).
#
# Environment:
#   MUSETALK_MODELS_DIR       models directory (weights baked at build time, or fetched here)
#   MUSETALK_FETCH_WEIGHTS    auto (default: fetch what is missing) | 0 (never fetch)
#   MUSETALK_QUEUE_WORKER     auto (default: start the worker only on SaladCloud) | 1 | 0
#   SALAD_WORKER_BIN          worker binary (default /usr/local/bin/salad-http-job-queue-worker)
set -euo pipefail

mode="${1:-${MUSETALK_MODE:-serve}}"
[ "$#" -gt 0 ] && shift

log() { printf '{"level": "info", "logger": "entrypoint", "msg": "%s"}\n' "$*" >&2; }

fetch_weights() {
  if [ "${MUSETALK_FETCH_WEIGHTS:-auto}" = "0" ]; then
    return 0
  fi
  # Idempotent: files already present with the right size are skipped without a network call.
  musetalk-job download-weights --models-dir "${MUSETALK_MODELS_DIR:-/opt/musetalk/models}" --no-progress
}

case "${mode}" in
  serve)
    fetch_weights
    worker="${MUSETALK_QUEUE_WORKER:-auto}"
    if [ "${worker}" = "auto" ]; then
      if [ -n "${SALAD_MACHINE_ID:-}" ] && [ "${SALAD_MACHINE_ID}" != "local" ]; then worker=1; else worker=0; fi
    fi
    pids=()
    stop_all() {
      trap - TERM INT
      for pid in "${pids[@]}"; do kill -TERM "${pid}" 2>/dev/null || true; done
      wait 2>/dev/null || true
    }
    trap 'stop_all; exit 143' TERM
    trap 'stop_all; exit 130' INT
    musetalk-job serve "$@" &
    pids+=("$!")
    if [ "${worker}" = "1" ]; then
      "${SALAD_WORKER_BIN:-/usr/local/bin/salad-http-job-queue-worker}" &
      pids+=("$!")
      log "started the server (pid ${pids[0]}) and the job queue worker (pid ${pids[1]})"
    else
      log "started the server (pid ${pids[0]}); job queue worker not started (not on SaladCloud)"
    fi
    status=0
    wait -n "${pids[@]}" || status=$?
    log "a process exited with status ${status}; stopping the other"
    stop_all
    exit "${status}"
    ;;
  run)
    fetch_weights
    exec musetalk-job run "$@"
    ;;
  *)
    exec "${mode}" "$@"
    ;;
esac
