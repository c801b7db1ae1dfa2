"""The learning probe of BESTIE training (bestie.probe): hand-made cases and a real dataset's crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bestie.errors import ConfigError
from bestie.losses import BestieLoss
from bestie.params import GroupingParams
from bestie.probe import PROBE_EPOCH, peak_scores, probe_keys, probe_metrics, probe_over_dataset
from bestie.targets import make_pseudo_instance_labels

INF = dict(grouping=GroupingParams(center_threshold=0.1, nms_kernel=41, beta=3.0, min_area=50))


def scene():
    """Two classes, one square instance each, pseudo targets from bestie.targets (image setting)."""
    wsss = np.zeros((64, 96), np.uint8)
    wsss[8:40, 8:40] = 1
    wsss[20:60, 50:90] = 2
    points = np.array([[20, 20, 0, 1.0], [70, 40, 1, 1.0]], np.float32)
    t = make_pseudo_instance_labels(wsss, [0, 1], points, num_classes=2)
    batch = {k: torch.from_numpy(np.asarray(t[k]))[None] for k in ("center", "offset", "weight")}
    prob = np.zeros((1, 3, 64, 96), np.float32)
    for c in range(3):
        prob[0, c][wsss == c] = 1.0
    logits = torch.from_numpy(np.log(prob + 1e-6))
    return batch, logits


def test_perfect_prediction_scores_one_at_peaks_and_zero_mse():
    batch, logits = scene()
    loss = BestieLoss()
    out = {"seg": logits, "center": batch["center"].clone(), "offset": batch["offset"].clone()}
    m = probe_metrics(out, batch, loss.center_term, **INF)
    assert m["probe_peaks"] == 2
    assert m["probe_peak_score"] == pytest.approx(1.0) and m["probe_peak_share"] == 1.0
    assert m["probe_center_mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["probe_center_mse_zero"] > 0
    # each square is grouped from its NMS center: 2 instances, none from the fallback
    assert m["probe_instances"] == 2 and m["probe_center_instance_share"] == 1.0


def test_zero_prediction_gives_the_zero_prediction_mse():
    batch, logits = scene()
    loss = BestieLoss()
    out = {"seg": logits, "center": torch.zeros_like(batch["center"]), "offset": torch.zeros_like(batch["offset"])}
    m = probe_metrics(out, batch, loss.center_term, **INF)
    assert m["probe_peak_score"] == 0.0 and m["probe_peak_share"] == 0.0
    assert m["probe_center_mse"] == pytest.approx(m["probe_center_mse_zero"])
    # by hand: sum of the squared Gaussians over the weighted pixels / number of weighted pixels x 200
    c, w = batch["center"][0].numpy(), batch["weight"][0].numpy()
    exp = float((c ** 2 * w[None]).sum() / (w > 0).sum() * 200)
    assert m["probe_center_mse_zero"] == pytest.approx(exp, rel=1e-5)
    # no center above 0.1 and offsets 0: every component comes from the fallback
    assert m["probe_instances"] == 2 and m["probe_center_instance_share"] == 0.0


def test_half_height_prediction_and_peak_reading():
    batch, logits = scene()
    pred = 0.5 * batch["center"]
    scores = peak_scores(pred, batch["center"])
    np.testing.assert_allclose(scores.numpy(), [0.5, 0.5])
    m = probe_metrics({"seg": logits, "center": pred, "offset": batch["offset"]}, batch, BestieLoss().center_term,
                      **INF)
    assert m["probe_center_mse"] == pytest.approx(0.25 * m["probe_center_mse_zero"], rel=1e-5)


def test_probe_keys_spread_and_errors():
    assert probe_keys(97, 8) == [(i, PROBE_EPOCH) for i in (0, 14, 27, 41, 55, 69, 82, 96)]
    assert probe_keys(3, 8) == [(i, PROBE_EPOCH) for i in (0, 1, 2)]
    with pytest.raises(ConfigError):
        probe_keys(5, 0)


class _Crops:
    """Probe samples by key: sample ``k`` is the hand-made scene; its image carries ``k`` so that the fake
    network below can tell the crops apart."""

    def __init__(self, n: int):
        batch, self.logits = scene()
        self.target = {k: v[0] for k, v in batch.items()}
        self.n = n

    def __getitem__(self, key):
        i = key[0]
        return {"image": torch.full((3, 64, 96), float(i)), "semantic": torch.zeros(64, 96, dtype=torch.long),
                **self.target}


def test_probe_over_dataset_adds_up_over_batches():
    """Crops 0 and 2 predicted perfectly, crop 1 all zero: the pooled figures by hand, and the same for any
    batch size (the totals of probe_sums add up, they are not averaged per batch)."""
    crops = _Crops(3)
    loss = BestieLoss()

    def forward(image):
        n = image.shape[0]
        good = (image[:, 0, 0, 0] != 1).float().view(n, 1, 1, 1)
        return {"seg": crops.logits.expand(n, -1, -1, -1), "center": good * crops.target["center"][None],
                "offset": crops.target["offset"][None].expand(n, -1, -1, -1)}

    keys = probe_keys(3, 3)
    figs = [probe_over_dataset(forward, crops, keys, loss.center_term, batch_size=b, **INF) for b in (1, 2, 3)]
    assert figs[0] == pytest.approx(figs[1]) and figs[0] == pytest.approx(figs[2])
    f = figs[0]
    one = probe_metrics({"seg": crops.logits, "center": torch.zeros(1, 2, 64, 96),
                         "offset": crops.target["offset"][None]}, {k: v[None] for k, v in crops.target.items()},
                        loss.center_term, **INF)
    assert f["probe_crops"] == 3 and f["probe_peaks"] == 6
    assert f["probe_peak_score"] == pytest.approx(4 / 6) and f["probe_peak_share"] == pytest.approx(4 / 6)
    # every crop has the same weighted pixels, so the pooled MSEs are the means over the crops
    assert f["probe_center_mse_zero"] == pytest.approx(one["probe_center_mse_zero"], rel=1e-6)
    assert f["probe_center_mse"] == pytest.approx(one["probe_center_mse_zero"] / 3, rel=1e-6)
    # perfect centres and offsets: both instances from centres; all-zero centres: both from the fallback
    assert f["probe_instances"] == 6 and f["probe_center_instance_share"] == pytest.approx(4 / 6)
    with pytest.raises(ConfigError):
        probe_over_dataset(forward, crops, [], loss.center_term, **INF)
    with pytest.raises(ConfigError):
        probe_over_dataset(forward, crops, keys, loss.center_term, batch_size=0, **INF)
