"""The folded upsamplers (``musetalk_job.models.upsample``) compute diffusers' ``Upsample2D``.

CPU: both folds against the module itself in fp32 on odd shapes, every upsampler of the tiny UNet
and VAE, undo, and the cases it must leave alone. CUDA (``cuda``-marked, on the device): the
full-size shapes in fp16 within fp16 rounding.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from musetalk_job.models import upsample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _module(cin: int, cout: int, seed: int = 0, **kw: object) -> Upsample2D:
    torch.manual_seed(seed)
    return Upsample2D(cin, use_conv=True, out_channels=cout, **kw).eval()


@pytest.mark.parametrize("mode", upsample.MODES)
@pytest.mark.parametrize("cin, cout, h, w", [(8, 8, 7, 9), (6, 5, 1, 1), (4, 12, 16, 3)])
def test_fold_computes_the_module_in_fp32(mode: str, cin: int, cout: int, h: int, w: int) -> None:
    m = _module(cin, cout)
    x = torch.randn(3, cin, h, w)
    with torch.no_grad():
        ref = m(x)
        assert upsample.fold(m, mode) == 1
        out = m(x)
    assert out.shape == ref.shape == (3, cout, 2 * h, 2 * w)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    # Not the identity by accident: the folded path differs from the nearest-neighbour map alone.
    assert (out - torch.nn.functional.interpolate(x, scale_factor=2.0)[:, :1]).abs().max() > 0.1


def test_folded_weight_layouts_and_taps() -> None:
    w = torch.randn(5, 3, 3, 3, dtype=torch.float16)
    t = upsample.folded_weight(w, "transpose")
    p = upsample.folded_weight(w, "phases")
    assert t.shape == (3, 5, 4, 4) and t.dtype == torch.float16
    assert p.shape == (20, 3, 2, 2) and p.dtype == torch.float16
    wf = w.float()
    # Corner taps are single weights; the middle ones sums of two rows and two columns.
    torch.testing.assert_close(t[:, :, 0, 0].float(), wf[:, :, 2, 2].T)
    torch.testing.assert_close(t[:, :, 3, 3].float(), wf[:, :, 0, 0].T)
    expect = (wf[:, :, 1, 1] + wf[:, :, 1, 2] + wf[:, :, 2, 1] + wf[:, :, 2, 2]).half()
    torch.testing.assert_close(t[:, :, 1, 1], expect.T)
    # Phase (0, 0) reads rows/cols (i-1, i) with w0 and w1 + w2.
    torch.testing.assert_close(p[:5, :, 0, 0].float(), wf[:, :, 0, 0])
    with pytest.raises(ValueError, match="fold mode"):
        upsample.folded_weight(w, "sideways")


def test_fold_and_unfold_every_upsampler_of_the_tiny_models(tiny_models_dir) -> None:
    from musetalk_job.latents import decode_latents
    from musetalk_job.models.loading import MuseTalkModels

    models = MuseTalkModels.load(tiny_models_dir, version="v15", device=torch.device("cpu"), dtype=torch.float32)
    unet, vae = models.unet, models.vae
    n_unet = sum(map(upsample.foldable, unet.modules()))
    n_vae = sum(map(upsample.foldable, vae.modules()))
    assert n_unet >= 1 and n_vae >= 1
    torch.manual_seed(1)
    lat, cond = torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384)
    t0 = torch.zeros(1, dtype=torch.long)
    keys = set(unet.state_dict()) | {f"vae.{k}" for k in vae.state_dict()}
    with torch.inference_mode():
        ref_pred = unet(lat, t0, encoder_hidden_states=cond).sample
        ref_faces = decode_latents(vae, ref_pred)
        assert upsample.fold(unet) == n_unet and upsample.fold(vae, "phases") == n_vae
        assert upsample.folded_count(unet) == n_unet
        pred = unet(lat, t0, encoder_hidden_states=cond).sample
        faces = decode_latents(vae, pred)
        torch.testing.assert_close(pred, ref_pred, rtol=0, atol=1e-4)
        assert (faces.int() - ref_faces.int()).abs().max() <= 1  # uint8 rounding of fp32 noise
        assert set(unet.state_dict()) | {f"vae.{k}" for k in vae.state_dict()} == keys  # state dicts untouched
        assert upsample.unfold(unet) == n_unet and upsample.unfold(vae) == n_vae
        assert upsample.folded_count(unet) == 0
        assert torch.equal(unet(lat, t0, encoder_hidden_states=cond).sample, ref_pred)


def test_the_pipeline_switch(tiny_models_dir) -> None:
    from musetalk_job.errors import SpecError
    from musetalk_job.pipeline import Pipeline

    pipe = Pipeline.from_models_dir(tiny_models_dir, device="cpu")
    assert pipe.fold_upsampling is None  # CPU: diffusers' own, as the reference path
    assert upsample.folded_count(pipe.models.vae) == 0
    torch.manual_seed(2)
    lat, cond = torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384)
    with torch.inference_mode():
        ref = pipe.face_step(lat, cond)
        pipe.fold_upsampling = "phases"
        assert upsample.folded_count(pipe.models.unet) >= 1 and upsample.folded_count(pipe.models.vae) >= 1
        assert (pipe.face_step(lat, cond).int() - ref.int()).abs().max() <= 1
        pipe.use_channels_last(True)  # the folded weights follow the conv weights' layout
        w = next(u for u in pipe.models.vae.modules() if "_musetalk_folded_upsample" in u.__dict__)
        assert w.__dict__["_musetalk_folded_upsample"]["weight"].is_contiguous(memory_format=torch.channels_last)
        assert (pipe.face_step(lat, cond).int() - ref.int()).abs().max() <= 1
        pipe.use_channels_last(False)
        pipe.fold_upsampling = "off"
        assert pipe.fold_upsampling is None and upsample.folded_count(pipe.models.vae) == 0
        assert torch.equal(pipe.face_step(lat, cond), ref)
    with pytest.raises(SpecError, match="fold_upsampling must be one of transpose, phases"):
        pipe.fold_upsampling = "sideways"
    # "auto": phases eager, transpose once compiled (picked up at the next job's warm-up).
    from musetalk_job import compiled

    pipe.fold_upsampling = "auto"
    assert pipe.fold_upsampling == "auto" and pipe._fold_upsampling == "phases"
    try:
        assert compiled.enable(pipe.models, "regional", backend="eager")
        pipe._ensure_compiled(2, encoder=False)
        assert pipe._fold_upsampling == "transpose"
        assert compiled._state(pipe.models.unet).batches == {2}  # compiled with the fold, then frozen
        with torch.inference_mode():
            assert (pipe.face_step(lat, cond).int() - ref.int()).abs().max() <= 1
    finally:
        compiled.disable(pipe.models)
        torch._dynamo.reset()
    pipe._ensure_compiled(2, encoder=False)
    assert pipe._fold_upsampling == "phases"


def test_not_foldable_left_alone() -> None:
    assert not upsample.foldable(Upsample2D(4, use_conv=False))
    assert not upsample.foldable(Upsample2D(4, use_conv_transpose=True))
    assert not upsample.foldable(Upsample2D(4, use_conv=True, kernel_size=5, padding=2))
    assert not upsample.foldable(Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True))
    assert not upsample.foldable(torch.nn.Conv2d(4, 4, 3, padding=1))
    model = torch.nn.Sequential(Upsample2D(4, use_conv=False), Upsample2D(4, use_conv=True))
    assert upsample.fold(model) == 1


def test_an_explicit_output_size_other_than_double_uses_the_module_itself() -> None:
    m = _module(4, 4)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        ref = m(x, output_size=(11, 9))
        upsample.fold(m)
        torch.testing.assert_close(m(x, output_size=(11, 9)), ref, rtol=0, atol=0)
        torch.testing.assert_close(m(x, output_size=(10, 10)), m(x), rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("mode", upsample.MODES)
@pytest.mark.parametrize("c, hw, batch", [(1280, 8, 16), (640, 16, 16), (512, 32, 8), (512, 64, 4), (256, 128, 2)])
def test_fold_in_fp16_on_cuda_is_within_fp16_rounding(mode: str, c: int, hw: int, batch: int) -> None:
    m = _module(c, c).cuda().half()
    x = torch.randn(batch, c, hw, hw, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        ref32 = Upsample2D(c, use_conv=True).cuda().eval()
        ref32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        exact = ref32(x.float())
        base = m(x).float()
        upsample.fold(m, mode)
        out = m(x).float()
    scale = exact.abs().max().item()
    # The folded result is as close to the fp32 truth as diffusers' own fp16 path, up to fp16 rounding.
    err_base = (base - exact).abs().max().item()
    err_fold = (out - exact).abs().max().item()
    assert err_fold <= 2 * err_base + 2e-3 * scale, (err_fold, err_base, scale)
