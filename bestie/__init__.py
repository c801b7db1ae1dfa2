"""BESTIE: weakly-supervised instance segmentation by semantic knowledge transfer and self-refinement.

A reproducible implementation of Kim et al., CVPR 2022 (arXiv 2109.09477), with every stage of the
pipeline (PAM classifier, CAMs and peaks, WSSS maps, BESTIE training, pseudo-label export, Mask R-CNN,
evaluation) as a plain Python function, a ``bestie <stage>`` subcommand and a Snakemake rule.
"""

__version__ = "0.1.0"

# imported first, before any stage opens a file: it notes what descriptor 3 is at start (the workflow's
# terminal, or nothing), so progress lines never go to a file that later took that number
from bestie import progress as _progress  # noqa: E402,F401
