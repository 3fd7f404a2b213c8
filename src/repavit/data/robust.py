"""Robust image loading: decode anything to RGB, and skip unreadable samples instead of crashing an epoch.

Two pieces, usable on any dataset built by :func:`repavit.data.build_dataset`:

* :func:`load_rgb` decodes a path or raw bytes to an 8-bit RGB PIL image. Grayscale, bilevel, CMYK,
  YCbCr/LAB/HSV convert as Pillow converts them; 16-bit (and 32-bit integer) grayscale is scaled down
  (``v / 257``) instead of clipped at 255 (Pillow's plain ``convert("RGB")`` turns a 16-bit PNG
  white); images with transparency (RGBA, LA, palette with a transparent entry) are composited over
  white, so what was invisible stays invisible. Any failure to open or decode raises
  :class:`BadImageError` naming the file.
* :class:`RobustDataset` wraps a dataset. A sample whose image cannot be read is replaced by the next
  readable sample (index order, so usually the same class), with one warning per file over the whole
  run, and counted. The count lives in shared memory, so it is right with DataLoader workers (forked or
  spawned). With ``fatal=True`` the first unreadable image raises :class:`BadImageError` instead.

Usage in a training loop (one call to wrap, one call per epoch to read and reset)::

    train_ds = RobustDataset(train_ds, fatal=False)
    ...  # one epoch over DataLoader(train_ds, num_workers=8, ...)
    skipped = train_ds.pop_bad_count()  # images replaced during this epoch, summed over workers

In distributed training every process has its own dataset and count: sum the counts across processes
to log a global number.
"""

from __future__ import annotations

import ctypes
import io
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import UserError

__all__ = ["BadImageError", "GuardedLoader", "RobustDataset", "check_split", "load_rgb", "to_rgb"]

_logger = logging.getLogger(__name__)

_WHITE = (255, 255, 255, 255)
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImageError(UserError):
    """An image that cannot be opened or decoded (corrupt, truncated, not an image, missing).

    The message is one line naming the file. When a DataLoader worker raised it, the main process
    receives it rebuilt from the worker's traceback text; the constructor recovers the original
    one-line message from that text, so the error still names the file on its first line.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_unwrap_worker_message(message, type(self)))


def _unwrap_worker_message(message: str, cls: type) -> str:
    """``Caught BadImageError in DataLoader worker process 0.\\nOriginal Traceback ...\\npkg.BadImageError: msg``
    -> ``msg (in DataLoader worker process 0)``; any other message is returned as given."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    first = message.splitlines()[0]
    where = first.split(" ", 2)[2].rstrip(".") if first.count(" ") >= 2 else ""
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    for line in reversed(message.splitlines()):
        if line.startswith(prefix):
            return f"{line[len(prefix) :]} ({where})" if where else line[len(prefix) :]
    return message


# ---- decoding ------------------------------------------------------------------------------------
def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel high-bit-depth pixels to 0..255: integers as 16-bit values, floats as 0..1 (or 0..255)."""
    if mode == "F":
        a = arr.astype(np.float64)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        return np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8)
    # 16-bit (and 32-bit integer, almost always 16-bit data widened by the decoder): 65535 -> 255.
    a = np.clip(arr.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _INT_MODES or mode == "F":
        gray = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    # L, 1, P, CMYK (Adobe-inverted CMYK JPEGs are un-inverted by the decoder), YCbCr, LAB, HSV.
    return img.convert("RGB")


def _describe(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def load_rgb(source: str | os.PathLike | bytes | bytearray | memoryview, name: str | None = None) -> Image.Image:
    """Decode an image file (path) or encoded image bytes to an 8-bit RGB PIL image.

    The whole image is decoded here (not lazily), so a truncated file fails now, not inside a transform.

    Args:
        source: a file path, or the raw bytes of an encoded image (JPEG, PNG, ...).
        name: how errors refer to the image (default: the path, or the byte count).

    Raises:
        BadImageError: the file is missing, unreadable, not an image, corrupt or truncated.
    """
    label = name or _describe(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise UserError("empty (0 bytes)")
            fp: Any = io.BytesIO(source)
        else:
            fp = open(source, "rb")  # closed by the with below
        with fp:
            img = Image.open(fp)
            img.load()
            return to_rgb(img)
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, zlib.error, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, FileNotFoundError):
            reason = "file not found"
        elif isinstance(e, UnidentifiedImageError):
            reason = "not an image (unknown or broken format)"
        raise BadImageError(f"cannot read image {label}: {reason}") from e


class GuardedLoader:
    """Wrap a dataset's own ``loader(path)``: any exception it raises becomes a :class:`BadImageError`.

    Picklable (a class, not a closure), so it works in spawned DataLoader workers.
    """

    def __init__(self, loader: Callable[[str], Any]) -> None:
        self.loader = loader

    def __call__(self, path: str) -> Any:
        try:
            return self.loader(path)
        except BadImageError:
            raise
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadImageError(f"cannot read image {path}: {reason}") from e


def _is_stock_loader(loader: Any) -> bool:
    """torchvision's ``default_loader`` / ``pil_loader`` (decode with PIL, ``convert("RGB")``)."""
    from torchvision.datasets import folder as tv_folder

    return loader in (tv_folder.default_loader, tv_folder.pil_loader)


# ---- split checks -------------------------------------------------------------------------------
def check_split(dataset: Dataset, split: str = "training") -> None:
    """Raise a one-line ``ValueError`` if a split has no samples, or a class has none.

    Uses ``dataset.classes`` and ``dataset.targets`` when the dataset has them (ImageFolder, RocksDB,
    iNaturalist, CIFAR); datasets without them get only the emptiness check.

    Args:
        dataset: the split.
        split: its name in the error message (``"training"``, ``"validation"``).
    """
    name = getattr(dataset, "db_path", None) or getattr(dataset, "root", None) or type(dataset).__name__
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise UserError(f"the {split} split ({name}) has no images")
    classes: Sequence[str] | None = getattr(dataset, "classes", None)
    targets = getattr(dataset, "targets", None)
    if classes is None or targets is None:
        return
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise UserError(f"class {empty[0]!r}{more} of the {split} split ({name}) has no images")


# ---- robust wrapper -----------------------------------------------------------------------------
class RobustDataset(Dataset):
    """A dataset whose unreadable samples are replaced by readable ones (or raise, with ``fatal=True``).

    On construction the wrapped dataset's ``loader`` attribute (ImageFolder, iNaturalist) is replaced:
    torchvision's stock loader by :func:`load_rgb` (RGB conversion rules of this module), any other
    loader by a :class:`GuardedLoader` around it. Datasets that decode with :func:`load_rgb` themselves
    (RocksDB) need nothing. Only :class:`BadImageError` is caught: an error in a transform or in the
    code is a bug and still stops training.

    A bad sample ``i`` is replaced by the next readable sample ``i+1, i+2, ...`` (wrapping around).
    Known-bad indices are remembered in shared memory and skipped without decoding them again. Every
    replaced sample (one per ``__getitem__`` call that could not return its own sample) increments a
    shared counter, so an epoch that reads each index once counts each bad file once;
    :meth:`pop_bad_count` reads and resets it.

    Attribute access falls through to the wrapped dataset (``classes``, ``targets``, ...).

    Args:
        dataset: a map-style dataset returning ``(image, target)``.
        fatal: raise :class:`BadImageError` on the first unreadable image instead of replacing it.
        max_tries: consecutive unreadable samples tolerated before giving up with an error.
        replace_loader: swap the wrapped dataset's ``loader`` as described above.
    """

    def __init__(
        self, dataset: Dataset, *, fatal: bool = False, max_tries: int = 32, replace_loader: bool = True
    ) -> None:
        if isinstance(dataset, RobustDataset):
            raise UserError("dataset is already a RobustDataset; wrap it once")
        if max_tries < 1:
            raise UserError(f"max_tries must be >= 1, got {max_tries}")
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise UserError(f"cannot wrap an empty dataset ({type(dataset).__name__} has no samples)")
        self.dataset = dataset
        self.fatal = fatal
        self.max_tries = max_tries
        if replace_loader and callable(getattr(dataset, "loader", None)):
            loader = dataset.loader  # type: ignore[attr-defined]
            if not isinstance(loader, GuardedLoader) and loader is not load_rgb:
                dataset.loader = load_rgb if _is_stock_loader(loader) else GuardedLoader(loader)  # type: ignore[attr-defined]
        # Shared memory without locks (a lock made in one start-method context cannot go to workers of
        # another): per index, how often it was replaced since the last pop, and whether it is known bad.
        # Worker processes touch different indices at a time; a rare race costs one count or one warning.
        self._replaced = multiprocessing.RawArray(ctypes.c_uint32, n)
        self._bad = multiprocessing.RawArray(ctypes.c_uint8, n)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "_replaced", "_bad") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _report(self, requested: int, bad: int, count: bool) -> bool:
        """Mark ``bad`` as unreadable (and count one replacement of ``requested``); True the first time."""
        if count:
            self._replaced[requested] += 1
        first = not self._bad[bad]
        self._bad[bad] = 1
        return first

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        start = j = index % n
        for attempt in range(self.max_tries):
            if self._bad[j]:
                self._report(start, j, count=attempt == 0)
            else:
                try:
                    return self.dataset[j]
                except BadImageError as e:
                    if self.fatal:
                        raise
                    if self._report(start, j, count=attempt == 0):
                        _logger.warning("skipping unreadable sample %d: %s", j, e)
            j = (j + 1) % n
        raise BadImageError(
            f"{self.max_tries} consecutive samples from index {start} are unreadable; the data looks broken "
            "(check the dataset, e.g. with `repavit rocksdb info --check` or by opening a few files)"
        )

    def pop_bad_count(self) -> int:
        """Samples replaced since the last call, in all worker processes together; resets the count to 0.

        Call it between epochs (when no worker is loading), e.g. right after the loop over the loader.
        """
        replaced = np.frombuffer(self._replaced, dtype=np.uint32)
        value = int(replaced.sum())
        replaced[:] = 0
        return value

    @property
    def bad_count(self) -> int:
        """Samples replaced since the last :meth:`pop_bad_count` (not reset)."""
        return int(np.frombuffer(self._replaced, dtype=np.uint32).sum())

    def bad_indices(self) -> list[int]:
        """Indices known to be unreadable so far (each warned about once)."""
        return np.flatnonzero(np.frombuffer(self._bad, dtype=np.uint8)).tolist()
