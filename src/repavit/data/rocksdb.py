"""ImageNet-style datasets stored in RocksDB, compatible with the RePaViT authors' databases.

Format (the authors' ``insert_rocksdb.py`` layout): ``DIR/train.db`` and ``DIR/val.db``, each a RocksDB
database whose keys are the UTF-8 bytes ``"<class_name>/<image_file_name>"`` (for example
``n01440764/n01440764_10026.JPEG``) and whose values are the encoded image files, byte for byte. The
class index of a key is the position of its class name in the sorted list of distinct class names,
and samples are ordered as :class:`torchvision.datasets.ImageFolder` orders the same files, so a
database and the folder it was built from give identical ``(image, target)`` sequences.

The database is read through `rocksdict <https://github.com/rocksdict/RocksDict>`_ in raw mode (keys and
values are plain bytes, so databases written by python-rocksdb or any other binding read as they are),
opened read-only, lazily, once per process: a handle is never shared across DataLoader workers, and the
dataset pickles without one. Listing 1.28 M keys needs a full scan of the database (RocksDB iterates
data blocks, values included), so the key list is cached next to the database in
``<db>.keys.npz`` (or in ``key_cache``), validated against the database's files on every start.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import MissingExtraError, UserError
from ..utils import atomic_write
from .robust import BadImageError, load_rgb

__all__ = [
    "KEY_CACHE_SUFFIX",
    "RocksDBDataset",
    "db_fingerprint",
    "is_rocksdb",
    "iter_db_keys",
    "open_rocksdb",
    "sort_keys",
    "write_key_cache",
]

_logger = logging.getLogger(__name__)

KEY_CACHE_SUFFIX = ".keys.npz"
_CACHE_FORMAT = "repavit-rocksdb-keys/1"
# Handles opened in a parent process and inherited by a forked worker: kept alive, never closed or
# used in the child (closing a RocksDB handle in a forked child can hang or corrupt the parent's state).
_INHERITED: list[Any] = []


def _rocksdict() -> Any:
    """The rocksdict module, or a :class:`MissingExtraError` naming the extra to install."""
    try:
        import rocksdict
    except ModuleNotFoundError:
        raise MissingExtraError(
            "RocksDB datasets need the rocksdict package: pip install 'repavit[rocksdb]' (or pip install rocksdict)"
        ) from None
    return rocksdict


def is_rocksdb(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding a RocksDB database (it has a ``CURRENT`` file)."""
    return os.path.isfile(os.path.join(os.fspath(path), "CURRENT"))


def _max_open_files() -> int:
    """RocksDB keeps every table file open by default (-1); stay within the process's file limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= 65536:
        return -1
    return max(64, soft // 2)


def open_rocksdb(path: str | os.PathLike, *, read_only: bool = True, create: bool = False) -> Any:
    """Open a RocksDB database with rocksdict in raw mode (bytes keys and values).

    Writers store values uncompressed (encoded images do not compress, and any RocksDB build can then
    read the files) in table files of about 256 MB, so ImageNet's 140 GB make about 600 files.

    Args:
        path: the database folder.
        read_only: open read-only (many processes may do so at once, also while a writer has it open).
        create: create the database if missing (writers only).

    Raises:
        FileNotFoundError: ``path`` is not a RocksDB database and ``create`` is false.
    """
    rd = _rocksdict()
    path = os.fspath(path)
    if not create and not is_rocksdb(path):
        what = "does not exist" if not os.path.exists(path) else "is not a RocksDB database (no CURRENT file)"
        raise FileNotFoundError(f"RocksDB database {path} {what}")
    opts = rd.Options(raw_mode=True)
    opts.set_max_open_files(_max_open_files())
    if create:
        opts.create_if_missing(True)
    if not read_only:
        opts.set_compression_type(rd.DBCompressionType.none())
        opts.set_target_file_size_base(256 << 20)
        opts.set_write_buffer_size(128 << 20)
    access = rd.AccessType.read_only() if read_only else rd.AccessType.read_write()
    kw = {"options": opts, "access_type": access}
    known_shadow = _SHADOWS.get(path) if read_only else None
    try:
        return rd.Rdict(known_shadow if known_shadow and os.path.isdir(known_shadow) else path, **kw)
    except Exception as e:  # rocksdict raises a bare Exception carrying RocksDB's status text
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not (read_only and any(s in msg for s in _UNWRITABLE)):
            raise UserError(f"cannot open RocksDB database {path}: {msg}") from e
    # rocksdict (<= 0.3.29) writes rocksdict-config.json into the folder even to open it read-only, which
    # fails on a read-only file system: open a writable folder of links to the database's files instead.
    shadow = _shadow_dir(path)
    try:
        return rd.Rdict(shadow, **kw)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open RocksDB database {path} (read-only folder): {msg}") from e


_UNWRITABLE = ("Read-only file system", "os error 30", "Permission denied", "os error 13")
_SHADOWS: dict[str, str] = {}


def _shadow_dir(path: str) -> str:
    """A temporary folder of symbolic links to the data files of ``path`` (one per database and process tree)."""
    shadow = _SHADOWS.get(path)
    if shadow is not None and os.path.isdir(shadow):
        return shadow
    shadow = tempfile.mkdtemp(prefix="repavit-rocksdb-ro-")
    for name in os.listdir(path):
        if name == "LOCK" or name.startswith("LOG") or name == "rocksdict-config.json":
            continue
        os.symlink(os.path.join(path, name), os.path.join(shadow, name))
    _SHADOWS[path] = shadow
    _logger.info("%s is not writable; reading it through links in %s", path, shadow)
    owner = os.getpid()
    # Forked DataLoader workers inherit the folder and leave through os._exit, so only its creator removes it.
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(shadow, ignore_errors=True))
    return shadow


def iter_db_keys(db: Any) -> Iterator[bytes]:
    """All keys of an open raw-mode database, in RocksDB (bytewise) order, without filling the block cache."""
    rd = _rocksdict()
    read_opt = rd.ReadOptions()
    read_opt.fill_cache(False)
    yield from db.keys(read_opt=read_opt)


def db_fingerprint(path: str | os.PathLike) -> str:
    """A digest of the files that hold a database's data (table files, write-ahead logs, manifest).

    Any write changes it (new or grown files); reading does not. Info logs, locks and option files are
    left out, since opening a database touches them without changing its contents.
    """
    path = os.fspath(path)
    h = hashlib.sha256()
    with open(os.path.join(path, "CURRENT"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(path)):
        if name.endswith((".sst", ".log", ".blob")) or name.startswith("MANIFEST-"):
            h.update(f"{name}\0{os.path.getsize(os.path.join(path, name))}\n".encode())
    return h.hexdigest()


def _split_key(key: str, db: str) -> tuple[str, str, str]:
    """``"cls/sub/file"`` -> ``("cls", "sub", "file")``: the sort key that reproduces ImageFolder's order."""
    cls, sep, rest = key.partition("/")
    if not sep or not cls or not rest or rest.endswith("/"):
        raise UserError(f"RocksDB key {key!r} in {db} is not '<class_name>/<image_file_name>'")
    sub, _, fname = rest.rpartition("/")
    return cls, sub, fname


def sort_keys(keys: Iterable[bytes | str], db: str = "the database") -> tuple[list[str], list[str], np.ndarray]:
    """Decode and order keys as ImageFolder orders files; return ``(keys, classes, targets)``.

    ImageFolder sorts classes by name, then within a class walks folders in sorted order and files in
    sorted order; sorting by ``(class, sub-folder, file name)`` gives the same sequence. (RocksDB's own
    bytewise order differs when one class name is a prefix of another: ``"a-b/x" < "a/x"``.)

    Raises:
        ValueError: a key is not UTF-8 or not ``<class>/<file>``.
    """
    decoded: list[tuple[tuple[str, str, str], str]] = []
    for k in keys:
        if isinstance(k, bytes):
            try:
                s = k.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"RocksDB key {k!r} in {db} is not UTF-8 text") from None
        else:
            s = k
        decoded.append((_split_key(s, db), s))
    decoded.sort()
    classes = sorted({parts[0] for parts, _ in decoded})
    index = {c: i for i, c in enumerate(classes)}
    targets = np.fromiter((index[parts[0]] for parts, _ in decoded), dtype=np.int32, count=len(decoded))
    return [s for _, s in decoded], classes, targets


# ---- key cache ------------------------------------------------------------------------------------
def _cache_paths(db_path: str, key_cache: str | os.PathLike | None) -> list[str]:
    """Where the key list of ``db_path`` may be cached, in order of preference."""
    base = os.path.basename(db_path.rstrip(os.sep)) + KEY_CACHE_SUFFIX
    tag = hashlib.sha1(db_path.encode()).hexdigest()[:12]
    if key_cache is not None:
        return [os.path.join(os.fspath(key_cache), f"{tag}-{base}")]
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(os.path.dirname(db_path), base), os.path.join(user, "repavit", "rocksdb", f"{tag}-{base}")]


def _pack(keys: list[str]) -> tuple[bytes, np.ndarray]:
    """Keys as one UTF-8 buffer plus ``len(keys) + 1`` offsets (no per-key Python objects)."""
    encoded = [k.encode("utf-8") for k in keys]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(k) for k in encoded], out=offsets[1:])
    return b"".join(encoded), offsets


def write_key_cache(
    db_path: str | os.PathLike,
    keys: list[str],
    classes: list[str],
    targets: np.ndarray,
    key_cache: str | os.PathLike | None = None,
) -> str | None:
    """Save an ordered key list (from :func:`sort_keys`) for ``db_path``; return the file, or None if unwritable."""
    blob, offsets = _pack(keys)
    return _save_cache(os.path.abspath(os.fspath(db_path)), blob, offsets, classes, targets, key_cache)


def _savez(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
        np.savez(f, **arrays)


def _save_cache(
    db_path: str,
    blob: bytes,
    offsets: np.ndarray,
    classes: list[str],
    targets: np.ndarray,
    key_cache: str | os.PathLike | None,
) -> str | None:
    count = len(offsets) - 1
    arrays = {
        "header": np.array(
            json.dumps({"format": _CACHE_FORMAT, "fingerprint": db_fingerprint(db_path), "count": count})
        ),
        "classes": np.array(classes, dtype=str),
        "offsets": offsets,
        "blob": np.frombuffer(blob, dtype=np.uint8),
        "targets": np.asarray(targets, dtype=np.int32),
    }
    for path in _cache_paths(db_path, key_cache):
        try:
            atomic_write(path, functools.partial(_savez, arrays=arrays))
        except OSError as e:
            _logger.debug("cannot write key cache %s: %s", path, e)
            continue
        _logger.debug("wrote key cache %s (%d keys)", path, count)
        return path
    _logger.warning("could not write a key cache for %s; every start will scan the database", db_path)
    return None


def _read_key_cache(db_path: str, key_cache: str | os.PathLike | None) -> dict[str, np.ndarray] | None:
    fingerprint: str | None = None
    for path in _cache_paths(db_path, key_cache):
        if not os.path.isfile(path):
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in ("header", "classes", "offsets", "blob", "targets")}
            header = json.loads(str(data["header"]))
        except (OSError, ValueError, KeyError) as e:
            _logger.info("ignoring unreadable key cache %s (%s)", path, e)
            continue
        fingerprint = fingerprint or db_fingerprint(db_path)
        count = header.get("count")
        if (
            header.get("format") != _CACHE_FORMAT
            or header.get("fingerprint") != fingerprint
            or len(data["offsets"]) != count + 1
            or len(data["targets"]) != count
        ):
            _logger.info("key cache %s is out of date; rescanning %s", path, db_path)
            continue
        return data
    return None


# ---- dataset ------------------------------------------------------------------------------------
class RocksDBDataset(Dataset):
    """Images stored in a RocksDB database as ``"<class>/<file>" -> encoded image``; yields ``(image, target)``.

    Same interface as torchvision's ImageFolder: ``classes`` (sorted names), ``class_to_idx``,
    ``targets`` (an int32 array here), ``__getitem__ -> (transform(image), target_transform(target))``.
    Images are decoded with :func:`repavit.data.robust.load_rgb`, so an unreadable value raises
    :class:`~repavit.data.robust.BadImageError` (wrap in :class:`~repavit.data.robust.RobustDataset` to
    skip such samples).

    Keys are stored in one bytes buffer plus an offsets array (no per-key Python objects), so forked
    DataLoader workers share them without copy-on-write growth.

    Args:
        db_path: the database folder (e.g. ``DIR/train.db``).
        transform: applied to the PIL image.
        target_transform: applied to the class index.
        key_cache: folder for the key-list cache (default: next to the database, or
            ``~/.cache/repavit/rocksdb`` if that folder is not writable).

    Raises:
        FileNotFoundError: ``db_path`` is not a RocksDB database.
        ValueError: the database is empty, or a key is not ``<class>/<file>``.
    """

    def __init__(
        self,
        db_path: str | os.PathLike,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        key_cache: str | os.PathLike | None = None,
    ) -> None:
        self.db_path = os.path.abspath(os.fspath(db_path))
        if not is_rocksdb(self.db_path):
            what = "does not exist" if not os.path.exists(self.db_path) else "is not a RocksDB database (no CURRENT)"
            raise FileNotFoundError(f"RocksDB database {self.db_path} {what}")
        self.transform = transform
        self.target_transform = target_transform
        self._handle: Any = None
        self._pid: int | None = None
        data = _read_key_cache(self.db_path, key_cache)
        if data is None:
            _logger.info("listing the keys of %s (first use; the list is cached afterwards)", self.db_path)
            db = open_rocksdb(self.db_path)
            try:
                keys, classes, targets = sort_keys(iter_db_keys(db), self.db_path)
            finally:
                db.close()
            if not keys:
                raise UserError(f"RocksDB database {self.db_path} is empty: no images (an empty split)")
            self._blob, self._offsets = _pack(keys)
            _save_cache(self.db_path, self._blob, self._offsets, classes, targets, key_cache)
            self.classes = classes
            self.targets = targets
        else:
            self._offsets = data["offsets"].astype(np.int64)
            self._blob = data["blob"].tobytes()
            self.classes = [str(c) for c in data["classes"]]
            self.targets = data["targets"].astype(np.int32)
        if len(self.targets) == 0:
            raise UserError(f"RocksDB database {self.db_path} is empty: no images (an empty split)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def key(self, index: int) -> str:
        """The key of sample ``index`` (``"<class>/<file>"``)."""
        return self._key_bytes(index).decode("utf-8")

    def _key_bytes(self, index: int) -> bytes:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        return self._blob[self._offsets[index] : self._offsets[index + 1]]

    def keys(self) -> Iterator[str]:
        """All keys in sample order."""
        for i in range(len(self)):
            yield self.key(i)

    def _db(self) -> Any:
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            if self._handle is not None:
                _INHERITED.append(self._handle)  # the parent's handle, inherited through fork
            self._handle = open_rocksdb(self.db_path)
            self._pid = pid
        return self._handle

    def read_bytes(self, index: int) -> bytes:
        """The stored (encoded) image of sample ``index``."""
        key = self._key_bytes(index)
        value = self._db().get(key)
        if value is None:
            raise BadImageError(f"cannot read image {self.db_path}/{key.decode('utf-8')}: key not in the database")
        return value

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        data = self.read_bytes(index)
        img = load_rgb(data, name=f"{self.db_path}/{self.key(index)}")
        target: Any = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def close(self) -> None:
        """Close this process's handle (it reopens on the next access)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.db_path!r}, {len(self)} images, {len(self.classes)} classes)"
