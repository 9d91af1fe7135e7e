"""blending: geometry rules, parsing masks, once-per-frame masks and the PIL-exact composite.

The reference for the whole blend is ``official_blend`` below: the offline ``get_image``
recipe of the pipeline report (§6.3) written step by step with PIL images (crop with zero
padding, paste, bicubic resize, the uint8 OpenCV blur, PIL's masked paste).
"""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from musetalk_job.blending import (
    BlendMask,
    MaskStream,
    apply_extra_margin,
    blend_pil,
    blur_kernel,
    composite,
    crop_box,
    parsing_mask,
    parsing_mask_batch,
    prepare_masks,
    resize_face,
    upload_masks,
)


# --- geometry --------------------------------------------------------------------------


def test_blur_kernel_rule():
    assert blur_kernel(200) == 21  # 2s = 400 -> 0.05 * 400 = 20 -> 21 (report §6.3 example)
    assert blur_kernel(100) == 11
    assert blur_kernel(50) == 5
    assert blur_kernel(45) == 5  # 0.05 * 90 = 4.5 -> 4 -> 5
    assert blur_kernel(5) == 1
    assert all(blur_kernel(s) % 2 == 1 for s in range(1, 600))


def test_crop_box_and_margin():
    # w = 100, h = 120 -> s = int(60 * 1.5) = 90, centre (150, 110)
    assert crop_box((100, 50, 200, 170)) == (60, 20, 240, 200, 90)
    # odd sizes: centre uses floor division, s = int(max(41, 30) // 2 * 1.5) = 30
    assert crop_box((11, 20, 52, 50)) == (1, 5, 61, 65, 30)
    assert apply_extra_margin((10, 20, 30, 40), 10, 100) == (10, 20, 30, 50)
    assert apply_extra_margin((10, 20, 30, 40), 10, 45) == (10, 20, 30, 45)  # clamped to the frame
    assert apply_extra_margin(None, 10, 45) is None


def test_crop_is_zero_padded_like_pil_crop():
    from musetalk_job.blending import _crop_zero_padded

    frame = np.random.default_rng(5).integers(1, 256, (40, 60, 3), dtype=np.uint8)
    for window in ((-10, -7, 30, 33), (45, 20, 85, 60), (-5, -5, 70, 50), (10, 5, 30, 25)):
        expected = np.asarray(Image.fromarray(frame).crop(window))
        got = _crop_zero_padded(frame, *window)
        np.testing.assert_array_equal(got, expected)
    assert not _crop_zero_padded(frame, -10, -7, 30, 33)[:7].any()  # outside the frame is black


# --- parsing masks ------------------------------------------------------------------------


def _face_classes() -> np.ndarray:
    """Skin rectangle rows 200..299, cols 100..411, a nose inside, lips below, hair above, neck."""
    c = np.zeros((512, 512), np.int64)
    c[120:200, 100:412] = 17  # hair
    c[200:300, 100:412] = 1  # skin
    c[220:260, 236:276] = 10  # nose
    c[400:420, 220:292] = 12  # upper lip, far from any skin
    c[420:430, 220:292] = 13  # lower lip
    c[440:500, 150:360] = 14  # neck
    return c


def test_raw_and_neck_masks():
    c = _face_classes()
    raw = parsing_mask(c, "raw")
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
    np.testing.assert_array_equal(raw == 255, np.isin(c, (1, 11, 12, 13)))
    neck = parsing_mask(c, "neck")
    np.testing.assert_array_equal(neck == 255, np.isin(c, (1, 11, 12, 13, 14)))
    with pytest.raises(ValueError, match="parsing_mode"):
        parsing_mask(c, "chin")


def test_jaw_mask_rules():
    c = _face_classes()
    jaw = parsing_mask(c, "jaw", 90, 90)
    # Nose excluded, lips always in (even far from the skin), hair/neck not skin.
    assert not jaw[220:260, 236:276].any()
    assert (jaw[400:430, 220:292] == 255).all()
    assert not jaw[450:500, 150:220].any()
    # Centre band (cols 167..345): the 33x33 cone kernel with anchor (16, 16) dilates the
    # skin 16 rows up and 6 rows down (cv2.dilate takes src(y + ky - 16) for kernel rows 10..32).
    assert jaw[184, 256] == 255 and jaw[183, 256] == 0
    assert jaw[305, 256] == 255 and jaw[306, 256] == 0
    # Tail rows of the kernel are 21 wide: 10 columns of growth sideways where not eroded.
    # Cheek bands (cols <= 166 and >= 346): dilated (cols 90..421), then eroded twice by a
    # 35x3 ellipse -> 34 columns back in from each side.
    assert jaw[250, 123] == 0 and jaw[250, 124] == 255
    assert jaw[250, 387] == 255 and jaw[250, 388] == 0
    assert c[250, 110] == 1 and jaw[250, 110] == 0  # skin eroded away at the cheek
    # A narrower cheek width moves the band edge: with 200 px, column 110 is in the centre band.
    wide = parsing_mask(c, "jaw", 200, 200)
    assert wide[250, 110] == 255 and wide[250, 91] == 255 and wide[250, 89] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_parsing_mask_batch_equals_the_opencv_masks(device: str) -> None:
    """The morphology as convolutions (the device path) gives cv2's masks, every mode and cheek width."""
    rng = np.random.default_rng(11)
    face = _face_classes()
    noisy = face.copy()
    holes = rng.random(face.shape) < 0.02
    noisy[holes] = rng.integers(0, 19, int(holes.sum()))
    edge = np.zeros_like(face)
    edge[:40, :] = 1  # skin against the map's edges: the border rules of dilate and erode
    edge[:, 490:] = 1
    edge[300:, 200:260] = 12
    maps = np.stack([face, noisy, edge, rng.integers(0, 19, face.shape).astype(face.dtype)])
    for mode in ("jaw", "raw", "neck"):
        for left, right in ((90, 90), (30, 200)):
            got = parsing_mask_batch(torch.from_numpy(maps.astype(np.uint8)).to(device), mode, left, right).cpu().numpy()
            for j, m in enumerate(maps):
                np.testing.assert_array_equal(got[j], parsing_mask(m, mode, left, right), err_msg=f"{mode} {left} {right} map {j}")


@pytest.mark.parametrize("mode", ["jaw", "raw"])
def test_masks_made_on_the_device_equal_the_cpu_masks(mode: str) -> None:
    """``prepare_masks(on_device=True)``: the resizes and morphology as tensor ops, the same masks,
    whatever the chunking and padding (crops leaving the frame included: frame 1 of the scene)."""
    frames, boxes = _scene()
    parser = ColourParser().eval()
    cpu = prepare_masks(frames, boxes, parser, mode=mode, device="cpu", batch_size=3)
    for batch_size, pad in ((3, False), (2, True), (1, False)):
        dev = prepare_masks(frames, boxes, parser, mode=mode, device="cpu", batch_size=batch_size, pad=pad, on_device=True)
        for a, b in zip(cpu, dev):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.box == b.box
                np.testing.assert_array_equal(a.alpha, b.alpha)
    assert any(m is not None and m.alpha.any() for m in cpu)  # the masks are not empty


def test_masks_made_on_the_device_with_bisenet_equal_the_cpu_masks() -> None:
    bisenet_mod = pytest.importorskip("musetalk_job.models.bisenet")
    torch.manual_seed(0)
    net = bisenet_mod.BiSeNet(n_classes=19, width=8).eval()
    frames, boxes = _scene()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device)
    cpu = prepare_masks(frames, boxes, net, mode="jaw", device=device, batch_size=2, pad=True)
    dev = prepare_masks(frames, boxes, net, mode="jaw", device=device, batch_size=2, pad=True, on_device=True)
    for a, b in zip(cpu, dev):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a.alpha, b.alpha)


# --- composite ----------------------------------------------------------------------------


def test_pil_blend_of_a_pixel_with_itself_is_identity():
    values = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 256)
    alphas = torch.arange(256, dtype=torch.uint8).view(1, 256).expand(256, 256)
    assert torch.equal(blend_pil(values, values, alphas), values)


def test_blend_matches_pil_paste_on_random_data():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (67, 91, 3), dtype=np.uint8)
    dst = rng.integers(0, 256, (67, 91, 3), dtype=np.uint8)
    m = rng.integers(0, 256, (67, 91), dtype=np.uint8)
    m[:3] = 0
    m[-3:] = 255
    expected = Image.fromarray(dst.copy())
    expected.paste(Image.fromarray(src), (0, 0), Image.fromarray(m))
    got = blend_pil(torch.from_numpy(src), torch.from_numpy(dst), torch.from_numpy(m))
    np.testing.assert_array_equal(got.numpy(), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(Image.composite(Image.fromarray(src), Image.fromarray(dst), Image.fromarray(m))),
                                  got.numpy())


def test_resize_face_is_within_one_level_of_cv2():
    face = np.array(Image.fromarray(_astronaut_face()).resize((256, 256)))
    for w, h in ((173, 211), (300, 280), (97, 120)):
        ours = resize_face(torch.from_numpy(face), w, h).numpy().astype(int)
        ref = cv2.resize(face, (w, h)).astype(int)  # official: cv2 default INTER_LINEAR
        diff = np.abs(ours - ref)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.8


def _per_frame_paste(frames: torch.Tensor, faces: torch.Tensor, masks: list) -> torch.Tensor:
    """The paste frame by frame, with torch's own bilinear resize: what ``composite`` batches."""
    import torch.nn.functional as F

    out = frames.clone()
    h_img, w_img = frames.shape[1:3]
    for b, mask in enumerate(masks):
        if mask is None:
            continue
        x1, y1, x2, y2 = mask.box
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w_img), min(y2, h_img)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        x = faces[b].permute(2, 0, 1)[None].float()
        face = F.interpolate(x, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
        face = face.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        alpha = torch.from_numpy(mask.alpha).to(frames.device)[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        out[b, cy1:cy2, cx1:cx2] = blend_pil(face, out[b, cy1:cy2, cx1:cx2], alpha)
    return out


def _random_paste_case(seed: int, n: int = 12, size: tuple[int, int] = (96, 128)):
    rng = np.random.default_rng(seed)
    h, w = size
    frames = torch.from_numpy(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8))
    faces = torch.from_numpy(rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8))
    masks: list = []
    for b in range(n):
        if b % 5 == 3:
            masks.append(None)
            continue
        bw, bh = int(rng.integers(8, 90)), int(rng.integers(8, 80))
        # boxes inside the frame and boxes running past every edge
        x1, y1 = int(rng.integers(-bw // 2, w - bw // 2)), int(rng.integers(-bh // 2, h - bh // 2))
        masks.append(BlendMask((x1, y1, x1 + bw, y1 + bh), rng.integers(0, 256, (bh, bw), dtype=np.uint8)))
    masks[0] = BlendMask((w + 5, 10, w + 40, 40), np.full((30, 35), 255, np.uint8))  # wholly outside
    return frames, faces, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_composite_matches_the_per_frame_paste(seed: int) -> None:
    frames, faces, masks = _random_paste_case(seed)
    before = frames.clone()
    got = composite(frames, faces, masks)
    want = _per_frame_paste(frames, faces, masks)
    assert torch.equal(frames, before), "composite must not write into its input"
    assert got.shape == frames.shape and got.is_contiguous()
    diff = (got.to(torch.int16) - want.to(torch.int16)).abs()
    # Only float rounding of the bilinear weights may differ: a rare pixel by one level.
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    touched = torch.zeros(frames.shape[:3], dtype=torch.bool)
    for b, m in enumerate(masks):
        if m is not None:
            x1, y1, x2, y2 = m.box
            touched[b, max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = True
    assert torch.equal(got[~touched], frames[~touched]), "pixels outside the boxes must stay as they were"
    assert not torch.equal(got[touched], frames[touched])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_composite_on_the_gpu_matches_the_per_frame_paste_and_the_cpu() -> None:
    frames, faces, masks = _random_paste_case(11, n=40, size=(240, 320))
    cpu = composite(frames, faces, masks)
    got = composite(frames.cuda(), faces.cuda(), masks)
    want = _per_frame_paste(frames.cuda(), faces.cuda(), masks)
    for other in (want.cpu(), cpu):
        diff = (got.cpu().to(torch.int16) - other.to(torch.int16)).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_composite_in_several_steps_equals_one_step(monkeypatch) -> None:
    import musetalk_job.blending as blending

    frames, faces, masks = _random_paste_case(7)
    one = composite(frames, faces, masks)
    monkeypatch.setattr(blending, "COMPOSITE_STEP_PIXELS", 3000)  # a step per one or two boxes
    assert torch.equal(composite(frames, faces, masks), one)


def test_composite_mask_extremes_and_outside_box():
    rng = np.random.default_rng(3)
    frames = torch.from_numpy(rng.integers(0, 256, (3, 90, 120, 3), dtype=np.uint8))
    faces = torch.from_numpy(rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8))
    box = (20, 15, 70, 80)
    zero = BlendMask(box, np.zeros((65, 50), np.uint8))
    full = BlendMask(box, np.full((65, 50), 255, np.uint8))
    out = composite(frames, faces, [zero, full, None])
    assert out.dtype == torch.uint8 and out.shape == frames.shape
    assert torch.equal(out[0], frames[0]) and torch.equal(out[2], frames[2])
    assert torch.equal(out[1, 15:80, 20:70], resize_face(faces[1], 50, 65))
    outside = torch.ones(90, 120, dtype=torch.bool)
    outside[15:80, 20:70] = False
    assert torch.equal(out[1][outside], frames[1][outside])
    assert not torch.equal(out[1], frames[1])
    # A box running past the right/bottom edge is clipped, as the official paste does.
    edge = BlendMask((100, 60, 140, 100), np.full((40, 40), 255, np.uint8))
    clipped = composite(frames[:1], faces[:1], [edge])
    assert torch.equal(clipped[0, 60:90, 100:120], resize_face(faces[0], 40, 40)[:30, :20])
    with pytest.raises(ValueError):
        composite(frames, faces, [None])


# --- the whole blend against the official recipe ------------------------------------------


class ColourParser(torch.nn.Module):
    """A deterministic stand-in for BiSeNet: per-pixel logits from colour (skin-ish -> 1,
    strong red -> lips, bright -> nose, else background), same I/O contract."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(3, 19, 1)
        w = torch.zeros(19, 3)
        b = torch.full((19,), -10.0)
        b[0] = 0.0
        w[1] = torch.tensor([1.5, 0.5, -1.5])  # skin: red/orange, not blue
        b[1] = 0.5
        w[12] = torch.tensor([3.0, -2.5, -1.0])  # lips: saturated red
        b[12] = -1.0
        w[10] = torch.tensor([0.8, 0.8, 0.8])  # nose: bright
        b[10] = -2.5
        with torch.no_grad():
            self.head.weight.copy_(w.view(19, 3, 1, 1))
            self.head.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def _astronaut_face() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[40:220, 140:310])


def _parser_classes(parser: torch.nn.Module, crop: Image.Image) -> np.ndarray:
    small = np.asarray(crop.resize((512, 512), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(small).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return parser((x - mean) / std).argmax(1)[0].numpy()


def official_blend(frame: np.ndarray, face: np.ndarray, box, parser, mode="jaw", cheek=90) -> np.ndarray:
    """Report §6.3, step by step with PIL; ``face`` is already resized to the box."""
    body = Image.fromarray(frame)
    x, y, x1, y1 = box
    s = int(max(x1 - x, y1 - y) // 2 * 1.5)
    cx, cy = (x + x1) // 2, (y + y1) // 2
    xs, ys = cx - s, cy - s
    large = body.crop((xs, ys, cx + s, cy + s))
    seg = Image.fromarray(parsing_mask(_parser_classes(parser, large), mode, cheek, cheek)).resize(large.size)
    inner = (x - xs, y - ys, x1 - xs, y1 - ys)
    mask = Image.new("L", large.size, 0)
    mask.paste(seg.crop(inner), inner)
    top = int(large.size[1] * 0.5)
    lower = Image.new("L", large.size, 0)
    lower.paste(mask.crop((0, top, large.size[0], large.size[1])), (0, top))
    k = int(0.05 * large.size[0] // 2 * 2) + 1
    blurred = Image.fromarray(cv2.GaussianBlur(np.asarray(lower), (k, k), 0))
    large.paste(Image.fromarray(face), inner)
    body.paste(large, (xs, ys), blurred)
    return np.asarray(body)


def _scene(n: int = 4) -> tuple[np.ndarray, list]:
    """Frames of the astronaut (face near the top-left edge in frame 1, so the crop leaves the frame)."""
    from skimage import data

    src = data.astronaut()
    frames = np.stack([src[0:200, 100:380], src[30:230, 150:430], src[10:210, 120:400], src[5:205, 110:390]])[:n]
    boxes = [(70, 50, 180, 190), (2, 3, 120, 150), None, (60, 40, 175, 200)][:n]
    return np.ascontiguousarray(frames), boxes


def test_prepare_masks_and_composite_match_official_recipe():
    frames, boxes = _scene()
    parser = ColourParser().eval()
    masks = prepare_masks(frames, boxes, parser, mode="jaw", left_cheek_width=90, right_cheek_width=90,
                          device="cpu", batch_size=3)
    assert masks[2] is None
    rng = np.random.default_rng(7)
    faces = rng.integers(0, 256, (len(frames), 256, 256, 3), dtype=np.uint8)
    out = composite(torch.from_numpy(frames), torch.from_numpy(faces), masks).numpy()
    np.testing.assert_array_equal(out[2], frames[2])
    for i, box in enumerate(boxes):
        if box is None:
            continue
        m = masks[i]
        assert m.box == box and m.alpha.shape == (box[3] - box[1], box[2] - box[0]) and m.alpha.dtype == np.uint8
        # The mask is non-trivial: zero in the upper half of the crop, a face region below.
        assert m.alpha.max() == 255 and m.alpha.min() == 0
        w, h = box[2] - box[0], box[3] - box[1]
        resized = resize_face(torch.from_numpy(faces[i]), w, h).numpy()
        expected = official_blend(frames[i], resized, box, parser)
        np.testing.assert_array_equal(out[i], expected)  # whole frame, bit for bit


def test_prepare_masks_batch_size_does_not_matter():
    frames, boxes = _scene()
    parser = ColourParser().eval()
    one = prepare_masks(frames, boxes, parser, mode="jaw", left_cheek_width=90, right_cheek_width=90,
                        device="cpu", batch_size=1, workers=1)
    three = prepare_masks(frames, boxes, parser, mode="jaw", left_cheek_width=90, right_cheek_width=90,
                          device="cpu", batch_size=3)
    for a, b in zip(one, three):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.box == b.box
            np.testing.assert_array_equal(a.alpha, b.alpha)
    raw = prepare_masks(frames, boxes, parser, mode="raw", left_cheek_width=90, right_cheek_width=90,
                        device="cpu", batch_size=2)
    assert any(not np.array_equal(a.alpha, r.alpha) for a, r in zip(one, raw) if a is not None)


def test_padded_chunks_keep_one_parser_shape_and_the_masks():
    frames, boxes = _scene()  # 3 frames with a mask: chunks of 2 leave a short last chunk
    parser = ColourParser().eval()
    shapes: list[int] = []
    hook = parser.register_forward_pre_hook(lambda _m, args: shapes.append(args[0].shape[0]))
    try:
        plain = prepare_masks(frames, boxes, parser, device="cpu", batch_size=2)
        assert shapes == [2, 1]
        shapes.clear()
        padded = prepare_masks(frames, boxes, parser, device="cpu", batch_size=2, pad=True)
        assert shapes == [2, 2]
    finally:
        hook.remove()
    for a, b in zip(plain, padded):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.box == b.box
            np.testing.assert_array_equal(a.alpha, b.alpha)


def test_prepare_masks_with_bisenet_architecture():
    bisenet_mod = pytest.importorskip("musetalk_job.models.bisenet")
    torch.manual_seed(0)
    net = bisenet_mod.BiSeNet(n_classes=19, width=8).eval()
    frames, boxes = _scene(2)
    masks = prepare_masks(frames, boxes, net, mode="neck", left_cheek_width=90, right_cheek_width=90,
                          device="cpu", batch_size=2)
    assert [m.alpha.shape for m in masks] == [(140, 110), (147, 118)]
    # Rows above the box centre never get the face.
    for m, box in zip(masks, boxes):
        centre_row = (box[1] + box[3]) // 2 - box[1]
        assert not m.alpha[: max(0, centre_row - blur_kernel(crop_box(box)[4]) // 2)].any()


def test_mask_device_cache_and_upload():
    m = BlendMask((0, 0, 4, 3), np.arange(12, dtype=np.uint8).reshape(3, 4))
    t = m.to("cpu")
    assert t is m.to(torch.device("cpu")) and t.dtype == torch.uint8 and t.tolist()[2] == [8, 9, 10, 11]
    a = BlendMask((0, 0, 2, 2), np.array([[1, 2], [3, 4]], np.uint8))
    b = BlendMask((5, 5, 8, 6), np.array([[7, 8, 9]], np.uint8))
    upload_masks([a, None, b], "cpu")
    assert a.to("cpu").tolist() == [[1, 2], [3, 4]] and b.to("cpu").tolist() == [[7, 8, 9]]
    # one buffer holds both
    assert a.to("cpu").untyped_storage().data_ptr() == b.to("cpu").untyped_storage().data_ptr()


# --- masks made while the job generates -----------------------------------------------------


def test_prepare_masks_streams_each_chunk_once_final():
    frames, boxes = _scene()
    parser = ColourParser().eval()
    calls: list[dict] = []
    final = prepare_masks(frames, boxes, parser, mode="jaw", device="cpu", batch_size=2, on_ready=calls.append)
    # First the frames that get no mask, then one call per parser chunk, in order.
    assert list(calls[0]) == [2] and calls[0][2] is None
    assert [sorted(c) for c in calls[1:]] == [[0, 1], [3]]
    for c in calls[1:]:
        for i, m in c.items():
            assert m is final[i] and m._on_device, "a published mask must already be on the device"
    stream = MaskStream(len(frames))
    for c in calls:
        stream.publish(c)
    assert stream.done and stream.wait_all() == final


def test_prepare_masks_parses_the_next_chunk_before_publishing_this_one():
    """The chunks are pipelined: the parser is already on chunk k+1 when chunk k's masks are
    published (their CPU finishing overlapped the device's parsing), with the serial result."""
    frames, boxes = _scene()
    frames, boxes = np.concatenate([frames, frames]), boxes + boxes  # 6 frames with a face: chunks of 2
    parses: list[int] = []

    class Counting(ColourParser):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parses.append(x.shape[0])
            return super().forward(x)

    seen: list[tuple[list[int], int]] = []
    out = prepare_masks(frames, boxes, Counting().eval(), device="cpu", batch_size=2,
                        on_ready=lambda items: seen.append((sorted(items), len(parses))))
    chunks = [(keys, n) for keys, n in seen if any(out[i] is not None for i in keys)]
    assert [keys for keys, _ in chunks] == [[0, 1], [3, 4], [5, 7]]
    assert [n for _, n in chunks] == [2, 3, 3]  # chunk k published after parse k+1 began (the last: nothing after it)
    serial = [prepare_masks(frames[i : i + 1], boxes[i : i + 1], ColourParser().eval(), device="cpu")[0] for i in range(8)]
    for a, b in zip(out, serial):
        assert (a is None and b is None) or (a.box == b.box and np.array_equal(a.alpha, b.alpha))


def test_prepare_masks_stops_when_asked():
    frames, boxes = _scene()
    stop = threading.Event()
    calls: list[dict] = []

    def on_ready(items: dict) -> None:
        calls.append(items)
        if len(calls) == 2:  # after the first chunk
            stop.set()

    out = prepare_masks(frames, boxes, ColourParser().eval(), device="cpu", batch_size=2, on_ready=on_ready, stop=stop)
    assert len(calls) == 2 and out[3] is None  # the second chunk (frame 3) was never made


def test_mask_stream_readers_wait_for_their_mask_and_see_the_producer_error():
    stream = MaskStream(3)
    mask = BlendMask((0, 0, 2, 2), np.full((2, 2), 9, np.uint8))
    got: list = []
    reader = threading.Thread(target=lambda: got.append(stream[1]))
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive() and not got, "the reader must wait until mask 1 is published"
    stream.publish({0: None, 1: mask})
    reader.join(5)
    assert got == [mask] and stream.waited_s >= 0.15
    assert stream[0] is None and stream[-2] is mask and not stream.done
    stream.fail(RuntimeError("parser exploded"))
    with pytest.raises(RuntimeError, match="parser exploded"):
        stream[2]
    assert stream[1] is mask  # what was published stays readable
    stream.close()
    assert stream.stop.is_set()
