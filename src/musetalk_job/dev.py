"""``musetalk-job dev``: developer helpers that need no downloads.

- ``dev random-weights DIR [--size tiny|full] [--version v15|v1|all] [--seed N] [--no-dwpose]``
  writes a complete models dir of random weights in the official layout
  (``models.random_weights.write_random_weights``): the real loaders and the whole pipeline run
  on it, the output is noise.
- ``dev make-sample DIR [--seconds S]`` writes ``DIR/face.mp4`` (a real face, moving) and
  ``DIR/speech.wav`` (espeak-ng speech) for the demo (``samples``).

Heavy modules are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import EXIT_OK, JobError, SpecError

SAMPLE_TEXT = (
    "Hello! This is a short sample for MuseTalk. The lips in this video should follow these words."
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dev",
        help="developer helpers: random test weights, sample media",
        description="Developer helpers that need no network access.",
    )
    sub = parser.add_subparsers(dest="dev_command", metavar="DEV_COMMAND")
    sub.required = True

    rw = sub.add_parser(
        "random-weights",
        help="write random weights in the official models-dir layout",
        description="Write random weights in the official MuseTalk models-dir layout (for tests and demos; "
        "the output video is noise). 'full' writes the real architectures (about 4.5 GB).",
    )
    rw.add_argument("dir", type=Path, metavar="DIR", help="models dir to write")
    rw.add_argument("--size", choices=("tiny", "full"), default="tiny", help="model sizes [tiny]")
    rw.add_argument("--version", choices=("v15", "v1", "all"), default="v15", help="UNet version(s) [v15]")
    rw.add_argument("--seed", type=int, default=0, help="random seed [0]")
    rw.add_argument("--no-dwpose", dest="dwpose", action="store_false", help="do not write a DWPose checkpoint")
    rw.set_defaults(func=random_weights_main)

    ms = sub.add_parser(
        "make-sample",
        help="write a sample face video and speech audio",
        description="Write DIR/face.mp4 (a real face, moving a little) and DIR/speech.wav (espeak-ng speech).",
    )
    ms.add_argument("dir", type=Path, metavar="DIR", help="folder to write into")
    ms.add_argument("--seconds", type=float, default=5.0, help="video length in seconds [5]")
    ms.set_defaults(func=make_sample_main)


def random_weights_main(args: argparse.Namespace) -> int:
    from .models.random_weights import write_random_weights

    try:
        write_random_weights(args.dir, size=args.size, version=args.version, seed=args.seed, dwpose=args.dwpose)
    except OSError as exc:
        return _fail(SpecError(f"DIR {args.dir}: cannot write ({exc.strerror or exc}); choose a writable folder"))
    print(f"wrote {args.size} random weights ({args.version}) to {args.dir}")
    return EXIT_OK


def make_sample_main(args: argparse.Namespace) -> int:
    from .samples import make_face_video, make_speech

    if not args.seconds > 0:
        return _fail(SpecError(f"--seconds must be > 0, got {args.seconds}"))
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
        speech = make_speech(args.dir / "speech.wav", text=SAMPLE_TEXT)
        video = make_face_video(args.dir / "face.mp4", seconds=args.seconds, fps=25.0, size=(640, 480))
    except JobError as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(SpecError(f"DIR {args.dir}: cannot write ({exc.strerror or exc}); choose a writable folder"))
    print(f"wrote {video} and {speech}")
    return EXIT_OK


def _fail(error: JobError) -> int:
    sys.stderr.write(error.one_line() + "\n")
    return error.exit_code
