#!/usr/bin/env python3
"""Where `import diffusers` (the UNet module) spends its time on this machine, by caller.

    python bench/probes/import_callers.py > callers.txt

Imports torch first (untimed), then profiles the diffusers UNet and VAE module imports with
cProfile (the package map cached as the loader does) and prints the top functions by
cumulative and by own time, and who calls ``stat``/``os.stat``/``os.listdir``/``posix.scandir``.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import torch  # noqa: E402,F401

from musetalk_job.models import fastio  # noqa: E402

fastio.cache_package_map()
prof = cProfile.Profile()
t = time.perf_counter()
prof.enable()
import diffusers.models.autoencoders.autoencoder_kl  # noqa: E402,F401
import diffusers.models.unets.unet_2d_condition  # noqa: E402,F401

prof.disable()
print(f"import seconds (profiled): {time.perf_counter() - t:.2f}")
for order, n in (("cumulative", 45), ("tottime", 30)):
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(order).print_stats(n)
    print(s.getvalue())
s = io.StringIO()
st = pstats.Stats(prof, stream=s).sort_stats("tottime")
st.print_callers(r"\{built-in method posix\.(stat|listdir|scandir|lstat|open)\}")
st.print_callers(r"pathlib.py.*\((stat|exists|is_dir|is_file|glob|rglob|iterdir)\)")
print(s.getvalue()[:20000])
