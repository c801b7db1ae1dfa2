"""Exceptions raised by the package.

Every error names the file (or config key) and the fault, so that a failed Snakemake job tells the user
what to fix without reading a traceback.
"""

from __future__ import annotations

__all__ = ["BestieError", "DataError", "ConfigError", "ArtifactError", "WeightsError", "TrainingError"]


class BestieError(Exception):
    """Base class of every error this package raises on purpose."""


class DataError(BestieError, ValueError):
    """Bad input data: a missing or corrupt image, an id without label, an unknown class, ..."""


class ConfigError(BestieError, ValueError):
    """A malformed configuration: unknown key, wrong type or value out of range."""


class ArtifactError(BestieError, OSError):
    """A stage artifact (HDF5, JSON, checkpoint) that is missing, corrupt or of the wrong form."""


class WeightsError(BestieError, FileNotFoundError):
    """A configured weights file that is missing or whose tensors do not match the model."""


class TrainingError(BestieError, RuntimeError):
    """Training cannot go on, e.g. a loss that became NaN or inf."""
