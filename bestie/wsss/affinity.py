"""Inter-pixel affinities learnt from confident CAM seeds, and CAM propagation by random walk.

The "stronger option" of METHOD.md section 3, after AffinityNet (Ahn & Kwak, CVPR 2018, "Learning
Pixel-level Semantic Affinity with Image-level Supervision") with IRN's treatment of the background
(Ahn, Cho & Kwak, CVPR 2019):

- **Network** (:class:`AffinityNet`): an ImageNet backbone (default EfficientNet-Lite0, frozen as IRN
  freezes its ResNet) whose stride-4..32 features are each reduced by a 1x1 conv, resized to the
  affinity grid (stride ``stride``, 8 or 4) and fused by a 1x1 conv into an embedding ``f``. The
  affinity of pixels ``i, j`` is ``a_ij = exp(-mean_d |f_i[d] - f_j[d]|)`` (AffinityNet eq. 2).
- **Labels** (:func:`pair_labels`): a seed map (0 background, ``c + 1`` class ``c``, 255 unknown) taken at
  the centres of the grid cells; for every pair within ``radius`` (grid pixels, ``dy^2 + dx^2 < r^2``):
  both background -> positive (bg), same class -> positive (fg), different labels -> negative, any
  255 -> ignored.
- **Loss** (:func:`affinity_loss`, AffinityNet eq. 3-6): ``L = L_bg/4 + L_fg/4 + L_neg/2`` with
  ``L_bg = mean_{bg pairs} -log a``, ``L_fg = mean_{fg pairs} -log a``, ``L_neg = mean_{neg pairs} -log(1-a)``.
- **Random walk** (:func:`random_walk`): ``A = a^beta`` on all pairs within the radius (symmetric, ones
  on the diagonal), ``T = D^-1 A`` (row-normalised; AffinityNet's column-normalised matrix acting from the
  right, ``v T``, is the same operator), CAM vectors propagated ``2^logt`` steps: ``v <- T v``. Sparse
  (a torch CSR matrix times the ``(N, C)`` maps, step by step), so memory and time grow with
  ``N * pairs`` instead of the ``N^2`` (memory) and ``N^3`` (time) of AffinityNet's dense matrix powers.
- **Background** (:func:`affinity_scores`; IRN ``make_sem_seg_labels``): the propagated CAMs of the
  present classes are rescaled by their maximum (per class here, as the CAMs themselves are normalised
  per class; IRN uses one global maximum) and compared to a constant background score; argmax.
  AffinityNet's propagated ``(1 - max CAM)^alpha`` background is available as ``bg_mode="power"``.

Reference defaults: AffinityNet ``beta=8``, ``logt=8``, ``radius=5`` (on its stride-8 grid), crop 448,
8 epochs, loss weights 1/4, 1/4, 1/2; IRN ``beta=10``, ``exp_times=8``, ``sem_seg_bg_thres=0.25``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from bestie.errors import ArtifactError, ConfigError, DataError, TrainingError
from bestie.wsss.affinity_params import AffinityTrainParams, radius_offsets

__all__ = [
    "AffinityNet",
    "AffinityTrainParams",
    "radius_offsets",
    "pair_affinities",
    "pair_labels",
    "downsample_labels",
    "affinity_loss",
    "transition_matrix",
    "random_walk",
    "cams_to_grid",
    "grid_to_image",
    "train_affinity_net",
    "infer_affinities",
    "propagate_cams",
    "affinity_scores",
    "save_affinity_checkpoint",
    "load_affinity_checkpoint",
]

log = logging.getLogger(__name__)

IGNORE = 255
#: random-walk settings of :func:`propagate_cams` / :func:`affinity_scores` (AffinityNet: radius 5 grid pixels,
#: ``aff ** 8``, ``2 ** 8`` steps)
WALK_RADIUS = 5
WALK_BETA = 8.0
WALK_LOGT = 8
_PAD_MULTIPLE = 32


# ----------------------------------------------------------------------------------------------- geometry
def _shift(t: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``out[..., y, x] = t[..., y + dy, x + dx]`` with ``fill`` outside (``dy >= 0``)."""
    h, w = t.shape[-2:]
    out = torch.full_like(t, fill)
    if dy >= h or abs(dx) >= w:
        return out
    ys, ye = 0, h - dy
    if dx >= 0:
        out[..., ys:ye, 0 : w - dx] = t[..., dy:, dx:]
    else:
        out[..., ys:ye, -dx:] = t[..., dy:, : w + dx]
    return out


def _pair_valid(h: int, w: int, offsets: np.ndarray, device=None) -> torch.Tensor:
    """``(P, h, w)`` bool: the pair ``(p, p + d)`` lies inside the grid."""
    ys = torch.arange(h, device=device).view(h, 1)
    xs = torch.arange(w, device=device).view(1, w)
    masks = []
    for dy, dx in offsets.tolist():
        masks.append((ys + dy < h) & (xs + dx >= 0) & (xs + dx < w))
    return torch.stack(masks)


def pair_affinities(emb: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """Affinities ``exp(-mean_d |f(p) - f(p + off)|)`` for every grid pixel and offset (AffinityNet eq. 2).

    Args:
        emb: ``(B, D, h, w)`` float embedding.
        offsets: ``(P, 2)`` ``(dy, dx)`` from :func:`radius_offsets`.

    Returns:
        ``(B, P, h, w)`` affinities in ``(0, 1]``; pairs whose second pixel falls outside the grid hold
        an arbitrary value (mask them with :func:`pair_labels` / the validity mask).
    """
    out = []
    for dy, dx in offsets.tolist():
        other = _shift(emb, int(dy), int(dx), 0.0)
        out.append(torch.exp(-(emb - other).abs().mean(dim=1)))
    return torch.stack(out, dim=1)


def downsample_labels(labels: np.ndarray, stride: int) -> np.ndarray:
    """Label map at the affinity grid: the label at the centre pixel of each ``stride x stride`` cell.

    Cell ``(i, j)`` covers pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)``; its label is the pixel
    ``(i*s + s//2, j*s + s//2)`` (nearest-neighbour, as IRN's label rescaling), or 255 where that pixel
    is outside the map.

    Args:
        labels: ``(H, W)`` uint8 seed map.
        stride: grid stride in pixels.

    Returns:
        ``(ceil(H/s), ceil(W/s))`` uint8.
    """
    labels = np.asarray(labels)
    h, w = -(-labels.shape[0] // stride), -(-labels.shape[1] // stride)
    padded = np.full((h * stride, w * stride), IGNORE, np.uint8)
    padded[: labels.shape[0], : labels.shape[1]] = labels
    return np.ascontiguousarray(padded[stride // 2 :: stride, stride // 2 :: stride])


def pair_labels(labels: torch.Tensor, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affinity targets of all pairs ``(p, p + off)`` of a grid label map.

    Args:
        labels: ``(B, h, w)`` integer grid labels (0 bg, ``c + 1`` class, 255 unknown/outside).
        offsets: ``(P, 2)`` from :func:`radius_offsets`.

    Returns:
        ``(bg_pos, fg_pos, neg)``, each ``(B, P, h, w)`` float32 0/1 masks: both background; same
        foreground class; different labels. Pairs with a 255 (or outside the grid) are in none.
    """
    labels = labels.long()
    a = labels.unsqueeze(1)  # (B, 1, h, w)
    b = torch.stack([_shift(labels, int(dy), int(dx), IGNORE) for dy, dx in offsets.tolist()], dim=1)
    known = (a != IGNORE) & (b != IGNORE)
    same = a == b
    bg_pos = known & same & (a == 0)
    fg_pos = known & same & (a > 0)
    neg = known & ~same
    return bg_pos.float(), fg_pos.float(), neg.float()


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor,
                  eps: float = 1e-5) -> tuple[torch.Tensor, dict[str, float]]:
    """AffinityNet's class-balanced cross-entropy: ``L_bg/4 + L_fg/4 + L_neg/2``.

    Each term is the mean over its own pairs (a term without pairs is 0), so background-background,
    foreground-foreground and cross-boundary pairs weigh the same whatever their counts.

    Args:
        aff: ``(B, P, h, w)`` affinities in ``(0, 1]``.
        bg_pos, fg_pos, neg: ``(B, P, h, w)`` 0/1 masks of :func:`pair_labels`.

    Returns:
        ``(loss, stats)``: scalar tensor; stats ``{"bg", "fg", "neg"}`` term values and ``*_count`` pair counts.
    """
    bg_n, fg_n, neg_n = bg_pos.sum(), fg_pos.sum(), neg.sum()
    l_bg = (-torch.log(aff + eps) * bg_pos).sum() / (bg_n + eps)
    l_fg = (-torch.log(aff + eps) * fg_pos).sum() / (fg_n + eps)
    l_neg = (-torch.log(1.0 + eps - aff) * neg).sum() / (neg_n + eps)
    loss = l_bg / 4 + l_fg / 4 + l_neg / 2
    stats = {"bg": float(l_bg.detach()), "fg": float(l_fg.detach()), "neg": float(l_neg.detach()),
             "bg_count": float(bg_n), "fg_count": float(fg_n), "neg_count": float(neg_n)}
    return loss, stats


# ----------------------------------------------------------------------------------------------- network
class AffinityNet(nn.Module):
    """Backbone + multi-level 1x1 fusion head giving the affinity embedding at stride ``stride``.

    Args:
        backbone: a :class:`bestie.models.backbones.Backbone` (``forward(x) -> list of feature maps`` with
            ``feature_info`` and ``mean`` / ``std``); all its outputs with reduction ``>= 4`` are used.
        stride: grid stride of the embedding, 4 or 8 (input pixels per grid pixel).
        level_channels: width of each level's 1x1 reduction.
        embed_dim: ``D``, channels of the embedding.
        train_backbone: False (default, as IRN) keeps the backbone frozen in eval mode.

    ``forward(x)`` with ``x`` ``(B, 3, H, W)`` normalised by ``mean`` / ``std``, ``H`` and ``W`` multiples
    of 32, returns ``(B, D, H / stride, W / stride)`` float32.
    """

    def __init__(self, backbone: nn.Module, stride: int = 8, level_channels: int = 64, embed_dim: int = 128,
                 train_backbone: bool = False) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise ConfigError(f"affinity stride must be 4 or 8, got {stride!r}")
        self.backbone = backbone
        self.stride = int(stride)
        self.train_backbone = bool(train_backbone)
        chans = backbone.feature_info.channels()
        reds = backbone.feature_info.reduction()
        self.levels = [i for i, r in enumerate(reds) if r >= 4]
        if not self.levels:
            raise ConfigError("affinity backbone has no feature level with reduction >= 4")
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], level_channels, 1, bias=False), nn.GroupNorm(4, level_channels),
                          nn.ReLU(inplace=True))
            for i in self.levels
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(level_channels * len(self.levels), embed_dim, 1, bias=False),
            nn.GroupNorm(8, embed_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim, embed_dim, 1),
        )
        if not self.train_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.backbone.mean)

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.backbone.std)

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        if self.train_backbone:
            feats = self.backbone(x)
        else:
            with torch.no_grad():
                feats = self.backbone(x)
        outs = []
        for lat, i in zip(self.lateral, self.levels):
            y = lat(feats[i])
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y)
        return self.fuse(torch.cat(outs, dim=1))


def _normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 ``(image / 255 - mean) / std``."""
    x = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ----------------------------------------------------------------------------------------------- training
def _random_sample(image: np.ndarray, labels: np.ndarray, crop: int, scale_range: tuple[float, float],
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale, horizontal flip and ``crop x crop`` crop (image padded with 0, labels with 255)."""
    s = float(rng.uniform(*scale_range))
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(labels, (nw, nh), interpolation=cv2.INTER_NEAREST)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    ph, pw = max(nh, crop), max(nw, crop)
    img_p = np.zeros((ph, pw, 3), np.uint8)
    lab_p = np.full((ph, pw), IGNORE, np.uint8)
    oy, ox = int(rng.integers(0, ph - nh + 1)), int(rng.integers(0, pw - nw + 1))
    img_p[oy : oy + nh, ox : ox + nw] = image
    lab_p[oy : oy + nh, ox : ox + nw] = labels
    y0, x0 = int(rng.integers(0, ph - crop + 1)), int(rng.integers(0, pw - crop + 1))
    return img_p[y0 : y0 + crop, x0 : x0 + crop], lab_p[y0 : y0 + crop, x0 : x0 + crop]


def train_affinity_net(
    net: AffinityNet,
    samples: Sequence[tuple[np.ndarray, np.ndarray]] | Callable[[int], tuple[np.ndarray, np.ndarray]],
    params: AffinityTrainParams = AffinityTrainParams(),
    *,
    num_samples: int | None = None,
    device: str | torch.device = "cpu",
    log_every: int = 10,
) -> list[dict[str, float]]:
    """Train the affinity head on seed maps (AffinityNet section 3.3, with the frozen-backbone choice of IRN).

    Args:
        net: the :class:`AffinityNet` (trained in place).
        samples: a sequence of ``(image (H, W, 3) uint8, seeds (H, W) uint8)`` pairs, or a function
            ``i -> pair`` together with ``num_samples``; seeds are 0 bg / ``c + 1`` / 255 unknown.
        params: :class:`AffinityTrainParams`.
        num_samples: number of samples when ``samples`` is a function.
        device: torch device.
        log_every: log the loss every this many steps.

    Returns:
        One dict per step: ``{"step", "epoch", "loss", "bg", "fg", "neg", "*_count", "lr"}``.

    Raises:
        DataError: no sample, or a sample whose image and seed map differ in size.
        TrainingError: the loss became NaN / inf.
    """
    get = samples if callable(samples) else samples.__getitem__
    n = int(num_samples if callable(samples) else len(samples))
    if n < 1:
        raise DataError("train_affinity_net: no training sample")
    device = torch.device(device)
    rng = np.random.default_rng(params.seed)
    torch.manual_seed(params.seed)
    offsets = radius_offsets(params.radius)
    net.to(device).train()
    head = [p for n_, p in net.named_parameters() if p.requires_grad and not n_.startswith("backbone.")]
    groups = [{"params": head, "lr": params.lr}]
    if net.train_backbone:
        groups.append({"params": [p for p in net.backbone.parameters() if p.requires_grad], "lr": params.lr / 10})
    opt = torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = max(1, math.ceil(n / params.batch_size))
    total = steps_per_epoch * params.epochs
    base = [g["lr"] for g in opt.param_groups]
    history: list[dict[str, float]] = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(params.epochs):
        order = rng.permutation(n)
        for b in range(steps_per_epoch):
            idx = order[b * params.batch_size : (b + 1) * params.batch_size]
            xs, ys = [], []
            for i in idx.tolist():
                image, seeds = get(i)
                if image.shape[:2] != seeds.shape:
                    raise DataError(f"train_affinity_net: sample {i}: image {image.shape[:2]} and seeds {seeds.shape} differ")
                img_c, lab_c = _random_sample(image, seeds, params.crop, params.scale_range, rng)
                xs.append(_normalise(img_c, net.mean, net.std))
                ys.append(torch.from_numpy(downsample_labels(lab_c, net.stride)))
            x = torch.stack(xs).to(device)
            y = torch.stack(ys).to(device)
            factor = (1.0 - step / total) ** 0.9
            for g, lr0 in zip(opt.param_groups, base):
                g["lr"] = lr0 * factor
            emb = net(x)
            aff = pair_affinities(emb, offsets)
            bg_pos, fg_pos, neg = pair_labels(y, offsets)
            loss, stats = affinity_loss(aff, bg_pos, fg_pos, neg)
            if not torch.isfinite(loss):
                raise TrainingError(f"affinity training: loss is {float(loss)} at step {step} (epoch {epoch})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"], **stats}
            history.append(rec)
            if log_every and step % log_every == 0:
                log.info("affinity step %d/%d epoch %d loss %.4f (bg %.3f fg %.3f neg %.3f) %.1fs", step, total,
                         epoch, rec["loss"], stats["bg"], stats["fg"], stats["neg"], time.perf_counter() - t0)
            step += 1
    net.eval()
    return history


# ----------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def infer_affinities(net: AffinityNet, image: np.ndarray, radius: int,
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Affinities of one image on its grid (stride ``net.stride``).

    The image is padded (zeros, bottom/right) to a multiple of 32; the grid keeps the
    ``(ceil(H/s), ceil(W/s))`` cells that touch the image.

    Args:
        net: trained :class:`AffinityNet`.
        image: ``(H, W, 3)`` uint8 RGB.
        radius: pair radius in grid pixels.
        device: torch device.

    Returns:
        ``(aff, offsets, (h, w))``: ``aff`` ``(P, h, w)`` float32 affinities of the pairs ``(p, p + off)``
        (0 where ``p + off`` leaves the grid), ``offsets`` ``(P, 2)``, grid size.

    Raises:
        DataError: image not ``(H, W, 3)`` uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"infer_affinities: expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    net.eval()
    height, width = image.shape[:2]
    s = net.stride
    ph, pw = -(-height // _PAD_MULTIPLE) * _PAD_MULTIPLE, -(-width // _PAD_MULTIPLE) * _PAD_MULTIPLE
    x = _normalise(image, net.mean, net.std)
    x = F.pad(x, (0, pw - width, 0, ph - height))
    emb = net(x.unsqueeze(0).to(device))
    h, w = -(-height // s), -(-width // s)
    emb = emb[..., :h, :w]
    offsets = radius_offsets(radius)
    aff = pair_affinities(emb, offsets)[0]
    aff = aff * _pair_valid(h, w, offsets, aff.device)
    return aff.float().cpu().numpy(), offsets, (h, w)


def transition_matrix(aff: np.ndarray, offsets: np.ndarray, beta: float) -> sp.csr_matrix:
    """Row-stochastic random-walk matrix ``T = D^-1 A`` with ``A = aff^beta`` (symmetric, unit diagonal).

    Args:
        aff: ``(P, h, w)`` pair affinities in [0, 1] (0 for pairs outside the grid).
        offsets: ``(P, 2)`` ``(dy, dx)`` of each pair.
        beta: power that sharpens the affinities (AffinityNet: 8; IRN: 10).

    Returns:
        ``(N, N)`` scipy CSR float64 matrix, ``N = h * w`` (row-major grid index ``y * w + x``), whose rows
        sum to 1.
    """
    p, h, w = aff.shape
    n = h * w
    idx = np.arange(n).reshape(h, w)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.ones(n)]
    for k, (dy, dx) in enumerate(np.asarray(offsets).tolist()):
        y0, y1 = 0, h - dy
        x0, x1 = max(0, -dx), min(w, w - dx)
        if y1 <= y0 or x1 <= x0:
            continue
        src = idx[y0:y1, x0:x1].ravel()
        dst = idx[y0 + dy : y1 + dy, x0 + dx : x1 + dx].ravel()
        v = np.power(np.clip(aff[k, y0:y1, x0:x1].ravel().astype(np.float64), 0.0, 1.0), beta)
        keep = v > 0
        rows += [src[keep], dst[keep]]
        cols += [dst[keep], src[keep]]
        vals += [v[keep], v[keep]]
    a = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    deg = np.asarray(a.sum(axis=1)).ravel()
    return sp.diags(1.0 / deg) @ a


def random_walk(values: np.ndarray, trans: sp.csr_matrix, logt: int,
                device: str | torch.device = "cpu") -> np.ndarray:
    """Propagate ``values`` ``2^logt`` steps: ``v <- T v`` (AffinityNet eq. 7-8, as a sparse iteration).

    Args:
        values: ``(C, h, w)`` float maps on the grid.
        trans: ``(N, N)`` row-stochastic matrix of :func:`transition_matrix`, ``N = h * w``.
        logt: log2 of the number of steps (AffinityNet: 8, i.e. 256 steps).
        device: torch device of the products (a torch CSR matrix times a dense ``(N, C)`` matrix).

    Returns:
        ``(C, h, w)`` float32 propagated maps.

    Raises:
        DataError: size mismatch.
    """
    import warnings

    c, h, w = values.shape
    if trans.shape != (h * w, h * w):
        raise DataError(f"random_walk: transition matrix {trans.shape} does not fit a {h}x{w} grid")
    t = trans.tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        mat = torch.sparse_csr_tensor(
            torch.from_numpy(t.indptr.astype(np.int64)), torch.from_numpy(t.indices.astype(np.int64)),
            torch.from_numpy(t.data.astype(np.float32)), size=t.shape, device=device,
        )
        v = torch.from_numpy(np.ascontiguousarray(values.reshape(c, h * w).T, dtype=np.float32)).to(device)
        for _ in range(2 ** int(logt)):
            v = mat @ v
    return np.ascontiguousarray(v.T.reshape(c, h, w).cpu().numpy(), dtype=np.float32)


def cams_to_grid(cams: np.ndarray, stride: int) -> np.ndarray:
    """Average ``(K, H, W)`` CAMs over the ``stride x stride`` grid cells (zero padding bottom/right)."""
    k, height, width = cams.shape
    h, w = -(-height // stride), -(-width // stride)
    pad = np.zeros((k, h * stride, w * stride), np.float32)
    pad[:, :height, :width] = cams
    return pad.reshape(k, h, stride, w, stride).mean(axis=(2, 4))


def grid_to_image(maps: np.ndarray, stride: int, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``(C, h, w)`` grid maps to the image size (cell ``i`` covers ``[i*s, (i+1)*s)``)."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)).unsqueeze(0)
    up = F.interpolate(t, size=(maps.shape[1] * stride, maps.shape[2] * stride), mode="bilinear", align_corners=False)
    return up[0, :, : size[0], : size[1]].numpy()


def propagate_cams(
    net: AffinityNet,
    image: np.ndarray,
    maps: np.ndarray,
    *,
    radius: int = WALK_RADIUS,
    beta: float = WALK_BETA,
    logt: int = WALK_LOGT,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Random-walk propagation of score maps over the affinities of one image, at the image size.

    The maps are averaged over the grid cells (:func:`cams_to_grid`), propagated ``2^logt`` steps with
    ``T = D^-1 aff^beta`` (:func:`transition_matrix`, :func:`random_walk`) and upsampled bilinearly.

    Args:
        net: trained :class:`AffinityNet`.
        image: ``(H, W, 3)`` uint8 RGB.
        maps: ``(C, H, W)`` float maps at the image size (CAMs, optionally with a background map).
        radius, beta, logt: random-walk settings.
        device: torch device of the network and the products.

    Returns:
        ``(C, H, W)`` float32 propagated maps (not rescaled; ``T`` averages, so values stay in the range
        of the input).

    Raises:
        DataError: maps not ``(C, H, W)`` at the image size.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[1:] != image.shape[:2]:
        raise DataError(f"propagate_cams: maps {maps.shape} do not match the image {image.shape[:2]}")
    if maps.shape[0] == 0:
        return maps.copy()
    aff, offsets, (h, w) = infer_affinities(net, image, radius, device)
    trans = transition_matrix(aff, offsets, beta)
    rw = random_walk(cams_to_grid(maps, net.stride), trans, logt, device)
    return grid_to_image(rw, net.stride, image.shape[:2])


def affinity_scores(
    net: AffinityNet,
    image: np.ndarray,
    cams: np.ndarray,
    *,
    bg_mode: str = "threshold",
    bg_threshold: float = 0.35,
    bg_power: float = 16.0,
    radius: int = WALK_RADIUS,
    beta: float = WALK_BETA,
    logt: int = WALK_LOGT,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Scores ``[background, class 1..K]`` after the random walk; their argmax is the label map.

    ``bg_mode="threshold"`` (IRN): the CAMs are propagated, each divided by its maximum (+1e-5; IRN uses
    one global maximum, here per class as the CAMs themselves are normalised per class), and the
    background score is the constant ``bg_threshold``.
    ``bg_mode="power"`` (AffinityNet ``infer_aff``): a background map ``(1 - max_k CAM_k)^bg_power`` is
    propagated together with the CAMs and competes with them as is (AffinityNet: alpha 16).

    Args:
        net: trained :class:`AffinityNet`.
        image: ``(H, W, 3)`` uint8 RGB.
        cams: ``(K, H, W)`` float CAMs in [0, 1] at the image size.
        bg_mode, bg_threshold, bg_power: background handling (above).
        radius, beta, logt, device: see :func:`propagate_cams`.

    Returns:
        ``(K + 1, H, W)`` float32 scores, background first.

    Raises:
        DataError: cams not ``(K, H, W)`` at the image size.
        ConfigError: unknown ``bg_mode``.
    """
    cams = np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)
    if cams.ndim != 3 or cams.shape[1:] != image.shape[:2]:
        raise DataError(f"affinity_scores: cams {cams.shape} do not match the image {image.shape[:2]}")
    kw = dict(radius=radius, beta=beta, logt=logt, device=device)
    if bg_mode == "threshold":
        rw = np.maximum(propagate_cams(net, image, cams, **kw), 0.0)
        rw /= rw.reshape(rw.shape[0], -1).max(axis=1, initial=0.0).reshape(-1, 1, 1) + 1e-5
        return np.concatenate([np.full((1,) + rw.shape[1:], bg_threshold, np.float32), rw])
    if bg_mode == "power":
        peak = cams.max(axis=0, initial=0.0) if cams.shape[0] else np.zeros(image.shape[:2], np.float32)
        bg = np.power(1.0 - peak, bg_power, dtype=np.float32)
        return np.maximum(propagate_cams(net, image, np.concatenate([bg[None], cams]), **kw), 0.0)
    raise ConfigError(f"affinity bg_mode must be 'threshold' or 'power', got {bg_mode!r}")


# ----------------------------------------------------------------------------------------------- checkpoints
def save_affinity_checkpoint(path: str | Path, net: AffinityNet, meta: dict) -> None:
    """Write the head weights (and the backbone's when trained) with ``meta`` atomically to ``path``."""
    from bestie.io.atomic import atomic_path

    state = {k: v for k, v in net.state_dict().items() if net.train_backbone or not k.startswith("backbone.")}
    with atomic_path(path) as tmp:
        torch.save({"format": "bestie-affinity-1", "meta": dict(meta), "state_dict": state}, tmp)


def load_affinity_checkpoint(path: str | Path, net: AffinityNet) -> dict:
    """Load weights written by :func:`save_affinity_checkpoint` into ``net``; return its ``meta``.

    Raises:
        ArtifactError: unreadable file, wrong format, or tensors that do not fit ``net`` (names the file).
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is reported the same way
        raise ArtifactError(f"{path}: cannot read affinity checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != "bestie-affinity-1":
        raise ArtifactError(f"{path}: not a bestie affinity checkpoint")
    try:
        missing, unexpected = net.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: affinity weights do not fit the network: {exc}") from exc
    head_missing = [k for k in missing if not k.startswith("backbone.") or net.train_backbone]
    if head_missing or unexpected:
        raise ArtifactError(f"{path}: affinity checkpoint keys do not match: missing {head_missing[:5]}, "
                            f"unexpected {list(unexpected)[:5]}")
    return dict(ckpt.get("meta", {}))
