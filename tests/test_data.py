"""Datasets, transforms and samplers of ``repavit.data``, on small files made in the test."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from repavit.data import (
    CIFAR100Local,
    INatDataset,
    RASampler,
    ShardedEvalSampler,
    SyntheticImages,
    TransformConfig,
    build_dataset,
    build_transform,
    scan_image_folder,
)


def _png(path, value=128, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def make_image_folder(root, classes=("cat", "dog"), per_class=2, size=8):
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            for i in range(per_class):
                _png(root / split / c / f"{i}.png", 40 + 80 * ci, size)
    return root


# ---- ImageFolder ----------------------------------------------------------------------------------
def test_image_folder_builds_both_splits(tmp_path):
    make_image_folder(tmp_path, per_class=3)
    ds, n = build_dataset(True, "IMNET", str(tmp_path))
    val, nv = build_dataset(False, "IMNET", str(tmp_path))
    assert (n, nv, len(ds), len(val)) == (2, 2, 6, 6)
    img, target = ds[0]
    assert isinstance(img, Image.Image) and target == 0
    assert ds.classes == ["cat", "dog"]


@pytest.mark.parametrize(
    ("setup", "exc", "needle"),
    [
        (lambda p: None, FileNotFoundError, "data folder not found"),
        (lambda p: p.mkdir(), ValueError, "is empty"),
        (lambda p: (p / "val").mkdir(parents=True), FileNotFoundError, "no train/ folder"),
    ],
)
def test_image_folder_layout_errors(tmp_path, setup, exc, needle):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(exc, match=needle):
        build_dataset(True, "IMNET", str(root))


def test_class_folder_without_images_is_named(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "empty_class").mkdir()
    (tmp_path / "train" / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*empty_class has no images"):
        scan_image_folder(tmp_path / "train")


def test_data_path_required():
    with pytest.raises(ValueError, match="^data_path is required"):
        build_dataset(True, "IMNET", "")


def test_unknown_dataset_and_rocksdb_not_installed(tmp_path):
    with pytest.raises(ValueError, match="unknown data_set"):
        build_dataset(True, "MNIST", str(tmp_path))
    with pytest.raises(ValueError, match="cannot be combined"):
        build_dataset(True, "CIFAR", rocksdb=str(tmp_path))


# ---- CIFAR-100 --------------------------------------------------------------------------------------
def _cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 100, size=n).tolist()


def test_cifar100_python_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data, labels = _cifar_arrays(5, 0)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * 5}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)
    ds, n = build_dataset(True, "CIFAR", str(tmp_path))
    assert n == 100 and len(ds) == 5
    img, target = ds[3]
    assert target == labels[3]
    # channel-major rows: pixel (0, 0) is bytes 0 (R), 1024 (G), 2048 (B)
    assert img.getpixel((0, 0)) == (data[3, 0], data[3, 1024], data[3, 2048])


def test_cifar100_binary_format_same_content(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    data, labels = _cifar_arrays(4, 1)
    rec = np.concatenate([np.zeros((4, 1), np.uint8), np.array(labels, np.uint8)[:, None], data], axis=1)
    rec.tofile(folder / "test.bin")
    (folder / "fine_label_names.txt").write_text("\n".join(f"c{i}" for i in range(100)))
    ds = CIFAR100Local(folder, train=False)
    assert len(ds) == 4 and ds.targets == labels
    assert np.array_equal(np.asarray(ds[2][0]), data[2].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar100_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        CIFAR100Local(tmp_path)


def test_cifar100_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-100 data"):
        build_dataset(True, "CIFAR", str(tmp_path))


# ---- iNaturalist ------------------------------------------------------------------------------------
def make_inat(root, year=2018):
    cats = [
        {"id": 0, "name": "Aa", "genus": "A", "kingdom": "Plantae"},
        {"id": 1, "name": "Ab", "genus": "A", "kingdom": "Plantae"},
        {"id": 2, "name": "Bz", "genus": "B", "kingdom": "Animalia"},
    ]
    (root / "categories.json").write_text(json.dumps(cats))

    def split(name, items):
        images, anns = [], []
        for i, (cat, img_id) in enumerate(items):
            fn = f"train_val{year}/{cats[cat]['kingdom']}/{cat}/{name}{i}.jpg"
            _png(root / fn, 10 * i)
            images.append({"id": img_id, "file_name": fn})
            anns.append({"id": img_id, "image_id": img_id, "category_id": cat})
        (root / f"{name}{year}.json").write_text(json.dumps({"images": images, "annotations": anns}))

    split("train", [(2, 10), (0, 11), (1, 12), (2, 13)])  # first appearance order: 2, 0, 1
    split("val", [(1, 20), (2, 21)])


def test_inat_labels_follow_first_appearance(tmp_path):
    make_inat(tmp_path)
    train, n = build_dataset(True, "INAT", str(tmp_path))
    val, _ = build_dataset(False, "INAT", str(tmp_path))
    assert n == 3 and train.classes == ["Bz", "Aa", "Ab"]
    assert train.targets == [0, 1, 2, 0] and val.targets == [2, 0]
    assert isinstance(val[0][0], Image.Image)


def test_inat_coarser_category(tmp_path):
    make_inat(tmp_path)
    ds = INatDataset(tmp_path, train=True, category="genus")
    assert ds.classes == ["B", "A"] and ds.targets == [0, 1, 1, 0]
    ds19 = tmp_path / "y19"
    ds19.mkdir()
    make_inat(ds19, year=2019)
    assert len(build_dataset(True, "INAT19", str(ds19))[0]) == 4


def test_inat_missing_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="train2018.json"):
        INatDataset(tmp_path)


# ---- synthetic -------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_balanced():
    a = SyntheticImages(20, num_classes=4, img_size=16, seed=3)
    b = SyntheticImages(20, num_classes=4, img_size=16, seed=3)
    assert np.array_equal(np.asarray(a[7][0]), np.asarray(b[7][0]))
    assert Counter(a.targets) == {0: 5, 1: 5, 2: 5, 3: 5}
    val = SyntheticImages(20, num_classes=4, img_size=16, split="val", seed=3)
    assert not np.array_equal(np.asarray(a[7][0]), np.asarray(val[7][0]))
    # the class layout is visible: same-class images are closer than different-class ones
    x = lambda i: np.asarray(a[i][0], np.float32)  # noqa: E731
    assert np.abs(x(0) - x(4)).mean() < np.abs(x(0) - x(1)).mean()


# ---- transforms -------------------------------------------------------------------------------------
def test_eval_transform_resizes_by_crop_ratio_then_center_crops():
    t = build_transform(False, TransformConfig(input_size=224, eval_crop_ratio=0.875))
    assert t.transforms[0].size == 256 and t.transforms[1].size == (224, 224)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    out = t(img)
    assert out.shape == (3, 224, 224)
    # independent check: torchvision resize of the short side to 256, crop of the middle 224
    ref = img.resize((341, 256), Image.BICUBIC)
    left, top = (341 - 224) // 2, (256 - 224) // 2
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    got = out.permute(1, 2, 0).numpy() * std + mean
    assert np.abs(got - ref).mean() < 0.02


@pytest.mark.parametrize("three", [False, True])
def test_train_transforms_give_tensors_of_input_size(three):
    cfg = TransformConfig(input_size=32, three_augment=three)
    t = build_transform(True, cfg)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    torch.manual_seed(0)
    for _ in range(5):
        assert t(img).shape == (3, 32, 32)


def test_randaugment_posterize_zero_bits_does_not_crash():
    # Pillow >= 11 rejects posterize(bits=0), which timm's RandAugment reaches at magnitude 10.
    t = build_transform(True, TransformConfig(input_size=32, aa="rand-m10-mstd0-inc1"))
    ra = next(x for x in t.transforms if hasattr(x, "ops"))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert out.getpixel((0, 0)) == (0, 0, 0)


# ---- samplers --------------------------------------------------------------------------------------
def test_ra_sampler_repeats_each_image_across_ranks():
    n, world = 12, 3
    samplers = [RASampler(n, world, r, repeats=3, seed=1) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == n // world == len(s) for p, s in zip(per_rank, samplers))
    # copies i,i,i of the shuffled order go to ranks 0,1,2: each rank sees the same images, once each
    assert per_rank[0] == per_rank[1] == per_rank[2]
    assert len(set(per_rank[0])) == n // world
    samplers[0].set_epoch(3)
    assert list(samplers[0]) != per_rank[0]


def test_sharded_eval_sampler_covers_every_index_once():
    n, world = 11, 3
    shards = [list(ShardedEvalSampler(n, world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    with pytest.raises(ValueError, match="out of range"):
        ShardedEvalSampler(n, 2, 2)
