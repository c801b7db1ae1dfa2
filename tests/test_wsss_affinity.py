"""Tests of bestie.wsss.affinity: AffinityNet-style affinities and the random walk (METHOD.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bestie.errors import ArtifactError, ConfigError
from bestie.wsss.affinity import (
    AffinityNet,
    AffinityTrainParams,
    affinity_loss,
    affinity_scores,
    cams_to_grid,
    downsample_labels,
    grid_to_image,
    infer_affinities,
    load_affinity_checkpoint,
    pair_affinities,
    pair_labels,
    propagate_cams,
    radius_offsets,
    random_walk,
    save_affinity_checkpoint,
    train_affinity_net,
    transition_matrix,
)

torch.set_num_threads(1)


def test_radius_offsets_half_disk():
    off = radius_offsets(5)
    # dy = 0: dx 1..4 (4); dy = 1: |dx| <= 4 (9); dy = 2: |dx| <= 4 (9); dy = 3: |dx| <= 3 (7); dy = 4: |dx| <= 2 (5)
    assert len(off) == 34
    pairs = {tuple(o) for o in off.tolist()}
    assert len(pairs) == 34
    assert all((-dy, -dx) not in pairs for dy, dx in pairs)
    assert all(0 < dy * dy + dx * dx < 25 for dy, dx in pairs)
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in pairs)
    with pytest.raises(ConfigError):
        radius_offsets(1)


def test_downsample_labels_takes_cell_centres():
    lab = np.arange(36, dtype=np.uint8).reshape(6, 6)
    # stride 4: cells [0,4) and [4,8) (padded with 255): centres at pixels 2 and 6 (outside -> 255)
    out = downsample_labels(lab, 4)
    assert out.tolist() == [[14, 255], [255, 255]]
    out2 = downsample_labels(lab, 2)
    assert out2.tolist() == [[7, 9, 11], [19, 21, 23], [31, 33, 35]]


def test_pair_labels_hand_made():
    labels = torch.tensor([[[0, 0, 1], [1, 255, 1]]])
    offsets = np.array([[0, 1], [1, 0]])
    bg, fg, neg = pair_labels(labels, offsets)
    # offset (0, 1): pairs (0,0)-(0,1) bg-bg; (0,1)-(0,2) bg-fg neg; (0,2)-outside ignored;
    #                (1,0)-(1,1) has 255 ignored; (1,1)-(1,2) ignored; (1,2)-outside ignored
    assert bg[0, 0].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert neg[0, 0].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert fg[0, 0].sum() == 0
    # offset (1, 0): (0,0)-(1,0) bg-fg neg; (0,1)-(1,1) ignored; (0,2)-(1,2) fg-fg same class; row 1 outside
    assert neg[0, 1].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert fg[0, 1].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert bg[0, 1].sum() == 0


def test_affinity_loss_values():
    shape = (1, 2, 2, 2)
    bg = torch.zeros(shape); fg = torch.zeros(shape); neg = torch.zeros(shape)
    bg[0, 0, 0, 0] = 1; fg[0, 0, 1, 1] = 1; neg[0, 1, 0, 1] = 1
    half = torch.full(shape, 0.5)
    loss, stats = affinity_loss(half, bg, fg, neg)
    # every term is -log(0.5); weights 1/4 + 1/4 + 1/2 = 1
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-3)
    assert stats["bg_count"] == 1 and stats["neg_count"] == 1
    perfect = torch.zeros(shape)
    perfect[bg.bool() | fg.bool()] = 1.0
    loss0, _ = affinity_loss(perfect, bg, fg, neg)
    assert float(loss0) < 1e-3


def test_pair_affinities_identical_embeddings_give_one():
    emb = torch.ones(1, 4, 5, 6)
    emb[..., 3:] = 3.0  # columns >= 3 differ by 2 in every channel: affinity exp(-2)
    aff = pair_affinities(emb, np.array([[0, 1]]))
    assert aff.shape == (1, 1, 5, 6)
    assert torch.allclose(aff[0, 0, :, 0], torch.ones(5))
    assert torch.allclose(aff[0, 0, :, 2], torch.full((5,), float(np.exp(-2.0))))


def test_transition_matrix_rows_and_dense_equivalent():
    rng = np.random.default_rng(0)
    h, w = 3, 4
    off = radius_offsets(2)  # (0,1), (1,-1), (1,0), (1,1)
    aff = rng.random((len(off), h, w))
    t = transition_matrix(aff, off, beta=2.0).toarray()
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-12)
    # rebuild A by hand: A[p, p+d] = A[p+d, p] = aff^2, unit diagonal
    a = np.eye(h * w)
    for k, (dy, dx) in enumerate(off.tolist()):
        for y in range(h):
            for x in range(w):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w:
                    a[y * w + x, yy * w + xx] = a[yy * w + xx, y * w + x] = aff[k, y, x] ** 2
    np.testing.assert_allclose(t, a / a.sum(axis=1, keepdims=True), atol=1e-12)


def test_random_walk_stays_inside_its_region():
    h, w = 6, 10
    regions = np.zeros((h, w), int)
    regions[:, 5:] = 1
    off = radius_offsets(3)
    aff = np.zeros((len(off), h, w))
    for k, (dy, dx) in enumerate(off.tolist()):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    aff[k, y, x] = 1.0 if regions[y, x] == regions[y + dy, x + dx] else 0.0
    v = np.zeros((1, h, w), np.float32)
    v[0, 2, 1] = 1.0
    out = random_walk(v, transition_matrix(aff, off, beta=8.0), logt=8)[0]
    assert np.all(out[:, 5:] == 0.0)  # nothing crosses a zero-affinity boundary
    left = out[:, :5]
    assert left.min() > 0 and left.max() / left.min() < 1.05  # ~uniform after 256 steps
    # T = D^-1 A with symmetric A converges to the degree-weighted mean per component:
    # every pixel of the region -> d_seed / sum_region d, with d = 1 + same-region neighbours in the radius
    full = np.concatenate([off, -off])
    deg = np.ones((h, w))
    for y in range(h):
        for x in range(w):
            for dy, dx in full.tolist():
                if 0 <= y + dy < h and 0 <= x + dx < w and regions[y + dy, x + dx] == regions[y, x]:
                    deg[y, x] += 1
    expected = deg[2, 1] / deg[:, :5].sum()
    np.testing.assert_allclose(left, expected, rtol=0.02)


def test_grid_helpers_round_trip():
    cams = np.zeros((1, 10, 13), np.float32)
    cams[0, :8, :8] = 1.0
    g = cams_to_grid(cams, 4)
    assert g.shape == (1, 3, 4)
    assert g[0, 0, 0] == 1.0 and g[0, 0, 2] == 0.0 and g[0, 2, 0] == 0.0
    up = grid_to_image(g, 4, (10, 13))
    assert up.shape == (1, 10, 13)
    assert up[0, 0, 0] == pytest.approx(1.0) and up[0, 9, 12] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- learning on synthetic images
def _toy(rng: np.random.Generator, size: int = 96):
    """Blue background with a red square (class 0): image, seeds (GT with a 255 ring), GT mask."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (30, 60, 200)
    y0, x0 = rng.integers(8, size // 2, 2)
    s = int(rng.integers(size // 4, size // 2))
    gt = np.zeros((size, size), np.uint8)
    gt[y0 : y0 + s, x0 : x0 + s] = 1
    img[gt == 1] = (210, 40, 30)
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    import cv2

    ring = cv2.dilate(gt, np.ones((7, 7), np.uint8)) != cv2.erode(gt, np.ones((7, 7), np.uint8))
    seeds = gt.copy()
    seeds[ring] = 255
    return img, seeds, gt


@pytest.fixture(scope="module")
def trained_net():
    from bestie.models.backbones import create_backbone

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    samples = [_toy(rng)[:2] for _ in range(6)]
    net = AffinityNet(create_backbone("tf_efficientnet_lite0", "imagenet"), stride=8, embed_dim=32)
    hist = train_affinity_net(net, samples, AffinityTrainParams(epochs=6, batch_size=3, lr=3e-3, crop=64,
                                                                scale_range=(0.9, 1.1), radius=4, seed=0))
    return net, hist


def test_training_lowers_the_loss_and_separates_regions(trained_net):
    net, hist = trained_net
    first = np.mean([h["loss"] for h in hist[:2]])
    last = np.mean([h["loss"] for h in hist[-2:]])
    assert last < 0.8 * first
    img, _, gt = _toy(np.random.default_rng(42))
    aff, off, (h, w) = infer_affinities(net, img, radius=4)
    g = downsample_labels(gt, 8).astype(int)
    k = int(np.flatnonzero((off[:, 0] == 0) & (off[:, 1] == 1))[0])  # right neighbour
    same = g[:, :-1] == g[:, 1:]
    a = aff[k, :, :-1]
    assert a[same].mean() > a[~same].mean() + 0.2


def test_propagation_extends_a_partial_cam(trained_net):
    net, _ = trained_net
    img, _, gt = _toy(np.random.default_rng(7))
    ys, xs = np.nonzero(gt)
    cam = np.zeros(gt.shape, np.float32)
    # the CAM covers only the top-left quarter of the object
    cy, cx = ys.min() + (ys.max() - ys.min()) // 2, xs.min() + (xs.max() - xs.min()) // 2
    cam[ys.min() : cy, xs.min() : cx] = 1.0
    raw = propagate_cams(net, img, cam[None], radius=4, beta=8.0, logt=6)
    # T is row-stochastic: propagated values are averages of the input, within [0, 1]
    assert raw.shape == (1,) + gt.shape and raw.min() >= -1e-6 and raw.max() <= 1.0 + 1e-6
    scores = affinity_scores(net, img, cam[None], bg_mode="threshold", bg_threshold=0.3, radius=4, logt=6)
    assert scores.shape == (2,) + gt.shape and np.all(scores[0] == np.float32(0.3))
    assert scores[1].max() == pytest.approx(1.0, abs=1e-4)

    def iou(pred):
        return (pred & (gt == 1)).sum() / (pred | (gt == 1)).sum()

    assert iou(scores.argmax(0) == 1) > iou(cam > 0.3) + 0.1
    # AffinityNet's background (1 - max CAM)^16 is ~1 wherever the CAM is 0 and propagates as well; with a
    # weak (0.4) activation on the rest of the object the object's mean favours the class, outside the bg
    soft = np.where(gt == 1, np.maximum(cam, 0.4), 0.0).astype(np.float32)
    power = affinity_scores(net, img, soft[None], bg_mode="power", bg_power=16, radius=4, logt=6)
    assert power.shape == (2,) + gt.shape
    assert iou(power.argmax(0) == 1) > 0.6
    with pytest.raises(ConfigError):
        affinity_scores(net, img, cam[None], bg_mode="saliency")


def test_checkpoint_round_trip(trained_net, tmp_path):
    from bestie.models.backbones import create_backbone

    net, _ = trained_net
    path = tmp_path / "aff.pt"
    save_affinity_checkpoint(path, net, {"stride": 8})
    fresh = AffinityNet(create_backbone("tf_efficientnet_lite0", "imagenet"), stride=8, embed_dim=32)
    meta = load_affinity_checkpoint(path, fresh)
    assert meta == {"stride": 8}
    for (k, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    wrong = AffinityNet(create_backbone("tf_efficientnet_lite0", None, warn_random=False), stride=8, embed_dim=16)
    with pytest.raises(ArtifactError):
        load_affinity_checkpoint(path, wrong)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError):
        load_affinity_checkpoint(tmp_path / "junk.pt", fresh)
