"""CUDA graphs for the engine's fixed-shape GPU steps: launch the whole step at once.

Contract:

- ``GraphedStep(fn, device, name)`` wraps a function of device tensors that returns one device
  tensor and does nothing but GPU work (no host syncs, no data-dependent shapes): here the face
  step (UNet + VAE decode → uint8 faces) and the VAE encode of one chunk of crops.
- On CUDA, the first call with a given set of input shapes and dtypes *captures* ``fn`` into a
  ``torch.cuda.CUDAGraph`` (after one warm-up run on a side stream, as CUDA graphs require), with
  static copies of the inputs. Every call copies its inputs into those static buffers, replays the
  graph, and returns a *clone* of the static output, so a result stays valid after later calls.
  All graphs of one ``GraphedStep`` share one memory pool, and steps given the same ``MemoryPool``
  share it too: their replays must then be ordered on one stream, never concurrent (the engine's
  encode and face steps both run on the main thread's stream).
- Why: the step is tens of thousands of kernel launches per job (run 27, bench/README.md); the
  GPU idles between them while Python launches the next. A replay launches them all at once.
- On CPU, when ``enabled`` is False, or after a failure, a call is ``fn(*inputs)`` unchanged.
- A capture that fails (an op that cannot be captured, a driver without graph support) logs ONE
  warning, switches graphs off for this step for good and runs the call eagerly: a job never fails
  because of graphs. ``torch.OutOfMemoryError`` is re-raised unchanged, after ``reset()`` has freed
  the graphs' pool, so the engine's batch-halving OOM handling owns it.
- Captured graphs replay the same kernels on the same addresses, so the output is the one ``fn``
  gives (tests/bench compare them). Changing the models' weights in place is seen by a replay
  (the graph reads the parameters' memory); replacing parameter tensors or recompiling is not:
  ``context`` (a function returning what the kernels depend on, e.g. compiled or not and the
  weights' memory format) drops every graph when its value changes; ``reset()`` does it by hand.
- A failed capture leaves PyTorch's CUDA random generator believing a capture is still under way
  (every later ``torch.randn`` on the device would raise); ``_repair_after_failed_capture`` runs one
  tiny capture that completes, which resets it.
- Memory: the graphs' intermediates live in a private pool that the rest of the job cannot use.
  H200, fp16, batch 64 (run 31): 8.2 GiB eager-launched models, 3.9 GiB compiled; batch 16: 4.1 GiB.
- ``MUSETALK_CUDA_GRAPHS``: ``auto`` (default): on when the GPU has at least ``AUTO_MIN_TOTAL_GIB``
  of memory (24 GB consumer cards and data-centre GPUs), off on smaller cards, where the pool would
  crowd out the job; ``1``/``on``: always on CUDA; ``0``/``off``: never. ``enabled_from_env()``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Optional

import torch

from .errors import SpecError

log = logging.getLogger(__name__)

ENV_GRAPHS = "MUSETALK_CUDA_GRAPHS"
AUTO_MIN_TOTAL_GIB = 20.0
_ON = {"1", "true", "on", "yes"}
_OFF = {"0", "false", "off", "no"}
_AUTO = {"", "auto"}


def mode_from_env(env: Optional[Mapping[str, str]] = None) -> str:
    """``MUSETALK_CUDA_GRAPHS`` → ``"auto"`` (the default), ``"on"`` or ``"off"``."""
    env = os.environ if env is None else env
    raw = env.get(ENV_GRAPHS, "").strip().lower()
    if raw in _AUTO:
        return "auto"
    if raw in _ON:
        return "on"
    if raw in _OFF:
        return "off"
    raise SpecError(f"{ENV_GRAPHS}={env.get(ENV_GRAPHS)!r}: expected auto (the default), 1 (on) or 0 (off)")


def decide(mode: str, device: torch.device, total_bytes: Optional[int] = None) -> bool:
    """Whether a pipeline on ``device`` uses CUDA graphs in ``mode`` (``total_bytes``: the GPU's
    memory, default what CUDA reports)."""
    if torch.device(device).type != "cuda" or mode == "off":
        return False
    if mode == "on":
        return True
    if total_bytes is None:
        total_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return total_bytes >= AUTO_MIN_TOTAL_GIB * 2**30


def enabled_from_env(device: torch.device, env: Optional[Mapping[str, str]] = None) -> bool:
    """``decide(mode_from_env(env), device)``."""
    return decide(mode_from_env(env), device)


class MemoryPool:
    """A CUDA graph memory pool that several ``GraphedStep`` s share (made by the first capture).

    The pool lives while some graph captured into it does; once no step holds a graph in it, the
    handle is forgotten (capturing into a released pool trips an allocator assertion)."""

    def __init__(self) -> None:
        self.handle: Optional[tuple[int, int]] = None
        self._holders: set[int] = set()

    def hold(self, step: object) -> None:
        self._holders.add(id(step))

    def release(self, step: object) -> None:
        self._holders.discard(id(step))
        if not self._holders:
            self.handle = None


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


Key = tuple[Hashable, ...]  # (the variant, when given,) then each input's (shape, dtype)


class GraphedStep:
    """``fn`` replayed from CUDA graphs, one per input signature (see the module contract)."""

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        device: torch.device,
        name: str,
        *,
        enabled: bool = True,
        context: Optional[Callable[[], Hashable]] = None,
        pool: Optional[MemoryPool] = None,
        variant: Optional[Callable[[], Hashable]] = None,
    ) -> None:
        self.fn = fn
        # What the captured kernels depend on beyond the inputs (compiled or not, weight layout):
        # when it changes, every graph is dropped and captured again.
        self.context = context
        # What else selects a graph, beside the inputs' shapes (the engine's chunk size): graphs of
        # each value are kept side by side, so switching back and forth captures nothing again.
        self.variant = variant
        self._context: Hashable = None
        self.device = torch.device(device)
        self.name = name
        self.enabled = bool(enabled) and self.device.type == "cuda"
        self.failure: Optional[str] = None
        self.captures = 0  # graphs captured over this step's life (benchmarks, tests)
        self._graphs: dict[Key, _Captured] = {}
        self.pool = pool or MemoryPool()
        self._lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.fn(*inputs)
        key: Key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if self.variant is not None:
            key = (self.variant(), *key)  # type: ignore[assignment]
        with self._lock:
            if self.context is not None:
                ctx = self.context()
                if ctx != self._context:
                    self._drop()
                    self._context = ctx
            cap = self._graphs.get(key)
            if cap is None:
                cap = self._capture(key, inputs)
                if cap is None:  # failed: graphs are off now
                    return self.fn(*inputs)
            for static, x in zip(cap.inputs, inputs):
                static.copy_(x, non_blocking=True)
            cap.graph.replay()
            return cap.output.clone()

    @property
    def shapes(self) -> list[Key]:
        return list(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph (after OOM, or new weights); the shared pool's memory goes back
        to the allocator once no step holds graphs in it."""
        with self._lock:
            self._drop()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _drop(self) -> None:
        self._graphs.clear()
        self.pool.release(self)

    def disable(self, why: str) -> None:
        if self.failure is None:
            log.warning("CUDA graphs for %s switched off, running it eagerly: %s", self.name, why)
        self.failure = why
        self.enabled = False
        self._drop()

    def _capture(self, key: Key, inputs: tuple[torch.Tensor, ...]) -> Optional[_Captured]:
        static = tuple(x.detach().clone() for x in inputs)
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        try:
            # A warm-up run off the capture: lazy initialisation (cuBLAS workspaces, cuDNN plans,
            # the allocator's first blocks) must not happen inside the graph.
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.fn(*static)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the blend-mask thread keeps using the GPU on its own stream meanwhile.
            with torch.cuda.graph(graph, pool=self.pool.handle, capture_error_mode="thread_local"):
                output = self.fn(*static)
        except torch.OutOfMemoryError:
            self._drop()
            torch.cuda.empty_cache()
            raise
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            _repair_after_failed_capture(self.device)
            self.disable(f"{type(exc).__name__}: {str(exc)[:300]}")
            return None
        if not isinstance(output, torch.Tensor):
            self.disable(f"the step returned {type(output).__name__}, not a tensor")
            return None
        if self.pool.handle is None:
            self.pool.handle = graph.pool()
        self.pool.hold(self)
        cap = _Captured(graph=graph, inputs=static, output=output)
        self._graphs[key] = cap
        self.captures += 1
        log.debug("captured a CUDA graph for %s at %s", self.name, key)
        return cap


def _repair_after_failed_capture(device: torch.device) -> None:
    """Complete one tiny capture: a capture that failed skipped the CUDA random generator's
    end-of-capture step, and its state would reject every later random op on the device."""
    try:
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - the failed capture's own error may surface here once
        log.debug("synchronize after a failed capture", exc_info=True)
    try:
        scratch = torch.zeros(1, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            scratch.add_(1)
        del graph
    except Exception:  # noqa: BLE001 - best effort; the step runs eagerly either way
        log.warning("could not reset CUDA graph state after a failed capture", exc_info=True)
