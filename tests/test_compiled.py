"""The opt-in torch.compile fast path (``musetalk_job.compiled``) on the tiny random models, CPU.

Fast tests trace with dynamo for real and use its ``eager`` backend (no code generation) for the
wrapper mechanics: shape freezing and padding, lazy-failure fallback, restore. One test compiles
the tiny UNet + VAE decoder with inductor (needs a C++ compiler; ~60 s on 2 cores) and compares
with eager at fp32 tolerance; regional inductor compilation (~75 s) runs only with
``MUSETALK_TEST_COMPILE_SLOW=1``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from musetalk_job import compiled
from musetalk_job.errors import SpecError
from musetalk_job.latents import decode_latents
from musetalk_job.models.loading import MuseTalkModels

SLOW = os.environ.get("MUSETALK_TEST_COMPILE_SLOW") == "1"


@pytest.fixture()
def models(tiny_models_dir: Path) -> Iterator[Any]:
    m = MuseTalkModels.load(tiny_models_dir, version="v15", device="cpu", dtype=torch.float32)
    yield m
    compiled.disable(m)
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Compile artefacts of the tests go to a temp dir, never to the user's cache.
    monkeypatch.setenv(compiled.ENV_COMPILE_CACHE, str(tmp_path / "inductor"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "x")))


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 8, 32, 32), generator=g), torch.randn((n, 50, 384), generator=g), torch.zeros(1, dtype=torch.long)


@torch.inference_mode()
def _hot(m: Any, lat: torch.Tensor, cond: torch.Tensor, ts: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    pred = m.unet(lat, ts, encoder_hidden_states=cond).sample
    return pred, decode_latents(m.vae, pred, chunk)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------ configuration


def test_mode_from_env_values() -> None:
    for off in ("", "0", "false", "OFF", "no"):
        assert compiled.mode_from_env({compiled.ENV_COMPILE: off}) is None
    assert compiled.mode_from_env({}) is None
    for on in ("1", "true", "yes", "on", "regional", "Regional"):
        assert compiled.mode_from_env({compiled.ENV_COMPILE: on}) == "regional"
    assert compiled.mode_from_env({compiled.ENV_COMPILE: "full"}) == "full"
    with pytest.raises(SpecError, match=compiled.ENV_COMPILE):
        compiled.mode_from_env({compiled.ENV_COMPILE: "fast"})
    assert compiled.inductor_mode_from_env({}) == "default"
    with pytest.raises(SpecError, match=compiled.ENV_COMPILE_MODE):
        compiled.inductor_mode_from_env({compiled.ENV_COMPILE_MODE: "turbo"})


def test_cache_dir_and_configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert compiled.cache_dir({}) == Path("~/.cache/musetalk-job/inductor").expanduser()
    assert compiled.cache_dir({compiled.ENV_COMPILE_CACHE: str(tmp_path / "c")}) == tmp_path / "c"
    used = compiled.configure_cache()
    assert used == (tmp_path / "inductor").resolve() and used.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(used)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(used)  # what inductor itself will use


def test_decode_chunk_sizes_follow_decode_latents() -> None:
    assert compiled.decode_chunk_sizes(64, 16) == [16]
    assert compiled.decode_chunk_sizes(40, 16) == [8, 16]
    assert compiled.decode_chunk_sizes(8, 16) == [8]
    assert compiled.decode_chunk_sizes(8, None) == [8]


def test_env_off_leaves_models_eager(models: Any) -> None:
    assert compiled.maybe_enable_from_env(models, {compiled.ENV_COMPILE: "0"}) is False
    assert "forward" not in models.unet.__dict__ and "decode" not in models.vae.__dict__
    assert not compiled.is_enabled(models)


def test_no_cpu_compiler_falls_back_with_one_warning(
    models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++/c++/clang++ reachable
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in (compiled.compiler_problem("cpu") or "")
    with caplog.at_level(logging.WARNING, logger="musetalk_job.compiled"):
        assert compiled.maybe_enable_from_env(models, {compiled.ENV_COMPILE: "1"}) is False
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert not compiled.is_enabled(models) and "forward" not in models.unet.__dict__


# ------------------------------------------------------------------ mechanics (dynamo, eager backend)


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_frozen_shapes_pad_or_run_eagerly(models: Any, mode: str) -> None:
    lat, cond, ts = _inputs(6)
    ref_pred, ref_faces = _hot(models, lat, cond, ts, chunk=2)
    ref3 = _hot(models, lat[:3], cond[:3], ts, chunk=2)
    assert compiled.enable(models, mode, backend="eager")
    assert compiled.is_enabled(models)
    if mode == "regional":
        blocks = compiled._state(models.unet).compiled_modules + compiled._state(models.vae).compiled_modules
        assert {type(b).__name__ for b in blocks} >= {"ResnetBlock2D", "Transformer2DModel", "Attention", "Upsample2D"}
    compiled.ensure_warm(models, 4, decode_chunk=2)
    assert compiled._state(models.unet).batches == {4} and compiled._state(models.vae).batches == {2}
    graphs = _graphs()
    assert compiled.ensure_warm(models, 4, decode_chunk=2) == 0.0  # already warm: nothing runs
    assert graphs > 0
    # Batch 3 is padded to the compiled 4 (UNet) and its decoder chunks (2, then 1 → 2).
    pred3, faces3 = _hot(models, lat[:3], cond[:3], ts, chunk=2)
    torch.testing.assert_close(pred3, ref3[0], rtol=1e-5, atol=1e-5)
    assert (faces3.int() - ref3[1].int()).abs().max() <= 1
    # Batch 6: larger than anything compiled → eager, no compile in the hot loop.
    pred6, faces6 = _hot(models, lat, cond, ts, chunk=2)
    torch.testing.assert_close(pred6, ref_pred, rtol=1e-5, atol=1e-5)
    assert (faces6.int() - ref_faces.int()).abs().max() <= 1
    assert _graphs() == graphs, "a frozen model compiled a new shape"
    # Same shape, but grad mode on and non-inference inputs: guards fail → eager, no new graph.
    with torch.no_grad():
        pred4 = models.unet(lat[:4], ts, encoder_hidden_states=cond[:4]).sample
    torch.testing.assert_close(pred4, ref_pred[:4], rtol=1e-5, atol=1e-5)
    assert _graphs() == graphs, "a frozen model recompiled for another guard"
    assert compiled.is_enabled(models)
    compiled.disable(models)
    assert "forward" not in models.unet.__dict__ and "decode" not in models.vae.__dict__
    assert all(getattr(mod, "_compiled_call_impl", None) is None for mod in models.unet.modules())
    assert all(getattr(mod, "_compiled_call_impl", None) is None for mod in models.vae.modules())


def test_a_new_decode_chunk_is_warmed_and_the_old_one_kept(models: Any) -> None:
    """``Pipeline.gpu_chunk`` changes the decoder's call size: ``ensure_warm`` at a batch already
    compiled still compiles the new chunk (not run eagerly or padded), keeping the chunk before."""
    lat, cond, ts = _inputs(4)
    ref = _hot(models, lat, cond, ts, chunk=4)[1]
    assert compiled.enable(models, "regional", backend="eager")
    compiled.ensure_warm(models, 4, decode_chunk=2)
    assert compiled._state(models.vae).batches == {2}
    assert compiled.ensure_warm(models, 4, decode_chunk=4) > 0  # the UNet's batch is warm, the chunk is not
    assert compiled._state(models.vae).batches == {2, 4} and compiled._state(models.unet).batches == {4}
    graphs = _graphs()
    assert compiled.ensure_warm(models, 4, decode_chunk=4) == 0.0 and compiled.ensure_warm(models, 4, decode_chunk=2) == 0.0
    assert (_hot(models, lat, cond, ts, chunk=4)[1].int() - ref.int()).abs().max() <= 1
    assert _graphs() == graphs, "a warmed chunk compiled again"


def test_a_new_code_variant_thaws_once_and_switching_back_compiles_nothing(models: Any) -> None:
    """The upsamplers' fold changes the compiled regions' code: its first use thaws the frozen
    shapes (compiled at the next ensure_warm, not run eagerly); switching back and forth later hits
    dynamo's cache: no thaw, no new graph."""
    from musetalk_job.models import upsample

    lat, cond, ts = _inputs(2)
    ref = _hot(models, lat, cond, ts)[1]
    assert compiled.enable(models, "regional", backend="eager")
    compiled.ensure_warm(models, 2)
    assert compiled.first_variant(models, ("fold", "transpose")) is True
    assert compiled.first_variant(models, ("fold", "transpose")) is False
    upsample.fold(models.unet), upsample.fold(models.vae)
    compiled.thaw(models)
    assert compiled._state(models.unet).batches is None and compiled._state(models.vae).batches is None
    before = _graphs()
    assert compiled.ensure_warm(models, 2) > 0
    assert _graphs() > before, "the folded upsamplers were not compiled"
    folded = _hot(models, lat, cond, ts)[1]
    assert (folded.int() - ref.int()).abs().max() <= 1
    upsample.unfold(models.unet), upsample.unfold(models.vae)
    settled = _graphs()
    assert torch.equal(_hot(models, lat, cond, ts)[1], _hot(models, lat, cond, ts)[1])
    upsample.fold(models.unet), upsample.fold(models.vae)
    assert torch.equal(_hot(models, lat, cond, ts)[1], folded)
    assert _graphs() == settled, "switching between compiled variants compiled again"
    compiled.disable(models)
    assert compiled.first_variant(models, ("fold", "transpose")) is False  # no compile state: nothing to thaw


def test_regional_encoder_frozen_shapes_pad_or_run_eagerly(models: Any) -> None:
    from musetalk_job.latents import encode_faces

    g = torch.Generator().manual_seed(3)
    crops = torch.randint(0, 256, (5, 256, 256, 3), generator=g, dtype=torch.uint8)
    ref2 = encode_faces(models.vae, crops[:2], 2)  # one call of 4 images (masked + full)
    ref1 = encode_faces(models.vae, crops[:1], 1)
    ref5 = encode_faces(models.vae, crops, 5)
    assert compiled.enable(models, "regional", backend="eager")
    enc_blocks = [b for b in compiled._state(models.vae).compiled_modules if any(b is m for m in models.vae.encoder.modules())]
    assert {type(b).__name__ for b in enc_blocks} >= {"ResnetBlock2D", "Downsample2D"}
    compiled.ensure_warm(models, 4, decode_chunk=2, encode_batch=4)
    assert compiled._state(models.vae).encode_batches == {4}
    graphs = _graphs()
    assert compiled.ensure_warm(models, 4, decode_chunk=2, encode_batch=4) == 0.0
    torch.testing.assert_close(encode_faces(models.vae, crops[:2], 2), ref2, rtol=1e-5, atol=1e-5)
    # 2 images padded to the compiled 4, the padding sliced off again.
    torch.testing.assert_close(encode_faces(models.vae, crops[:1], 1), ref1, rtol=1e-5, atol=1e-5)
    # 10 images: larger than anything compiled → eager.
    torch.testing.assert_close(encode_faces(models.vae, crops, 5), ref5, rtol=1e-5, atol=1e-5)
    assert _graphs() == graphs, "a frozen encoder compiled a new shape"
    # A new encode batch warms that shape (and keeps the old one).
    compiled.ensure_warm(models, 4, decode_chunk=2, encode_batch=10)
    assert compiled._state(models.vae).encode_batches == {4, 10}
    torch.testing.assert_close(encode_faces(models.vae, crops, 5), ref5, rtol=1e-5, atol=1e-5)
    compiled.disable(models)
    assert "encode" not in models.vae.__dict__


def test_lazy_compile_failure_reruns_eagerly_with_one_warning(models: Any, caplog: pytest.LogCaptureFixture) -> None:
    def broken_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        raise RuntimeError("simulated inductor failure")

    lat, cond, ts = _inputs(2)
    ref_pred, ref_faces = _hot(models, lat, cond, ts)
    assert compiled.enable(models, "full", backend=broken_backend)  # compilation is lazy: enable succeeds
    with caplog.at_level(logging.WARNING, logger="musetalk_job.compiled"):
        pred, faces = _hot(models, lat, cond, ts)
        pred2, _ = _hot(models, lat, cond, ts)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "simulated inductor failure" in warnings[0].getMessage()
    torch.testing.assert_close(pred, ref_pred, rtol=0, atol=0)
    torch.testing.assert_close(pred2, ref_pred, rtol=0, atol=0)
    assert torch.equal(faces, ref_faces)
    assert not compiled.is_enabled(models)  # both models back to eager
    assert "forward" not in models.unet.__dict__ and "decode" not in models.vae.__dict__
    assert "simulated inductor failure" in (compiled.failure(models) or "")


# ------------------------------------------------------------------------------ inductor, real


def _need_compiler() -> None:
    problem = compiled.compiler_problem("cpu")
    if problem:
        pytest.skip(f"inductor cannot compile on this machine: {problem}")


@pytest.mark.parametrize(
    "mode",
    ["full", pytest.param("regional", marks=pytest.mark.skipif(not SLOW, reason="~75 s on 2 cores; MUSETALK_TEST_COMPILE_SLOW=1"))],
)
def test_inductor_matches_eager_fp32(models: Any, mode: str) -> None:
    _need_compiler()
    lat, cond, ts = _inputs(2, seed=1)
    ref_pred, ref_faces = _hot(models, lat, cond, ts)
    with torch.inference_mode():
        ref_img = models.vae.decode(ref_pred).sample
    assert compiled.enable(models, mode)
    compiled.warmup(models, [2])
    pred, faces = _hot(models, lat, cond, ts)
    with torch.inference_mode():
        img = models.vae.decode(ref_pred).sample
    assert compiled.is_enabled(models), compiled.failure(models)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-4)
    assert (faces.int() - ref_faces.int()).abs().max() <= 1  # rounding at .5 boundaries only
