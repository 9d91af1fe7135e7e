"""DWPose port: official key layout, tolerant-but-strict loading, batched inference, presence rule."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from musetalk_job.errors import ModelsError
from musetalk_job.landmarks import detect_boxes, load_detector, topdown
from musetalk_job.landmarks.boxes import bbox_from_landmarks
from musetalk_job.landmarks.dwpose import ArchConfig, DWPoseDetector, RTMPose, load_model, write_random_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("dw") / "dwpose" / "dw-ll_ucoco_384.pth", size="tiny", seed=3)


@pytest.fixture(scope="module")
def detector(tiny_ckpt: Path) -> DWPoseDetector:
    return load_detector("dwpose", tiny_ckpt.parent.parent, "cpu")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    face = cv2.resize(skimage.data.astronaut(), (96, 72), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    out = [face, np.roll(face, 5, axis=1), rng.integers(0, 255, face.shape, dtype=np.uint8)]
    return np.ascontiguousarray(np.stack(out))


# Names taken from the official architecture (mmdet CSPNeXt + mmpose RTMCCHead as configured by
# DWPose's rtmpose-l 384x288 config).
OFFICIAL_KEYS = {
    "backbone.stem.0.conv.weight": (32, 3, 3, 3),
    "backbone.stem.2.bn.running_var": (64,),
    "backbone.stage1.0.conv.weight": (128, 64, 3, 3),
    "backbone.stage1.1.main_conv.conv.weight": (64, 128, 1, 1),
    "backbone.stage1.1.blocks.2.conv1.conv.weight": (64, 64, 3, 3),
    "backbone.stage1.1.blocks.2.conv2.depthwise_conv.conv.weight": (64, 1, 5, 5),
    "backbone.stage1.1.blocks.2.conv2.pointwise_conv.bn.weight": (64,),
    "backbone.stage1.1.attention.fc.bias": (128,),
    "backbone.stage2.1.blocks.5.conv1.conv.weight": (128, 128, 3, 3),
    "backbone.stage3.1.final_conv.conv.weight": (512, 512, 1, 1),
    "backbone.stage4.1.conv1.conv.weight": (512, 1024, 1, 1),
    "backbone.stage4.1.conv2.conv.weight": (1024, 2048, 1, 1),
    "backbone.stage4.2.short_conv.conv.weight": (512, 1024, 1, 1),
    "backbone.stage4.2.blocks.2.conv2.pointwise_conv.conv.weight": (512, 512, 1, 1),
    "head.final_layer.weight": (133, 1024, 7, 7),
    "head.final_layer.bias": (133,),
    "head.mlp.0.g": (1,),
    "head.mlp.1.weight": (256, 108),
    "head.gau.uv.weight": (1152, 256),
    "head.gau.o.weight": (256, 512),
    "head.gau.gamma": (2, 128),
    "head.gau.beta": (2, 128),
    "head.gau.ln.g": (1,),
    "head.gau.res_scale.scale": (256,),
    "head.cls_x.weight": (576, 256),
    "head.cls_y.weight": (768, 256),
}


def test_full_architecture_matches_the_official_key_layout() -> None:
    cfg = ArchConfig.preset("full")
    sd = RTMPose(cfg).state_dict()
    for key, shape in OFFICIAL_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert "backbone.stage4.2.blocks.3.conv1.conv.weight" not in sd  # 3 blocks in the last stage
    assert "backbone.stage2.1.blocks.5.conv1.conv.weight" in sd  # 6 in the middle ones
    assert all(k.startswith(("backbone.", "head.")) for k in sd)
    assert ArchConfig.from_state_dict(sd) == cfg
    assert cfg.featuremap == (9, 12) and cfg.input_size == (288, 384)


def test_random_checkpoint_layout_and_safe_load(tiny_ckpt: Path) -> None:
    obj = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert set(obj) == {"state_dict", "meta"}
    sd = obj["state_dict"]
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    # same names as the official file (fewer blocks per stage, narrower shapes)
    assert {re.sub(r"blocks\.\d+", "blocks.0", k) for k in OFFICIAL_KEYS} <= set(sd)
    assert tuple(sd["head.cls_x.weight"].shape)[0] == 576 and tuple(sd["head.cls_y.weight"].shape)[0] == 768
    assert obj["meta"]["dataset_meta"]["flip_indices"] == topdown.flip_indices()
    model = load_model(tiny_ckpt)
    x, y = model(torch.zeros(1, 3, 384, 288))
    assert x.shape == (1, 133, 576) and y.shape == (1, 133, 768)


class _ForeignObject:  # stands in for mmengine's HistoryBuffer etc. inside a real checkpoint
    def __init__(self) -> None:
        self.data = np.arange(4)


def test_loader_accepts_official_wrappers_and_extras(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    wrapped = {
        "meta": {"dataset_meta": {"sigmas": np.ones(133, np.float32)}, "seed": 21, "epoch": np.int64(270)},
        "state_dict": {**{f"student.{k}": v for k, v in base.items()},
                       "teacher.backbone.stem.0.conv.weight": torch.zeros(1),
                       "distill_losses.loss_fea.alpha": torch.zeros(1),
                       "data_preprocessor.mean": torch.zeros(3)},
        "ema_state_dict": {"module.backbone.stem.0.conv.weight": torch.zeros(1)},
        "message_hub": {"log_scalars": {"loss": _ForeignObject()}},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}},
    }
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    a, b = load_model(tiny_ckpt), load_model(path)
    inp = torch.randn(1, 3, 384, 288)
    with torch.inference_mode():
        assert all(torch.equal(u, v) for u, v in zip(a(inp), b(inp)))
    # a bare state dict works too, also in torch's legacy (pre-zip) format
    torch.save(base, tmp_path / "bare.pth")
    load_model(tmp_path / "bare.pth")
    torch.save({"state_dict": base}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    load_model(tmp_path / "legacy.pth")


def test_loader_is_strict_about_student_keys(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    missing = dict(base)
    del missing["backbone.stage2.1.short_conv.bn.running_mean"]
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(ModelsError, match="missing.pth.*missing.*short_conv"):
        load_model(tmp_path / "missing.pth")
    extra = dict(base, **{"backbone.stage9.0.conv.weight": torch.zeros(1)})
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(ModelsError, match="unexpected"):
        load_model(tmp_path / "extra.pth")
    wrong = dict(base, **{"head.gau.res_scale.scale": torch.zeros(7)})
    torch.save({"state_dict": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(ModelsError, match="wrong shape"):
        load_model(tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelsError, match="junk.pth"):
        load_model(tmp_path / "junk.pth")
    torch.save({"state_dict": {"something.else": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ModelsError, match="not an RTMPose"):
        load_model(tmp_path / "other.pth")


def test_missing_weights_name_the_file_and_the_cascade_option(tmp_path: Path) -> None:
    with pytest.raises(ModelsError) as err:
        load_detector("dwpose", tmp_path, "cpu")
    assert err.value.exit_code == 5
    assert "dw-ll_ucoco_384.pth" in err.value.message and "cascade" in err.value.message


def test_batched_and_one_by_one_give_identical_results(detector: DWPoseDetector, frames: np.ndarray) -> None:
    ref = detector.keypoints(frames[1:2], batch_size=1)
    results = {}
    for bs in (1, 2, 3):
        calls: list[tuple[int, int]] = []
        results[bs] = detector.keypoints(frames, batch_size=bs, progress=lambda d, t: calls.append((d, t)))
        assert calls[-1] == (3, 3) and len(calls) == -(-3 // bs)
    for bs, res in results.items():
        assert res.keypoints.shape == (3, 133, 2) and res.scores.shape == (3, 133)
        assert np.array_equal(res.keypoints, results[1].keypoints), bs
        np.testing.assert_allclose(res.scores, results[1].scores, atol=1e-4)
    assert np.array_equal(ref.keypoints[0], results[1].keypoints[1])
    # the image matters: different frames give different keypoints
    assert not np.array_equal(results[1].keypoints[0], results[1].keypoints[2])
    # keypoints are in frame pixels of the whole-frame box: within the padded box around the frame
    center, scale = topdown.frame_center_scale(96, 72)
    lo, hi = center - scale / 2 - 1, center + scale / 2 + 1
    assert np.all(results[1].keypoints >= lo) and np.all(results[1].keypoints <= hi)


def test_flip_test_is_mirror_equivariant(detector: DWPoseDetector) -> None:
    rng = np.random.default_rng(5)
    warped = rng.integers(0, 255, (2, 384, 288, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(warped[:, :, ::-1])
    locs, scores = detector._forward(warped)
    mlocs, mscores = detector._forward(mirrored)
    flip = topdown.flip_indices()
    ok = scores > 0
    # averaging the plain and flipped passes makes the result exactly mirror-symmetric:
    # keypoint k in the mirror = keypoint flip[k] of the original at x' = 287.5 - x
    assert torch.allclose(mscores, scores[:, flip], atol=1e-5)
    same = ok[:, flip]
    assert torch.equal(mlocs[..., 1][same], locs[:, flip][..., 1][same])
    assert torch.equal(mlocs[..., 0][same], 287.5 - locs[:, flip][..., 0][same])


def test_face_presence_rule_and_boxes(detector: DWPoseDetector, frames: np.ndarray) -> None:
    res = detector.keypoints(frames, batch_size=3)
    lms = res.face_landmarks()
    assert lms.dtype == np.int32 and lms.shape == (3, 68, 2)
    assert np.array_equal(lms, res.keypoints[:, 23:91].astype(np.int32))
    mean = res.face_scores().mean(1)
    old = detector.face_score_threshold
    try:
        detector.face_score_threshold = float(np.median(mean))
        boxes = detector.boxes_from_result(res)
        for i, b in enumerate(boxes):
            if mean[i] < detector.face_score_threshold:
                assert b is None
            else:
                assert b == bbox_from_landmarks(lms[i])
        detector.face_score_threshold = float(mean.max()) + 1.0
        assert detector.boxes_from_result(res) == [None] * 3
        detector.face_score_threshold = float(mean.min()) - 1.0
        assert detector.boxes_from_result(res, bbox_shift=3) == [bbox_from_landmarks(lm, 3) for lm in lms]
        seen: list[tuple[str, int, int]] = []
        got = detect_boxes(frames, backend="dwpose", detector=detector, batch_size=2, progress=lambda *a: seen.append(a))
        assert got == [bbox_from_landmarks(lm) for lm in lms]
        assert seen == [("landmarks", 2, 3), ("landmarks", 3, 3)]
    finally:
        detector.face_score_threshold = old


def test_padded_batches_keep_one_shape_and_the_results(detector: DWPoseDetector, frames: np.ndarray) -> None:
    shapes: list[int] = []
    hook = detector.model.register_forward_pre_hook(lambda _m, args: shapes.append(args[0].shape[0]))
    padded = DWPoseDetector(model=detector.model, device=detector.device, pad_batches=True)
    try:
        assert not detector._pads() and padded._pads()  # CPU default: no padding
        plain = detector.keypoints(frames, batch_size=2)
        assert shapes == [4, 2]  # [batch, mirrored batch]: the last batch is short
        shapes.clear()
        got = padded.keypoints(frames, batch_size=2)
        assert shapes == [4, 4]  # the short batch filled up to the batch size
        shapes.clear()
        padded.warmup(batch_size=2)
        assert shapes == [4]
    finally:
        hook.remove()
    assert got.keypoints.shape == (3, 133, 2) and got.scores.shape == (3, 133)
    assert np.array_equal(got.keypoints, plain.keypoints)
    np.testing.assert_allclose(got.scores, plain.scores, atol=1e-4)
    center, scale = topdown.frame_center_scale(96, 72)
    mat = topdown.warp_matrix(center, scale)
    warped = topdown.warp_frames(frames[:1], mat, rows=3)
    assert warped.shape == (3, 384, 288, 3) and not warped[1:].any()
    assert np.array_equal(warped[:1], topdown.warp_frames(frames[:1], mat))


def test_detect_boxes_works_through_frames_as_they_arrive(detector: DWPoseDetector, frames: np.ndarray) -> None:
    # 7 frames: frame 4 repeats frame 3 (a duplicate across the pieces' boundary), 6 repeats 5
    rows = [frames[0], frames[1], frames[2], frames[0], frames[0], np.roll(frames[0], 9, axis=0), None]
    rows[6] = rows[5]
    video = np.ascontiguousarray(np.stack(rows))

    class KeypointBoxes(DWPoseDetector):
        """The real network; each frame's "box" is made of its first face keypoints (random weights
        give no valid face box), so the boxes tell the analysed frames apart."""

        def boxes_from_result(self, result, *, bbox_shift=0):  # type: ignore[override]
            return [tuple(int(v * 1000) for v in kp[23:25].ravel()) for kp in result.keypoints]

    det = KeypointBoxes(model=detector.model, device=detector.device)
    ref = detect_boxes(video, backend="dwpose", detector=det, batch_size=2)
    assert ref[4] == ref[3] and ref[6] == ref[5] and len({ref[0], ref[1], ref[2], ref[5]}) == 4
    buf = np.zeros_like(video)  # rows appear only when ready(k) says they are decoded
    asked: list[int] = []
    seen: list[tuple[str, int, int]] = []

    def ready(k: int) -> None:
        asked.append(k)
        buf[:k] = video[:k]

    got = detect_boxes(buf, backend="dwpose", detector=det, batch_size=2, ready=ready, progress=lambda *a: seen.append(a))
    assert got == ref
    assert asked == [2, 4, 6, 7]
    assert seen == [("landmarks", 2, 7), ("landmarks", 4, 7), ("landmarks", 6, 7), ("landmarks", 7, 7)]
    # a detector whose frames depend on each other (the cascade tracks the face) waits for all
    asked.clear()
    detect_boxes(video[:3], backend="cascade", ready=asked.append)
    assert asked == [3]


def test_detect_boxes_input_checks(detector: DWPoseDetector) -> None:
    assert detect_boxes(np.zeros((0, 8, 8, 3), np.uint8), detector=detector) == []
    with pytest.raises(ValueError):
        detect_boxes(np.zeros((1, 8, 8, 3), np.float32), detector=detector)
    with pytest.raises(ValueError):
        detect_boxes(np.zeros((1, 8, 8, 3), np.uint8), backend="dwpose")
