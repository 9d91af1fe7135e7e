#!/usr/bin/env bash
# Quickstart, step 1 of 2: set everything up on a fresh Debian/Ubuntu machine and run one
# demo job end to end on sample media that the project makes itself.
#
#   bash scripts/quickstart.sh            # models in ./models, demo output in ./demo/
#
# Real weights are downloaded when the Hugging Face hub is reachable. Otherwise tiny random
# weights in the official layout are generated instead, and the demo still runs the whole
# pipeline — but the generated mouth is noise. A notice says which happened.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS_DIR="${MUSETALK_MODELS_DIR:-./models}"
DEMO_DIR="./demo"

if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng sox >/dev/null
  else
    echo "quickstart: please install ffmpeg and espeak-ng (e.g. sudo apt-get install ffmpeg espeak-ng)" >&2
    exit 2
  fi
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null; then
  python -m pip install -q torch            # CUDA build
else
  python -m pip install -q torch==2.13.0    # CPU build
fi
python -m pip install -q -e '.[test]'

landmarks=dwpose
if musetalk-job download-weights --models-dir "$MODELS_DIR"; then
  echo "quickstart: official weights are in $MODELS_DIR"
else
  echo "quickstart: NOTICE — the official weights could not be downloaded (no access to the Hugging Face hub)."
  echo "quickstart: generating TINY RANDOM weights in the official layout instead: the pipeline runs end to end,"
  echo "quickstart: but the generated mouth region will be noise. Re-run when the hub is reachable for real output."
  MODELS_DIR="./models-random"
  musetalk-job dev random-weights "$MODELS_DIR" --size tiny --version all
  landmarks=cascade   # random DWPose weights would place the face box at random
fi

musetalk-job dev make-sample "$DEMO_DIR"
musetalk-job run --models-dir "$MODELS_DIR" --landmarks "$landmarks" \
  --video "$DEMO_DIR/face.mp4" --audio "$DEMO_DIR/speech.wav" --output "$DEMO_DIR/out.mp4" --job-id demo
echo "quickstart: done — see $DEMO_DIR/out.mp4 and $DEMO_DIR/out.mp4.json"
