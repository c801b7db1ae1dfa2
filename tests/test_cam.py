"""CAM inference (METHOD.md section 2): relu, bilinear upsampling, flip TTA, multi-scale sum, max norm."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bestie.cam import average_cams, cam_output_size, compute_cams, normalize_image
from bestie.errors import DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class PointwisePool(torch.nn.Module):
    """1x1 conv then 4x4 average pooling: flip-equivariant for widths divisible by 4."""

    def __init__(self, classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)

    def forward(self, x):
        cams = F.avg_pool2d(self.conv(x), 4)
        return {"logits": cams.mean((2, 3)), "cams": cams}


class Asymmetric(torch.nn.Module):
    """A 3x3 conv with random (left-right asymmetric) kernels and stride 2: not flip-equivariant."""

    def __init__(self, classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = torch.nn.Conv2d(3, classes, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)  # plain tensor output is accepted too


def _image(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _manual(model, image, classes, size):
    """Reference computation written out: relu -> upsample -> (flip-back average) -> / (max + 1e-5)."""
    x = normalize_image(image, MEAN, STD)[None]
    out = model(x)
    maps = out["cams"] if isinstance(out, dict) else out
    xf = x.flip(-1)
    outf = model(xf)
    mapsf = outf["cams"] if isinstance(outf, dict) else outf
    up = F.interpolate(torch.relu(maps[:, classes]), size=size, mode="bilinear", align_corners=False)[0]
    upf = F.interpolate(torch.relu(mapsf[:, classes]), size=size, mode="bilinear", align_corners=False)[0]
    return up, upf


@torch.no_grad()
def test_flip_tta_of_equivariant_model_equals_no_tta_on_asymmetric_image():
    model = PointwisePool().eval()
    img = _image()  # random, not left-right symmetric
    assert not np.array_equal(img, img[:, ::-1])
    with_flip = compute_cams(model, img, [0, 1, 2], MEAN, STD, flip=True)
    without = compute_cams(model, img, [0, 1, 2], MEAN, STD, flip=False)
    np.testing.assert_allclose(with_flip, without, atol=1e-5)
    # a forgotten flip-back would give (CAM + mirrored CAM) / 2, which differs here
    mirrored_avg = 0.5 * (without + without[:, :, ::-1])
    mirrored_avg /= mirrored_avg.max(axis=(1, 2), keepdims=True) + 1e-5
    assert np.abs(mirrored_avg - with_flip).max() > 0.05


@torch.no_grad()
def test_flip_tta_of_asymmetric_model_matches_hand_computation():
    model = Asymmetric().eval()
    img = _image(20, 30, seed=3)
    got = compute_cams(model, img, [2, 0], MEAN, STD, flip=True)
    up, upf = _manual(model, img, [2, 0], (20, 30))
    ref = 0.5 * (up + upf.flip(-1))
    ref = ref / (ref.amax(dim=(1, 2), keepdim=True) + 1e-5)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    # and the TTA changes the result for this model (so the comparison above is not vacuous)
    assert np.abs(got - compute_cams(model, img, [2, 0], MEAN, STD, flip=False)).max() > 0.01


@torch.no_grad()
def test_multiscale_sum_then_normalise_and_value_range():
    model = Asymmetric().eval()
    img = _image(24, 32, seed=5)
    got = compute_cams(model, img, [1], MEAN, STD, scales=(1.0, 0.5), flip=False)
    up1, _ = _manual(model, img, [1], (24, 32))
    import cv2

    half = cv2.resize(img, (16, 12), interpolation=cv2.INTER_LINEAR)
    up05, _ = _manual(model, half, [1], (24, 32))
    ref = up1 + up05
    ref = ref / (ref.amax(dim=(1, 2), keepdim=True) + 1e-5)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    assert got.dtype == np.float32 and got.min() >= 0 and 0.999 < got.max() < 1.0


@torch.no_grad()
def test_out_stride_classes_and_empty():
    model = PointwisePool().eval()
    img = _image(25, 33)
    assert cam_output_size(25, 33, 4) == (7, 9)
    cams = compute_cams(model, img, [2, 0], MEAN, STD, out_stride=4)
    assert cams.shape == (2, 7, 9)
    full = compute_cams(model, img, [0, 2], MEAN, STD)
    assert full.shape == (2, 25, 33)
    np.testing.assert_allclose(compute_cams(model, img, [2], MEAN, STD), full[1:2], atol=1e-6)
    empty = compute_cams(model, img, [], MEAN, STD, out_stride=4)
    assert empty.shape == (0, 7, 9)


def test_all_negative_map_stays_zero_and_bad_input():
    class Neg(torch.nn.Module):
        def forward(self, x):
            return -torch.ones(x.shape[0], 2, x.shape[2], x.shape[3])

    cams = compute_cams(Neg(), _image(8, 8), [0, 1], MEAN, STD)
    assert np.all(cams == 0)
    with pytest.raises(DataError):
        compute_cams(Neg(), np.zeros((8, 8), np.uint8), [0], MEAN, STD)
    with pytest.raises(DataError):
        compute_cams(Neg(), _image(8, 8), [5], MEAN, STD)


def test_average_cams_of_an_ensemble_by_hand():
    a = np.array([[[0.5, 1.0]], [[0.0, 0.0]]], np.float32)  # 2 classes, 1 x 2 maps; class 1 all zero
    b = np.array([[[1.0, 0.0]], [[0.2, 0.4]]], np.float32)
    got = average_cams([a, b])
    # class 0: (1.5, 1.0) / 1.5; class 1: (0.2, 0.4) / 0.4 (each divided by its max + 1e-5)
    np.testing.assert_allclose(got[0, 0], [1.5 / (1.5 + 1e-5), 1.0 / (1.5 + 1e-5)], rtol=1e-6)
    np.testing.assert_allclose(got[1, 0], [0.2 / (0.4 + 1e-5), 0.4 / (0.4 + 1e-5)], rtol=1e-6)
    assert average_cams([a]) is a  # one member: unchanged
    assert average_cams([a[:0], b[:0]]).shape == (0, 1, 2)
    with pytest.raises(ValueError, match="shape"):
        average_cams([a, b[:1]])
    with pytest.raises(ValueError, match="no CAMs"):
        average_cams([])


@pytest.mark.parametrize("k", [1, 4, 5, 9])
def test_resize_of_many_class_cams_at_non_integer_scale_equals_per_channel(k):
    """CAM stacks with more than 4 classes (common on COCO) downsample and upsample at any scale: OpenCV 5's
    INTER_AREA refuses more than 4 channels at a non-integer scale, so they go 4 at a time."""
    import cv2

    from bestie.cam import downsample_cams, upsample_cams

    rng = np.random.default_rng(k)
    cams = rng.random((k, 147, 163)).astype(np.float32)  # 147 x 163 -> stride 4 -> 37 x 41: scale not integer
    small = downsample_cams(cams, 4)
    assert small.shape == (k, 37, 41)
    for c in range(k):
        np.testing.assert_array_equal(small[c], cv2.resize(cams[c], (41, 37), interpolation=cv2.INTER_AREA))
    big = upsample_cams(small, 147, 163)
    assert big.shape == (k, 147, 163)
    for c in range(k):
        np.testing.assert_allclose(big[c], cv2.resize(small[c], (163, 147), interpolation=cv2.INTER_LINEAR),
                                   atol=1e-6)
