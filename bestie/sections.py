"""The configuration section of every stage, as frozen dataclasses (``config.yaml`` -> typed settings).

One class per section of :data:`bestie.schema.STAGE_SECTIONS`; each field's default is defined here once,
and each ``__post_init__`` rejects a bad value with a :class:`~bestie.errors.ConfigError` naming the key.
The stage modules (:mod:`bestie.stages`) re-export their class. The module imports neither torch nor
OpenCV: ``bestie check``, the workflow and the command line build and validate every section in well
under a second, before any stage starts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from bestie.data.transforms import DEFAULT_SCALES
from bestie.errors import ConfigError
from bestie.params import PAM_ALPHA, SETTINGS, GroupingParams, PseudoLabelParams, RefineParams
from bestie.wsss.crf import BG_SEED, FG_SEED, CrfParams

__all__ = ["ClassifierConfig", "CamConfig", "WsssConfig", "BestieConfig", "InferenceConfig", "ExportConfig",
           "MaskRCNNConfig", "EvalConfig", "PredictConfig", "MODEL_KINDS", "BASELINE_KEYS",
           "GROUPING_KEYS", "WORKFLOW_KEYS"]

#: Defaults of the classifier's ``lr`` / ``weight_decay`` per optimizer (``null`` in the config).
_DEFAULT_LR = {"sgd": 1e-3, "adamw": 1e-4}
_DEFAULT_WD = {"sgd": 5e-4, "adamw": 1e-4}

#: Keys of the ``bestie`` section that the pseudo-label baseline reads (:mod:`bestie.stages.score_baseline`);
#: its rule gets only these, so that a change of another BESTIE key does not rerun it.
BASELINE_KEYS = ("setting", "min_area", "point_threshold", "split_components")

#: Keys of the ``instances`` section that BESTIE training reads: the grouping of its in-training validation
#: and learning probe (:class:`~bestie.params.GroupingParams`, :meth:`InferenceConfig.grouping_params`).
GROUPING_KEYS = tuple(f.name for f in fields(GroupingParams))

#: Keys that the workflow reads and the section's stage does not (they choose jobs, inputs or the rule's other
#: params): the workflow leaves them out of the stage's params, so that changing one reruns no job that
#: ignores it (``stage_params`` in ``workflow/rules/common.smk``).
WORKFLOW_KEYS: dict[str, tuple[str, ...]] = {
    "demo": ("generate",),
    "classifier_pam": ("ensemble_seeds",),
    "classifier_dense": ("ensemble_seeds",),
    "wsss": ("import_png_dir",),
    "predict": ("images", "model"),
}

#: Values of ``predict.model``: which checkpoint of a run the workflow's ``predict`` rule uses.
MODEL_KINDS = ("maskrcnn", "bestie")


# ------------------------------------------------------------ train_classifier
@dataclass(frozen=True)
class ClassifierConfig:
    """Configuration of the ``classifier_pam`` / ``classifier_dense`` sections (METHOD.md section 1).

    Attributes:
        backbone: backbone name (:data:`bestie.models.backbones.BACKBONES`).
        weights: ``"imagenet"``, a weights file, or None (random start, logged as a warning).
        use_pam: PAM after each extra conv (True: peaks; False: dense CAMs for WSSS).
        alpha: PAM controller.
        num_extra_convs, extra_channels: the new 3x3 conv layers (reference VGG16: 3 x 512).
        output_stride: backbone output stride (16 = last EfficientNet stage dilated; None = native).
        freeze_bn: backbone BatchNorm in eval mode with frozen affine parameters.
        frozen_levels: backbone feature levels left untrained (0: train all; 3: stem to stride 8, which
            saves about 20 % of the CPU time per iteration, at some CAM quality on coco128-voc).
        backbone_head: use the backbone's ImageNet feature head (EfficientNet-Lite0 1x1 conv to 1280
            channels) before the new layers.
        optimizer: ``"sgd"`` (reference: momentum 0.9, Nesterov) or ``"adamw"`` (CPU default).
        lr: base lr (None: 1e-3 for SGD as the reference, 1e-4 for AdamW); new layers get 10x / 20x.
        weight_decay: None: 5e-4 (SGD, reference) / 1e-4 (AdamW).
        epochs: training epochs.
        lr_steps: 1-based epochs at whose start the lr is divided by 10 (reference ``reduce_lr``: 5, 10).
        batch_size: images per iteration (per process under DDP).
        resize: shorter image side before cropping, px (reference 384).
        crop_size: square training crop, px (reference 321).
        scales: random scale factors applied after the resize (default 0.7..1.3 as the BESTIE stage;
            ``[1.0]`` = none, as the reference classifier).
        photometric: colour jitter on/off.
        num_workers: DataLoader workers.
        seed: RNG seed (data order, augmentation, head initialisation).
        ensemble_seeds: [] = one classifier; 2+ seeds = one classifier per seed, CAMs averaged.
            Read by the workflow, not by this stage: it trains ``classifier/<kind>_seed<S>.pt`` with
            ``seed = S`` for each seed, and the CAM stage averages their CAMs
            (:func:`bestie.cam.average_cams`). Empty: a single classifier (``<kind>.pt``) with
            ``seed``. On coco128-voc one dense classifier's CAM mIoU moves by up to 2.7 points with the
            seed alone; averaging two members cuts that noise (figures in the README).
        checkpoint_every: iterations between partial checkpoints (0 = none).
        amp: autocast on CUDA (bf16 / fp16); ignored on CPU.
    """

    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = "imagenet"
    use_pam: bool = True
    alpha: float = PAM_ALPHA
    num_extra_convs: int = 2
    extra_channels: int = 256
    output_stride: int | None = 16
    freeze_bn: bool = True
    frozen_levels: int = 0
    backbone_head: bool = False
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float | None = None
    epochs: int = 15
    lr_steps: tuple[int, ...] = (5, 10)
    batch_size: int = 5
    resize: int = 384
    crop_size: int = 321
    scales: tuple[float, ...] = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
    photometric: bool = True
    num_workers: int = 0
    seed: int = 3407
    ensemble_seeds: tuple[int, ...] = ()
    checkpoint_every: int = 100
    amp: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in _DEFAULT_LR:
            raise ConfigError(f"classifier.optimizer must be one of {sorted(_DEFAULT_LR)}, got {self.optimizer!r}")
        for key in ("epochs", "batch_size", "resize", "crop_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"classifier.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0 or self.checkpoint_every < 0:
            raise ConfigError("classifier.num_workers and classifier.checkpoint_every must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"classifier.lr must be > 0, got {self.lr}")
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"classifier.scales must be positive factors, got {self.scales}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"classifier.alpha must be in [0, 1], got {self.alpha}")
        if len(set(self.ensemble_seeds)) != len(self.ensemble_seeds) or len(self.ensemble_seeds) == 1:
            raise ConfigError(f"classifier.ensemble_seeds must be empty or hold two or more distinct seeds (one model: "
                              f"set `seed`), got {list(self.ensemble_seeds)}")

    @property
    def base_lr(self) -> float:
        return float(self.lr if self.lr is not None else _DEFAULT_LR[self.optimizer])

    @property
    def base_weight_decay(self) -> float:
        return float(self.weight_decay if self.weight_decay is not None else _DEFAULT_WD[self.optimizer])


# ------------------------------------------------------------ make_cams
@dataclass(frozen=True)
class CamConfig:
    """Configuration of the ``cams`` section.

    Attributes:
        scales: image scale factors of the multi-scale TTA (CAMs summed, then normalised).
        flip: flip TTA.
        output_stride: backbone output stride at inference (None: as trained). A network trained at
            stride 16 and run dilated at stride 8 computes (up to border padding) the same function on a
            twice denser grid (the "atrous" equivalence), so CAMs get finer without retraining.
        out_stride: stride of the stored CAMs (1 = image size).
        peak_kernel: local-maximum window, px of the original image (reference 15).
        peak_top_k: most peaks per class (reference 25).
        peak_threshold: minimum peak confidence (reference 0.1).
        overlays: number of images (first ids of the split) drawn as PNG overlays.
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    output_stride: int | None = None
    out_stride: int = 4
    peak_kernel: int = 15
    peak_top_k: int = 25
    peak_threshold: float = 0.1
    overlays: int = 4

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"cams.scales must be positive factors, got {self.scales}")
        if self.output_stride not in (None, 8, 16, 32):
            raise ConfigError(f"cams.output_stride must be 8, 16, 32 or null, got {self.output_stride}")
        if self.out_stride < 1:
            raise ConfigError(f"cams.out_stride must be >= 1, got {self.out_stride}")
        if self.peak_kernel < 1 or self.peak_kernel % 2 == 0:
            raise ConfigError(f"cams.peak_kernel must be a positive odd integer, got {self.peak_kernel}")
        if self.peak_top_k < 1 or self.overlays < 0:
            raise ConfigError("cams.peak_top_k must be >= 1 and cams.overlays >= 0")


# ------------------------------------------------------------ make_wsss, import_wsss
@dataclass(frozen=True)
class WsssConfig:
    """Configuration of the ``wsss`` section (METHOD.md section 3).

    Defaults chosen by measurement on coco128-voc train (97 images; dense CAMs of the default plain
    classifier, 15 epochs, CAM argmax best 19.8 mIoU at threshold 0.10): ``affinity`` at threshold 0.15
    with beta 10 / logt 8 gave 24.1 mIoU (beta 8: 21.4-23.1 depending on logt; bg_mode ``power``
    14.6-17.2; a CRF after the walk -0.1; a stride-4 grid 21.0 at 4x the cost), the ``crf`` baseline
    20.7 at 0.10 and 20.1 at 0.15; the IRN and AffinityNet CRF kernels differ by < 1 point.

    Attributes:
        method: ``"affinity"`` (AffinityNet-style random walk, default) or ``"crf"`` (baseline, no
            training).
        bg_threshold: constant background score in [0, 1], or ``"auto"``: the ``best_threshold`` of the
            CAM stage diagnostics JSON (measured against the train GT; needs ``cam_diagnostics``).
        crf: run the dense CRF (crf method: on the CAM scores; affinity method: see ``affinity_crf``).
        crf_iters, crf_gaussian_sxy, crf_gaussian_compat, crf_bilateral_sxy, crf_bilateral_srgb,
        crf_bilateral_compat, crf_unary, crf_gt_prob, crf_scale: :class:`bestie.wsss.crf.CrfParams`
            (IRN defaults: 10 iterations, Gaussian 3/3, bilateral 50/5/10).
        fg_seed, bg_seed: confident-seed thresholds (IRN 0.30 / 0.05); null disables the uncertain rule.
        seed_mode: seeds of the uncertain rule: ``"raw"`` (CAM thresholds) or ``"crf"`` (IRN's CRF'd maps).
        affinity_epochs, affinity_batch_size, affinity_lr, affinity_crop, affinity_radius: training of the
            affinity head (:class:`bestie.wsss.affinity.AffinityTrainParams`; radius in grid pixels).
        affinity_beta, affinity_logt: random walk: ``A = aff^beta``, ``2^logt`` steps (AffinityNet 8 / 8,
            IRN 10 / 8).
        affinity_stride: affinity grid stride, 4 or 8 pixels.
        affinity_bg_threshold: background score against the propagated CAMs (null: ``bg_threshold``).
        affinity_bg_mode: ``"threshold"`` (IRN: constant background vs propagated CAMs rescaled to max 1)
            or ``"power"`` (AffinityNet: ``(1 - max CAM)^affinity_bg_power`` propagated with the CAMs).
        affinity_bg_power: AffinityNet's alpha (16) for ``affinity_bg_mode="power"``.
        affinity_crf: refine the random-walk scores with the dense CRF before the uncertain rule.
        affinity_backbone, affinity_weights: backbone of the affinity network and its weights
            (``"imagenet"`` or a file, see :func:`bestie.models.backbones.create_backbone`).
        workers: processes for the per-image CRF (1 = in this process).
        seed: RNG seed of the affinity training.
        import_png_dir: read by the workflow only (import existing maps instead of this stage).
    """

    method: str = "affinity"
    bg_threshold: float | str = 0.15
    crf: bool = True
    crf_iters: int = CrfParams.iters
    crf_gaussian_sxy: float = CrfParams.gaussian_sxy
    crf_gaussian_compat: float = CrfParams.gaussian_compat
    crf_bilateral_sxy: float = CrfParams.bilateral_sxy
    crf_bilateral_srgb: float = CrfParams.bilateral_srgb
    crf_bilateral_compat: float = CrfParams.bilateral_compat
    crf_unary: str = CrfParams.unary
    crf_gt_prob: float = CrfParams.gt_prob
    crf_scale: float = CrfParams.scale
    fg_seed: float | None = FG_SEED
    bg_seed: float | None = BG_SEED
    seed_mode: str = "raw"
    affinity_epochs: int = 8
    affinity_batch_size: int = 8
    affinity_lr: float = 1e-3
    affinity_crop: int = 320
    affinity_radius: int = 5
    affinity_beta: float = 10.0
    affinity_logt: int = 8
    affinity_stride: int = 8
    affinity_bg_threshold: float | None = None
    affinity_bg_mode: str = "threshold"
    affinity_bg_power: float = 16.0
    affinity_crf: bool = False
    affinity_backbone: str = "tf_efficientnet_lite0"
    affinity_weights: str | None = "imagenet"
    workers: int = 1
    seed: int = 0
    import_png_dir: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("crf", "affinity"):
            raise ConfigError(f"wsss.method must be 'crf' or 'affinity', got {self.method!r}")
        if isinstance(self.bg_threshold, str):
            if self.bg_threshold != "auto":
                raise ConfigError(f"wsss.bg_threshold must be a number in [0, 1] or 'auto', got {self.bg_threshold!r}")
        elif not 0.0 <= float(self.bg_threshold) <= 1.0:
            raise ConfigError(f"wsss.bg_threshold must be in [0, 1], got {self.bg_threshold}")
        if (self.fg_seed is None) != (self.bg_seed is None):
            raise ConfigError("wsss.fg_seed and wsss.bg_seed must both be numbers or both null")
        if self.fg_seed is not None and not 0.0 <= self.bg_seed <= self.fg_seed <= 1.0:
            raise ConfigError(f"wsss seeds need 0 <= bg_seed <= fg_seed <= 1, got {self.bg_seed}, {self.fg_seed}")
        if self.seed_mode not in ("raw", "crf"):
            raise ConfigError(f"wsss.seed_mode must be 'raw' or 'crf', got {self.seed_mode!r}")
        if self.affinity_bg_threshold is not None and not 0.0 <= self.affinity_bg_threshold <= 1.0:
            raise ConfigError(f"wsss.affinity_bg_threshold must be in [0, 1], got {self.affinity_bg_threshold}")
        if self.affinity_bg_mode not in ("threshold", "power"):
            raise ConfigError(f"wsss.affinity_bg_mode must be 'threshold' or 'power', got {self.affinity_bg_mode!r}")
        if not self.affinity_bg_power > 0:
            raise ConfigError(f"wsss.affinity_bg_power must be > 0, got {self.affinity_bg_power}")
        if self.affinity_stride not in (4, 8):
            raise ConfigError(f"wsss.affinity_stride must be 4 or 8, got {self.affinity_stride}")
        if self.affinity_logt < 0 or self.affinity_logt > 12:
            raise ConfigError(f"wsss.affinity_logt must be in 0..12, got {self.affinity_logt}")
        if not self.affinity_beta > 0:
            raise ConfigError(f"wsss.affinity_beta must be > 0, got {self.affinity_beta}")
        if self.workers < 1:
            raise ConfigError(f"wsss.workers must be >= 1, got {self.workers}")
        self.crf_params()  # validates the CRF keys
        self.train_params()

    def crf_params(self) -> CrfParams:
        """The CRF keys as :class:`~bestie.wsss.crf.CrfParams` (raises ConfigError naming the key)."""
        try:
            return CrfParams(
                iters=self.crf_iters, gaussian_sxy=self.crf_gaussian_sxy, gaussian_compat=self.crf_gaussian_compat,
                bilateral_sxy=self.crf_bilateral_sxy, bilateral_srgb=self.crf_bilateral_srgb,
                bilateral_compat=self.crf_bilateral_compat, unary=self.crf_unary, gt_prob=self.crf_gt_prob,
                scale=self.crf_scale,
            )
        except ConfigError as exc:
            raise ConfigError(f"wsss.{exc}") from exc

    def train_params(self):
        """The affinity training keys as :class:`~bestie.wsss.affinity_params.AffinityTrainParams`."""
        from bestie.wsss.affinity_params import AffinityTrainParams

        try:
            return AffinityTrainParams(epochs=self.affinity_epochs, batch_size=self.affinity_batch_size,
                                       lr=self.affinity_lr, crop=self.affinity_crop, radius=self.affinity_radius,
                                       seed=self.seed)
        except ConfigError as exc:
            raise ConfigError(f"wsss.{exc}") from exc


# ------------------------------------------------------------ train_bestie
@dataclass(frozen=True)
class BestieConfig:
    """Settings of BESTIE training (config section ``bestie``). Defaults: METHOD.md section 4.

    Attributes:
        backbone: encoder (``tf_efficientnet_lite0`` on CPU; the paper's ``hrnet_w48`` needs a weights file).
        weights: encoder weights: ``"imagenet"`` (EfficientNet-Lite0 package), a file path, or null (random).
        head: ``"light"`` (HRNet-style heads) or ``"deeplab"`` (Panoptic-DeepLab decoders).
        head_channels, fusion_channels, hrnet_fusion, output_stride: see :class:`~bestie.models.instance.BestieNet`.
        center_mode: ``"class"`` (one center channel per class, the paper) or ``"agnostic"`` (one shared
            channel, Panoptic-DeepLab; a documented departure, see :mod:`bestie.models.instance`).
        center_support_weight: factor on the center-MSE weight of the pixels under a Gaussian (1 = the
            paper's loss; :class:`bestie.losses.BestieLoss`).
        setting: ``"image"`` (image-level labels + peak points) or ``"point"`` (GT center points).
        sigma, min_area, point_threshold: pseudo-label parameters (6, 50, 0.7;
            :class:`~bestie.params.PseudoLabelParams`).
        split_components: split a WSSS component holding several points of its class into one pseudo
            instance per point (false = the paper: no instance; a departure,
            :class:`~bestie.params.PseudoLabelParams`).
        refine: online self-refinement on/off; ``refine_iter``: first (0-based) iteration that uses it
            (the public code's default 0: refinement from the start).
        center_threshold_refine, nms_kernel, beta, max_instances: refinement grouping (0.3, 41, 3, 5;
            :class:`~bestie.params.RefineParams`).
        seg_weight, center_weight, offset_weight: loss weights (1, 200, 0.01); ``top_k_percent``: hard
            pixel share of the DeepLab CE (0.2).
        lr, weight_decay, warmup_iters, max_iters, poly_power: Adam + warm-up/poly schedule
            (5e-5, 0, 2000, 50000, 0.9).
        batch_size: global batch, split evenly over the DDP processes (16).
        crop_size, resize, scales: augmentation (416, long side 480, 0.7..1.3 step 0.1).
        photometric, flip: enable those augmentations.
        bn_momentum: BatchNorm momentum (0.01). ``sync_bn``: SyncBatchNorm under DDP on GPUs.
        seed: seed of model init, data order and augmentation (3407).
        num_workers: DataLoader workers per process.
        checkpoint_every: iterations between resumable partial checkpoints.
        val_every: iterations between validations (0 = only at the end; validation needs ``val_split``).
        val_split: split scored during training (mAP50 against GT masks), or null for no validation.
        val_max_images: score at most this many images of ``val_split`` (null = all).
        val_flip: flip TTA during validation (the public image-label script turns it off).
        log_every: iterations between ``train`` log records.
        probe_images: crops of the learning probe (:mod:`bestie.probe`) measured at every ``train`` log
            record and at the end (0 = off).
        probe_final_images: the end record's second probe (``probe_final``): one crop of each of this many
            training images, spread evenly (all of them when the set is smaller; 0 = off). The few crops of
            ``probe_images`` hold a handful of peaks, too few to judge a head by (issue 15).
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler); ignored on CPU.
    """

    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = "imagenet"
    head: str = "light"
    head_channels: int = 256
    fusion_channels: int = 64
    hrnet_fusion: str = "branch0"
    output_stride: int | None = None
    center_mode: str = "class"
    center_support_weight: float = 1.0
    setting: str = PseudoLabelParams.setting
    sigma: float = PseudoLabelParams.sigma
    min_area: int = PseudoLabelParams.min_area
    point_threshold: float = PseudoLabelParams.point_threshold
    split_components: bool = PseudoLabelParams.split_components
    refine: bool = True
    refine_iter: int = 0
    center_threshold_refine: float = RefineParams.center_threshold
    nms_kernel: int = RefineParams.nms_kernel
    beta: float = RefineParams.beta
    max_instances: int = RefineParams.max_instances
    seg_weight: float = 1.0
    center_weight: float = 200.0
    offset_weight: float = 0.01
    top_k_percent: float = 0.2
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_iters: int = 2000
    max_iters: int = 50000
    poly_power: float = 0.9
    batch_size: int = 16
    crop_size: int = 416
    resize: int | None = 480
    scales: tuple[float, ...] = DEFAULT_SCALES
    photometric: bool = True
    flip: bool = True
    bn_momentum: float = 0.01
    sync_bn: bool = True
    seed: int = 3407
    num_workers: int = 4
    checkpoint_every: int = 1000
    val_every: int = 1000
    val_split: str | None = "val"
    val_max_images: int | None = None
    val_flip: bool = False
    log_every: int = 20
    probe_images: int = 8
    probe_final_images: int = 1000
    amp: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.setting in SETTINGS, f"bestie.setting must be 'image' or 'point', got {self.setting!r}"),
            (self.head in ("light", "deeplab"), f"bestie.head must be 'light' or 'deeplab', got {self.head!r}"),
            (self.max_iters >= 1, f"bestie.max_iters must be >= 1, got {self.max_iters}"),
            (self.batch_size >= 1, f"bestie.batch_size must be >= 1, got {self.batch_size}"),
            (self.crop_size >= 8, f"bestie.crop_size must be >= 8, got {self.crop_size}"),
            (self.resize is None or self.resize >= 8, f"bestie.resize must be >= 8 or null, got {self.resize}"),
            (len(self.scales) > 0 and min(self.scales) > 0, f"bestie.scales must be positive, got {self.scales}"),
            (self.lr > 0, f"bestie.lr must be > 0, got {self.lr}"),
            (self.warmup_iters >= 0, f"bestie.warmup_iters must be >= 0, got {self.warmup_iters}"),
            (self.refine_iter >= 0, f"bestie.refine_iter must be >= 0, got {self.refine_iter}"),
            (self.checkpoint_every >= 1, f"bestie.checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.val_every >= 0, f"bestie.val_every must be >= 0, got {self.val_every}"),
            (self.log_every >= 1, f"bestie.log_every must be >= 1, got {self.log_every}"),
            (self.probe_images >= 0, f"bestie.probe_images must be >= 0, got {self.probe_images}"),
            (self.probe_final_images >= 0, f"bestie.probe_final_images must be >= 0, got {self.probe_final_images}"),
            (self.center_support_weight >= 1.0,
             f"bestie.center_support_weight must be >= 1, got {self.center_support_weight}"),
            (self.num_workers >= 0, f"bestie.num_workers must be >= 0, got {self.num_workers}"),
            (0.0 < self.top_k_percent <= 1.0, f"bestie.top_k_percent must be in (0, 1], got {self.top_k_percent}"),
            (0.0 < self.bn_momentum <= 1.0, f"bestie.bn_momentum must be in (0, 1], got {self.bn_momentum}"),
            (self.nms_kernel >= 1 and self.nms_kernel % 2 == 1,
             f"bestie.nms_kernel must be odd, got {self.nms_kernel}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def pseudo_label_params(self) -> PseudoLabelParams:
        """``setting``, ``sigma``, ``min_area``, ``point_threshold``, ``split_components`` as a
        :class:`~bestie.params.PseudoLabelParams`."""
        return PseudoLabelParams(setting=self.setting, sigma=self.sigma, min_area=self.min_area,
                                 point_threshold=self.point_threshold, split_components=self.split_components)

    def refine_params(self) -> RefineParams:
        """``center_threshold_refine``, ``nms_kernel``, ``beta``, ``max_instances`` as a
        :class:`~bestie.params.RefineParams`."""
        return RefineParams(center_threshold=self.center_threshold_refine, nms_kernel=self.nms_kernel,
                            beta=self.beta, max_instances=self.max_instances)


# ------------------------------------------------------------ predict_instances
@dataclass(frozen=True)
class InferenceConfig:
    """Settings of BESTIE inference (config section ``instances``, formerly ``inference``; METHOD.md section 4,
    "Inference").

    The first five keys make the :class:`~bestie.params.GroupingParams` of :meth:`grouping_params`.

    Attributes:
        center_threshold: minimum center-heatmap score of an instance center (0.1).
        nms_kernel: max-pool window of the center NMS, pixels (41).
        beta: center-clustering parameter of low-offset regions (3).
        min_area: predicted class components below this many pixels are dropped (50).
        min_center_support: in a component with several centers, drop a center when fewer than this share
            of its group's pixels vote within 8 px (network input scale) of it, and regroup its pixels
            (0 = off, the paper; :func:`bestie.postprocess.supported_centers`). A departure (issue 15): on
            coco128-voc the center head fires at several points of one object whose offsets do not
            converge there, and the cuts cost more than they gain (docs/RESULTS.md, 2026-12-07).
        flip: flip test-time augmentation.
        resize: long side (pixels) of the network input before rounding, or None for the original size. The
            grouping's pixel sizes (``nms_kernel``, ``min_area``, clustering) are then at this scale: scaled by
            original long side / ``resize`` when grouping at the original size (:mod:`bestie.inference`).
        size_divisor: the network input sides are rounded up to a multiple of this (32; 1 = no rounding).
        image_labels: restrict the semantic softmax of an image to background and its image-level labels
            (the supervision of the train images, known there; an image without labels is predicted
            unrestricted). False = the paper. A departure (issue 15): a semantic head that has not yet
            separated many classes labels the objects with the dominant one, and the export then drops
            them as absent from the image's labels.
    """

    center_threshold: float = GroupingParams.center_threshold
    nms_kernel: int = GroupingParams.nms_kernel
    beta: float = GroupingParams.beta
    min_area: int = GroupingParams.min_area
    min_center_support: float = GroupingParams.min_center_support
    flip: bool = True
    resize: int | None = None
    size_divisor: int = 32
    image_labels: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.center_threshold <= 1.0:
            raise ConfigError(f"instances.center_threshold must be in [0, 1], got {self.center_threshold}")
        if self.nms_kernel < 1 or self.nms_kernel % 2 == 0:
            raise ConfigError(f"instances.nms_kernel must be an odd positive integer, got {self.nms_kernel}")
        if self.min_area < 0:
            raise ConfigError(f"instances.min_area must be >= 0, got {self.min_area}")
        if not 0.0 <= self.min_center_support <= 1.0:
            raise ConfigError(f"instances.min_center_support must be in [0, 1], got {self.min_center_support}")
        if self.resize is not None and self.resize < 8:
            raise ConfigError(f"instances.resize must be >= 8 pixels or null, got {self.resize}")
        if self.size_divisor < 1:
            raise ConfigError(f"instances.size_divisor must be >= 1, got {self.size_divisor}")

    def grouping_params(self) -> GroupingParams:
        """``center_threshold``, ``nms_kernel``, ``beta``, ``min_area``, ``min_center_support`` as a
        :class:`~bestie.params.GroupingParams`."""
        return GroupingParams(center_threshold=self.center_threshold, nms_kernel=self.nms_kernel, beta=self.beta,
                              min_area=self.min_area, min_center_support=self.min_center_support)


# ------------------------------------------------------------ export_pseudo_labels
@dataclass(frozen=True)
class ExportConfig:
    """Settings of the pseudo-label export (config section ``pseudo_labels``, formerly ``export``).

    Attributes:
        score_threshold: instances scoring below this are dropped (BESTIE scores are in ``[0, 1]``:
            center score x mean class probability, METHOD.md section 4 "Inference").
        min_area: instances with fewer mask pixels are dropped (pixels of the original image; 50 is
            the component size limit of METHOD.md section 4).
        filter_by_image_labels: drop instances of classes absent from the image-level labels.
        max_per_image: keep at most this many instances per image, highest score first.
    """

    score_threshold: float = 0.1
    min_area: int = 50
    filter_by_image_labels: bool = True
    max_per_image: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ConfigError(f"pseudo_labels.score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.min_area < 0:
            raise ConfigError(f"pseudo_labels.min_area must be >= 0, got {self.min_area}")
        if self.max_per_image < 1:
            raise ConfigError(f"pseudo_labels.max_per_image must be >= 1, got {self.max_per_image}")


# ------------------------------------------------------------ train_maskrcnn
@dataclass(frozen=True)
class MaskRCNNConfig:
    """Settings of Mask R-CNN training (config section ``maskrcnn``).

    METHOD.md gives no Mask R-CNN hyper-parameters; the defaults are torchvision's reference recipe
    (SGD lr 0.02 for 16 images, momentum 0.9, weight decay 1e-4, 26 epochs with lr x0.1 after epochs 16
    and 22, warm-up factor 0.001) with the learning rate scaled linearly to ``batch_size``
    (``0.02 * 4 / 16 = 0.005``; with ``N`` processes the effective batch is ``N * batch_size``).

    Attributes:
        model: architecture (:data:`bestie.models.maskrcnn.MASKRCNN_MODELS`).
        weights: ``"imagenet"`` (EfficientNet-Lite0 package), a weights file, or None (random init).
        min_size, max_size: input resize, pixels (None: the architecture's default).
        trainable_backbone_layers: backbone stages trained (0..5, output side first) with pretrained weights.
        lr, momentum, weight_decay: SGD settings (lr per run, not per image).
        epochs: training length in passes over the images with pseudo labels (used when ``max_iters`` is 0).
        max_iters: training length in iterations (0: from ``epochs``).
        batch_size: images per process and iteration.
        warmup_iters: linear warm-up length, capped at one epoch minus one iteration (as the reference).
        warmup_factor: lr factor at iteration 0 of the warm-up.
        lr_steps: fractions of the run after which the lr is multiplied by ``lr_gamma``
            (16/26 and 22/26 = the reference's epochs 16 and 22 of 26).
        lr_gamma: step decay factor.
        clip_grad_norm: clip the gradient norm to this value (0: no clipping, as the reference).
        hflip: probability of a horizontal flip per image.
        seed: seed of initialisation, data order and augmentation.
        amp: mixed precision on CUDA (ignored on CPU).
        checkpoint_every: iterations between resumable checkpoints (0: none).
        log_every: iterations between JSON log records (the last iteration is always logged).
        num_workers: data-loader worker processes per training process.
    """

    model: str = "maskrcnn_efficientnet_lite0_fpn"
    weights: str | None = "imagenet"
    min_size: int | None = None
    max_size: int | None = None
    trainable_backbone_layers: int = 3
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 26
    max_iters: int = 0
    batch_size: int = 4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_steps: tuple[float, ...] = (16 / 26, 22 / 26)
    lr_gamma: float = 0.1
    clip_grad_norm: float = 0.0
    hflip: float = 0.5
    seed: int = 3407
    amp: bool = True
    checkpoint_every: int = 500
    log_every: int = 20
    num_workers: int = 2

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.momentum >= 0, "momentum must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.epochs >= 0 and self.max_iters >= 0, "epochs and max_iters must be >= 0"),
            (self.epochs > 0 or self.max_iters > 0, "one of epochs / max_iters must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.warmup_iters >= 0, "warmup_iters must be >= 0"),
            (0 < self.warmup_factor <= 1, "warmup_factor must be in (0, 1]"),
            (all(0 < f < 1 for f in self.lr_steps), "lr_steps must be fractions in (0, 1)"),
            (0 < self.lr_gamma <= 1, "lr_gamma must be in (0, 1]"),
            (self.clip_grad_norm >= 0, "clip_grad_norm must be >= 0"),
            (0 <= self.hflip <= 1, "hflip must be a probability in [0, 1]"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"maskrcnn.{msg}")


# ------------------------------------------------------------ evaluate
@dataclass(frozen=True)
class EvalConfig:
    """Settings of the final evaluation (config section ``evaluate``).

    Attributes:
        score_threshold: detections below this score are dropped (torchvision's default 0.05).
        mask_threshold: a pixel belongs to a predicted mask when its probability is above this.
        max_dets: detections kept per image, highest score first (COCO's 100).
        pr_iou: IoU threshold of the precision-recall curve written for the report.
    """

    score_threshold: float = 0.05
    mask_threshold: float = 0.5
    max_dets: int = 100
    pr_iou: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold < 1.0:
            raise ConfigError(f"evaluate.score_threshold must be in [0, 1), got {self.score_threshold}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"evaluate.mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if self.max_dets < 1:
            raise ConfigError(f"evaluate.max_dets must be >= 1, got {self.max_dets}")
        if not 0.5 <= self.pr_iou <= 0.95 or abs(round(self.pr_iou * 20) - self.pr_iou * 20) > 1e-6:
            raise ConfigError(f"evaluate.pr_iou must be one of COCO's IoU thresholds 0.50:0.05:0.95, got {self.pr_iou}")


# ------------------------------------------------------------ predict
@dataclass(frozen=True)
class PredictConfig:
    """Settings of ``bestie predict`` (config section ``predict``; flags of the command override them).

    Attributes:
        images: workflow only: the images the ``predict`` rule predicts (a file, folder or glob, or a list
            of them); null = no ``predict`` rule in ``rule all``.
        model: workflow only: which checkpoint of the run the ``predict`` rule uses (``maskrcnn`` or ``bestie``).
        score_threshold: drop instances scoring below this; null = the checkpoint's (Mask R-CNN
            ``inference.score_threshold``; BESTIE 0, every instance whose centre passed ``center_threshold``).
        flip: flip test-time augmentation; null = the checkpoint's (BESTIE ``inference.flip``; Mask R-CNN
            off). Mask R-CNN merges the detections of both views by class-wise box NMS.
        max_side: longer side (pixels) of the working size: larger images are downscaled for the network
            and their masks mapped back (1333, the standard COCO Mask R-CNN maximum).
        batch_size: images per forward pass (Mask R-CNN; BESTIE groups each image on its own).
        overlays: write ``overlays/<stem>.png``.
        overlay_threshold: overlays draw the instances scoring at least this (``predictions.json`` keeps
            every instance above ``score_threshold``, as COCO AP needs; drawing those too buries the image).
        overlay_top_k: when no instance of an image reaches ``overlay_threshold``, its overlay draws this
            many of the best instead (3; 0 = none).
        ids_from: a COCO dataset JSON whose image ids (matched by file base name) the results use.
    """

    images: str | list[str] | None = None
    model: Literal["maskrcnn", "bestie"] = "maskrcnn"
    score_threshold: float | None = None
    flip: bool | None = None
    max_side: int = 1333
    batch_size: int = 1
    overlays: bool = True
    overlay_threshold: float = 0.3
    overlay_top_k: int = 3
    ids_from: str | None = None

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ConfigError(f"predict.model must be one of {', '.join(MODEL_KINDS)}, got {self.model!r}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise ConfigError(f"predict.score_threshold must be in [0, 1] or null, got {self.score_threshold}")
        if not 0.0 <= self.overlay_threshold <= 1.0:
            raise ConfigError(f"predict.overlay_threshold must be in [0, 1], got {self.overlay_threshold}")
        if self.overlay_top_k < 0:
            raise ConfigError(f"predict.overlay_top_k must be >= 0, got {self.overlay_top_k}")
        if self.max_side < 32:
            raise ConfigError(f"predict.max_side must be >= 32 pixels, got {self.max_side}")
        if self.batch_size < 1:
            raise ConfigError(f"predict.batch_size must be >= 1, got {self.batch_size}")
