"""CIFAR-100 from a local folder, in either official format, read without running pickled code.

Accepted layouts (``root`` may be the folder itself or its parent)::

    root/cifar-100-python/{train,test,meta}                      # the "python version"
    root/cifar-100-binary/{train.bin,test.bin,fine_label_names.txt}  # the "binary version"

The python version is a pickle; it is read with an unpickler that rebuilds only numpy arrays and
plain containers, so a tampered file cannot execute code. Nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError

__all__ = ["CIFAR100Local"]

_RECORD = 2 + 3 * 32 * 32  # binary format: coarse label, fine label, 3072 pixels
# The only globals the official pickles need: numpy array reconstruction (and, for files re-pickled by
# Python 3 with protocol 2, the pure function that rebuilds bytes objects).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")


def _load_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        obj = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a CIFAR dictionary")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _find(root: str, sub: str) -> str | None:
    for cand in (os.path.join(root, sub), root):
        if os.path.basename(os.path.normpath(cand)) == sub and os.path.isdir(cand):
            return cand
    return None


class CIFAR100Local(Dataset):
    """CIFAR-100 (fine labels) read from ``root``; yields ``(PIL image, label)``.

    Args:
        root: folder holding ``cifar-100-python/`` or ``cifar-100-binary/`` (or one of them).
        train: the 50,000 training images, else the 10,000 test images.
        transform: applied to the PIL image.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"CIFAR-100 folder not found: {root} (expected cifar-100-python/ inside)")
        self.transform = transform
        py_dir, bin_dir = _find(root, "cifar-100-python"), _find(root, "cifar-100-binary")
        if py_dir is not None:
            self.data, self.targets, self.classes = self._read_python(py_dir, train)
        elif bin_dir is not None:
            self.data, self.targets, self.classes = self._read_binary(bin_dir, train)
        else:
            raise FileNotFoundError(
                f"no CIFAR-100 data in {root}: expected cifar-100-python/ (train, test, meta) or "
                "cifar-100-binary/ (train.bin, test.bin, fine_label_names.txt)"
            )

    @staticmethod
    def _read_python(folder: str, train: bool) -> tuple[np.ndarray, list[int], list[str]]:
        split = os.path.join(folder, "train" if train else "test")
        meta = os.path.join(folder, "meta")
        for p in (split, meta):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"CIFAR-100 file missing: {p}")
        d = _load_pickle(split)
        if "data" not in d or "fine_labels" not in d:
            raise UserError(f"{split} has no 'data'/'fine_labels' entries: not a CIFAR-100 file")
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _load_pickle(meta)["fine_label_names"]]
        return np.ascontiguousarray(data), [int(t) for t in d["fine_labels"]], classes

    @staticmethod
    def _read_binary(folder: str, train: bool) -> tuple[np.ndarray, list[int], list[str]]:
        split = os.path.join(folder, "train.bin" if train else "test.bin")
        names = os.path.join(folder, "fine_label_names.txt")
        for p in (split, names):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"CIFAR-100 file missing: {p}")
        raw = np.fromfile(split, dtype=np.uint8)
        if raw.size == 0 or raw.size % _RECORD:
            raise UserError(f"{split} is not a CIFAR-100 binary file (size not a multiple of {_RECORD} bytes)")
        rec = raw.reshape(-1, _RECORD)
        data = rec[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        with open(names) as f:
            classes = [line.strip() for line in f if line.strip()]
        return np.ascontiguousarray(data), rec[:, 1].astype(int).tolist(), classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index], mode="RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
