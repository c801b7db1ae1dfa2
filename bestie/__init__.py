"""BESTIE: weakly-supervised instance segmentation by semantic knowledge transfer and self-refinement.

A reproducible implementation of Kim et al., CVPR 2022 (arXiv 2109.09477), with every stage of the
pipeline (PAM classifier, CAMs and peaks, WSSS maps, BESTIE training, pseudo-label export, Mask R-CNN,
evaluation) as a plain Python function, a ``bestie <stage>`` subcommand and a Snakemake rule.
"""

__version__ = "0.1.0"
