"""Skip the ``__init__`` of the diffusers packages whose every model the engine does not use.

Contract:

- ``defer_init(name) -> bool`` puts a *deferred* package module for ``name`` in ``sys.modules``
  (when it is not imported yet): a module with the real package's ``__spec__``, ``__path__`` and
  ``__file__`` whose ``__init__.py`` has not run. ``import name.sub`` then loads only ``sub`` (and
  what ``sub`` imports). The first lookup of a name the package does not have yet
  (``name.UNet1DModel``, ``from name import X``) runs the real ``__init__.py`` in that module, once,
  so the package behaves exactly as if it had been imported normally, only later. A lookup of a
  name that is one of its submodules (``from name import sub``) imports just that submodule.
  Returns False, changing nothing, when ``name`` is imported already or cannot be found.
- ``DIFFUSERS_PACKAGES``: the packages ``models.loading`` defers before importing the UNet and
  the VAE. ``diffusers/models/unets/__init__.py`` imports all of diffusers' UNets, and through their
  blocks ``diffusers.models.transformers`` imports all ~80 transformer models (and through LoRA
  loaders ``scipy``); ``autoencoders`` imports ~20 autoencoders. The engine uses two classes.
  Measured on the 2-core dev box: importing UNet2DConditionModel + AutoencoderKL + WhisperEncoder
  after ``torch`` 3.39 s → 2.65 s, 138 fewer modules; on the H200 VM ``import_diffusers`` 7.54 →
  6.39 s with a dropped page cache (bench/README.md, "Runs 23–28").
- An error raised by the real ``__init__`` (a missing optional dependency) propagates from the
  lookup that ran it, and the next lookup runs it again (and raises again).
- ``MUSETALK_DEFER_IMPORTS=0`` turns the deferral off (the packages import in full, as before).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from typing import Any

ENV = "MUSETALK_DEFER_IMPORTS"
DIFFUSERS_PACKAGES = ("diffusers.models.unets", "diffusers.models.transformers", "diffusers.models.autoencoders")

_LOCK = threading.RLock()


class DeferredPackage(types.ModuleType):
    """A package module whose ``__init__.py`` runs on the first lookup of a missing name."""

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name.startswith("__") or d.get("_musetalk_init_ran"):
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        submodule = f"{self.__name__}.{name}"
        if importlib.machinery.PathFinder.find_spec(submodule, d["__path__"]) is not None:
            # ``from package import submodule`` looks the name up first: import just that one
            return importlib.import_module(submodule)
        with _LOCK:
            if not d.get("_musetalk_init_ran"):
                d["_musetalk_init_ran"] = True  # before running: a lookup from inside it must not recurse
                try:
                    d["__spec__"].loader.exec_module(self)
                except BaseException:
                    d["_musetalk_init_ran"] = False  # the next lookup raises the same error again
                    raise
        try:
            return d[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "off", "no"}


def defer_init(name: str) -> bool:
    with _LOCK:
        if name in sys.modules:
            return False
        try:
            spec = importlib.util.find_spec(name)  # imports the parents (diffusers' are lazy)
        except (ImportError, ValueError):
            return False
        if spec is None or spec.loader is None or not spec.submodule_search_locations or name in sys.modules:
            return False
        module = DeferredPackage(name)
        module.__spec__ = spec
        module.__loader__ = spec.loader
        module.__file__ = spec.origin
        module.__path__ = list(spec.submodule_search_locations)
        module.__package__ = name
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules:
            # as the import system does for a loaded submodule (a lazy parent may not allow it)
            try:
                setattr(sys.modules[parent], child, module)
            except Exception:  # noqa: BLE001 - the attribute is a convenience only
                pass
        return True


def defer_diffusers() -> list[str]:
    """Defer ``DIFFUSERS_PACKAGES`` unless ``MUSETALK_DEFER_IMPORTS=0``; the names deferred."""
    if not enabled():
        return []
    return [name for name in DIFFUSERS_PACKAGES if defer_init(name)]
