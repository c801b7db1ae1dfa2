"""WSSS maps (semantic pseudo labels) from dense CAMs with image-level supervision only.

METHOD.md section 3: :mod:`bestie.wsss.crf` (background threshold + dense CRF + uncertain band, the
baseline) and :mod:`bestie.wsss.affinity` (AffinityNet-style inter-pixel affinities learnt from the
confident seeds, CAM propagation by random walk; imports torch, so it is not imported here).
"""

from bestie.wsss.crf import CrfParams, cams_to_wsss, dense_crf, mark_uncertain, seed_map, threshold_argmax

__all__ = ["CrfParams", "cams_to_wsss", "dense_crf", "mark_uncertain", "seed_map", "threshold_argmax"]
