"""Writing ImageNet-style RocksDB databases (:func:`build_db`), and inspecting them (:func:`inspect_db`).

:func:`build_db` reads the ImageNet tar files (``ILSVRC2012_img_train.tar``: a tar of per-class ``<wnid>.tar``;
``ILSVRC2012_img_val.tar`` plus a local label file, one wnid per line for the sorted file names) or
any ImageFolder directory, and writes ``OUT/train.db`` / ``OUT/val.db`` in the authors' format (see
:mod:`repavit.data.rocksdb`). Writes are batched; a progress bar shows files (folders) or bytes (tars).

Restarting an interrupted build resumes it: keys already in the database are skipped, not rewritten
(a ``<db>.build.json`` file records the source and whether the build finished). A database that holds
images but is not an unfinished build of the same source is refused unless ``resume`` (add only the
missing images) or ``overwrite`` (delete and rebuild). At the end every source image is checked to be
in the database with its exact size, no other key may be present, and the key list is cached for
:class:`~repavit.data.rocksdb.RocksDBDataset`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ArgumentError, UserError
from ..utils import write_json
from .folder import scan_image_folder
from .rocksdb import KEY_CACHE_SUFFIX, _rocksdict, is_rocksdb, iter_db_keys, open_rocksdb, sort_keys, write_key_cache

__all__ = [
    "FolderSource",
    "ImageNetTrainTar",
    "ImageNetValTar",
    "build_db",
    "inspect_db",
    "open_sources",
    "read_val_labels",
]

_logger = logging.getLogger(__name__)

STATE_SUFFIX = ".build.json"
DEFAULT_BATCH_BYTES = 64 << 20


def _image_ext(name: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return name.lower().endswith(IMG_EXTENSIONS)


@dataclass
class Item:
    """One image of a source: its database key, its size in bytes and a function reading its bytes."""

    key: str
    size: int
    read: Callable[[], bytes]


# ---- sources ------------------------------------------------------------------------------------
class FolderSource:
    """An ImageFolder directory (``root/<class>/**/<image>``): the same files, in the same order, as ImageFolder."""

    kind = "folder"
    unit = "img"

    def __init__(self, root: str | os.PathLike) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        self.root = os.path.abspath(os.fspath(root))
        self.classes = scan_image_folder(self.root)
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [p for p, _ in make_dataset(self.root, class_to_idx, extensions=IMG_EXTENSIONS)]
        self.total = len(self.samples)
        self.position = 0

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "path": self.root}

    def __iter__(self) -> Iterator[Item]:
        for i, path in enumerate(self.samples, start=1):
            self.position = i
            key = os.path.relpath(path, self.root).replace(os.sep, "/")
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"file name is not valid UTF-8, cannot be a RocksDB key: {path!r}") from None
            yield Item(key, os.path.getsize(path), functools.partial(_read_file, path))


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise UserError(f"tar member {member.name} has no data")
    return f.read()


def _check_tar(path: str, what: str) -> str:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not tarfile.is_tarfile(path):
        raise UserError(f"{what} {path} is not a tar file")
    return path


class ImageNetTrainTar:
    """``ILSVRC2012_img_train.tar``: a tar of ``<wnid>.tar`` files, each a tar of that class's images.

    Progress is counted in bytes of the outer tar (its image count is unknown until it is read).
    """

    kind = "imagenet-train-tar"
    unit = "B"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = _check_tar(os.fspath(path), "training tar")
        self.total = os.path.getsize(self.path)
        self.position = 0
        with tarfile.open(self.path, "r:") as outer:  # headers only: tarfile seeks over the data
            names = [posixpath.basename(m.name) for m in outer.getmembers() if m.isfile()]
        inner = [n for n in names if n.endswith(".tar")]
        if not inner:
            raise UserError(f"training tar {self.path} holds no per-class <wnid>.tar files")
        if len(inner) != len(names):
            _logger.warning(
                "training tar %s: ignoring %d members that are not .tar files", self.path, len(names) - len(inner)
            )
        self.classes = sorted(n[: -len(".tar")] for n in inner)

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "path": self.path}

    def __iter__(self) -> Iterator[Item]:
        with open(self.path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
            for m in outer:
                name = posixpath.basename(m.name)
                if not m.isfile() or not name.endswith(".tar"):
                    continue
                wnid = name[: -len(".tar")]
                fileobj = outer.extractfile(m)
                with tarfile.open(fileobj=fileobj, mode="r|") as inner:
                    for im in inner:
                        fname = posixpath.basename(im.name)
                        if not im.isfile() or not _image_ext(fname):
                            continue
                        self.position = m.offset_data + getattr(im, "offset_data", 0)
                        yield Item(f"{wnid}/{fname}", im.size, functools.partial(_read_member, inner, im))
                self.position = m.offset_data + m.size


def read_val_labels(path: str | os.PathLike) -> list[str]:
    """One class name (wnid) per line; trailing blank lines ignored.

    Raises:
        ValueError: a blank line inside, a label with ``/`` or spaces, or numeric labels (the ILSVRC
            devkit's ``ILSVRC2012_validation_ground_truth.txt`` holds 1-based ids, not wnids).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"validation label file not found: {path}")
    with open(path, encoding="utf-8") as f:
        labels = [line.strip() for line in f]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise UserError(f"validation label file {path} is empty (expected one wnid per line)")
    for i, lab in enumerate(labels, start=1):
        if not lab or "/" in lab or any(ch.isspace() for ch in lab):
            raise UserError(f"{path} line {i}: {lab!r} is not a class name (expected one wnid per line)")
    if all(lab.isdigit() for lab in labels):
        raise UserError(
            f"{path} holds numbers, not class names: expected one wnid per line (e.g. n01751748), "
            "not the devkit's numeric ILSVRC ids"
        )
    return labels


class ImageNetValTar:
    """``ILSVRC2012_img_val.tar`` (flat image files) with labels paired to the file names in sorted order."""

    kind = "imagenet-val-tar"
    unit = "B"

    def __init__(self, path: str | os.PathLike, labels: str | os.PathLike) -> None:
        self.path = _check_tar(os.fspath(path), "validation tar")
        self.labels_path = os.path.abspath(os.fspath(labels))
        self.total = os.path.getsize(self.path)
        self.position = 0
        with tarfile.open(self.path, "r:") as tf:
            names = sorted(posixpath.basename(m.name) for m in tf.getmembers() if m.isfile() and _image_ext(m.name))
        if not names:
            raise UserError(f"validation tar {self.path} holds no image files")
        if len(set(names)) != len(names):
            raise UserError(f"validation tar {self.path} holds two images with the same file name")
        labels = read_val_labels(self.labels_path)
        if len(labels) != len(names):
            raise UserError(
                f"{self.labels_path} has {len(labels)} labels but {self.path} holds {len(names)} images "
                "(expected one label per image, in sorted file-name order)"
            )
        self.label_of = dict(zip(names, labels))
        self.classes = sorted(set(labels))

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "path": self.path, "labels": self.labels_path}

    def __iter__(self) -> Iterator[Item]:
        with open(self.path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                fname = posixpath.basename(m.name)
                if not m.isfile() or not _image_ext(fname):
                    continue
                self.position = m.offset_data
                yield Item(f"{self.label_of[fname]}/{fname}", m.size, functools.partial(_read_member, tf, m))
            self.position = self.total


# ---- building -----------------------------------------------------------------------------------
def _state_path(db_path: str) -> str:
    return db_path.rstrip(os.sep) + STATE_SUFFIX


def _read_state(db_path: str) -> dict[str, Any] | None:
    try:
        with open(_state_path(db_path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_state(db_path: str, state: dict[str, Any]) -> None:
    write_json(_state_path(db_path), state)


def _has_keys(db_path: str) -> bool:
    db = open_rocksdb(db_path)
    try:
        return next(iter_db_keys(db), None) is not None
    finally:
        db.close()


def _remove_db(db_path: str) -> None:
    shutil.rmtree(db_path)
    for extra in (db_path.rstrip(os.sep) + KEY_CACHE_SUFFIX, _state_path(db_path)):
        if os.path.exists(extra):
            os.remove(extra)


def _prepare(db_path: str, source: Any, resume: bool, overwrite: bool) -> bool:
    """Check the target before writing; delete it for ``overwrite``. Return True if resuming."""
    if os.path.exists(db_path) and not os.path.isdir(db_path):
        raise NotADirectoryError(f"{db_path} exists and is not a folder (expected a RocksDB database or nothing)")
    if os.path.isdir(db_path) and os.listdir(db_path) and not is_rocksdb(db_path):
        raise UserError(f"{db_path} exists and is not a RocksDB database; choose another output folder or remove it")
    if not is_rocksdb(db_path):
        return False
    if overwrite:
        _logger.info("overwrite: deleting %s", db_path)
        _remove_db(db_path)
        return False
    if not _has_keys(db_path):
        return False
    state = _read_state(db_path)
    unfinished_same = (
        state is not None and state.get("status") == "in-progress" and state.get("source") == (source.describe())
    )
    if resume or unfinished_same:
        return True
    if state is not None and state.get("status") == "complete":
        what = "is a finished build" + (" of the same source" if state.get("source") == source.describe() else "")
    elif state is not None:
        what = "is an unfinished build of another source"
    else:
        what = "already holds images (not written by this tool)"
    raise ArgumentError(
        "{path} {what}; pass {resume} to add only the missing images, or {overwrite} to delete and rebuild it",
        path=db_path,
        what=what,
    )


def build_db(
    db_path: str | os.PathLike,
    source: Any,
    *,
    resume: bool = False,
    overwrite: bool = False,
    batch_size: int = 256,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write the images of ``source`` into the database ``db_path``, verify it and cache its key list.

    Args:
        db_path: the database folder to create (e.g. ``OUT/train.db``).
        source: a :class:`FolderSource`, :class:`ImageNetTrainTar` or :class:`ImageNetValTar`.
        resume: add only the keys missing from an existing database (never rewrites a key).
        overwrite: delete an existing database first.
        batch_size: images per write batch.
        batch_bytes: a batch is also written once it holds this many bytes.
        progress: show a progress bar (None: only on a terminal).

    Returns:
        A summary: images, classes, images written and skipped, bytes written, seconds.

    Raises:
        ValueError: the target holds images and neither flag allows touching them; a duplicate key; the
            verification found missing, extra or wrongly sized values.
    """
    db_path = os.path.abspath(os.fspath(db_path))
    if resume and overwrite:
        raise ArgumentError("{resume} and {overwrite} exclude each other")
    if batch_size < 1 or batch_bytes < 1:
        raise UserError(f"batch sizes must be >= 1, got {batch_size} images and {batch_bytes} bytes")
    resuming = _prepare(db_path, source, resume, overwrite)
    t0 = time.perf_counter()
    db = open_rocksdb(db_path, read_only=False, create=True)
    try:
        existing = set(iter_db_keys(db)) if resuming else set()
        if resuming:
            _logger.info("resuming %s: %d images already present are skipped", db_path, len(existing))
        _write_state(db_path, {"status": "in-progress", "source": source.describe()})
        counts = _write_items(db, os.path.basename(db_path), source, existing, batch_size, batch_bytes, progress)
    finally:
        db.flush()
        db.close()
        del db
    if not counts["expected"]:
        raise UserError(f"{source.describe()['path']} holds no images")
    keys = _verify(db_path, counts.pop("expected"))
    ordered, classes, targets = sort_keys(keys, db_path)
    write_key_cache(db_path, ordered, classes, targets)
    summary = {"db": db_path, "images": len(ordered), "classes": len(classes), **counts}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    _write_state(db_path, {"status": "complete", "source": source.describe(), **summary})
    return summary


def _write_items(
    db: Any, name: str, source: Any, existing: set[bytes], batch_size: int, batch_bytes: int, progress: bool | None
) -> dict[str, Any]:
    """Write the source's images not in ``existing``, in batches; return the expected sizes and the counts."""
    from tqdm import tqdm

    rd = _rocksdict()
    wopt = rd.WriteOptions()
    wopt.disable_wal = True  # a crash loses only unflushed batches, which a resumed build writes again
    expected: dict[bytes, int] = {}
    written = skipped = written_bytes = 0
    batch, n_batch, bytes_batch = rd.WriteBatch(raw_mode=True), 0, 0
    with tqdm(total=source.total, unit=source.unit, unit_scale=True, desc=name, disable=progress_off(progress)) as bar:
        for item in source:
            key = item.key.encode("utf-8")
            if key in expected:
                raise UserError(f"two images map to the same key {item.key!r} in {source.describe()['path']}")
            expected[key] = item.size
            if key in existing:
                skipped += 1
            else:
                data = item.read()
                batch.put(key, data)
                n_batch, bytes_batch = n_batch + 1, bytes_batch + len(data)
            if n_batch and (n_batch >= batch_size or bytes_batch >= batch_bytes):
                db.write(batch, wopt)
                written, written_bytes = written + n_batch, written_bytes + bytes_batch
                batch, n_batch, bytes_batch = rd.WriteBatch(raw_mode=True), 0, 0
            bar.update(source.position - bar.n)
        if n_batch:
            db.write(batch, wopt)
            written, written_bytes = written + n_batch, written_bytes + bytes_batch
    return {"expected": expected, "written": written, "skipped": skipped, "written_bytes": written_bytes}


def progress_off(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def _verify(db_path: str, expected: dict[bytes, int]) -> list[bytes]:
    """Every expected key present with its size, nothing else; return the database's keys."""
    rd = _rocksdict()
    read_opt = rd.ReadOptions()
    read_opt.fill_cache(False)
    db = open_rocksdb(db_path)
    keys: list[bytes] = []
    extra: list[bytes] = []
    wrong: list[bytes] = []
    try:
        for k, v in db.items(read_opt=read_opt):
            keys.append(k)
            size = expected.get(k)
            if size is None:
                extra.append(k)
            elif len(v) != size:
                wrong.append(k)
    finally:
        db.close()
    missing = len(expected) - (len(keys) - len(extra))
    if missing or extra or wrong:
        problems = []
        if missing:
            problems.append(f"{missing} source images missing")
        if extra:
            problems.append(f"{len(extra)} keys not in the source (e.g. {extra[0].decode('utf-8', 'replace')})")
        if wrong:
            problems.append(f"{len(wrong)} values of the wrong size (e.g. {wrong[0].decode('utf-8', 'replace')})")
        raise UserError(f"verification of {db_path} failed: {'; '.join(problems)}")
    return keys


# ---- sources of a build, and inspection ----------------------------------------------------------
SOURCE_KINDS = ("imagenet-tar", "folder")


def open_sources(
    source: str,
    train: str | os.PathLike | None = None,
    val: str | os.PathLike | None = None,
    val_labels: str | os.PathLike | None = None,
) -> list[tuple[str, Any]]:
    """The ``(split, source)`` pairs to build, every input checked before anything is written.

    Args:
        source: ``"imagenet-tar"`` (``train`` is ``ILSVRC2012_img_train.tar``, ``val`` is
            ``ILSVRC2012_img_val.tar`` with ``val_labels``, one wnid per line for the sorted file names)
            or ``"folder"`` (ImageFolder directories, ``<class>/<image>``).
        train, val: the training and validation sources; at least one.
        val_labels: the validation label file (imagenet-tar only).

    Raises:
        ArgumentError: no split, a label file where none belongs or missing where one is needed, or
            training and validation sources with different classes.
    """
    if source not in SOURCE_KINDS:
        raise ArgumentError("unknown {source} {value!r}; expected one of {kinds}", value=source, kinds=SOURCE_KINDS)
    if not train and not val:
        raise ArgumentError("nothing to build: give {train} and/or {val}")
    out: list[tuple[str, Any]] = []
    if source == "folder":
        if val_labels:
            raise ArgumentError(
                "{val_labels} is for the imagenet-tar source (folders hold their labels as sub-folders)"
            )
        out += [(split, FolderSource(path)) for split, path in (("train", train), ("val", val)) if path]
    else:
        if train:
            out.append(("train", ImageNetTrainTar(train)))
        if val:
            if not val_labels:
                raise ArgumentError("the imagenet-tar source with {val} needs {val_labels} (one wnid per line)")
            out.append(("val", ImageNetValTar(val, val_labels)))
        elif val_labels:
            raise ArgumentError("{val_labels} given without {val}")
    if len(out) == 2 and out[0][1].classes != out[1][1].classes:
        a, b = set(out[0][1].classes), set(out[1][1].classes)
        raise UserError(
            f"training and validation sources have different classes ({len(a)} vs {len(b)}; "
            f"e.g. {', '.join(sorted(a ^ b)[:3])})"
        )
    return out


def _dir_bytes(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def inspect_db(
    db: str | os.PathLike, check: bool = False, on_bad: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """What a database holds: images, classes, the count per class, bytes on disk, whether its build finished.

    Args:
        db: a database folder (e.g. ``OUT/train.db``).
        check: also decode every image; the report lists the unreadable keys under ``unreadable``.
        on_bad: called with the message of each unreadable image as it is found.

    Returns:
        ``db``, ``images``, ``classes``, ``per_class_min/median/max``, ``per_class`` (name -> count),
        ``disk_bytes``, ``status`` (``complete``, ``in-progress``: an interrupted build, or ``unknown``:
        not written by this package) and, with ``check``, ``unreadable``.
    """
    import numpy as np

    from .robust import BadImageError, load_rgb
    from .rocksdb import RocksDBDataset

    ds = RocksDBDataset(db)
    counts = np.bincount(ds.targets, minlength=len(ds.classes))
    state = _read_state(ds.db_path)
    report: dict[str, Any] = {
        "db": ds.db_path,
        "images": len(ds),
        "classes": len(ds.classes),
        "per_class_min": int(counts.min()),
        "per_class_median": float(np.median(counts)),
        "per_class_max": int(counts.max()),
        "per_class": {c: int(n) for c, n in zip(ds.classes, counts)},
        "disk_bytes": _dir_bytes(ds.db_path),
        "status": state.get("status", "unknown") if state else "unknown",
    }
    if check:
        bad = []
        for i in range(len(ds)):
            try:
                load_rgb(ds.read_bytes(i), name=ds.key(i))
            except BadImageError as e:
                bad.append(ds.key(i))
                if on_bad is not None:
                    on_bad(str(e))
        report["unreadable"] = bad
    return report
