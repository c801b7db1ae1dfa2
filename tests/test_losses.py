"""Tests of bestie.losses on hand-computed cases (METHOD.md section 4, "Loss")."""

from __future__ import annotations

import math

import pytest
import torch

from bestie.errors import ConfigError, DataError
from bestie.losses import BestieLoss, DeepLabCE, weighted_l1, weighted_mse


def ce(logit_row, label):
    return math.log(sum(math.exp(v) for v in logit_row)) - logit_row[label]


def test_deeplab_ce_top_k_hand_case():
    # 10 pixels, 2 classes, logits (0, a_i), label 0: CE_i = log(1 + e^{a_i})
    a = [-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, -2.0, 4.0, 0.2]
    logits = torch.tensor([[0.0] * 10, a]).reshape(1, 2, 1, 10)
    labels = torch.zeros((1, 1, 10), dtype=torch.long)
    per = sorted((ce([0.0, v], 0) for v in a), reverse=True)
    # top 20 % of 10 pixels = the 2 hardest
    assert DeepLabCE()(logits, labels).item() == pytest.approx((per[0] + per[1]) / 2, rel=1e-6)
    assert DeepLabCE(top_k_percent=0.5)(logits, labels).item() == pytest.approx(sum(per[:5]) / 5, rel=1e-6)
    assert DeepLabCE(top_k_percent=1.0)(logits, labels).item() == pytest.approx(sum(per) / 10, rel=1e-6)


def test_deeplab_ce_ignore_label_counts_as_zero_loss_pixels():
    a = [4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
    logits = torch.tensor([[0.0] * 10, a]).reshape(1, 2, 1, 10)
    labels = torch.tensor([255, 255, 0, 0, 0, 0, 0, 0, 255, 255]).reshape(1, 1, 10)
    # ignored pixels have loss 0 (here the two hardest ones), the 2 hardest remaining are a = 2 and 1
    exp = (ce([0, 2.0], 0) + ce([0, 1.0], 0)) / 2
    assert DeepLabCE()(logits, labels).item() == pytest.approx(exp, rel=1e-6)
    # mean over all 10 pixels with top_k 1.0 (ignored pixels count with 0 loss, as the reference)
    exp_all = sum(ce([0, v], 0) for v in a[2:8]) / 10
    assert DeepLabCE(top_k_percent=1.0)(logits, labels).item() == pytest.approx(exp_all, rel=1e-6)
    all_ignored = torch.full((1, 1, 10), 255, dtype=torch.long)
    assert DeepLabCE()(logits, all_ignored).item() == 0.0
    tiny = DeepLabCE()(logits[..., :2], labels[..., 2:4])  # int(0.2 * 2) = 0 -> at least one pixel
    assert tiny.item() == pytest.approx(ce([0, 4.0], 0), rel=1e-6)
    with pytest.raises(ConfigError):
        DeepLabCE(top_k_percent=0.0)
    with pytest.raises(DataError):
        DeepLabCE()(logits, labels[0])


def test_weighted_mse_normalisation_and_gradient():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0]]]], requires_grad=True)  # (1,2,2,2)
    target = torch.zeros((1, 2, 2, 2))
    weight = torch.tensor([[[0.0, 0.5], [1.0, 0.0]]])  # two weighted pixels
    # sum over channels: pixel (0,1): 0.5 * (4 + 0); pixel (1,0): 1 * (9 + 1) -> 12 / 2 pixels
    loss = weighted_mse(pred, target, weight)
    assert loss.item() == pytest.approx(6.0)
    loss.backward()
    exp_grad = torch.tensor([[[[0.0, 0.5 * 2 * 2 / 2], [1 * 2 * 3 / 2, 0.0]], [[0.0, 0.0], [1 * 2 * 1 / 2, 0.0]]]])
    torch.testing.assert_close(pred.grad, exp_grad)
    assert weighted_mse(pred, target, weight[:, None]).item() == pytest.approx(6.0)  # (B, 1, H, W) weight


def test_weighted_losses_zero_when_no_weight_with_live_graph():
    pred = torch.randn(2, 3, 4, 5, requires_grad=True)
    zero_w = torch.zeros(2, 4, 5)
    for fn in (weighted_mse, weighted_l1):
        loss = fn(pred, torch.randn(2, 3, 4, 5), zero_w)
        assert loss.item() == 0.0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, pred)
        assert torch.count_nonzero(g) == 0


def test_weighted_l1_normalisation_and_gradient():
    pred = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.5]]]], requires_grad=True)  # (1, 2, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]], [[0.0, 1.0]]]])
    weight = torch.tensor([[[0.25, 1.0]]])
    # pixel 0: 0.25 * (1 + 3) = 1; pixel 1: 1 * (2 + 0.5) = 2.5 -> 3.5 / 2
    loss = weighted_l1(pred, target, weight)
    assert loss.item() == pytest.approx(1.75)
    loss.backward()
    torch.testing.assert_close(pred.grad, torch.tensor([[[[0.125, -0.5]], [[0.125, -0.5]]]]))
    with pytest.raises(DataError):
        weighted_l1(pred, target[:, :1], weight)
    with pytest.raises(DataError):
        weighted_l1(pred, target, torch.ones(1, 3, 2))


def loss_case():
    seg = torch.zeros((1, 2, 2, 2), requires_grad=True)  # CE = log 2 on every pixel
    center = torch.zeros((1, 1, 2, 2), requires_grad=True)
    offset = torch.zeros((1, 2, 2, 2), requires_grad=True)
    outputs = {"seg": seg, "center": center, "offset": offset}
    pw = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    pseudo = {"center": torch.full((1, 1, 2, 2), 0.5), "offset": torch.full((1, 2, 2, 2), 2.0), "weight": pw}
    rw = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    refined = {"center": torch.ones((1, 1, 2, 2)), "offset": torch.full((1, 2, 2, 2), 3.0), "weight": rw,
               "has_center": True}
    sem = torch.tensor([[[0, 1], [255, 1]]])
    return outputs, pseudo, refined, sem


def test_bestie_loss_weights_and_half_averaging():
    outputs, pseudo, refined, sem = loss_case()
    out = BestieLoss()(outputs, pseudo, refined, sem)
    assert out["seg"].item() == pytest.approx(math.log(2))  # top 20 % of 4 pixels = 1 pixel
    assert out["center_pseudo"].item() == pytest.approx(0.25 * 200)  # 0.5^2 on one pixel
    assert out["center_refined"].item() == pytest.approx((1.0 + 0.5) / 2 * 200)
    assert out["offset_pseudo"].item() == pytest.approx(4.0 * 0.01)  # |2| x 2 channels on one pixel
    assert out["offset_refined"].item() == pytest.approx((6.0 + 3.0) / 2 * 0.01)
    assert out["center"].item() == pytest.approx(0.5 * (50 + 150))
    assert out["offset"].item() == pytest.approx(0.5 * (0.04 + 0.045))
    assert out["total"].item() == pytest.approx(math.log(2) + 100 + 0.0425)
    out["total"].backward()
    for t in outputs.values():
        assert t.grad is not None and torch.count_nonzero(t.grad) > 0


def test_bestie_loss_without_refined_and_point_setting():
    outputs, pseudo, refined, sem = loss_case()
    plain = BestieLoss()(outputs, pseudo, None, sem)
    assert plain["center"].item() == pytest.approx(50.0)  # the pseudo term takes the full weight
    assert plain["offset"].item() == pytest.approx(0.04)
    assert plain["total"].item() == pytest.approx(math.log(2) + 50 + 0.04)
    point = dict(refined, has_center=False, center=torch.zeros((1, 1, 2, 2)))
    out = BestieLoss()(outputs, pseudo, point, sem)
    assert out["center"].item() == pytest.approx(50.0)  # no refined center target
    assert out["offset"].item() == pytest.approx(0.5 * (0.04 + 0.045))
    custom = BestieLoss(seg_weight=2.0, center_weight=1.0, offset_weight=1.0)(outputs, pseudo, refined, sem)
    assert custom["total"].item() == pytest.approx(2 * math.log(2) + 0.5 * (0.25 + 0.75) + 0.5 * (4 + 4.5))
    with pytest.raises(DataError):
        BestieLoss()({"seg": outputs["seg"]}, pseudo, None, sem)
    with pytest.raises(ConfigError):
        BestieLoss(center_weight=-1)


def test_center_agnostic_compares_first_channel_with_class_maximum():
    # targets: class 0 Gaussian value 1.0 at pixel (0,0), class 1 value 0.5 at pixel (0,1); weight on both
    target = torch.zeros((1, 2, 1, 2))
    target[0, 0, 0, 0] = 1.0
    target[0, 1, 0, 1] = 0.5
    weight = torch.ones((1, 1, 2))
    shared = torch.tensor([[[[0.8, 0.2]]]], requires_grad=True)  # (1, 1, 1, 2): one center channel
    pred = shared.expand(-1, 2, -1, -1)  # as BestieNet(center_mode="agnostic") returns it
    loss = BestieLoss(center_agnostic=True)
    # MSE of the shared channel against max over classes (1.0, 0.5): ((0.2)^2 + (0.3)^2) / 2 pixels x 200
    term = loss.center_term(pred, target, weight)
    assert term.item() == pytest.approx((0.04 + 0.09) / 2 * 200, rel=1e-6)
    term.backward()
    torch.testing.assert_close(shared.grad, torch.tensor([[[[2 * -0.2 / 2 * 200, 2 * -0.3 / 2 * 200]]]]))
    # the class-wise loss counts every channel: channel 0 (0.2^2 + 0.2^2), channel 1 (0.8^2 + 0.3^2)
    classwise = BestieLoss().center_term(pred.detach(), target, weight)
    assert classwise.item() == pytest.approx((0.04 + 0.04 + 0.64 + 0.09) / 2 * 200, rel=1e-6)


def test_center_support_weight_boosts_gaussian_pixels_only():
    # 4 weighted pixels; the target is 0.5 on pixel 0 (support), 0.005 on pixel 1 (below 0.01), 0 elsewhere
    target = torch.tensor([[[[0.5, 0.005, 0.0, 0.0]]]])
    pred = torch.zeros_like(target)
    weight = torch.ones((1, 1, 4))
    plain = BestieLoss().center_term(pred, target, weight).item()
    assert plain == pytest.approx((0.25 + 0.005 ** 2) / 4 * 200, rel=1e-6)
    boosted = BestieLoss(center_support_weight=20.0).center_term(pred, target, weight).item()
    assert boosted == pytest.approx((20 * 0.25 + 0.005 ** 2) / 4 * 200, rel=1e-6)
    # weight 0 stays 0, and the denominator still counts weighted pixels only
    weight0 = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])
    assert BestieLoss(center_support_weight=20.0).center_term(pred, target, weight0).item() == \
        pytest.approx(0.005 ** 2 / 2 * 200, rel=1e-6)
    with pytest.raises(ConfigError):
        BestieLoss(center_support_weight=0.5)


def test_center_pair_equals_the_two_center_terms_values_and_gradient():
    """The fused pseudo + refined center pass = 0.5 (center_term(t1) + center_term(t2)), values and gradient,
    class-wise, agnostic and with the support boost."""
    g = torch.Generator().manual_seed(3)
    base = torch.rand((2, 3, 5, 6), generator=g)
    t1, t2 = torch.rand((2, 3, 5, 6), generator=g), torch.rand((2, 3, 5, 6), generator=g)
    t1[0, 1, 2, 2] = 1.0
    w1 = (torch.rand((2, 5, 6), generator=g) > 0.5).float()
    w2 = torch.rand((2, 5, 6), generator=g) * (torch.rand((2, 5, 6), generator=g) > 0.3)
    for kw in ({}, {"center_agnostic": True}, {"center_support_weight": 5.0}):
        loss = BestieLoss(**kw)
        p_ref = base.clone().requires_grad_(True)
        c1, c2 = loss.center_term(p_ref, t1, w1), loss.center_term(p_ref, t2, w2)
        (0.5 * (c1 + c2)).backward()
        p = base.clone().requires_grad_(True)
        center, f1, f2 = loss.center_pair(p, t1, w1, t2, w2)
        assert center.item() == pytest.approx(0.5 * (c1.item() + c2.item()), rel=1e-5), kw
        assert f1.item() == pytest.approx(c1.item(), rel=1e-5) and f2.item() == pytest.approx(c2.item(), rel=1e-5)
        assert not f1.requires_grad and not f2.requires_grad
        center.backward()
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)
    again = BestieLoss().center_pair(base.clone().requires_grad_(True), t1, w1, t2, w2)[0]
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):  # the kept buffer became the first gradient
        again.backward()


def test_deeplab_ce_value_and_gradient_equal_torch_cross_entropy():
    """The one-allocation pixel cross entropy = F.cross_entropy (ignore 255) in value and gradient, with the
    hard-pixel top-k on top."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn((2, 4, 6, 7), generator=g) * 4).requires_grad_(True)
    labels = torch.randint(0, 4, (2, 6, 7), generator=g)
    labels[0, :2] = 255
    for top_k in (0.2, 1.0):
        ref_logits = logits.detach().clone().requires_grad_(True)
        pixel = F.cross_entropy(ref_logits, labels, ignore_index=255, reduction="none").reshape(-1)
        k = max(1, int(top_k * pixel.numel()))
        ref = torch.topk(pixel, k, sorted=False).values.mean() if top_k < 1 else pixel.mean()
        ref.backward()
        logits.grad = None
        got = DeepLabCE(top_k_percent=top_k)(logits, labels.to(torch.uint8))
        got.backward()
        assert got.item() == pytest.approx(ref.item(), rel=1e-6)
        torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(logits.grad[0, :, :2]) == 0  # ignored pixels get no gradient
