"""WSSS maps from dense CAMs: background threshold, dense CRF, uncertain band (METHOD.md section 3).

The baseline of ``../shared/docs/METHOD.md`` section 3, with image-level supervision only:

1. scores ``S = [bg_threshold, CAM_1, ..., CAM_K]`` per pixel (a constant background score against the
   CAMs of the classes in the image label);
2. a fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011, through ``pydensecrf2``) whose unary is the
   negative log of the normalised scores ``S / sum(S)`` (or, ``unary="labels"``, of the hard
   ``argmax S`` labels with confidence ``gt_prob``, as IRN's ``crf_inference_label``), with a Gaussian
   smoothness kernel and a bilateral appearance kernel; the CRF label is the argmax of its marginals;
3. pixels where a confident seed disagrees with the CRF label become 255 (uncertain). See
   :func:`seed_map` and :func:`cams_to_wsss` for the exact rule.

Default pairwise parameters are those of IRN (Ahn et al., CVPR 2019, ``misc/imutils.crf_inference_label``):
Gaussian ``sxy=3, compat=3``; bilateral ``sxy=50, srgb=5, compat=10``; 10 mean-field iterations.
AffinityNet (Ahn & Kwak, CVPR 2018) used a bilateral ``sxy=80, srgb=13``; both are available through
:class:`CrfParams`. The seed thresholds 0.30 / 0.05 are IRN's ``conf_fg_thres`` / ``conf_bg_thres``.

Label convention (docs/ARCHITECTURE.md): 0 background, ``c + 1`` for 0-based class ``c``, 255 uncertain.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bestie.errors import ConfigError, DataError

__all__ = [
    "CrfParams",
    "IGNORE",
    "dense_crf",
    "threshold_argmax",
    "seed_map",
    "mark_uncertain",
    "cams_to_wsss",
    "check_wsss_inputs",
]

IGNORE = 255
#: confident-seed thresholds of the uncertain rule (IRN: foreground CAM > 0.30, background CAM < 0.05)
FG_SEED = 0.30
BG_SEED = 0.05
_PROB_CLIP = 1e-5


@dataclass(frozen=True)
class CrfParams:
    """Parameters of the fully connected CRF (pydensecrf's ``DenseCRF2D``).

    Attributes:
        iters: mean-field iterations (IRN / AffinityNet: 10).
        gaussian_sxy: spatial std of the smoothness kernel, pixels (IRN: 3).
        gaussian_compat: Potts weight of the smoothness kernel (IRN: 3).
        bilateral_sxy: spatial std of the appearance kernel, pixels (IRN: 50; AffinityNet: 80).
        bilateral_srgb: colour std of the appearance kernel, 0-255 RGB units (IRN: 5; AffinityNet: 13).
        bilateral_compat: Potts weight of the appearance kernel (IRN and AffinityNet: 10).
        unary: ``"scores"`` (default): unary = -log of the normalised scores ``S / sum(S)``;
            ``"labels"``: unary from the hard argmax labels with probability ``gt_prob`` for the label
            and ``(1 - gt_prob) / (L - 1)`` for the others (IRN's ``crf_inference_label``).
        gt_prob: confidence of the hard label for ``unary="labels"`` (IRN: 0.7); in (0, 1).
        scale: run the CRF on the image resized by this factor (<= 1, spatial stds scaled with it) and
            resize the marginals back bilinearly; 1.0 = full resolution (the reference setting).
    """

    iters: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    unary: str = "scores"
    gt_prob: float = 0.7
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 0:
            raise ConfigError(f"crf iters must be an integer >= 0, got {self.iters!r}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"crf {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gaussian_compat", "bilateral_compat"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"crf {name} must be >= 0, got {getattr(self, name)!r}")
        if self.unary not in ("scores", "labels"):
            raise ConfigError(f"crf unary must be 'scores' or 'labels', got {self.unary!r}")
        if not 0.0 < float(self.gt_prob) < 1.0:
            raise ConfigError(f"crf gt_prob must be in (0, 1), got {self.gt_prob!r}")
        if not 0.0 < float(self.scale) <= 1.0:
            raise ConfigError(f"crf scale must be in (0, 1], got {self.scale!r}")

    def replace(self, **changes) -> "CrfParams":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _densecrf_module():
    """The compiled ``densecrf`` module of the installed pydensecrf package.

    The PyPI distribution ``pydensecrf2`` installs the import package ``pydensecrf``; a build that
    names its package ``pydensecrf2`` is accepted as well.
    """
    try:
        import pydensecrf.densecrf as dcrf  # type: ignore[import-not-found]
    except ImportError:
        try:
            import pydensecrf2.densecrf as dcrf  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ImportError(
                "the dense CRF needs the 'pydensecrf2' package (import name 'pydensecrf'): "
                "pip install pydensecrf2"
            ) from exc
    return dcrf


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"{where}: image must be an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(f"{where}: image is empty, shape {image.shape}")
    return image


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray | None = None,
    iters: int | None = None,
    *,
    params: CrfParams = CrfParams(),
    unary: np.ndarray | None = None,
) -> np.ndarray:
    """Mean-field inference of a fully connected CRF with Gaussian + bilateral Potts kernels.

    Energy (Kraehenbuehl & Koltun 2011): ``E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j)``
    with ``psi_u = -log(probs)`` (clipped at 1e-5), ``mu`` Potts and
    ``k = w_g exp(-|p_i - p_j|^2 / 2 sxy_g^2) + w_b exp(-|p_i - p_j|^2 / 2 sxy_b^2 - |I_i - I_j|^2 / 2 srgb^2)``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image (colour features of the bilateral kernel).
        probs: ``(L, H, W)`` float class probabilities (need not be exactly normalised; the unary is
            ``-log(clip(probs, 1e-5, 1))``). Exactly one of ``probs`` / ``unary`` must be given.
        iters: mean-field iterations; ``None`` uses ``params.iters``.
        params: kernel parameters (:class:`CrfParams`; ``params.unary``/``gt_prob`` are not used here).
        unary: ``(L, H, W)`` float unary energies (negative log-probabilities) instead of ``probs``.

    Returns:
        ``(L, H, W)`` float32 marginals (each pixel sums to 1). With ``L == 1`` or ``iters == 0`` the
        normalised input distribution is returned.

    Raises:
        DataError: image not ``(H, W, 3)`` uint8; probs/unary not ``(L, H, W)`` with the image's size,
            non-finite, or ``L == 0``.
        ImportError: pydensecrf2 is not installed.
    """
    image = _check_image(image, "dense_crf")
    if (probs is None) == (unary is None):
        raise ValueError("dense_crf: give exactly one of probs / unary")
    arr = np.asarray(probs if probs is not None else unary, dtype=np.float32)
    name = "probs" if probs is not None else "unary"
    if arr.ndim != 3 or arr.shape[1:] != image.shape[:2] or arr.shape[0] == 0:
        raise DataError(f"dense_crf: {name} must be (L, H, W) with (H, W) = {image.shape[:2]}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"dense_crf: {name} contains NaN or inf")
    if probs is not None:
        energy = -np.log(np.clip(arr, _PROB_CLIP, 1.0))
    else:
        energy = arr
    n_labels, height, width = energy.shape
    iters = params.iters if iters is None else int(iters)
    if n_labels == 1 or iters == 0:
        q = np.exp(-(energy - energy.min(axis=0, keepdims=True)))
        return (q / q.sum(axis=0, keepdims=True)).astype(np.float32)

    scale = float(params.scale)
    if scale < 1.0:
        import cv2

        h2, w2 = max(1, round(height * scale)), max(1, round(width * scale))
        small = cv2.resize(image, (w2, h2), interpolation=cv2.INTER_AREA)
        e_small = np.stack([cv2.resize(e, (w2, h2), interpolation=cv2.INTER_LINEAR) for e in energy])
        q = _crf_core(small, e_small, iters, params, scale)
        return np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in q]).astype(
            np.float32
        )
    return _crf_core(image, energy, iters, params, 1.0)


def _crf_core(image: np.ndarray, energy: np.ndarray, iters: int, params: CrfParams, scale: float) -> np.ndarray:
    dcrf = _densecrf_module()
    n_labels, height, width = energy.shape
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    # pydensecrf needs writable C-contiguous buffers (read-only inputs, e.g. from h5py, are refused)
    crf.setUnaryEnergy(np.require(energy.reshape(n_labels, -1), np.float32, ["C", "W", "O"]))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy * scale, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy * scale,
        srgb=params.bilateral_srgb,
        rgbim=np.require(image, np.uint8, ["C", "W", "O"]),
        compat=params.bilateral_compat,
    )
    q = np.asarray(crf.inference(iters), dtype=np.float32)
    return q.reshape(n_labels, height, width)


def check_wsss_inputs(
    image: np.ndarray | None, cams: np.ndarray, classes: Sequence[int], where: str = "cams_to_wsss"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate CAMs and their class indices; return them as float32 ``(K, H, W)`` and int64 ``(K,)``.

    Raises:
        DataError: cams not ``(K, H, W)`` (or not the image's size when ``image`` is given), non-finite
            values, ``classes`` not ``(K,)`` distinct integers in ``0..253`` (so that ``c + 1 < 255``).
    """
    cams = np.asarray(cams, dtype=np.float32)
    classes_arr = np.asarray(classes)
    if cams.ndim != 3:
        raise DataError(f"{where}: cams must be (K, H, W), got shape {cams.shape}")
    if image is not None and cams.shape[1:] != image.shape[:2]:
        raise DataError(
            f"{where}: cams are {cams.shape[1:]} but the image is {image.shape[:2]}; upsample the CAMs to "
            "the image size first"
        )
    if classes_arr.ndim != 1 or classes_arr.shape[0] != cams.shape[0]:
        raise DataError(f"{where}: classes must be (K,) with K = {cams.shape[0]} CAMs, got shape {classes_arr.shape}")
    if classes_arr.size and not np.issubdtype(classes_arr.dtype, np.integer):
        raise DataError(f"{where}: classes must be integers, got dtype {classes_arr.dtype}")
    classes_arr = classes_arr.astype(np.int64)
    if classes_arr.size and (classes_arr.min() < 0 or classes_arr.max() > 253):
        raise DataError(f"{where}: class indices must be in 0..253, got {classes_arr.tolist()}")
    if len(set(classes_arr.tolist())) != classes_arr.size:
        raise DataError(f"{where}: duplicate class indices {classes_arr.tolist()}")
    if not np.isfinite(cams).all():
        raise DataError(f"{where}: cams contain NaN or inf")
    return cams, classes_arr


def threshold_argmax(cams: np.ndarray, classes: np.ndarray, bg_threshold: float) -> np.ndarray:
    """Label map of ``argmax [bg_threshold, CAM_1..K]`` (no CRF): the plain CAM segmentation.

    Ties go to the background (a pixel is foreground only where its largest CAM is strictly above the
    threshold).

    Args:
        cams: ``(K, H, W)`` float CAMs in [0, 1].
        classes: ``(K,)`` 0-based class index of each CAM.
        bg_threshold: constant background score.

    Returns:
        ``(H, W)`` uint8: 0 background, ``classes[k] + 1`` where CAM ``k`` wins.
    """
    cams = np.asarray(cams, dtype=np.float32)
    height, width = cams.shape[1:]
    if cams.shape[0] == 0:
        return np.zeros((height, width), np.uint8)
    keys = np.concatenate([[0], np.asarray(classes, np.int64) + 1]).astype(np.uint8)
    k = cams.argmax(axis=0)
    fg = np.take_along_axis(cams, k[None], axis=0)[0] > bg_threshold
    return np.where(fg, keys[1 + k], 0).astype(np.uint8)


def _score_probs(cams: np.ndarray, bg: float) -> np.ndarray:
    """``(K + 1, H, W)`` normalised scores ``S / sum(S)`` with ``S = [bg, clip(CAMs, 0, 1)]``."""
    scores = np.concatenate([np.full((1,) + cams.shape[1:], bg, np.float32), np.clip(cams, 0.0, 1.0)], axis=0)
    scores = np.maximum(scores, _PROB_CLIP)
    return scores / scores.sum(axis=0, keepdims=True)


def _crf_labels(image: np.ndarray, cams: np.ndarray, bg: float, params: CrfParams) -> np.ndarray:
    """Index map in ``0..K`` (0 background, ``k + 1`` CAM ``k``) after the CRF at background score ``bg``."""
    n = cams.shape[0] + 1
    if params.unary == "labels":
        scores = np.concatenate([np.full((1,) + cams.shape[1:], bg, np.float32), cams], axis=0)
        hard = scores.argmax(axis=0)
        energy = np.full((n,) + hard.shape, -np.log((1.0 - params.gt_prob) / (n - 1)), np.float32)
        np.put_along_axis(energy, hard[None], np.float32(-np.log(params.gt_prob)), axis=0)
        q = dense_crf(image, unary=energy, params=params)
    else:
        q = dense_crf(image, _score_probs(cams, bg), params=params)
    return q.argmax(axis=0)


def seed_map(
    image: np.ndarray | None,
    cams: np.ndarray,
    classes: Sequence[int],
    *,
    fg_seed: float = FG_SEED,
    bg_seed: float = BG_SEED,
    mode: str = "raw",
    crf_params: CrfParams = CrfParams(),
) -> np.ndarray:
    """Confident seeds: ``c + 1`` confident foreground of class c, 0 confident background, 255 neither.

    ``mode="raw"`` (thresholds on the CAMs themselves): a pixel is a foreground seed of class
    ``classes[argmax_k CAM_k]`` where ``max_k CAM_k > fg_seed``; a background seed where
    ``max_k CAM_k < bg_seed``; else 255.

    ``mode="crf"`` (IRN's ``cam_to_ir_label``): ``F`` = CRF labels of ``[fg_seed, CAMs]``, ``B`` = CRF
    labels of ``[bg_seed, CAMs]``; foreground seed ``F`` where ``F`` is foreground, background seed where
    both ``F`` and ``B`` are background, 255 elsewhere (``F`` background but ``B`` foreground). Costs two
    CRF runs.

    Args:
        image: ``(H, W, 3)`` uint8 (needed for ``mode="crf"`` only; may be None for ``"raw"``).
        cams: ``(K, H, W)`` float CAMs in [0, 1] at the image size.
        classes: ``(K,)`` 0-based class of each CAM.
        fg_seed, bg_seed: thresholds with ``0 <= bg_seed <= fg_seed``.
        mode: ``"raw"`` or ``"crf"``.
        crf_params: CRF parameters for ``mode="crf"``.

    Returns:
        ``(H, W)`` uint8 seed map with values in ``{0, 255} U {c + 1 : c in classes}``.

    Raises:
        DataError: malformed inputs (see :func:`check_wsss_inputs`).
        ConfigError: ``bg_seed > fg_seed`` or an unknown mode.
    """
    if mode not in ("raw", "crf"):
        raise ConfigError(f"seed mode must be 'raw' or 'crf', got {mode!r}")
    _check_seed_thresholds(fg_seed, bg_seed)
    if image is not None:
        image = _check_image(image, "seed_map")
    cams, classes_arr = check_wsss_inputs(image, cams, classes, "seed_map")
    height, width = cams.shape[1:]
    if cams.shape[0] == 0:
        return np.zeros((height, width), np.uint8)
    keys = np.concatenate([[0], classes_arr + 1]).astype(np.uint8)
    if mode == "raw":
        peak = cams.max(axis=0)
        seeds = np.full((height, width), IGNORE, np.uint8)
        fg = peak > fg_seed
        seeds[fg] = keys[1 + cams.argmax(axis=0)[fg]]
        seeds[peak < bg_seed] = 0
        return seeds
    if image is None:
        raise DataError("seed_map: mode='crf' needs the image")
    f_idx = _crf_labels(image, cams, fg_seed, crf_params)
    b_idx = _crf_labels(image, cams, bg_seed, crf_params)
    seeds = np.full((height, width), IGNORE, np.uint8)
    seeds[(f_idx == 0) & (b_idx == 0)] = 0
    seeds[f_idx > 0] = keys[f_idx[f_idx > 0]]
    return seeds


def _check_seed_thresholds(fg_seed: float, bg_seed: float) -> None:
    if not 0.0 <= bg_seed <= fg_seed:
        raise ConfigError(f"seed thresholds need 0 <= bg_seed <= fg_seed, got bg_seed={bg_seed}, fg_seed={fg_seed}")


def mark_uncertain(labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Set to 255 the pixels where a confident seed (``seeds != 255``) disagrees with ``labels``.

    Args:
        labels: ``(H, W)`` uint8 label map (0 / ``c + 1``).
        seeds: ``(H, W)`` uint8 seed map from :func:`seed_map`.

    Returns:
        ``(H, W)`` uint8 copy of ``labels`` with 255 where ``seeds != 255 and seeds != labels``.
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    out[(seeds != IGNORE) & (seeds != labels)] = IGNORE
    return out


def cams_to_wsss(
    image: np.ndarray,
    cams: np.ndarray,
    classes: Sequence[int],
    *,
    bg_threshold: float,
    crf: bool = True,
    crf_params: CrfParams = CrfParams(),
    fg_seed: float | None = FG_SEED,
    bg_seed: float | None = BG_SEED,
    seed_mode: str = "raw",
    return_dense: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """WSSS label map of one image from its dense CAMs (METHOD.md section 3, baseline).

    Steps: (1) scores ``[bg_threshold, CAM_1..K]``; (2) with ``crf=True`` a dense CRF on those scores
    (:func:`dense_crf`, unary per ``crf_params.unary``) and the argmax of its marginals, else the plain
    argmax (:func:`threshold_argmax`); (3) the uncertain rule: with the confident seeds of
    :func:`seed_map` (``fg_seed``, ``bg_seed``, ``seed_mode``), a pixel becomes 255 when it is a seed and
    its seed label differs from the label of step 2, i.e. with ``seed_mode="raw"``:

    - ``max_k CAM_k > fg_seed`` (a foreground seed of class ``c = classes[argmax_k CAM_k]``) and the
      step-2 label is not ``c + 1`` (background or another class), or
    - ``max_k CAM_k < bg_seed`` (a background seed) and the step-2 label is not 0.

    Pixels that are no seed keep the step-2 label. With ``fg_seed`` / ``bg_seed`` None, no pixel becomes
    255. A foreground seed must score above the background threshold and a background seed below it: the
    thresholds used are ``max(fg_seed, bg_threshold)`` and ``min(bg_seed, bg_threshold)``. (IRN's 0.30 lies
    above its background score 0.16. With a higher ``bg_threshold``, e.g. an ``"auto"`` 0.75 on the demo,
    every pixel with ``0.30 < max CAM <= 0.75`` would be a foreground seed that the argmax calls
    background, hence 255: 48 % of the demo's pixels, where BESTIE's semantic head then learned no
    background and predicted foreground. Measured 2026-12-07, docs/RESULTS.md.)

    Args:
        image: ``(H, W, 3)`` uint8 RGB image.
        cams: ``(K, H, W)`` float CAMs in [0, 1] at the image size (upsample strided CAMs first),
            one per class present in the image label. ``K = 0`` gives an all-background map.
        classes: ``(K,)`` 0-based class index of each CAM, distinct, in ``0..253``.
        bg_threshold: the constant background score (in [0, 1]).
        crf: run the dense CRF (step 2); False gives the thresholded argmax.
        crf_params: CRF parameters (:class:`CrfParams`, IRN defaults).
        fg_seed, bg_seed: confident-seed thresholds (IRN: 0.30 / 0.05); None disables the uncertain rule.
        seed_mode: ``"raw"`` (thresholds on the CAMs, one CRF in total) or ``"crf"`` (IRN's CRF'd seeds,
            two extra CRF runs); see :func:`seed_map`.
        return_dense: also return the step-2 map (before the uncertain rule).

    Returns:
        ``(H, W)`` uint8 map with values in ``{0, 255} U {c + 1 : c in classes}``; with
        ``return_dense`` a tuple ``(wsss, dense)`` where ``dense`` has no 255.

    Raises:
        DataError: malformed image / cams / classes (shape, dtype, non-finite values, bad indices).
        ConfigError: ``bg_threshold`` outside [0, 1], bad seed thresholds or mode.
        ImportError: ``crf=True`` without pydensecrf2 installed.
    """
    image = _check_image(image, "cams_to_wsss")
    cams, classes_arr = check_wsss_inputs(image, cams, classes)
    if not 0.0 <= float(bg_threshold) <= 1.0:
        raise ConfigError(f"bg_threshold must be in [0, 1], got {bg_threshold!r}")
    if fg_seed is not None and bg_seed is not None:
        _check_seed_thresholds(fg_seed, bg_seed)  # before the CRF, not after it in seed_map
    height, width = image.shape[:2]
    if cams.shape[0] == 0:
        dense = np.zeros((height, width), np.uint8)
        return (dense, dense.copy()) if return_dense else dense
    if crf:
        keys = np.concatenate([[0], classes_arr + 1]).astype(np.uint8)
        dense = keys[_crf_labels(image, cams, float(bg_threshold), crf_params)]
    else:
        dense = threshold_argmax(cams, classes_arr, float(bg_threshold))
    if fg_seed is None or bg_seed is None:
        out = dense.copy()
    else:
        seeds = seed_map(image, cams, classes_arr, fg_seed=max(float(fg_seed), float(bg_threshold)),
                         bg_seed=min(float(bg_seed), float(bg_threshold)), mode=seed_mode, crf_params=crf_params)
        out = mark_uncertain(dense, seeds)
    return (out, dense) if return_dense else out
