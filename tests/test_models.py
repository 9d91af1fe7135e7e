"""models.loading / models.bisenet / models.random_weights: tiny random weights in the official
layout load through the real loader; every file variant the official downloads may have loads;
broken files fail with ModelsError (exit 5) naming the file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from musetalk_job.errors import EXIT_MODELS, ModelsError
from musetalk_job.models import layout
from musetalk_job.models.bisenet import BiSeNet
from musetalk_job.models.loading import MuseTalkModels, convert_legacy_vae_keys
from musetalk_job.models.random_weights import (
    UNET_FULL,
    VAE_FULL,
    WHISPER_FULL,
    write_bisenet,
    write_random_weights,
    write_unet,
)


def _load(models_dir: Path, version: str = "v15", **kw) -> MuseTalkModels:
    return MuseTalkModels.load(models_dir, version=version, device=torch.device("cpu"), dtype=kw.pop("dtype", torch.float32), **kw)


def _sd(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def models_copy(tiny_models_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "models"
    shutil.copytree(tiny_models_dir, dest, ignore=shutil.ignore_patterns("dwpose"))
    return dest


@pytest.fixture(scope="module", autouse=True)
def _no_user_warm_manifest():
    """Loads here neither read nor write ~/.cache/musetalk-job/warm-files.json."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUSETALK_WARM_MANIFEST", "0")
        yield


@pytest.fixture(scope="module")
def v15(tiny_models_dir: Path) -> MuseTalkModels:
    return _load(tiny_models_dir, "v15")


# --------------------------------------------------------------------------------------------
# Loading the random models dir


def test_tiny_v15_loads_with_the_documented_attributes(v15: MuseTalkModels, tiny_models_dir: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    assert isinstance(v15.unet, UNet2DConditionModel)
    assert isinstance(v15.vae, AutoencoderKL)
    assert isinstance(v15.whisper, WhisperEncoder)
    assert isinstance(v15.feature_extractor, WhisperFeatureExtractor)
    assert isinstance(v15.bisenet, BiSeNet)
    assert v15.version == "v15" and v15.device == torch.device("cpu") and v15.dtype == torch.float32
    assert 0 < v15.load_seconds < 60
    assert v15.vae_scaling_factor == pytest.approx(0.18215)
    for module in (v15.unet, v15.vae, v15.whisper, v15.bisenet):
        assert not module.training
        tensors = list(module.parameters()) + list(module.buffers())
        assert all(not p.requires_grad for p in module.parameters())
        assert all(t.device.type == "cpu" and not t.is_meta for t in tensors)
        assert all(t.dtype == torch.float32 for t in module.parameters())
    # the weights are the file's, not a fresh init
    on_disk = _sd(tiny_models_dir / layout.UNET["v15"][0])
    assert torch.equal(v15.unet.state_dict()["conv_in.weight"], on_disk["conv_in.weight"])
    assert v15.sources["unet"].path == tiny_models_dir / "musetalkV15/unet.pth" and not v15.sources["unet"].fast


def test_tiny_v1_loads_its_own_unet(tiny_models_dir: Path, v15: MuseTalkModels) -> None:
    v1 = _load(tiny_models_dir, "v1")
    assert v1.version == "v1"
    on_disk = _sd(tiny_models_dir / "musetalk/pytorch_model.bin")
    assert torch.equal(v1.unet.state_dict()["conv_in.weight"], on_disk["conv_in.weight"])
    assert not torch.equal(v1.unet.conv_in.weight, v15.unet.conv_in.weight)


def test_tiny_shapes_and_finite_chain(v15: MuseTalkModels) -> None:
    """256² RGB → 4×32×32 latents → UNet (8 in, 384-d audio tokens) → decode, all finite in fp32."""
    from musetalk_job.audio import positional_encoding

    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    with torch.inference_mode():
        z = v15.vae.encode(img).latent_dist.mean * v15.vae_scaling_factor
        assert z.shape == (2, 4, 32, 32)
        tokens = positional_encoding(torch.randn(2, 50, 384, generator=g))
        pred = v15.unet(torch.cat([z, z], 1), 0, encoder_hidden_states=tokens).sample
        assert pred.shape == (2, 4, 32, 32)
        out = v15.vae.decode(pred / v15.vae_scaling_factor).sample
        assert out.shape == (2, 3, 256, 256)
        parsing = v15.bisenet(torch.randn(1, 3, 128, 128, generator=g))
        assert parsing.shape == (1, 19, 128, 128)
    for t in (z, pred, out, parsing):
        assert torch.isfinite(t).all()
        assert t.std() > 1e-3  # not collapsed to a constant


def test_tiny_models_are_small(v15: MuseTalkModels) -> None:
    counts = {n: sum(p.numel() for p in getattr(v15, n).parameters()) for n in ("unet", "vae", "bisenet")}
    assert all(c < 1_500_000 for c in counts.values()), counts
    assert v15.whisper.config.d_model == 384 and len(v15.whisper.layers) == 4


def test_dtype_and_missing_dir(tiny_models_dir: Path, tmp_path: Path) -> None:
    m = _load(tiny_models_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.unet.parameters())
    assert all(p.dtype == torch.bfloat16 for p in m.whisper.parameters())
    with pytest.raises(ModelsError) as err:
        _load(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in err.value.message and "download-weights" in err.value.message


# --------------------------------------------------------------------------------------------
# Random-weights writer


def test_random_weights_deterministic_for_a_seed(tmp_path: Path) -> None:
    write_unet(tmp_path / "a", "v15", "tiny", seed=3)
    write_unet(tmp_path / "b", "v15", "tiny", seed=3)
    write_unet(tmp_path / "c", "v15", "tiny", seed=4)
    a, b, c = (_sd(tmp_path / x / "musetalkV15/unet.pth") for x in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])
    write_bisenet(tmp_path / "a", "tiny", seed=3)
    write_bisenet(tmp_path / "b", "tiny", seed=3)
    x, y = (_sd(tmp_path / d / layout.BISENET) for d in "ab")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_random_weights_layout_is_the_official_one(tiny_models_dir: Path) -> None:
    for rel in (
        "musetalkV15/unet.pth",
        "musetalkV15/musetalk.json",
        "musetalk/pytorch_model.bin",
        "musetalk/musetalk.json",
        "sd-vae/config.json",
        "sd-vae/diffusion_pytorch_model.bin",
        "whisper/config.json",
        "whisper/pytorch_model.bin",
        "whisper/preprocessor_config.json",
        "face-parse-bisent/79999_iter.pth",
    ):
        assert (tiny_models_dir / rel).is_file(), rel
    from musetalk_job.weights import is_random_weights_dir

    assert is_random_weights_dir(tiny_models_dir)
    import importlib.util

    if importlib.util.find_spec("musetalk_job.landmarks.dwpose") is not None:
        assert (tiny_models_dir / layout.DWPOSE_PTH).is_file()
    whisper = _sd(tiny_models_dir / "whisper/pytorch_model.bin")
    prefixes = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("model.") else "") for k in whisper}
    assert prefixes == {"model.encoder", "model.decoder", "proj_out"}
    import json

    pre = json.loads((tiny_models_dir / "whisper/preprocessor_config.json").read_text())
    assert pre["feature_size"] == 80 and pre["sampling_rate"] == 16000 and pre["n_samples"] == 480000
    assert pre["hop_length"] == 160 and pre["n_fft"] == 400


def test_version_v1_only_writes_v1(tmp_path: Path) -> None:
    write_random_weights(tmp_path, size="tiny", version="v1", dwpose=False)
    assert (tmp_path / "musetalk/pytorch_model.bin").is_file()
    assert not (tmp_path / "musetalkV15").exists()
    assert _load(tmp_path, "v1").version == "v1"
    with pytest.raises(ModelsError) as err:
        _load(tmp_path, "v15")
    assert "musetalkV15" in err.value.message


def test_full_size_configs_have_the_official_parameter_counts() -> None:
    """Instantiated on the meta device only (no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNET_FULL)
        vae = AutoencoderKL.from_config(VAE_FULL)
        whisper = WhisperForConditionalGeneration(WhisperConfig(**WHISPER_FULL))
        bisenet = BiSeNet(19, 64)
    assert sum(p.numel() for p in unet.parameters()) == 849_947_844
    assert len(unet.state_dict()) == 686
    assert unet.conv_in.weight.shape == (320, 8, 3, 3) and unet.conv_out.weight.shape == (4, 320, 3, 3)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # sd-vae-ft-mse
    assert sum(p.numel() for p in whisper.parameters()) == 37_760_640  # whisper-tiny
    # 79999_iter.pth is 53,289,463 bytes: fp32 tensors plus ~37 kB of zip/pickle overhead
    floats = sum(t.numel() for k, t in bisenet.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert 0 < 53_289_463 - 4 * floats < 60_000


# --------------------------------------------------------------------------------------------
# File variants: legacy VAE names, safetensors VAE, whisper without "model." prefix


def test_legacy_vae_keys_and_unprefixed_whisper_load_to_the_same_weights(tmp_path: Path, v15: MuseTalkModels) -> None:
    write_random_weights(tmp_path, size="tiny", version="v15", seed=0, dwpose=False, legacy_vae_keys=True, whisper_prefix="")
    vae_sd = _sd(tmp_path / "sd-vae/diffusion_pytorch_model.bin")
    assert "encoder.mid_block.attentions.0.query.weight" in vae_sd
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in vae_sd
    assert not any(".to_q." in k for k in vae_sd)
    whisper_sd = _sd(tmp_path / "whisper/pytorch_model.bin")
    assert "encoder.layers.0.fc1.weight" in whisper_sd and not any(k.startswith("model.") for k in whisper_sd)

    m = _load(tmp_path)
    ref_vae, ref_whisper = v15.vae.state_dict(), v15.whisper.state_dict()  # same seed, new names / prefix
    got_vae, got_whisper = m.vae.state_dict(), m.whisper.state_dict()
    assert got_vae.keys() == ref_vae.keys() and all(torch.equal(got_vae[k], ref_vae[k]) for k in ref_vae)
    assert got_whisper.keys() == ref_whisper.keys()
    assert all(torch.equal(got_whisper[k], ref_whisper[k]) for k in ref_whisper)


def test_legacy_vae_conv_attention_weights_are_squeezed() -> None:
    w = torch.randn(8, 8, 1, 1)
    out = convert_legacy_vae_keys({"encoder.mid_block.attentions.0.key.weight": w, "encoder.conv_in.weight": w})
    assert torch.equal(out["encoder.mid_block.attentions.0.to_k.weight"], w[:, :, 0, 0])
    assert out["encoder.conv_in.weight"] is w


def test_vae_safetensors_is_accepted(models_copy: Path, v15: MuseTalkModels) -> None:
    from safetensors.torch import save_file

    folder = models_copy / "sd-vae"
    save_file(v15.vae.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "diffusion_pytorch_model.bin").unlink()
    m = _load(models_copy)
    assert m.sources["vae"].path.name == "diffusion_pytorch_model.safetensors"
    assert torch.equal(m.vae.decoder.conv_out.weight, v15.vae.decoder.conv_out.weight)


# --------------------------------------------------------------------------------------------
# BiSeNet: the official key names


# Names as in zllrunning/face-parsing.PyTorch (model.py: BiSeNet/ContextPath/FeatureFusionModule/
# BiSeNetOutput/AttentionRefinementModule/ConvBNReLU; resnet.py: Resnet18/BasicBlock) with the
# official 79999_iter.pth shapes.
OFFICIAL_BISENET_SHAPES = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.bn1.running_var": (64,),
    "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "cp.resnet.layer1.1.bn2.weight": (64,),
    "cp.resnet.layer2.0.conv1.weight": (128, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_mean": (128,),
    "cp.resnet.layer3.1.conv2.weight": (256, 256, 3, 3),
    "cp.resnet.layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "cp.resnet.layer4.1.bn2.bias": (512,),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm16.conv.bn.weight": (128,),
    "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm16.bn_atten.running_var": (128,),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_head16.bn.bias": (128,),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.convblk.bn.running_mean": (256,),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv.bn.weight": (64,),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}


def official_bisenet_keys(with_counters: bool = True) -> list[str]:
    """Every key of the official checkpoint, enumerated from the public module structure."""
    bn = ["weight", "bias", "running_mean", "running_var"] + (["num_batches_tracked"] if with_counters else [])

    def cbr(prefix: str) -> list[str]:  # ConvBNReLU
        return [f"{prefix}.conv.weight"] + [f"{prefix}.bn.{s}" for s in bn]

    keys = ["cp.resnet.conv1.weight"] + [f"cp.resnet.bn1.{s}" for s in bn]
    for layer in (1, 2, 3, 4):
        for block in (0, 1):
            p = f"cp.resnet.layer{layer}.{block}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{s}" for s in bn), f"{p}.conv2.weight", *(f"{p}.bn2.{s}" for s in bn)]
            if block == 0 and layer > 1:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{s}" for s in bn)]
    for arm in ("cp.arm16", "cp.arm32"):
        keys += cbr(f"{arm}.conv") + [f"{arm}.conv_atten.weight"] + [f"{arm}.bn_atten.{s}" for s in bn]
    for name in ("cp.conv_head32", "cp.conv_head16", "cp.conv_avg"):
        keys += cbr(name)
    keys += cbr("ffm.convblk") + ["ffm.conv1.weight", "ffm.conv2.weight"]
    for head in ("conv_out", "conv_out16", "conv_out32"):
        keys += cbr(f"{head}.conv") + [f"{head}.conv_out.weight"]
    return keys


def test_bisenet_has_exactly_the_official_keys_and_shapes() -> None:
    with torch.device("meta"):
        sd = BiSeNet(19, 64).state_dict()
    assert sorted(sd) == sorted(official_bisenet_keys())
    for key, shape in OFFICIAL_BISENET_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key


@pytest.mark.parametrize("with_counters", [True, False], ids=["with-num_batches_tracked", "without"])
def test_official_named_bisenet_checkpoint_loads_strictly(models_copy: Path, with_counters: bool) -> None:
    """A full-width state dict built only from the official names (shapes from the public model)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BiSeNet(19, 64).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key in official_bisenet_keys(with_counters):
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(79999)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shapes[key], generator=g) + 0.5
        else:
            sd[key] = torch.randn(shapes[key], generator=g) * 0.05
    torch.save(sd, models_copy / layout.BISENET)
    m = _load(models_copy)
    assert m.bisenet.width == 64
    got = m.bisenet.state_dict()
    for key in OFFICIAL_BISENET_SHAPES:
        assert torch.equal(got[key], sd[key]), key
    with torch.inference_mode():
        out = m.bisenet(torch.randn(1, 3, 64, 64, generator=g))
    assert out.shape == (1, 19, 64, 64) and torch.isfinite(out).all()


def test_bisenet_main_head_is_bilinear_align_corners_of_the_fused_features(v15: MuseTalkModels) -> None:
    import torch.nn.functional as F

    net = v15.bisenet
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        f8, f16, f32 = net.cp.resnet(x)
        assert f8.shape[2:] == (12, 12) and f16.shape[2:] == (6, 6) and f32.shape[2:] == (3, 3)
        f8_again, fcp8 = net.cp(x)
        logits = net.conv_out(net.ffm(f8_again, fcp8))
        expected = F.interpolate(logits, size=(96, 96), mode="bilinear", align_corners=True)
        assert torch.allclose(net(x), expected)


# --------------------------------------------------------------------------------------------
# Broken files → ModelsError naming the file


def _expect_models_error(models_dir: Path, needle: str, version: str = "v15") -> ModelsError:
    with pytest.raises(ModelsError) as err:
        _load(models_dir, version)
    exc = err.value
    assert exc.exit_code == EXIT_MODELS == 5
    assert needle in exc.message, exc.message
    assert f"download-weights --models-dir {models_dir}" in exc.message
    assert exc.one_line().startswith("error[5]: ")
    return exc


def test_missing_unet_names_the_file(models_copy: Path) -> None:
    (models_copy / "musetalkV15/unet.pth").unlink()
    exc = _expect_models_error(models_copy, str(models_copy / "musetalkV15/unet.pth"))
    assert "missing" in exc.message


def test_truncated_unet_names_the_file(models_copy: Path) -> None:
    path = models_copy / "musetalkV15/unet.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    exc = _expect_models_error(models_copy, str(path))
    assert "corrupt" in exc.message


def test_garbage_bisenet_and_bad_json(models_copy: Path) -> None:
    (models_copy / layout.BISENET).write_bytes(b"\x00not a checkpoint" * 100)
    _expect_models_error(models_copy, str(models_copy / layout.BISENET))
    cfg = models_copy / "musetalkV15/musetalk.json"
    cfg.write_text("{ not json")
    _expect_models_error(models_copy, str(cfg))


def test_legacy_non_zip_checkpoint_loads(models_copy: Path, v15: MuseTalkModels) -> None:
    """Pre-1.6 torch files cannot be memory-mapped; they still load (weights_only)."""
    path = models_copy / layout.BISENET
    sd = _sd(path)
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    m = _load(models_copy)
    assert torch.equal(m.bisenet.cp.resnet.conv1.weight, v15.bisenet.cp.resnet.conv1.weight)


def test_pickled_code_is_refused(models_copy: Path) -> None:
    """weights_only: a checkpoint carrying an arbitrary object is refused, never executed."""
    path = models_copy / layout.BISENET
    torch.save({"x": torch.zeros(1), "evil": zipfile.ZipFile}, path)
    _expect_models_error(models_copy, str(path))


def test_mismatched_weights_name_the_file_and_the_keys(models_copy: Path) -> None:
    # the v1 config says 2 levels; give it a UNet whose conv_in has other shapes
    path = models_copy / "musetalk/pytorch_model.bin"
    sd = _sd(path)
    sd["conv_in.weight"] = torch.zeros(32, 4, 3, 3)
    del sd["conv_out.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    exc = _expect_models_error(models_copy, str(path), "v1")
    assert "conv_out.bias" in exc.message and "extra.weight" in exc.message and "conv_in.weight" in exc.message


def test_whisper_problems_name_the_file(models_copy: Path) -> None:
    folder = models_copy / "whisper"
    pre = folder / "preprocessor_config.json"
    pre_text = pre.read_text()
    pre.unlink()
    _expect_models_error(models_copy, str(pre))
    pre.write_text(pre_text)
    weights = folder / "pytorch_model.bin"
    sd = _sd(weights)
    torch.save({k: v for k, v in sd.items() if not k.startswith("model.encoder.")}, weights)
    exc = _expect_models_error(models_copy, str(weights))
    assert "encoder" in exc.message
    (models_copy / "sd-vae/diffusion_pytorch_model.bin").unlink()
    _expect_models_error(models_copy, "diffusion_pytorch_model")


# --------------------------------------------------------------------------------------------
# Fast copies (written by convert-weights)


def test_fast_copies_are_preferred(models_copy: Path, v15: MuseTalkModels) -> None:
    from musetalk_job.weights import convert_weights

    convert_weights(models_copy, version="v15", dtype="fp16")
    assert not _load(models_copy).sources["unet"].fast  # fp32 run: an fp16 copy would lose precision
    m = _load(models_copy, dtype=torch.float16)
    assert all(m.sources[n].fast for n in ("unet", "vae", "whisper", "bisenet")), m.sources
    assert m.sources["unet"].path == models_copy / layout.FAST["unet-v15"]
    assert m.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(m.unet.conv_in.weight, v15.unet.conv_in.weight.half())
    assert torch.equal(m.bisenet.conv_out.conv_out.weight, v15.bisenet.conv_out.conv_out.weight.half())
    assert torch.equal(m.whisper.layers[0].fc1.weight, v15.whisper.layers[0].fc1.weight.half())
    assert torch.equal(m.vae.decoder.conv_out.weight, v15.vae.decoder.conv_out.weight.half())
    bf16 = _load(models_copy, dtype=torch.bfloat16)  # an fp16 copy does not serve a bf16 run
    assert not bf16.sources["unet"].fast


def test_stale_or_broken_fast_copies_fall_back(models_copy: Path, v15: MuseTalkModels, caplog) -> None:
    from musetalk_job.weights import convert_weights

    convert_weights(models_copy, version="v15", dtype="fp16")
    original = models_copy / "musetalkV15/unet.pth"
    original.write_bytes(original.read_bytes())  # the original replaced after the conversion → stale copy
    os.utime(original, ns=(time.time_ns() + 10**9,) * 2)
    bise_fast = models_copy / layout.FAST["bisenet"]
    bise_fast.write_bytes(bise_fast.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        m = _load(models_copy, dtype=torch.float16)
    assert not m.sources["unet"].fast and not m.sources["bisenet"].fast
    assert m.sources["vae"].fast and m.sources["whisper"].fast
    assert torch.equal(m.unet.conv_in.weight, v15.unet.conv_in.weight.half())
    assert torch.equal(m.bisenet.conv_out.conv_out.weight, v15.bisenet.conv_out.conv_out.weight.half())
    assert str(models_copy / layout.FAST["unet-v15"]) in caplog.text and str(bise_fast) in caplog.text


def test_hand_made_fast_copy_without_record_is_ignored(models_copy: Path, v15: MuseTalkModels) -> None:
    from safetensors.torch import save_file

    path = models_copy / layout.FAST["bisenet"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros_like(v).half() for k, v in v15.bisenet.state_dict().items()}, str(path))
    m = _load(models_copy, dtype=torch.float16)
    assert not m.sources["bisenet"].fast
    assert torch.equal(m.bisenet.cp.resnet.conv1.weight, v15.bisenet.cp.resnet.conv1.weight.half())


def test_present_file_with_wrong_size_for_the_manifest_fails_fast(models_copy: Path) -> None:
    """Outside a random-weights dir, a file whose size disagrees with the weights manifest
    (a truncated download) is a ModelsError naming it, before anything is loaded."""
    from musetalk_job.weights import RANDOM_MARKER

    (models_copy / RANDOM_MARKER).unlink()
    exc = _expect_models_error(models_copy, "musetalkV15/unet.pth")
    assert exc.exit_code == 5 and "download-weights" in exc.message


# --------------------------------------------------------------------------------------------
# Cold start: the parallel reader (models.fastio), the parallel loader and its breakdown


def _reader(chunk: int = 1 << 16, workers: int = 4):
    from musetalk_job.models import fastio

    return fastio.Reader(workers=workers, chunk_bytes=chunk)


def test_parallel_reader_returns_the_exact_bytes(tiny_models_dir: Path) -> None:
    path = tiny_models_dir / layout.UNET["v15"][0]
    assert path.stat().st_size > 8 * (1 << 16)  # many chunks in flight
    reader = _reader()
    try:
        buf = reader.read(path).result(timeout=30)
        assert bytes(buf) == path.read_bytes()
        assert reader.warm(path).result(timeout=30) is None
    finally:
        reader.shutdown(wait=True)


def test_safetensors_from_the_parallel_read_match_the_library(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from musetalk_job.models import fastio

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(300, 257, generator=g),
        "f16": torch.randn(7, 3, 5, generator=g).half(),
        "bf16": torch.randn(1000, generator=g).bfloat16(),
        "i64": torch.arange(5),
        "u8": torch.arange(13, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    reader = _reader(chunk=1 << 16)
    try:
        got = fastio.safetensors_from_buffer(reader.read(path).result(timeout=30))
    finally:
        reader.shutdown(wait=True)
    ref = load_file(str(path))
    assert got.keys() == ref.keys() == tensors.keys()
    for key in ref:
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape, key
        assert torch.equal(got[key], ref[key]), key


def test_parallel_read_state_dict_matches_the_plain_loader(tiny_models_dir: Path, tmp_path: Path, v15: MuseTalkModels) -> None:
    """.pth / .bin (page cache warmed, then torch.load mmap) and .safetensors (from the buffer)."""
    from safetensors.torch import save_file

    from musetalk_job.models.loading import read_state_dict

    st = tmp_path / "vae.safetensors"
    save_file(v15.vae.state_dict(), str(st))
    reader = _reader()
    try:
        for path in (tiny_models_dir / layout.UNET["v15"][0], tiny_models_dir / "whisper/pytorch_model.bin",
                     tiny_models_dir / layout.BISENET, st):
            plain = read_state_dict(path, tiny_models_dir)
            handle = reader.read(path) if path.suffix == ".safetensors" else reader.warm(path)
            fast = read_state_dict(path, tiny_models_dir, handle=handle)
            assert fast.keys() == plain.keys(), path
            assert all(fast[k].dtype == plain[k].dtype and torch.equal(fast[k], plain[k]) for k in plain), path
    finally:
        reader.shutdown(wait=True)


def test_corrupt_or_truncated_files_in_a_parallel_read_name_the_file(tmp_path: Path, v15: MuseTalkModels) -> None:
    import json
    import struct
    import threading

    from safetensors.torch import save_file

    from musetalk_job.models.loading import read_state_dict

    good = tmp_path / "good.safetensors"
    save_file(v15.bisenet.state_dict(), str(good))
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    bad_offsets = dict(header)
    bad_offsets[name] = {**header[name], "data_offsets": [0, header[name]["data_offsets"][1] + 4]}
    blob = json.dumps(bad_offsets).encode()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "short.safetensors": data[:5],
        "garbage-header.safetensors": struct.pack("<Q", 16) + b"{not json at all" + data[24:],
        "bad-offsets.safetensors": struct.pack("<Q", len(blob)) + blob + data[8 + n :],
        "huge-header.safetensors": struct.pack("<Q", 1 << 40) + data[8:],
        "trailing-bytes.safetensors": data + b"\x00" * 16,
    }
    reader = _reader()
    try:
        for file_name, content in cases.items():
            path = tmp_path / file_name
            path.write_bytes(content)
            with pytest.raises(ModelsError) as err:
                read_state_dict(path, tmp_path, handle=reader.read(path))
            assert str(path) in err.value.message and "corrupt" in err.value.message, file_name
        # a torch zip truncated on disk: the warm read succeeds, torch.load fails, same error
        pth = tmp_path / "cut.pth"
        torch.save(v15.bisenet.state_dict(), pth)
        pth.write_bytes(pth.read_bytes()[:1000])
        with pytest.raises(ModelsError) as err:
            read_state_dict(pth, tmp_path, handle=reader.warm(pth))
        assert str(pth) in err.value.message and "corrupt" in err.value.message
    finally:
        reader.shutdown(wait=True)

    # a file that shrinks after the read started: the chunks hit its end → ShortReadError
    one = _reader(workers=1)
    gate = threading.Event()
    try:
        one._pool.submit(gate.wait)  # occupy the only worker until the file is cut
        handle = one.read(good)
        good.write_bytes(data[:100])
        gate.set()
        with pytest.raises(ModelsError) as err:
            read_state_dict(good, tmp_path, handle=handle)
        assert str(good) in err.value.message and "ShortReadError" in err.value.message
    finally:
        gate.set()
        one.shutdown(wait=True)


def _state_dicts(m: MuseTalkModels) -> dict[str, dict[str, torch.Tensor]]:
    return {n: getattr(m, n).state_dict() for n in ("unet", "vae", "whisper", "bisenet")}


def _assert_same_weights(a: MuseTalkModels, b: MuseTalkModels) -> None:
    sa, sb = _state_dicts(a), _state_dicts(b)
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        assert all(sa[name][k].dtype == sb[name][k].dtype and torch.equal(sa[name][k], sb[name][k]) for k in sa[name]), name


PARALLEL_KEYS = {"total", "check_sizes", "plan", "import_diffusers", "import_transformers", "feature_extractor"} | {
    f"{step}_{name}" for step in ("read", "wait_read", "parse", "build", "fill", "to_device")
    for name in ("unet", "vae", "whisper", "bisenet")
}


def test_parallel_and_serial_loads_agree_with_and_without_fast_copies(models_copy: Path) -> None:
    from musetalk_job.weights import convert_weights

    for dtype in (torch.float32, torch.float16):  # fp32: the originals; fp16 after convert: the fast copies
        if dtype == torch.float16:
            convert_weights(models_copy, version="v15", dtype="fp16")
        par = _load(models_copy, dtype=dtype, parallel=True)
        ser = _load(models_copy, dtype=dtype, parallel=False)
        fast = dtype == torch.float16
        assert all(par.sources[n].fast is fast and ser.sources[n].fast is fast for n in par.sources), (par.sources, dtype)
        assert {n: s.path for n, s in par.sources.items()} == {n: s.path for n, s in ser.sources.items()}
        _assert_same_weights(par, ser)
        assert PARALLEL_KEYS <= par.load_breakdown.keys(), PARALLEL_KEYS - par.load_breakdown.keys()
        assert {"total", "read_unet", "build_unet", "fill_unet", "to_device_unet", "import_diffusers"} <= ser.load_breakdown.keys()
        assert "wait_read_unet" not in ser.load_breakdown
        assert all(v >= 0 for v in par.load_breakdown.values())
        assert par.load_breakdown["total"] == pytest.approx(par.load_seconds, abs=1e-3)
        for key, (start, end) in par.load_timeline.items():
            assert 0 <= start <= end <= par.load_seconds + 1e-3, key
        assert "cuda_init" not in par.load_breakdown  # CPU: no CUDA thread
        for m in (par, ser):  # the import steps carry their thread's counters (CPU, faults, disk reads)
            assert "import_diffusers" in m.load_counters and "cuda_init" not in m.load_counters
            assert {"cpu_s", "majflt", "read_bytes", "syscr"} <= m.load_counters["import_diffusers"].keys()
            assert all(v >= 0 for c in m.load_counters.values() for v in c.values())


def test_broken_fast_copy_falls_back_in_the_parallel_loader(models_copy: Path, v15: MuseTalkModels, caplog) -> None:
    from musetalk_job.weights import convert_weights

    convert_weights(models_copy, version="v15", dtype="fp16")
    fast = models_copy / layout.FAST["vae"]
    data = bytearray(fast.read_bytes())
    data[8:24] = b"{ broken header "  # same size, so the fast.json record still matches
    fast.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        m = _load(models_copy, dtype=torch.float16, parallel=True)
    assert not m.sources["vae"].fast and m.sources["unet"].fast
    assert torch.equal(m.vae.decoder.conv_out.weight, v15.vae.decoder.conv_out.weight.half())
    assert str(fast) in caplog.text


def test_prefetch_is_taken_over_by_the_load(models_copy: Path, v15: MuseTalkModels) -> None:
    from musetalk_job.models import fastio

    planned = fastio.planned_files(models_copy, "v15", None)
    assert planned == [models_copy / layout.UNET["v15"][0], models_copy / "sd-vae/diffusion_pytorch_model.bin",
                       models_copy / "whisper/pytorch_model.bin", models_copy / layout.BISENET]
    assert fastio.prefetch(models_copy, "v15", None) == planned
    m = _load(models_copy, parallel=True)
    assert all(fastio.take(p) is None for p in planned)  # handed over (and only once)
    _assert_same_weights(m, v15)
    # a file changed after its prefetch started is read afresh
    fastio.prefetch(models_copy, "v15", None)
    bise = models_copy / layout.BISENET
    os.utime(bise, ns=(time.time_ns() + 10**9,) * 2)
    assert fastio.take(bise) is None
    fastio.release_prefetched()


def test_warm_manifest_records_and_replays(tmp_path: Path, tiny_models_dir: Path, monkeypatch) -> None:
    import json
    import sys

    from musetalk_job.models import fastio

    manifest = tmp_path / "warm.json"
    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", str(manifest))
    assert fastio.manifest_path() == manifest and not fastio.manifest_is_current()
    _load(tiny_models_dir, parallel=True)  # no manifest of this environment yet: the load records one
    fastio.wait_recorded(30)
    assert fastio.manifest_is_current()
    assert not any(e["path"].startswith(str(tiny_models_dir)) for e in json.loads(manifest.read_text())["files"])
    manifest.unlink()
    fastio.start_recording()
    (tiny_models_dir / "whisper/config.json").read_text()  # inside the models dir: left out
    extra = tmp_path / "opened.txt"
    extra.write_text("x")
    extra.read_text()
    (tmp_path / "listed").mkdir()
    os.listdir(tmp_path / "listed")
    os.listdir(tiny_models_dir)  # inside the models dir: left out
    assert fastio.record_manifest(exclude=[tiny_models_dir]) == manifest
    data = json.loads(manifest.read_text())
    paths = [e["path"] for e in data["files"]]
    assert str(extra) in paths
    assert not any(p.startswith(str(tiny_models_dir)) for p in paths)
    assert sys.modules["torch"].__spec__.cached in paths or sys.modules["torch"].__spec__.origin in paths
    libs = [e for e in data["files"] if "ranges" in e]
    assert libs and all(a >= 0 and b > 0 for e in libs for a, b in e["ranges"])
    # metadata the imports touch: the source file of a module imported from its .pyc (stat
    # only), its package dir (listed by the path finder); directories listed while recording
    entries = {(e["path"], "stat" if e.get("stat") else "dir" if e.get("dir") else "read") for e in data["files"]}
    assert (fastio.__file__, "stat") in entries and (os.path.dirname(fastio.__file__), "dir") in entries
    assert (str(tmp_path / "listed"), "dir") in entries
    assert not any(p.startswith(str(tiny_models_dir)) for p, _k in entries)
    assert fastio.manifest_is_current()
    monkeypatch.setattr(fastio, "_WARMED", [])
    assert fastio.warm_manifest() == len(data["files"])  # in the helper process (default)
    assert fastio.wait_warmed(60) == 0
    assert fastio.warm_manifest() == 0  # once per process
    # another environment's manifest, or a broken one: nothing
    monkeypatch.setattr(fastio, "_WARMED", [])
    manifest.write_text(json.dumps({**data, "env": "elsewhere"}))
    assert fastio.warm_manifest() == 0 and not fastio.manifest_is_current()
    manifest.write_text("{ nope")
    assert fastio.warm_manifest() == 0
    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", "0")
    assert fastio.manifest_path() is None and fastio.record_manifest() is None


def test_warm_manifest_replays_old_and_meta_entries(tmp_path: Path, monkeypatch) -> None:
    """Entries of every kind (whole file, ranges, stat, dir; missing paths too) are queued and
    run on the shared reader without raising; a manifest without stat/dir entries still works."""
    import json

    from musetalk_job.models import fastio

    data_file = tmp_path / "data.bin"
    data_file.write_bytes(os.urandom(3 << 16))
    files = [{"path": str(data_file)}, {"path": str(data_file), "ranges": [[0, 4096], [1 << 16, 100]]},
             {"path": str(data_file), "stat": True}, {"path": str(tmp_path), "dir": True},
             {"path": str(tmp_path / "gone"), "stat": True}, {"path": str(tmp_path / "gone-dir"), "dir": True},
             {"path": str(tmp_path / "gone.bin")}]
    manifest = tmp_path / "warm.json"
    manifest.write_text(json.dumps({"env": fastio._env_key(), "created": 0, "files": files}))
    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", str(manifest))
    reader = fastio.Reader(workers=2, chunk_bytes=1 << 16)
    monkeypatch.setattr(fastio, "_WARMED", [])
    monkeypatch.setattr(fastio, "_MANIFEST_READER", None)
    try:
        assert fastio.warm_manifest(reader=reader) == len(files)  # on this process's threads
    finally:
        reader.shutdown(wait=True)  # every queued task ran (errors of vanished paths ignored)
    # the helper process: the same entries, plus a malformed one that is skipped; exit code 0
    manifest.write_text(json.dumps({"env": fastio._env_key(), "created": 0, "files": [*files, {"nope": 1}]}))
    monkeypatch.setattr(fastio, "_WARMED", [])
    assert fastio.warm_manifest() == len(files)
    assert fastio.wait_warmed(60) == 0
    # without a helper process (MUSETALK_WARM_PROCESS=0): the shared reader's threads
    monkeypatch.setattr(fastio, "_WARMED", [])
    monkeypatch.setattr(fastio, "WARM_PROCESS", False)
    monkeypatch.setattr(fastio, "_WARM_PROC", None)
    monkeypatch.setattr(fastio, "_MANIFEST_READER", reader2 := fastio.Reader(workers=2, chunk_bytes=1 << 16))
    try:
        assert fastio.warm_manifest() == len(files) and fastio.wait_warmed(1) is None
    finally:
        reader2.shutdown(wait=True)
    bad = subprocess.run([sys.executable, "-I", "-S", fastio.__file__, "--warm"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_warm_helper_exits_with_its_parent(tmp_path: Path) -> None:
    """A warming helper whose process is gone stops (it would otherwise warm files into the page
    cache of whatever runs next, e.g. the next cold-start measurement)."""
    import json

    from musetalk_job.models import fastio

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(4 << 20))
    manifest = tmp_path / "warm.json"
    manifest.write_text(json.dumps({"env": "any", "files": [{"path": str(big)}] * 50000}))  # 200 GB of reads: minutes
    code = ("import subprocess, sys; q = subprocess.Popen([sys.executable, '-I', '-S', sys.argv[1], '--warm', "
            "sys.argv[2], '1', '65536']); print(q.pid, flush=True)")
    parent = subprocess.run([sys.executable, "-c", code, fastio.__file__, str(manifest)], capture_output=True,
                            text=True, check=True)
    pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 3
    state = "R"
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            state = "gone"
        if state in ("Z", "X", "gone"):
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
    assert state in ("Z", "X", "gone"), state


def test_thread_counters_see_cpu_and_reads(tmp_path: Path) -> None:
    from musetalk_job.models import fastio

    before = fastio.thread_counters()
    t = time.thread_time()
    while time.thread_time() - t < 0.05:
        pass
    for _ in range(20):
        os.stat(tmp_path)
    (tmp_path / "f").write_bytes(b"x" * 10)
    (tmp_path / "f").read_bytes()
    delta = fastio.counters_delta(before, fastio.thread_counters())
    assert delta["cpu_s"] >= 0.04
    if os.path.exists("/proc/thread-self/io"):
        assert delta["syscr"] >= 1 and delta["majflt"] >= 0 and delta["read_bytes"] >= 0


def test_read_throughput_reports_bytes(tiny_models_dir: Path) -> None:
    from musetalk_job.models import fastio

    files = [tiny_models_dir / layout.UNET["v15"][0], tiny_models_dir / layout.BISENET]
    for workers in (1, 4):
        res = fastio.throughput(files, workers, chunk_bytes=1 << 16)
        assert res["bytes"] == sum(p.stat().st_size for p in files) and res["gb_per_s"] > 0


def test_package_map_cache_serves_saves_and_invalidates(tmp_path: Path, monkeypatch) -> None:
    """diffusers' import-time scan of every installed distribution is served from a saved map,
    which a distribution added to a sys.path directory invalidates."""
    import importlib.metadata as md

    from musetalk_job.models import fastio

    fastio.uncache_package_map()  # an earlier test's load may have installed it (another path)
    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", str(tmp_path / "cache" / "warm.json"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    original = md.packages_distributions
    truth = md.packages_distributions()
    try:
        assert fastio.cache_package_map()
        assert md.packages_distributions() == truth
        saved = tmp_path / "cache" / "package-map.json"
        assert saved.is_file()
        got = md.packages_distributions()
        got.clear()  # callers get copies
        assert md.packages_distributions() == truth

        # A new process (state reset) reads the saved map: the scan itself is never called.
        fastio.uncache_package_map()
        def no_scan():
            raise AssertionError("scanned although the saved map is current")
        monkeypatch.setattr(md, "packages_distributions", no_scan)
        assert fastio.cache_package_map()
        assert md.packages_distributions() == truth

        # A distribution appears in a sys.path directory: the saved map is stale and rebuilt.
        fastio.uncache_package_map()
        monkeypatch.undo()
        monkeypatch.setenv("MUSETALK_WARM_MANIFEST", str(tmp_path / "cache" / "warm.json"))
        monkeypatch.syspath_prepend(str(site))
        dist = site / "musetalkfakepkg-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: musetalkfakepkg\nVersion: 1.0\n")
        (dist / "top_level.txt").write_text("musetalkfakepkg\n")
        assert fastio.cache_package_map()
        assert md.packages_distributions()["musetalkfakepkg"] == ["musetalkfakepkg"]
    finally:
        fastio.uncache_package_map()
    assert md.packages_distributions is original  # undone


def test_package_map_cache_is_off_with_the_warm_manifest(monkeypatch) -> None:
    import importlib.metadata as md

    from musetalk_job.models import fastio

    fastio.uncache_package_map()
    original = md.packages_distributions
    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", "0")
    assert fastio.package_map_path() is None and not fastio.cache_package_map()
    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", "/tmp/x/warm.json")
    monkeypatch.setenv("MUSETALK_PACKAGE_MAP", "0")
    assert not fastio.cache_package_map()
    assert md.packages_distributions is original


def test_warm_early_replays_the_manifest_once_and_can_be_turned_off(tmp_path: Path, monkeypatch) -> None:
    import json

    from musetalk_job.models import fastio

    manifest = tmp_path / "warm.json"
    listed = tmp_path / "listed"
    listed.mkdir()
    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", str(manifest))
    monkeypatch.setattr(fastio, "_WARMED", [])
    monkeypatch.setattr(fastio, "WARM_PROCESS", False)  # on this process's reader: observable here
    assert fastio.warm_early() == 0  # no manifest yet
    manifest.write_text(json.dumps({"env": fastio._env_key(), "files": [{"path": str(listed), "dir": True}]}))
    monkeypatch.setenv("MUSETALK_PREFETCH", "0")
    assert fastio.warm_early() == 0 and fastio._WARMED == []
    monkeypatch.delenv("MUSETALK_PREFETCH")
    assert fastio.warm_early() == 1  # the manifest's one entry, queued
    assert fastio.warm_early() == 0 and fastio.warm_manifest() == 0  # once per process: load's call is a no-op


def test_release_prefetched_forgets_the_reads_no_load_took(models_copy: Path, monkeypatch) -> None:
    from musetalk_job.models import fastio

    monkeypatch.setenv("MUSETALK_WARM_MANIFEST", "0")
    fastio.release_prefetched()  # what earlier tests left in flight
    started = fastio.prefetch(models_copy, "v15", None)
    assert started == fastio.planned_files(models_copy, "v15", None)
    assert fastio.release_prefetched() == len(started)
    assert all(fastio.take(p) is None for p in started)
    assert fastio.release_prefetched() == 0


def test_a_cancelled_read_skips_its_chunks_and_reports_it(tmp_path: Path) -> None:
    import threading

    from musetalk_job.models import fastio

    path = tmp_path / "blob.safetensors"
    path.write_bytes(os.urandom(4 << 20))
    reader = fastio.Reader(workers=1, chunk_bytes=1 << 20)
    gate = threading.Event()
    reader._pool.submit(gate.wait, 30)  # the one worker is busy: the file's 4 chunks wait in the queue
    handle = reader.read(path)
    handle.cancel()
    gate.set()
    with pytest.raises(OSError, match="cancelled"):
        handle.result(30)
    assert handle.fd is None  # the file was closed once the skipped chunks were counted
    done = reader.read(path)
    assert bytes(done.result(30)) == path.read_bytes()
    done.cancel()  # after the read finished: nothing changes
    assert bytes(done.result(30)) == path.read_bytes()
    reader.shutdown(wait=True)
