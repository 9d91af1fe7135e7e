"""Nearest-neighbour ×2 upsampling followed by a 3×3 convolution, computed as one folded convolution.

diffusers' ``Upsample2D`` (three in the VAE decoder, three in the UNet's up blocks) repeats every
pixel 2×2 and then convolves the doubled map 3×3. An output pixel of phase ``(a, b)`` (its row and
column parity) then reads only a 2×2 window of the *input*, with weights that are sums of the 3×3
kernel's rows and columns: along one axis, phase 0 reads rows ``i-1, i`` with ``w0`` and ``w1+w2``,
phase 1 reads rows ``i, i+1`` with ``w0+w1`` and ``w2``. So the pair is the same linear map as

- ``"transpose"``: one ``conv_transpose2d`` (kernel 4, stride 2, padding 1) whose 4-tap kernel is
  ``[w2, w1+w2, w0+w1, w0]`` per axis; or
- ``"phases"``: one 2×2 convolution of the input (padded by 1) with four times the output channels,
  one group per phase, whose outputs are interleaved into the doubled map.

Either does 16/36 of the multiply-adds of the original, and never writes the doubled input. The
function is the same; only rounding differs: the folded weights are summed in fp32 and rounded once
to the model's dtype, so fp16 results differ from the unfolded ones at fp16 rounding level.

``fold(model, mode)`` patches every foldable ``Upsample2D`` of a model (instance ``forward``; the
state dict and the module tree are unchanged) and returns how many it folded; ``unfold(model)``
restores them. The folded weights are computed from the module's weights when folded: fold after
loading the weights and moving the model to its device and dtype.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("transpose", "phases")

_FOLD_ATTR = "_musetalk_folded_upsample"
_CACHE_ATTR = "_musetalk_folded_weights"

# Per axis: rows of the 3×3 kernel summed into each tap of the folded kernels (see the docstring).
_TRANSPOSE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))  # kernel taps 0..3 of conv_transpose2d
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))  # phase 0 / 1: taps 0..1 of the 2×2 conv


def foldable(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``Upsample2D`` that repeats ×2 and convolves 3×3 (stride 1,
    padding 1, one group, no norm): the case the fold computes."""
    if type(module).__name__ != "Upsample2D":
        return False
    conv = _conv(module)
    return (
        bool(getattr(module, "use_conv", False))
        and not getattr(module, "use_conv_transpose", False)
        and bool(getattr(module, "interpolate", True))
        and getattr(module, "norm", None) is None
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _conv(module: nn.Module) -> Any:
    """The ``Upsample2D``'s convolution (diffusers names it ``conv`` or, legacy, ``Conv2d_0``; None without one)."""
    return getattr(module, "conv" if getattr(module, "name", "conv") == "conv" else "Conv2d_0", None)


def folded_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The folded kernel of a 3×3 conv weight ``[O, I, 3, 3]``, summed in fp32, in ``weight``'s dtype:
    ``"transpose"`` → ``[I, O, 4, 4]`` (conv_transpose2d's layout); ``"phases"`` → ``[4·O, I, 2, 2]``
    (phase ``2a + b`` in channels ``[(2a+b)·O, (2a+b+1)·O)``)."""
    if mode not in MODES:
        raise ValueError(f"fold mode must be one of {', '.join(MODES)}, got {mode!r}")
    w = weight.detach().float()
    if mode == "transpose":
        m = torch.tensor(_TRANSPOSE_TAPS, dtype=torch.float32, device=w.device)  # [4, 3]
        k = torch.einsum("yp,xq,oipq->ioyx", m, m, w)
    else:
        m = torch.tensor(_PHASE_TAPS, dtype=torch.float32, device=w.device)  # [2 phases, 2 taps, 3]
        k = torch.einsum("ayp,bxq,oipq->aboiyx", m, m, w).reshape(4 * w.shape[0], w.shape[1], 2, 2)
    return k.to(weight.dtype).contiguous(memory_format=_format_of(weight))


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else torch.contiguous_format


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """``conv3x3(repeat2x(x))`` from the folded ``weight`` (``folded_weight``) and the conv's bias."""
    if mode == "transpose":
        return F.conv_transpose2d(x, weight, bias, stride=2, padding=1)
    n, _, h, w = x.shape
    o = weight.shape[0] // 4
    y = F.conv2d(x, weight, None if bias is None else bias.repeat(4), padding=1)  # [N, 4·O, h+1, w+1]
    # Phase (a, b) of output pixel (2i+a, 2j+b) is y[:, (2a+b)·O:, i+a, j+b].
    phases = torch.stack(
        [torch.stack([y[:, (2 * a + b) * o : (2 * a + b + 1) * o, a : a + h, b : b + w] for b in (0, 1)], dim=-1) for a in (0, 1)],
        dim=3,
    )  # [N, O, h, 2, w, 2]
    return phases.reshape(n, o, 2 * h, 2 * w)


def _folded_forward(self: nn.Module, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    if output_size is not None and tuple(output_size) != (2 * hidden_states.shape[-2], 2 * hidden_states.shape[-1]):
        return type(self).forward(self, hidden_states, output_size, *args, **kwargs)
    state = self.__dict__[_FOLD_ATTR]
    return upsample_conv(hidden_states, state["weight"], _conv(self).bias, state["mode"])


def _cached_weight(module: nn.Module, mode: str) -> torch.Tensor:
    # Folding again in a mode reuses its tensor while the conv weight is the same storage: CUDA
    # graphs captured with the folded model read that tensor's memory, so it must stay alive.
    w = _conv(module).weight
    key = (mode, w.data_ptr(), tuple(w.stride()), w.dtype, w.device)
    cache = module.__dict__.setdefault(_CACHE_ATTR, {})
    if key not in cache:
        if any(k[1:] != key[1:] for k in cache):  # new conv weights: the old folds are stale
            cache.clear()
        cache[key] = folded_weight(w, mode)
    return cache[key]


def fold(model: nn.Module, mode: str = "transpose") -> int:
    """Fold every foldable ``Upsample2D`` in ``model``; returns how many. The folded weights are
    computed from the conv weights as they are now (reused while those are unchanged)."""
    if mode not in MODES:
        raise ValueError(f"fold mode must be one of {', '.join(MODES)}, got {mode!r}")
    count = 0
    for module in model.modules():
        if foldable(module):
            module.__dict__[_FOLD_ATTR] = {"mode": mode, "weight": _cached_weight(module, mode)}
            module.forward = types.MethodType(_folded_forward, module)
            count += 1
    return count


def unfold(model: nn.Module) -> int:
    """Undo ``fold``: the modules compute with diffusers' own forward again; returns how many."""
    count = 0
    for module in model.modules():
        if module.__dict__.pop(_FOLD_ATTR, None) is not None:
            module.__dict__.pop("forward", None)
            count += 1
    return count


def folded_count(model: nn.Module) -> int:
    """How many of ``model``'s upsamplers are folded now."""
    return sum(1 for m in model.modules() if _FOLD_ATTR in m.__dict__)
