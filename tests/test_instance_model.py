"""BESTIE network (bestie.models.instance) and the inference helpers of bestie.stages.predict_instances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bestie.errors import ConfigError, DataError
from bestie.inference import instance_source_summary
from bestie.models.instance import BestieNet, build_bestie_net, convert_sync_batchnorm, upsample_outputs
from bestie.stages.predict_instances import (
    InferenceConfig,
    network_input_size,
    predict_image,
    predict_maps,
    semantic_drift,
)

torch.set_num_threads(1)
C = 3


@pytest.fixture(scope="module")
def lite_light() -> BestieNet:
    torch.manual_seed(0)
    return BestieNet("tf_efficientnet_lite0", C, None, "light", warn_random=False)


@pytest.mark.parametrize("head", ["light", "deeplab"])
def test_output_shapes(head: str, lite_light: BestieNet) -> None:
    torch.manual_seed(0)
    model = lite_light if head == "light" else BestieNet("tf_efficientnet_lite0", C, None, head, warn_random=False)
    x = torch.randn(2, 3, 64, 96)
    raw = model.forward_raw(x)
    assert {k: tuple(v.shape) for k, v in raw.items()} == {"seg": (2, C + 1, 16, 24), "center": (2, C, 16, 24),
                                                           "offset": (2, 2, 16, 24)}
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"seg": (2, C + 1, 64, 96), "center": (2, C, 64, 96),
                                                           "offset": (2, 2, 64, 96)}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    out2 = model(x, output_size=(50, 70))
    assert out2["seg"].shape[-2:] == (50, 70)
    # every BatchNorm layer carries the METHOD.md momentum
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.01 for m in bns)


def test_offsets_rescaled_on_upsampling() -> None:
    # Constant raw offsets (dy=1, dx=2) on a 16x24 grid: at 64x96 they are 4x larger on both axes, and at
    # 32x96 dy doubles while dx quadruples. Semantic and center maps are never scaled.
    raw = {"seg": torch.full((1, 2, 16, 24), 0.7), "center": torch.full((1, 1, 16, 24), 0.25),
           "offset": torch.stack([torch.full((16, 24), 1.0), torch.full((16, 24), 2.0)])[None]}
    up = upsample_outputs(raw, (64, 96))
    assert torch.allclose(up["offset"][0, 0], torch.full((64, 96), 4.0))
    assert torch.allclose(up["offset"][0, 1], torch.full((64, 96), 8.0))
    assert torch.allclose(up["seg"], torch.full((1, 2, 64, 96), 0.7))
    assert torch.allclose(up["center"], torch.full((1, 1, 64, 96), 0.25))
    up2 = upsample_outputs(raw, (32, 96))
    assert torch.allclose(up2["offset"][0, 0], torch.full((32, 96), 2.0))
    assert torch.allclose(up2["offset"][0, 1], torch.full((32, 96), 8.0))
    # A linear ramp dx = column (in 16x24 grid pixels) becomes ~4 x column in output pixels: the
    # displacement field of a point stays the same physical vector after rescaling.
    ramp = torch.arange(24, dtype=torch.float32).expand(16, 24)
    up3 = upsample_outputs({"offset": torch.stack([ramp * 0, ramp])[None]}, (64, 96))["offset"][0, 1]
    assert torch.allclose(up3[:, 2:-2], 4.0 * ((torch.arange(96.0) + 0.5) / 4 - 0.5)[2:-2].expand(64, 92), atol=1e-4)


def test_model_forward_uses_rescaling(lite_light: BestieNet, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_raw(x: torch.Tensor) -> dict:
        b, _, h, w = x.shape
        return {"seg": torch.zeros(b, C + 1, h // 4, w // 4), "center": torch.zeros(b, C, h // 4, w // 4),
                "offset": torch.ones(b, 2, h // 4, w // 4)}

    monkeypatch.setattr(lite_light, "forward_raw", fake_raw)
    out = lite_light(torch.zeros(1, 3, 32, 64), output_size=(96, 64))
    assert torch.allclose(out["offset"][0, 0], torch.full((96, 64), 12.0))  # 96 / 8
    assert torch.allclose(out["offset"][0, 1], torch.full((96, 64), 4.0))   # 64 / 16


def test_rebuild_from_config(lite_light: BestieNet) -> None:
    clone = build_bestie_net(lite_light.config)
    clone.load_state_dict(lite_light.state_dict(), strict=True)
    lite_light.eval()
    clone.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = lite_light(x), clone(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lite_light.train()
    with pytest.raises(ConfigError, match="unknown key"):
        build_bestie_net({**lite_light.config, "bogus": 1})


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="encoder"):
        BestieNet("vgg16", C, None)
    with pytest.raises(ConfigError, match="head"):
        BestieNet("tf_efficientnet_lite0", C, None, "mask")
    with pytest.raises(ConfigError, match="hrnet_fusion"):
        BestieNet("tf_efficientnet_lite0", C, None, hrnet_fusion="sum")


def test_hrnet_light_head_reads_fused_high_resolution_branch() -> None:
    """The light head on HRNet reads branch 0 of the last stage (32 channels for W32, stride 4), exactly
    timm's raw branch output (feature_location=''), not the classification 'incre' features."""
    import timm

    torch.manual_seed(0)
    model = BestieNet("hrnet_w32", C, None, "light", warn_random=False).eval()
    assert model.heads["seg"].conv.in_channels == 32
    ref = timm.create_model("hrnet_w32", pretrained=False, features_only=True, feature_location="",
                            out_indices=(1, 2, 3, 4)).eval()
    missing, unexpected = ref.load_state_dict(model.encoder.body.state_dict(), strict=False)
    parts = [k.split(".") for k in missing]  # only the dropped fuse layers of branches 1-3
    assert not unexpected and parts and all(p[:3] == ["stage4", "2", "fuse_layers"] and p[3] != "0" for p in parts)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.encoder(x)
        theirs = ref(x)
    # only the fused branch 0 is computed (the last module's other fuse layers are dropped, as BESTIE's
    # multi_scale_output=False), and it equals timm's full-model branch 0
    assert [tuple(f.shape) for f in ours] == [(1, 32, 16, 16)]
    assert [tuple(f.shape) for f in theirs] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
    assert torch.allclose(ours[0], theirs[0])
    assert model(x)["seg"].shape == (1, C + 1, 64, 64)


@pytest.mark.parametrize("backbone,head,fusion", [("hrnet_w32", "light", "branch0"), ("hrnet_w32", "light", "concat"),
                                                  ("tf_efficientnet_lite0", "deeplab", "branch0")])
def test_every_parameter_gets_a_gradient(backbone: str, head: str, fusion: str) -> None:
    """DDP (without find_unused_parameters) needs a gradient for every parameter."""
    torch.manual_seed(0)
    model = BestieNet(backbone, C, None, head, hrnet_fusion=fusion, warn_random=False)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_sync_batchnorm_conversion(lite_light: BestieNet) -> None:
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in lite_light.modules())
    conv = convert_sync_batchnorm(build_bestie_net(lite_light.config))
    sync = [m for m in conv.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(sync) == n_bn
    assert all(m.momentum == 0.01 for m in sync)
    # timm's BatchNormAct2d keeps its activation (torch's converter would drop it)
    assert any(type(m).__name__ == "SyncBatchNormAct" and not isinstance(m.act, nn.Identity) for m in sync)


# ----------------------------------------------------------------------------------- inference helpers
class _MirrorNet(nn.Module):
    """A flip-equivariant stand-in: seg logits = image channels + a constant, center = sigmoid(channel 0),
    offsets = image-derived horizontal/vertical central differences of channel 0 (dx changes sign under
    mirroring, as real offsets do)."""

    num_classes = 2

    def forward(self, x: torch.Tensor, output_size=None) -> dict:
        g = x[:, :1]
        gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
        dx = (gp[..., 1:-1, 2:] - gp[..., 1:-1, :-2]) * 5
        dy = (gp[..., 2:, 1:-1] - gp[..., :-2, 1:-1]) * 5
        out = {"seg": x * 3.0, "center": torch.sigmoid(g).expand(-1, 2, -1, -1),
               "offset": torch.cat([dy, dx], dim=1)}
        return upsample_outputs(out, output_size or x.shape[-2:])


def _test_image(h: int = 40, w: int = 56) -> np.ndarray:
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return np.ascontiguousarray(img)


def test_flip_tta_negates_dx_of_flipped_branch() -> None:
    net = _MirrorNet()
    img = _test_image()
    mean = std = (0.5, 0.5, 0.5)
    base = InferenceConfig(flip=False, size_divisor=1)
    flip = InferenceConfig(flip=True, size_divisor=1)
    a = predict_maps(net, img, mean, std, base, "cpu")
    b = predict_maps(net, img, mean, std, flip, "cpu")
    # For an equivariant network the flip average equals the plain prediction; without negating dx of the
    # mirrored branch dx would average to ~0.
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert a["offset"][1].abs().mean() > 0.5
    assert torch.allclose(a["seg_prob"].sum(0), torch.ones(40, 56), atol=1e-5)


def test_predict_maps_returns_original_size() -> None:
    net = _MirrorNet()
    img = _test_image(37, 50)
    maps = predict_maps(net, img, (0.5,) * 3, (0.5,) * 3, InferenceConfig(flip=True), "cpu")
    assert maps["seg_prob"].shape == (3, 37, 50) and maps["offset"].shape == (2, 37, 50)
    with pytest.raises(DataError):
        predict_maps(net, img.astype(np.float32), (0.5,) * 3, (0.5,) * 3, InferenceConfig(), "cpu")


def test_network_input_size() -> None:
    assert network_input_size(375, 500, InferenceConfig()) == (384, 512)  # (h + 31) // 32 * 32 as public code
    assert network_input_size(375, 500, InferenceConfig(resize=480)) == (384, 480)  # 360 -> 384, 480 -> 480
    assert network_input_size(20, 33, InferenceConfig()) == (32, 64)
    assert network_input_size(20, 33, InferenceConfig(size_divisor=1)) == (20, 33)


def test_predict_image_with_real_network(lite_light: BestieNet) -> None:
    lite_light.eval()
    inst = predict_image(lite_light, _test_image(48, 64), lite_light.mean, lite_light.std,
                         InferenceConfig(min_area=1), "cpu")
    lite_light.train()
    n = inst["labels"].shape[0]
    assert inst["masks"].shape == (n, 48, 64) and inst["masks"].dtype == bool
    assert inst["scores"].dtype == np.float32 and np.all(np.diff(inst["scores"]) <= 0)
    assert np.all((inst["labels"] >= 0) & (inst["labels"] < C))


def test_semantic_drift_hand_checked() -> None:
    sem = np.array([[0, 1, 1], [0, 0, 2], [2, 2, 0]])
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, :] = True          # (0,0) bg, (0,1) (0,2) fg
    masks[1, 1:, 1:] = True        # (1,1) bg, (1,2) fg, (2,1) fg, (2,2) bg
    masks[1, 0, 2] = True          # overlaps instance 0: counted once
    assert semantic_drift(sem, masks) == (3, 7)
    with pytest.raises(DataError):
        semantic_drift(sem[:2], masks)


def test_instance_source_summary_hand_checked() -> None:
    # sources 0 center, 1 cluster, 2 fallback; areas in pixels
    out = instance_source_summary(np.array([0, 2, 0, 2, 2, 0], np.int8), np.array([900, 10, 500, 30, 20, 700]))
    assert out["instances_by_source"] == {"center": 3, "cluster": 0, "fallback": 3}
    assert out["median_area_by_source"] == {"center": 700.0, "cluster": None, "fallback": 20.0}
    assert out["center_instance_share"] == 0.5
    empty = instance_source_summary(np.zeros(0, np.int8), np.zeros(0, np.int64))
    assert empty["center_instance_share"] is None and empty["median_area_by_source"]["center"] is None
    with pytest.raises(DataError, match="areas"):
        instance_source_summary(np.array([0, 1]), np.array([5]))
    with pytest.raises(DataError, match=r"unknown source values \[3\]"):
        instance_source_summary(np.array([0, 3]), np.array([5, 6]))


def test_center_agnostic_one_channel_broadcast_and_rebuilt_from_config() -> None:
    torch.manual_seed(0)
    model = BestieNet("tf_efficientnet_lite0", C, None, "light", center_mode="agnostic", warn_random=False)
    x = torch.randn(1, 3, 64, 64)
    raw = model.forward_raw(x)
    assert raw["center"].shape == (1, 1, 16, 16)
    out = model(x)
    assert out["center"].shape == (1, C, 64, 64)
    assert all(torch.equal(out["center"][:, c], out["center"][:, 0]) for c in range(C))
    rebuilt = build_bestie_net(model.config)
    assert rebuilt.center_mode == "agnostic" and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    # a checkpoint of the class-wise model (no center_mode key, as written before the key existed) rebuilds
    old = {k: v for k, v in BestieNet("tf_efficientnet_lite0", C, None, "light", warn_random=False).config.items()
           if k != "center_mode"}
    assert build_bestie_net(old).center_mode == "class"
    with pytest.raises(ConfigError, match="center_mode"):
        BestieNet("tf_efficientnet_lite0", C, None, "light", center_mode="shared", warn_random=False)


def test_predict_maps_restricted_to_image_labels() -> None:
    """With the image-level labels, the softmax runs over background + those classes: the other classes get
    probability 0, the kept ones are the unrestricted probabilities renormalised; no labels = unrestricted."""
    net = _MirrorNet()  # 3 seg channels: background, class 0, class 1
    img = _test_image(37, 50)
    cfg = InferenceConfig(flip=False)
    full = predict_maps(net, img, (0.5,) * 3, (0.5,) * 3, cfg, "cpu")["seg_prob"]
    only1 = predict_maps(net, img, (0.5,) * 3, (0.5,) * 3, cfg, "cpu", labels=[1])["seg_prob"]
    assert torch.equal(only1[1], torch.zeros(37, 50))
    kept = full[[0, 2]]
    torch.testing.assert_close(only1[[0, 2]], kept / kept.sum(0, keepdim=True))
    torch.testing.assert_close(predict_maps(net, img, (0.5,) * 3, (0.5,) * 3, cfg, "cpu", labels=[])["seg_prob"], full)
    flip = predict_maps(net, img, (0.5,) * 3, (0.5,) * 3, InferenceConfig(flip=True), "cpu", labels=[0])["seg_prob"]
    assert torch.equal(flip[2], torch.zeros(37, 50))


def test_grouping_scale_is_original_over_network_scale() -> None:
    from bestie.inference import grouping_scale

    assert grouping_scale((480, 640), InferenceConfig(resize=384)) == pytest.approx(640 / 384)
    assert grouping_scale((640, 427), InferenceConfig(resize=320)) == pytest.approx(2.0)
    assert grouping_scale((480, 640), InferenceConfig()) == 1.0  # no resize: the paper's original size
