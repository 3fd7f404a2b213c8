"""RocksDB datasets: the authors' raw byte format reads as the ImageFolder it came from (same samples, same
order, same training run), the key cache, per-process handles, and ``repavit rocksdb build | info`` from
ImageNet-layout tar files and folders (resume, refusal to overwrite, verification), and ``bench-data``."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import sys
import tarfile

import numpy as np
import pytest
import rocksdict  # in the dev extra
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from repavit.cli.main import main
from repavit.data.folder import image_folder
from repavit.data.robust import BadImageError, RobustDataset
from repavit.data.rocksdb import KEY_CACHE_SUFFIX, RocksDBDataset
from repavit.data.rocksdb_build import FolderSource, build_db
from repavit.errors import MissingExtraError

# "a" is a prefix of "a-b": RocksDB's bytewise key order ("a-b/..." < "a/...") differs from ImageFolder's.
CLASSES = ("a", "a-b", "b")


def _image_bytes(rng: np.random.Generator, fmt: str, mode: str = "RGB", size: int = 12) -> bytes:
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _make_folder(root, n_per_class: int = 3, seed: int = 0) -> list[str]:
    """root/<class>/<files>: JPEG and PNG, one grayscale image, one image in a sub-folder; return the keys."""
    rng = np.random.default_rng(seed)
    keys = []
    for c in CLASSES:
        for i in range(n_per_class):
            name = f"{c}_{i}.JPEG" if i % 2 == 0 else f"{c}_{i}.png"
            mode = "L" if (c, i) == ("b", 0) else "RGB"
            keys.append(f"{c}/{name}")
            (root / c).mkdir(parents=True, exist_ok=True)
            (root / c / name).write_bytes(_image_bytes(rng, "JPEG" if name.endswith("JPEG") else "PNG", mode))
    (root / "a" / "sub").mkdir()
    (root / "a" / "sub" / "deep.png").write_bytes(_image_bytes(rng, "PNG"))
    keys.append("a/sub/deep.png")
    return keys


def _write_raw_db(db_path, items: dict[str, bytes]) -> None:
    """What the authors' tool writes: UTF-8 key bytes -> raw file bytes, nothing else (shuffled insertion order)."""
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    db = rocksdict.Rdict(str(db_path), options=opts)
    keys = list(items)
    random.Random(0).shuffle(keys)
    for k in keys:
        db[k.encode("utf-8")] = items[k]
    db.close()


def _folder_items(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root).replace(os.sep, "/")] = open(path, "rb").read()
    return out


@pytest.fixture
def data(tmp_path):
    """An ImageFolder dataset (train/, val/) and the authors'-format databases written from it (db/)."""
    for split, seed in (("train", 0), ("val", 1)):
        _make_folder(tmp_path / "data" / split, seed=seed)
        (tmp_path / "db").mkdir(exist_ok=True)
        _write_raw_db(tmp_path / "db" / f"{split}.db", _folder_items(tmp_path / "data" / split))
    return tmp_path


# ---- the dataset -----------------------------------------------------------------------------------
def test_raw_database_gives_the_samples_of_its_image_folder(data):
    folder = image_folder(data / "data" / "train")
    ds = RocksDBDataset(data / "db" / "train.db")
    assert ds.classes == folder.classes == list(CLASSES)
    assert ds.class_to_idx == folder.class_to_idx
    assert list(ds.keys()) == [os.path.relpath(p, folder.root).replace(os.sep, "/") for p, _ in folder.samples]
    assert ds.targets.tolist() == folder.targets
    for i in range(len(folder)):
        (img_db, y_db), (img_f, y_f) = ds[i], folder[i]
        assert y_db == y_f and img_db.mode == "RGB"
        assert np.array_equal(np.asarray(img_db), np.asarray(img_f))


def test_transforms_and_negative_indices(data):
    ds = RocksDBDataset(data / "db" / "train.db", transform=T.PILToTensor(), target_transform=lambda y: y + 100)
    x, y = ds[-1]
    assert x.shape == (3, 12, 12) and y == 102
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_train_and_eval_with_rocksdb_match_image_folder(data, capsys):
    common = [
        "--model", "RePaViT_Tiny", "--model_kwargs", "depth=1", "embed_dim=32", "num_heads=2", "patch_size=8",
        "--input_size", "16", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--epochs", "1",
        "--channel_idle", "--feature_norm", "BatchNorm", "--warmup_epochs", "0", "--no_model_ema", "--seed", "3",
    ]  # fmt: skip
    logs = {}
    for name, src in (("folder", ["--data_path", str(data / "data")]), ("rocksdb", ["--rocksdb", str(data / "db")])):
        out = data / f"out_{name}"
        assert main(["train", *common, *src, "--output_dir", str(out)]) == 0
        logs[name] = json.loads((out / "log.txt").read_text().splitlines()[-1])
    for key in ("train_loss", "test_loss", "test_acc1", "test_images", "train_images"):
        assert logs["rocksdb"][key] == logs["folder"][key], key
    # Evaluate the folder-trained checkpoint on the database: the same numbers as during training.
    ckpt = data / "out_folder" / "checkpoint.pth"
    capsys.readouterr()
    assert main(["eval", *common, "--rocksdb", str(data / "db"), "--resume", str(ckpt)]) == 0
    assert f"top-1 {logs['folder']['test_acc1']:.2f}%" in capsys.readouterr().out


def test_key_list_is_cached_and_refreshed_when_the_database_changes(data, monkeypatch):
    db = data / "db" / "train.db"
    n = len(RocksDBDataset(db))
    cache = data / "db" / ("train.db" + KEY_CACHE_SUFFIX)
    assert cache.is_file()

    def no_scan(_db):
        raise AssertionError("the database was scanned although its key cache is valid")

    monkeypatch.setattr("repavit.data.rocksdb.iter_db_keys", no_scan)
    assert len(RocksDBDataset(db)) == n
    monkeypatch.undo()
    # A new image invalidates the cache (the database's files changed).
    rdb = rocksdict.Rdict(str(db), options=rocksdict.Options(raw_mode=True))
    rdb[b"c/new.png"] = (data / "data" / "train" / "a" / "a_1.png").read_bytes()
    rdb.close()
    ds = RocksDBDataset(db)
    assert len(ds) == n + 1 and ds.classes == [*CLASSES, "c"]
    # A damaged cache file is ignored and rewritten.
    cache.write_bytes(b"not a zip")
    assert len(RocksDBDataset(db)) == n + 1 and cache.stat().st_size > 100


def test_key_cache_folder_and_unwritable_cache(data, caplog):
    db = data / "db" / "val.db"
    ds = RocksDBDataset(db, key_cache=data / "caches")
    assert len(os.listdir(data / "caches")) == 1
    assert not (data / "db" / ("val.db" + KEY_CACHE_SUFFIX)).exists()
    (data / "a-file").write_text("x")
    ds2 = RocksDBDataset(db, key_cache=data / "a-file" / "sub")  # cannot be created: works without a cache
    assert list(ds2.keys()) == list(ds.keys())
    assert "could not write a key cache" in caplog.text


def test_handles_are_per_process_and_never_pickled(data):
    ds = RocksDBDataset(data / "db" / "train.db", transform=T.PILToTensor())
    assert ds._handle is None  # nothing opened until a sample is read
    first = ds[0]
    assert ds._handle is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handle is None and torch.equal(clone[0][0], first[0])
    # Forked workers inherit the parent's open handle but open their own; results equal single-process.
    single = [(x.clone(), y) for x, y in DataLoader(ds, batch_size=None, num_workers=0)]
    multi = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(single) == len(multi) == len(ds)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(single, multi))


def test_robust_wrapper_skips_a_corrupt_value_across_spawned_workers(tmp_path):
    rng = np.random.default_rng(0)
    items = {f"k/{i}.png": _image_bytes(rng, "PNG") for i in range(4)}
    items["k/1.png"] = items["k/1.png"][:40]  # truncated
    _write_raw_db(tmp_path / "x.db", items)
    ds = RobustDataset(RocksDBDataset(tmp_path / "x.db", transform=T.PILToTensor()))
    with pytest.raises(BadImageError, match="x.db/k/1.png"):
        ds.dataset[1]
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = list(loader)
    assert len(got) == 4 and torch.equal(got[1][0], got[2][0])
    assert ds.pop_bad_count() == 1 and ds.bad_indices() == [1]


def test_read_only_folder_is_read_through_links(data, monkeypatch):
    """rocksdict <= 0.3.29 writes a config file even to open read-only; an unwritable folder must still read."""
    real = rocksdict.Rdict
    opened = []

    def unwritable_unless_shadow(path, **kw):
        if not os.path.basename(path).startswith("repavit-rocksdb-ro-"):
            raise Exception("IO error: Read-only file system (os error 30)")
        opened.append(path)
        return real(path, **kw)

    monkeypatch.setattr(rocksdict, "Rdict", unwritable_unless_shadow)
    monkeypatch.setattr("repavit.data.rocksdb._SHADOWS", {})
    ds = RocksDBDataset(data / "db" / "train.db", key_cache=data / "cache")
    folder = image_folder(data / "data" / "train")
    assert np.array_equal(np.asarray(ds[3][0]), np.asarray(folder[3][0]))
    shadow = opened[0]
    assert all(p == shadow for p in opened)
    assert "LOCK" not in os.listdir(shadow) and os.path.islink(os.path.join(shadow, "CURRENT"))
    ds.close()


@pytest.mark.parametrize(
    ("items", "message"),
    [({}, "is empty"), ({"no-slash.png": b"x"}, "is not '<class_name>/<image_file_name>'")],
    ids=["empty", "bad-key"],
)
def test_bad_databases_are_clear_errors(tmp_path, items, message):
    _write_raw_db(tmp_path / "x.db", items)
    with pytest.raises(ValueError, match=message):
        RocksDBDataset(tmp_path / "x.db")


def test_missing_database_and_missing_binding(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RocksDBDataset(tmp_path / "nope.db")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a RocksDB database"):
        RocksDBDataset(tmp_path / "plain")
    _write_raw_db(tmp_path / "x.db", {"a/b.png": b"x"})
    monkeypatch.setitem(sys.modules, "rocksdict", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'repavit\[rocksdb\]'"):
        RocksDBDataset(tmp_path / "x.db")


# ---- repavit rocksdb build / info ------------------------------------------------------------------------
def _db_items(db_path) -> dict[str, bytes]:
    db = rocksdict.Rdict(str(db_path), options=rocksdict.Options(raw_mode=True))
    try:
        return {k.decode(): v for k, v in db.items()}
    finally:
        db.close()


def test_build_from_folders_stores_the_files_byte_for_byte(tmp_path, capsys):
    keys = _make_folder(tmp_path / "d" / "train")
    _make_folder(tmp_path / "d" / "val", seed=1)
    args = ["rocksdb", "build", "--source", "folder", "--output", str(tmp_path / "out"), "--batch-size", "3"]
    assert main([*args, "--train", str(tmp_path / "d" / "train"), "--val", str(tmp_path / "d" / "val")]) == 0
    out = capsys.readouterr().out
    assert f"train.db: {len(keys)} images in 3 classes, verified ({len(keys)} written, 0 already present" in out
    for split in ("train", "val"):
        assert _db_items(tmp_path / "out" / f"{split}.db") == _folder_items(tmp_path / "d" / split)
    state = json.loads((tmp_path / "out" / "train.db.build.json").read_text())
    assert state["status"] == "complete" and state["images"] == len(keys)
    # The builder leaves a valid key cache: the dataset starts without scanning.
    assert (tmp_path / "out" / ("train.db" + KEY_CACHE_SUFFIX)).is_file()
    assert RocksDBDataset(tmp_path / "out" / "train.db").classes == list(CLASSES)


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def imagenet_tars(tmp_path):
    """ILSVRC2012-style tars: train = tar of <wnid>.tar; val = flat files + one wnid per line (sorted names)."""
    rng = np.random.default_rng(0)
    wnids = ["n01440764", "n01443537", "n01484850"]
    train_items, inner = {}, {}
    for w in wnids:
        files = {f"{w}_{i}.JPEG": _image_bytes(rng, "JPEG") for i in (10026, 7)}
        train_items.update({f"{w}/{f}": b for f, b in files.items()})
        inner[f"{w}.tar"] = _tar_bytes(files)
    (tmp_path / "train.tar").write_bytes(_tar_bytes(inner))
    val_names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]
    val_labels = ["n01484850", "n01440764", "n01443537", "n01440764", "n01484850", "n01443537"]
    val_files = {n: _image_bytes(rng, "JPEG") for n in val_names}
    (tmp_path / "val.tar").write_bytes(_tar_bytes(dict(reversed(list(val_files.items())))))  # stored unsorted
    (tmp_path / "labels.txt").write_text("\n".join(val_labels) + "\n\n")
    val_items = {f"{lab}/{n}": val_files[n] for n, lab in zip(val_names, val_labels)}
    return tmp_path, train_items, val_items


def test_build_from_imagenet_tars(imagenet_tars, capsys):
    root, train_items, val_items = imagenet_tars
    args = ["rocksdb", "build", "--source", "imagenet-tar", "--train", str(root / "train.tar")]
    args += ["--val", str(root / "val.tar"), "--val-labels", str(root / "labels.txt"), "--output", str(root / "db")]
    assert main(args) == 0
    assert _db_items(root / "db" / "train.db") == train_items
    assert _db_items(root / "db" / "val.db") == val_items
    val = RocksDBDataset(root / "db" / "val.db")
    assert val.key(0) == "n01440764/ILSVRC2012_val_00000002.JPEG" and val.targets.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("n01440764\n" * 5, "has 5 labels but .* holds 6 images"),
        ("\n".join(str(i) for i in range(1, 7)), "holds numbers, not class names"),
        ("n01440764\n\nn01443537\n" * 2, "line 2: '' is not a class name"),
        ("n01440764\n" * 6, "different classes"),
    ],
    ids=["count", "numeric", "blank", "classes"],
)
def test_bad_validation_labels_fail_before_writing(imagenet_tars, labels, message, capsys):
    root, _, _ = imagenet_tars
    (root / "labels.txt").write_text(labels)
    args = ["rocksdb", "build", "--source", "imagenet-tar", "--train", str(root / "train.tar")]
    args += ["--val", str(root / "val.tar"), "--val-labels", str(root / "labels.txt"), "--output", str(root / "db")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("repavit rocksdb: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (root / "db" / "train.db").exists()


class _Interrupted(FolderSource):
    """A folder source that dies after ``stop`` images, like a killed build."""

    stop = 5

    def __iter__(self):
        for n, item in enumerate(super().__iter__()):
            if n == self.stop:
                raise KeyboardInterrupt
            yield item


def test_interrupted_build_resumes_and_finished_build_is_not_overwritten(tmp_path, capsys):
    src = tmp_path / "imgs"
    keys = _make_folder(src)
    db = tmp_path / "out" / "train.db"
    with pytest.raises(KeyboardInterrupt):
        build_db(db, _Interrupted(src), batch_size=2)
    assert json.loads((tmp_path / "out" / "train.db.build.json").read_text())["status"] == "in-progress"
    present = len(_db_items(db))
    assert 0 < present <= _Interrupted.stop
    assert main(["rocksdb", "info", str(db)]) == 1  # an interrupted build says it is not complete
    assert "UNFINISHED" in capsys.readouterr().out
    cmd = ["rocksdb", "build", "--source", "folder", "--train", str(src), "--output", str(tmp_path / "out")]
    assert main(cmd) == 0  # the same command again: resumes, rewrites nothing
    out = capsys.readouterr().out
    assert f"{len(keys)} images in 3 classes, verified ({len(keys) - present} written, {present} already present" in out
    assert _db_items(db) == _folder_items(src)
    # Finished: running it again is refused; --overwrite rebuilds from scratch.
    assert main(cmd) == 2
    assert "is a finished build of the same source; pass --resume" in capsys.readouterr().err
    assert main([*cmd, "--overwrite"]) == 0
    assert f"({len(keys)} written, 0 already present" in capsys.readouterr().out


def test_foreign_database_is_refused_and_extra_keys_fail_verification(tmp_path, capsys):
    src = tmp_path / "imgs"
    _make_folder(src)
    (tmp_path / "out").mkdir()
    _write_raw_db(tmp_path / "out" / "train.db", {"zzz/other.png": b"123"})
    cmd = ["rocksdb", "build", "--source", "folder", "--train", str(src), "--output", str(tmp_path / "out")]
    assert main(cmd) == 2
    assert "already holds images (not written by this tool)" in capsys.readouterr().err
    assert main([*cmd, "--resume"]) == 2
    assert "1 keys not in the source (e.g. zzz/other.png)" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "train.db").mkdir()
    (tmp_path / "junk" / "train.db" / "notes.txt").write_text("x")
    assert main([*cmd[:-1], str(tmp_path / "junk")]) == 2
    assert "is not a RocksDB database" in capsys.readouterr().err


def test_info_reports_counts(data, capsys):
    report = data / "info.json"
    db = str(data / "db" / "train.db")
    assert main(["rocksdb", "info", db, "--per-class", "--check", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "10 images, 3 classes" in out and "0 unreadable images" in out
    info = json.loads(report.read_text())
    assert info["per_class"] == {"a": 4, "a-b": 3, "b": 3} and info["unreadable"] == []
    assert info["status"] == "unknown"  # written raw, as the authors' tools do: no build record


def test_info_check_fails_on_unreadable_images(tmp_path, capsys):
    rng = np.random.default_rng(0)
    items = {f"k/{i}.png": _image_bytes(rng, "PNG") for i in range(3)}
    items["k/1.png"] = items["k/1.png"][:40]  # truncated
    _write_raw_db(tmp_path / "x.db", items)
    assert main(["rocksdb", "info", str(tmp_path / "x.db")]) == 0  # without --check nothing is decoded
    assert main(["rocksdb", "info", str(tmp_path / "x.db"), "--check"]) == 1
    out = capsys.readouterr().out
    assert "1 unreadable images" in out and "k/1.png" in out and "no build record" in out


# ---- repavit bench-data ----------------------------------------------------------------------------------
def test_bench_data_reports_both_datasets(data, capsys):
    out = data / "bench.json"
    args = ["bench-data", "--folder", str(data / "data" / "train"), "--rocksdb", str(data / "db" / "train.db")]
    args += ["--workers", "0", "1", "--batch-size", "2", "--batches", "2", "--input-size", "16", "--output", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    got = {(r["dataset"], r["workers"]) for r in report["results"]}
    assert got == {("ImageFolder", 0), ("ImageFolder", 1), ("RocksDB", 0), ("RocksDB", 1)}
    assert all(r["images_per_s"] > 0 for r in report["results"])
    assert report["command"].startswith("repavit bench-data --folder")
    assert "RocksDB" in capsys.readouterr().out


def test_bench_data_synthetic_set_and_mismatched_inputs(data, capsys):
    assert main(["bench-data", "--synthetic", "10", "--workers", "0", "--batch-size", "2", "--batches", "1"]) == 0
    assert "ImageFolder" in capsys.readouterr().out
    _write_raw_db(data / "other.db", {f"{c}/x.png": b"" for c in CLASSES})
    args = ["bench-data", "--folder", str(data / "data" / "train"), "--rocksdb", str(data / "other.db")]
    assert main([*args, "--mode", "read", "--workers", "0"]) == 2
    assert "do not hold the same images" in capsys.readouterr().err
