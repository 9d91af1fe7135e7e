"""Opt-in ``torch.compile`` fast path for the GPU work: the UNet forward, the VAE decode and encode.

Contract:

- Eager is the default. ``maybe_enable_from_env(models) -> bool`` turns compilation on only when
  ``MUSETALK_COMPILE`` is ``1``/``true``/``on``/``yes``/``regional`` (regional compilation) or
  ``full`` (whole-model); ``0``/``false``/``off``/``no``/empty leave eager. An unknown value is a
  ``SpecError`` naming the variable. ``MUSETALK_COMPILE_MODE`` picks the inductor mode
  (``default``, ``max-autotune-no-cudagraphs``, ``max-autotune``, ``reduce-overhead``).
  ``enable(models, mode="regional", *, inductor_mode="default") -> bool`` is the explicit call.
  ``models`` is anything with ``.unet`` (diffusers ``UNet2DConditionModel``) and ``.vae``
  (``AutoencoderKL``), e.g. ``models.loading.MuseTalkModels``.
- What is compiled, always with fixed shapes (``dynamic=False``):
  ``regional``: every ``ResnetBlock2D``, ``Transformer2DModel``, ``Attention``, ``Downsample2D``
  and ``Upsample2D`` of the UNet and of the VAE decoder and encoder, each compiled on its own (the
  outermost match; nothing nested twice). Instances with equal shapes share one compiled graph, so
  the compile cost is a fraction of whole-model compilation. ``full``: the whole UNet forward and
  ``post_quant_conv`` + ``decoder`` as one graph each; ``vae.encode`` stays eager in ``full``.
- The models are changed in place: ``unet.forward``, ``vae.decode`` and ``vae.encode`` become guarded wrappers
  (instance attributes), so callers keep calling ``unet(...)`` / ``vae.decode(...)`` unchanged and
  get identical output types. ``disable(models)`` restores eager exactly.
- Fallback, never a failed job: when no compiler is usable (CPU without a C++ compiler, CUDA
  without Triton) or ``torch.compile`` raises, ``enable`` returns False and logs ONE warning.
  Errors raised lazily by the first compiled call (dynamo/inductor/Triton) are caught by the
  wrapper, which logs ONE warning, disables compilation on both models and reruns that call
  eagerly. ``torch.OutOfMemoryError`` is re-raised unchanged (the engine's OOM handling owns it)
  without disabling.
- Shapes: ``warmup(models, batch_sizes, decode_chunk=..., encode_batches=...)`` compiles (runs
  once, under ``torch.inference_mode``) the UNet at each batch size, the decoder at the chunk sizes
  ``latents.decode_latents(vae, z, decode_chunk)`` produces for them and the encoder (regional) at
  each of ``encode_batches`` images per call, then *freezes* the shape
  sets: afterwards a call whose batch is not compiled is padded (repeating its last row) to the
  smallest compiled batch that is larger and its output sliced back, or, when none is larger,
  runs eagerly; any other guard failure (grad mode, inference flags) also runs eagerly
  (``torch.compiler.set_stance("eager_on_recompile")`` around frozen calls) — a job never stalls
  on a compile in its hot loop. Before ``warmup`` every new
  shape compiles on first use.
- Persistent cache: ``configure_cache()`` (called by ``enable``) points inductor's on-disk caches
  (``TORCHINDUCTOR_CACHE_DIR``, FX graph cache, AOTAutograd cache; Triton's kernels live below it)
  at ``MUSETALK_COMPILE_CACHE`` or ``~/.cache/musetalk-job/inductor``. A second process with the same dir skips inductor
  code generation (dynamo tracing is still paid). It raises dynamo's recompile limits so that the
  many block shapes of regional compilation do not silently fall back to eager.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Optional

import torch
from torch import nn

from .errors import SpecError

log = logging.getLogger(__name__)

ENV_COMPILE = "MUSETALK_COMPILE"
ENV_COMPILE_MODE = "MUSETALK_COMPILE_MODE"
ENV_COMPILE_CACHE = "MUSETALK_COMPILE_CACHE"
DEFAULT_CACHE = Path("~/.cache/musetalk-job/inductor")

MODES = ("regional", "full")
INDUCTOR_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
_ON = {"1": "regional", "true": "regional", "on": "regional", "yes": "regional", "regional": "regional", "full": "full"}
_OFF = {"", "0", "false", "off", "no", "eager"}

# Classes compiled one by one in regional mode (diffusers names; UNet2DConditionModel and
# AutoencoderKL define no ``_repeated_blocks`` as of diffusers 0.42).
REGIONAL_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "Attention", "Downsample2D", "Upsample2D")

# Dynamo keeps at most ``recompile_limit`` graphs per code object (default 8) before it falls back
# to eager for good; regional compilation gives ResnetBlock2D.forward one graph per distinct
# (channels, resolution, batch) — ~20 per batch size for UNet + decoder.
RECOMPILE_LIMIT = 1024

ATTR = "_musetalk_compiled"
FAILURE_ATTR = "_musetalk_compile_failure"


def mode_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``MUSETALK_COMPILE`` → ``"regional"``/``"full"``, or None (eager)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_COMPILE, "").strip().lower()
    if raw in _OFF:
        return None
    if raw in _ON:
        return _ON[raw]
    raise SpecError(f"{ENV_COMPILE}={env.get(ENV_COMPILE)!r}: expected one of 1, regional, full, 0 (off)")


def inductor_mode_from_env(env: Optional[Mapping[str, str]] = None) -> str:
    env = os.environ if env is None else env
    raw = env.get(ENV_COMPILE_MODE, "").strip().lower() or "default"
    if raw not in INDUCTOR_MODES:
        raise SpecError(f"{ENV_COMPILE_MODE}={raw!r}: expected one of {', '.join(INDUCTOR_MODES)}")
    return raw


def cache_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """Where the compile cache lives: ``MUSETALK_COMPILE_CACHE`` or ``~/.cache/musetalk-job/inductor``."""
    env = os.environ if env is None else env
    return Path(env.get(ENV_COMPILE_CACHE) or DEFAULT_CACHE).expanduser()


def configure_cache(path: Optional[Path | str] = None) -> Path:
    """Point inductor's persistent caches at ``path`` (default: ``cache_dir()``) and switch the FX
    graph and AOTAutograd caches on. Returns the directory in use. (``TORCHINDUCTOR_CACHE_DIR`` is
    overwritten: importing diffusers already sets it to inductor's /tmp default.)"""
    chosen = Path(path).expanduser() if path is not None else cache_dir()
    chosen.mkdir(parents=True, exist_ok=True)
    chosen = chosen.resolve()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(chosen):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(chosen)
        try:
            from torch._inductor.utils import clear_caches

            clear_caches()  # in-process memoised paths of the old dir
        except Exception:  # pragma: no cover - depends on the torch build
            pass
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        if hasattr(functorch_config, "enable_autograd_cache"):
            functorch_config.enable_autograd_cache = True
    except Exception as exc:  # pragma: no cover - depends on the torch build
        log.debug("could not switch on inductor caches: %s", exc)
    return chosen


def _raise_recompile_limits() -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            try:
                setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), RECOMPILE_LIMIT))
            except Exception:  # pragma: no cover - deprecated aliases may refuse writes
                pass


def compiler_problem(device: torch.device | str) -> Optional[str]:
    """Why inductor cannot compile for ``device`` here, or None when it should."""
    dev = torch.device(device)
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if dev.type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "Triton is not usable (pip install triton matching torch)"
        except Exception as exc:
            return f"Triton check failed: {exc}"
        return None
    if dev.type == "cpu":
        cxx = os.environ.get("CXX")
        if cxx and shutil.which(cxx):
            return None
        if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return None
        return "no C++ compiler (g++/clang++) on PATH: inductor's CPU backend needs one"
    return f"torch.compile fast path not supported on device type {dev.type!r}"


# ---------------------------------------------------------------------------------------- state


@dataclass
class _State:
    """Per-model compile state, stored on the model as ``ATTR``."""

    kind: str  # "unet" | "vae"
    mode: str
    compiled_modules: list[nn.Module] = field(default_factory=list)
    core: Optional[Callable[..., Any]] = None  # full mode: the compiled callable
    batches: Optional[set[int]] = None  # frozen compiled batch sizes (None: compile any)
    encode_batches: Optional[set[int]] = None  # vae only: frozen compiled encoder batches
    active: bool = True
    group: Optional["_Group"] = None
    variants: set[Hashable] = field(default_factory=set)  # code variants compiled (see first_variant)


class _Group:
    """The UNet and VAE states enabled together; the first lazy failure disables both."""

    def __init__(self) -> None:
        self.states: list[tuple[nn.Module, _State]] = []
        self.lock = threading.Lock()
        self.warned = False
        self.failure: Optional[str] = None

    def fail(self, what: str, exc: BaseException) -> None:
        with self.lock:
            if not self.warned:
                self.warned = True
                self.failure = f"{what}: {type(exc).__name__}: {_short(exc)}"
                log.warning("compiled %s failed (%s); falling back to eager for this process", what, self.failure)
            for model, _state in self.states:
                model.__dict__[FAILURE_ATTR] = self.failure
                _restore(model)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


def _state(model: nn.Module) -> Optional[_State]:
    return model.__dict__.get(ATTR)


def _compile_regional(root: nn.Module, compile_kwargs: dict[str, Any]) -> list[nn.Module]:
    """Compile the outermost submodules of ``root`` whose class is in REGIONAL_BLOCKS."""
    done: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in REGIONAL_BLOCKS:
                child.compile(**compile_kwargs)
                done.append(child)
            else:
                visit(child)

    visit(root)
    return done


def _restore(model: nn.Module) -> None:
    """Undo everything ``enable`` did to ``model`` (idempotent)."""
    state = model.__dict__.pop(ATTR, None)
    for name in ("forward", "decode", "encode"):
        model.__dict__.pop(name, None)
    if state is not None:
        state.active = False
        for sub in state.compiled_modules:
            sub._compiled_call_impl = None  # what nn.Module.compile sets; None = eager __call__


def _pad_rows(x: torch.Tensor, m: int) -> torch.Tensor:
    n = x.shape[0]
    return torch.cat([x, x[-1:].expand(m - n, *x.shape[1:])]) if m > n else x


def _target_batch(frozen: Optional[set[int]], n: int) -> Optional[int]:
    """Compiled batch to run ``n`` rows at, given the frozen batch sizes (None: not frozen, any
    shape compiles); None → run eagerly (frozen and nothing fits)."""
    if frozen is None or n in frozen:
        return n
    larger = [b for b in frozen if b > n]
    return min(larger) if larger else None


def _frozen_stance(state: _State) -> Any:
    """Once shapes are frozen: dynamo reuses the compiled graphs and runs anything that would
    need a new one (a guard that fails for another reason than the batch, e.g. grad mode or a
    tensor's inference flag) eagerly instead of compiling it in the hot loop."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if state.batches is None or set_stance is None:
        return contextlib.nullcontext()
    return set_stance("eager_on_recompile")


def _slice_output(out: Any, n: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:n]
    if isinstance(out, tuple) and not hasattr(out, "keys"):
        return type(out)(_slice_output(o, n) for o in out)
    if hasattr(out, "sample"):  # diffusers BaseOutput (an OrderedDict dataclass)
        return type(out)(sample=out.sample[:n])
    return out


# ----------------------------------------------------------------------------------- wrappers


def _wrap_unet(unet: nn.Module, state: _State) -> None:
    eager_forward = type(unet).forward.__get__(unet)
    run = state.core or eager_forward

    def forward(sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not state.active:
            return eager_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        n = int(sample.shape[0])
        m = _target_batch(state.batches, n)
        if m is None or args or any(v is not None for k, v in kwargs.items() if k != "return_dict"):
            # Unusual calls (extra conditioning) and unwarmed shapes run eagerly: no mid-job compile.
            with _eager_blocks(state):
                return eager_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        try:
            with _frozen_stance(state):
                if m != n:
                    out = run(_pad_rows(sample, m), timestep, _pad_rows(encoder_hidden_states, m), **kwargs)
                    return _slice_output(out, n)
                return run(sample, timestep, encoder_hidden_states, **kwargs)
        except Exception as exc:
            if _is_oom(exc) or state.group is None:
                raise
            state.group.fail("UNet forward", exc)
            return eager_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    unet.__dict__["forward"] = forward


def _wrap_vae(vae: nn.Module, state: _State) -> None:
    eager_decode = type(vae).decode.__get__(vae)

    def core(z: torch.Tensor) -> torch.Tensor:
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z)

    run = state.core or core

    def decode(z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        tiled = getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False)
        if not state.active or tiled:
            return eager_decode(z, return_dict=return_dict, generator=generator)
        n = int(z.shape[0])
        m = _target_batch(state.batches, n)
        if m is None:
            with _eager_blocks(state):
                return eager_decode(z, return_dict=return_dict, generator=generator)
        try:
            with _frozen_stance(state):
                dec = run(_pad_rows(z, m))[:n] if m != n else run(z)
        except Exception as exc:
            if _is_oom(exc) or state.group is None:
                raise
            state.group.fail("VAE decode", exc)
            return eager_decode(z, return_dict=return_dict, generator=generator)
        if not return_dict:
            return (dec,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=dec)

    vae.__dict__["decode"] = decode
    if state.mode == "regional":
        _wrap_vae_encode(vae, state)


def _wrap_vae_encode(vae: nn.Module, state: _State) -> None:
    """Regional mode: ``vae.encode`` runs its compiled blocks at the warmed batches only (padded
    like the decoder's), eagerly otherwise; the output is the eager call's type."""
    eager_encode = type(vae).encode.__get__(vae)

    def encode(x: torch.Tensor, return_dict: bool = True) -> Any:
        tiled = getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False)
        if not state.active or tiled:
            return eager_encode(x, return_dict=return_dict)
        n = int(x.shape[0])
        m = _target_batch(state.encode_batches if state.batches is not None else None, n)
        if m is None:
            with _eager_blocks(state):
                return eager_encode(x, return_dict=return_dict)
        try:
            with _frozen_stance(state):
                out = eager_encode(_pad_rows(x, m) if m != n else x, return_dict=return_dict)
        except Exception as exc:
            if _is_oom(exc) or state.group is None:
                raise
            state.group.fail("VAE encode", exc)
            return eager_encode(x, return_dict=return_dict)
        if m == n:
            return out
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution((out.latent_dist if return_dict else out[0]).parameters[:n])
        if not return_dict:
            return (dist,)
        return type(out)(latent_dist=dist)

    vae.__dict__["encode"] = encode


class _eager_blocks:
    """Context: regional blocks of ``state`` run eagerly (a frozen model's unwarmed shape)."""

    def __init__(self, state: _State) -> None:
        self.state = state
        self.saved: list[tuple[nn.Module, Any]] = []

    def __enter__(self) -> None:
        for sub in self.state.compiled_modules:
            self.saved.append((sub, sub._compiled_call_impl))
            sub._compiled_call_impl = None

    def __exit__(self, *exc: Any) -> None:
        for sub, impl in self.saved:
            if self.state.active:
                sub._compiled_call_impl = impl


# ----------------------------------------------------------------------------------- public


def is_enabled(models: Any) -> bool:
    """True while the UNet and the VAE decode of ``models`` run compiled."""
    states = [_state(m) for m in (models.unet, models.vae)]
    return all(s is not None and s.active for s in states)


def failure(models: Any) -> Optional[str]:
    """The lazy failure that switched compilation off, if any (for logs and manifests)."""
    for m in (models.unet, models.vae):
        if m.__dict__.get(FAILURE_ATTR):
            return str(m.__dict__[FAILURE_ATTR])
    return None


def disable(models: Any) -> None:
    """Back to eager exactly as loaded."""
    _restore(models.unet)
    _restore(models.vae)


def enable(
    models: Any,
    mode: str = "regional",
    *,
    inductor_mode: str = "default",
    cache: Optional[Path | str] = None,
    device: Optional[torch.device | str] = None,
    backend: str | Callable[..., Any] = "inductor",
) -> bool:
    """Compile ``models.unet`` and ``models.vae``'s decode path (lazily: the work happens at the
    first call per shape, or in ``warmup``). Returns False (one warning, models untouched) when
    compilation is not possible here. ``backend``: ``torch.compile``'s backend (tests and
    debugging use ``"eager"``/``"aot_eager"``: dynamo tracing without code generation)."""
    if mode not in MODES:
        raise SpecError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    if inductor_mode not in INDUCTOR_MODES:
        raise SpecError(f"inductor mode must be one of {', '.join(INDUCTOR_MODES)}, got {inductor_mode!r}")
    disable(models)
    for m in (models.unet, models.vae):
        m.__dict__.pop(FAILURE_ATTR, None)
    dev = torch.device(device) if device is not None else next(models.unet.parameters()).device
    problem = compiler_problem(dev) if backend == "inductor" else None
    if problem:
        log.warning("torch.compile fast path off (%s); running eagerly", problem)
        return False
    try:
        configure_cache(cache)
        _raise_recompile_limits()
        kwargs: dict[str, Any] = {"dynamic": False, "fullgraph": False, "backend": backend}
        if inductor_mode != "default" and backend == "inductor":
            kwargs["mode"] = inductor_mode
        group = _Group()
        unet_state = _State("unet", mode, group=group)
        vae_state = _State("vae", mode, group=group)
        unet, vae = models.unet, models.vae
        if mode == "regional":
            unet_state.compiled_modules = _compile_regional(unet, kwargs)
            vae_state.compiled_modules = _compile_regional(vae.decoder, kwargs) + _compile_regional(vae.encoder, kwargs)
        else:
            unet_state.core = torch.compile(type(unet).forward.__get__(unet), **kwargs)

            def core(z: torch.Tensor) -> torch.Tensor:
                if vae.post_quant_conv is not None:
                    z = vae.post_quant_conv(z)
                return vae.decoder(z)

            vae_state.core = torch.compile(core, **kwargs)
        for model, st in ((unet, unet_state), (vae, vae_state)):
            model.__dict__[ATTR] = st
            group.states.append((model, st))
        _wrap_unet(unet, unet_state)
        _wrap_vae(vae, vae_state)
    except Exception as exc:
        disable(models)
        log.warning("torch.compile fast path off (%s: %s); running eagerly", type(exc).__name__, _short(exc))
        return False
    log.info(
        "torch.compile fast path on: %s (%s), cache %s%s",
        mode,
        inductor_mode,
        os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        f", {len(unet_state.compiled_modules) + len(vae_state.compiled_modules)} blocks" if mode == "regional" else "",
    )
    return True


def thaw(models: Any) -> None:
    """Forget which shapes are compiled, so the next ``ensure_warm`` runs them again (compiling
    what changed, e.g. after the upsamplers are folded; unchanged code hits dynamo's cache) instead
    of running changed code eagerly under the frozen stance. No-op when compiling is off."""
    for model in (models.unet, models.vae):
        state = _state(model)
        if state is not None:
            state.batches = None
            state.encode_batches = None


def first_variant(models: Any, variant: Hashable) -> bool:
    """True the first time ``variant`` (a change of the models' code, e.g. the upsamplers' fold) is
    asked for since compiling was enabled; the caller then ``thaw``s so that it compiles. A variant
    compiled before is in dynamo's cache beside the others: switching back needs no thaw."""
    state = _state(models.unet)
    if state is None or variant in state.variants:
        return False
    state.variants.add(variant)
    return True


def maybe_enable_from_env(models: Any, env: Optional[Mapping[str, str]] = None) -> bool:
    """``enable`` when ``MUSETALK_COMPILE`` asks for it; False (eager) otherwise."""
    mode = mode_from_env(env)
    if mode is None:
        return False
    return enable(models, mode, inductor_mode=inductor_mode_from_env(env))


def decode_chunk_sizes(batch: int, chunk: Optional[int]) -> list[int]:
    """The batch sizes ``latents.decode_latents(vae, z[batch], chunk)`` calls the decoder with."""
    step = batch if not chunk or chunk >= batch else int(chunk)
    sizes = {step}
    if batch % step:
        sizes.add(batch % step)
    return sorted(sizes)


def warmup(
    models: Any,
    batch_sizes: Iterable[int],
    *,
    decode_chunk: Optional[int] = None,
    encode_batches: Iterable[int] = (),
    tokens: int = 50,
    timestep: Optional[torch.Tensor] = None,
    freeze: bool = True,
) -> float:
    """Compile (by running once) the UNet at each of ``batch_sizes`` and the decoder at the chunk
    sizes ``decode_latents`` uses for them, then freeze the compiled shapes (see the module
    docstring). ``tokens``: audio tokens per frame (50 with the default audio padding).
    ``timestep``: pass the engine's own timestep tensor (``Pipeline._timestep``): dynamo guards
    on whether a graph input is an inference tensor, so it must be created the same way (the
    default, ``zeros(1)`` made outside inference mode, matches). Runs under inference mode, as the
    engine's hot loop does. Returns the seconds spent; 0 when compilation is not enabled."""
    unet_state, vae_state = _state(models.unet), _state(models.vae)
    if unet_state is None or vae_state is None or not unet_state.active:
        return 0.0
    t0 = time.perf_counter()
    vae = models.vae
    p = next(models.unet.parameters())
    batches = sorted({int(b) for b in batch_sizes if int(b) > 0})
    # The decoder keeps the chunk sizes compiled before (another ``decode_chunk``) too.
    decodes = sorted({c for b in batches for c in decode_chunk_sizes(b, decode_chunk)} | (vae_state.batches or set()))
    encodes = sorted({int(b) for b in encode_batches if int(b) > 0} | (vae_state.encode_batches or set()))
    if vae_state.mode != "regional":
        encodes = []
    # Let every shape compile now; freeze afterwards.
    unet_state.batches = None
    vae_state.batches = None
    vae_state.encode_batches = None
    if timestep is None:
        with torch.inference_mode(False):
            timestep = torch.zeros(1, dtype=torch.long, device=p.device)
    latent_ch = int(getattr(vae.config, "latent_channels", 4))
    with torch.inference_mode():
        _run_shapes(models, batches, decodes, tokens, timestep, latent_ch)
        vp = next(vae.parameters())
        in_ch = int(getattr(vae.config, "in_channels", 3))
        size = 256  # latents.FACE_SIZE
        for e in encodes:
            vae.encode(torch.zeros((e, in_ch, size, size), device=vp.device, dtype=vp.dtype))
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    if freeze and unet_state.active:
        unet_state.batches = set(batches)
        vae_state.batches = set(decodes)
        vae_state.encode_batches = set(encodes)
    seconds = time.perf_counter() - t0
    log.info("compiled UNet at batch %s, VAE decode at %s and encode at %s in %.1fs", batches, decodes, encodes, seconds)
    return seconds


def _run_shapes(models: Any, batches: list[int], decodes: list[int], tokens: int, timestep: torch.Tensor, latent_ch: int) -> None:
    unet, vae = models.unet, models.vae
    p = next(unet.parameters())
    cfg = unet.config
    sample_size = 32  # latents.LATENT_SIZE
    for b in batches:
        unet(
            torch.zeros((b, int(cfg.in_channels), sample_size, sample_size), device=p.device, dtype=p.dtype),
            timestep,
            encoder_hidden_states=torch.zeros((b, tokens, int(cfg.cross_attention_dim)), device=p.device, dtype=p.dtype),
        )
    vp = next(vae.parameters())
    for c in decodes:
        vae.decode(torch.zeros((c, latent_ch, sample_size, sample_size), device=vp.device, dtype=vp.dtype))


def ensure_warm(
    models: Any,
    batch: int,
    *,
    decode_chunk: Optional[int] = None,
    encode_batch: Optional[int] = None,
    tokens: int = 50,
    timestep: Optional[torch.Tensor] = None,
) -> float:
    """``warmup`` at ``batch`` (plus the batches already compiled) and the encoder at
    ``encode_batch`` images per call, unless they are compiled already: the call the engine makes
    before a job's GPU work. 0 when compiling is off or warm."""
    state, vae_state = _state(models.unet), _state(models.vae)
    if state is None or not state.active or vae_state is None:
        return 0.0
    enc_ok = encode_batch is None or vae_state.mode != "regional" or int(encode_batch) in (vae_state.encode_batches or set())
    dec_ok = vae_state.batches is not None and set(decode_chunk_sizes(batch, decode_chunk)) <= vae_state.batches
    if state.batches is not None and batch in state.batches and enc_ok and dec_ok:
        return 0.0
    return warmup(
        models, sorted((state.batches or set()) | {int(batch)}), decode_chunk=decode_chunk,
        encode_batches=[] if encode_batch is None else [int(encode_batch)], tokens=tokens, timestep=timestep,
    )
