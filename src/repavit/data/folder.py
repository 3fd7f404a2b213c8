"""ImageFolder datasets (``root/<class>/<image>``) with errors that name what is wrong."""

from __future__ import annotations

import os
from collections.abc import Callable

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError

__all__ = ["IMG_EXTENSIONS", "image_folder", "scan_image_folder"]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike) -> list[str]:
    """Check ``root`` holds one sub-folder per class, each with at least one image; return the classes.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ValueError: ``root`` has no class folders, or a class folder has no image files.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"data folder not found: {root} (expected one sub-folder of images per class)")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data path is not a folder: {root} (expected one sub-folder of images per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"data folder {root} is empty: expected one sub-folder of images per class")
    for c in classes:
        has_image = False
        for _dirpath, _dirs, files in os.walk(os.path.join(root, c), followlinks=True):
            if any(_is_image(f) for f in files):
                has_image = True
                break
        if not has_image:
            raise UserError(
                f"class folder {os.path.join(root, c)} has no images (expected files ending in "
                f"{', '.join(IMG_EXTENSIONS[:4])}, ...)"
            )
    return classes


def image_folder(root: str | os.PathLike, transform: Callable | None = None) -> ImageFolder:
    """A torchvision :class:`ImageFolder` over ``root``, after :func:`scan_image_folder` checked it."""
    scan_image_folder(root)
    return ImageFolder(os.fspath(root), transform=transform)
