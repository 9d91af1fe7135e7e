#!/usr/bin/env python3
"""What `import diffusers` spends on this machine's installed-package metadata.

    python bench/probes/import_probe.py [--patched]

Prints one JSON line: the number of installed distributions (and how many are egg-info),
the seconds of `importlib_metadata.packages_distributions()` (diffusers calls it once at
import), and, in a fresh interpreter, the seconds to import torch and then the diffusers UNet
module. With --patched the map is computed before the timed import and served from memory,
so the import's difference is what the metadata scan costs inside it.
"""
from __future__ import annotations

import json
import sys
import time

patched = "--patched" in sys.argv
t0 = time.perf_counter()
import torch  # noqa: E402,F401

t_torch = time.perf_counter() - t0
out: dict = {"torch_s": round(t_torch, 3)}
import importlib.metadata as std_md  # noqa: E402

try:
    import importlib_metadata as md  # the backport diffusers prefers when installed
except ImportError:
    md = std_md
dists = list(md.distributions())
out["distributions"] = len(dists)
out["egg_info"] = sum(1 for d in dists if str(getattr(d, "_path", "")).endswith(".egg-info"))
t = time.perf_counter()
pmap = md.packages_distributions()
out["packages_distributions_s"] = round(time.perf_counter() - t, 3)
out["packages"] = len(pmap)
if patched:
    md.packages_distributions = lambda: pmap
    std_md.packages_distributions = lambda: pmap
t = time.perf_counter()
import diffusers.models.unets.unet_2d_condition  # noqa: E402,F401

out["import_unet_module_s"] = round(time.perf_counter() - t, 3)
out["patched"] = patched
print(json.dumps(out))
