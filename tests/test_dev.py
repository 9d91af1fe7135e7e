"""dev CLI: ``dev random-weights`` writes a models dir the real loader accepts; ``dev make-sample``
writes real media; the module stays light at import time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk_job.cli import main


def test_random_weights_cli_writes_a_loadable_models_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from musetalk_job.models.loading import MuseTalkModels

    out = tmp_path / "models"
    assert main(["dev", "random-weights", str(out), "--version", "v1", "--seed", "7", "--no-dwpose"]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "musetalk/pytorch_model.bin").is_file() and not (out / "musetalkV15").exists()
    assert not (out / "dwpose").exists()
    m = MuseTalkModels.load(out, version="v1", device=torch.device("cpu"), dtype=torch.float32)
    assert m.version == "v1"
    # --seed reaches the writer: another seed gives other weights
    other = tmp_path / "other"
    assert main(["dev", "random-weights", str(other), "--version", "v1", "--seed", "8", "--no-dwpose"]) == 0
    a = torch.load(out / "musetalk/pytorch_model.bin", weights_only=True)
    b = torch.load(other / "musetalk/pytorch_model.bin", weights_only=True)
    assert not torch.equal(a["conv_in.weight"], b["conv_in.weight"])


def test_random_weights_cli_unwritable_dir_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["dev", "random-weights", str(blocker / "models"), "--no-dwpose"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error[2]: ") and str(blocker / "models") in err


def test_random_weights_cli_rejects_unknown_size(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dev", "random-weights", "x", "--size", "huge"])
    assert exc.value.code == 2
    assert "huge" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_make_sample_writes_a_face_video_and_speech(tmp_path: Path) -> None:
    import av

    out = tmp_path / "sample"
    assert main(["dev", "make-sample", str(out), "--seconds", "1"]) == 0
    with av.open(str(out / "face.mp4")) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (stream.codec_context.width, stream.codec_context.height) == (640, 480)
    assert frames == 25
    with av.open(str(out / "speech.wav")) as container:
        rate = container.streams.audio[0].rate
        samples = sum(f.samples for f in container.decode(audio=0))
    assert samples > 0.5 * rate  # at least half a second of speech


def test_make_sample_rejects_non_positive_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dev", "make-sample", str(tmp_path), "--seconds", "0"]) == 2
    assert "--seconds" in capsys.readouterr().err


def test_dev_module_import_is_light() -> None:
    code = (
        "import sys, musetalk_job.dev, musetalk_job.cli as c; c.build_parser(); "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'cv2', 'av') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
