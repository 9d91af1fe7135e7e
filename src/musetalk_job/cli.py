"""The ``musetalk-job`` console script.

Each subcommand lives in the module that owns it; that module exposes
``register(subparsers)`` which adds its parser and sets ``func(args) -> int`` (the exit
code). Modules must not import torch or other heavy libraries at import time, so that
``--help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__

# (module, attribute) pairs, in the order they appear in --help.
SUBCOMMANDS: tuple[str, ...] = (
    "musetalk_job.runner_cli",  # run
    "musetalk_job.worker",  # serve
    "musetalk_job.weights",  # download-weights
    "musetalk_job.doctor",  # doctor
    "musetalk_job.salad.cli",  # salad ...
    "musetalk_job.dev",  # dev random-weights, dev make-sample
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musetalk-job",
        description="MuseTalk v1.5 lip-sync jobs: face video + speech audio in, lip-synced MP4 out.",
    )
    parser.add_argument("--version", action="version", version=f"musetalk-job {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a subcommand not built yet must not break the others
            if exc.name and exc.name.startswith("musetalk_job"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
