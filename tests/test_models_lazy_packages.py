"""``models.lazy_packages``: a package's ``__init__`` deferred until a name it defines is looked up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from musetalk_job.models import lazy_packages

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture()
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package whose __init__ counts its runs and imports a heavy sibling, like diffusers' do."""
    root = tmp_path / "deferpkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text(textwrap.dedent("""
        import builtins
        builtins.DEFER_INIT_RUNS = getattr(builtins, "DEFER_INIT_RUNS", 0) + 1
        from .light import Light
        from .heavy import Heavy
    """))
    (root / "sub" / "light.py").write_text("class Light:\n    pass\n")
    (root / "sub" / "heavy.py").write_text("class Heavy:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "deferpkg.sub"
    for name in [n for n in sys.modules if n.startswith("deferpkg")]:
        del sys.modules[name]
    import builtins

    if hasattr(builtins, "DEFER_INIT_RUNS"):
        del builtins.DEFER_INIT_RUNS


def test_submodule_import_skips_the_init_until_a_name_is_looked_up(pkg: str) -> None:
    import builtins
    import importlib

    assert lazy_packages.defer_init(pkg)
    light = importlib.import_module(f"{pkg}.light")
    assert light.Light.__name__ == "Light"
    assert getattr(builtins, "DEFER_INIT_RUNS", 0) == 0
    assert f"{pkg}.heavy" not in sys.modules
    package = sys.modules[pkg]
    assert isinstance(package, lazy_packages.DeferredPackage)
    from deferpkg.sub import light as light_again  # noqa: PLC0415 - a submodule: no __init__ needed

    assert light_again is light and getattr(builtins, "DEFER_INIT_RUNS", 0) == 0
    # The first missing name runs the real __init__, once; then the package is complete.
    from deferpkg.sub import Heavy  # noqa: PLC0415

    assert Heavy.__name__ == "Heavy" and builtins.DEFER_INIT_RUNS == 1
    assert package.Light is light.Light  # the submodule loaded earlier is reused, not reloaded
    with pytest.raises(AttributeError, match="no attribute 'Missing'"):
        package.Missing
    assert builtins.DEFER_INIT_RUNS == 1


def test_an_imported_or_unknown_package_is_left_alone(pkg: str) -> None:
    import importlib

    importlib.import_module(pkg)
    assert not lazy_packages.defer_init(pkg)
    assert not isinstance(sys.modules[pkg], lazy_packages.DeferredPackage)
    assert not lazy_packages.defer_init("deferpkg.nothing_here")
    assert not lazy_packages.defer_init("no_such_top_level_package.sub")


def _fresh_import(env_value: str | None) -> dict:
    code = textwrap.dedent("""
        import json, sys
        from musetalk_job.models import loading
        unet_cls, vae_cls = loading._import_diffusers()
        loading._import_transformers()
        before = {"unet_1d": "diffusers.models.unets.unet_1d" in sys.modules,
                  "autoencoder_tiny": "diffusers.models.autoencoders.autoencoder_tiny" in sys.modules,
                  "modules": len(sys.modules)}
        from diffusers import UNet2DConditionModel
        from diffusers.models.unets import UNet1DModel
        from diffusers.models.autoencoders import AutoencoderTiny
        import diffusers.models.transformers as T
        ok = UNet2DConditionModel is unet_cls and UNet1DModel.__name__ == "UNet1DModel" and T.Transformer2DModel is not None
        print(json.dumps({**before, "later_imports_ok": bool(ok and AutoencoderTiny)}))
    """)
    env = {k: v for k, v in os.environ.items() if k != lazy_packages.ENV}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    if env_value is not None:
        env[lazy_packages.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_engine_imports_only_its_diffusers_models_and_the_rest_still_works() -> None:
    deferred = _fresh_import(None)
    full = _fresh_import("0")
    assert not deferred["unet_1d"] and not deferred["autoencoder_tiny"]
    assert full["unet_1d"] and full["autoencoder_tiny"]
    assert deferred["modules"] < full["modules"]
    assert deferred["later_imports_ok"] and full["later_imports_ok"]


def test_models_load_and_compile_with_the_packages_deferred(tiny_models_dir: Path) -> None:
    """A fresh process loads the engine's models with the packages deferred, dynamo traces them
    (regional, eager backend) with the same output, and the packages stay deferred throughout."""
    code = textwrap.dedent(f"""
        import json, sys, torch
        from musetalk_job import compiled
        from musetalk_job.models import lazy_packages
        from musetalk_job.models.loading import MuseTalkModels

        def deferred():
            return [n for n in lazy_packages.DIFFUSERS_PACKAGES
                    if isinstance(sys.modules.get(n), lazy_packages.DeferredPackage)
                    and not sys.modules[n].__dict__.get("_musetalk_init_ran")]

        m = MuseTalkModels.load({str(tiny_models_dir)!r}, version="v15", device="cpu", dtype=torch.float32)
        after_load = deferred()
        ts = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            lat, cond = torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384)
            ref = m.unet(lat, ts, encoder_hidden_states=cond).sample
        assert compiled.enable(m, "regional", backend="eager")
        compiled.warmup(m, [2], decode_chunk=2)
        with torch.inference_mode():
            out = m.unet(lat.clone(), ts, encoder_hidden_states=cond.clone()).sample
        print(json.dumps({{"after_load": after_load, "after_compile": deferred(),
                          "failure": compiled.failure(m), "diff": float((out - ref).abs().max())}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != lazy_packages.ENV}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["after_load"] == list(lazy_packages.DIFFUSERS_PACKAGES)
    assert res["after_compile"] == list(lazy_packages.DIFFUSERS_PACKAGES)
    assert res["failure"] is None and res["diff"] <= 1e-5


def test_an_init_that_fails_raises_its_error_on_every_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "brokenpkg" / "sub"
    root.mkdir(parents=True)
    (tmp_path / "brokenpkg" / "__init__.py").write_text("")
    (root / "__init__.py").write_text("import no_such_dependency_here\n")
    (root / "fine.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert lazy_packages.defer_init("brokenpkg.sub")
        from brokenpkg.sub import fine  # noqa: PLC0415 - the submodule needs no __init__

        assert fine.VALUE == 1
        for _ in range(2):
            with pytest.raises(ModuleNotFoundError, match="no_such_dependency_here"):
                sys.modules["brokenpkg.sub"].Other
    finally:
        for name in [n for n in sys.modules if n.startswith("brokenpkg")]:
            del sys.modules[name]
