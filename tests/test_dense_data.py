"""The dense-prediction data: the digits-on-photos set in the COCO and ADE20K layouts, and their readers.

The sets are tiny (96-pixel images, a handful per split) and written once per module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repavit.data.dense import (
    IGNORE_INDEX,
    AdeSegmentation,
    CocoDetection,
    _digit_pools,
    _load_sources,
    _scene,
    collate_detection,
    collate_segmentation,
    write_dense_set,
)
from repavit.errors import MissingExtraError, UserError

mask_util = pytest.importorskip("pycocotools.mask")
pytest.importorskip("sklearn")

# pycocotools' decode trips NumPy 2's __array__(copy=...) deprecation inside its own Cython code
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

SIZE = 96
NUM_CLASSES = 4
TINY = {"num_train": 6, "num_val": 3, "image_size": SIZE, "num_classes": NUM_CLASSES, "max_objects": 3, "seed": 0}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _extent(mask: np.ndarray) -> list[float]:
    """The COCO bbox [x, y, w, h] of a mask's pixels."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _xyxy(mask: np.ndarray) -> list[float]:
    x, y, w, h = _extent(mask)
    return [x, y, x + w, y + h]


def _runs(flat: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: lengths of alternating runs, starting with zeros."""
    counts, current, n = [], 0, 0
    for v in flat.tolist():
        if v == current:
            n += 1
        else:
            counts.append(n)
            current, n = v, 1
    return [*counts, n]


def _decode(ann: dict) -> np.ndarray:
    seg = ann["segmentation"]
    return mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")})


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    coco = write_dense_set(root / "coco", layout="coco", **TINY)
    ade = write_dense_set(root / "ade", layout="ade20k", **TINY)
    return {"root": root, "coco": root / "coco", "ade": root / "ade", "counts": coco, "ade_counts": ade}


def _instances(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


# ---- the writer -------------------------------------------------------------------------------------
def test_counts_and_layout(sets):
    counts = sets["counts"]
    assert counts == sets["ade_counts"]
    assert counts["train"] == 6 and counts["val"] == 3
    for split in ("train", "val"):
        data = _instances(sets["coco"], split)
        assert len(data["images"]) == counts[split] == len(list((sets["coco"] / split).glob("*.jpg")))
        assert len(data["annotations"]) == counts[f"{split}_objects"]
        per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=counts[split] + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= 3
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
        assert data["categories"][2] == {"id": 3, "name": "digit 2", "supercategory": "digit"}
        for im in data["images"]:
            with Image.open(sets["coco"] / split / im["file_name"]) as img:
                assert img.format == "JPEG" and img.size == (im["width"], im["height"]) == (SIZE, SIZE)
    assert json.loads((sets["ade"] / "classes.json").read_text()) == ["background", *(f"digit {d}" for d in range(4))]
    assert not list(sets["root"].rglob("*.tmp"))


def test_same_seed_same_files_other_seed_other_files(sets, tmp_path):
    write_dense_set(tmp_path / "again", layout="coco", **TINY)
    assert _files(tmp_path / "again") == _files(sets["coco"])
    write_dense_set(tmp_path / "other", layout="coco", **{**TINY, "seed": 1})
    assert _files(tmp_path / "other")["train/000001.jpg"] != _files(sets["coco"])["train/000001.jpg"]


def test_both_layouts_write_the_same_scenes(sets):
    for coco_split, ade_split in (("train", "training"), ("val", "validation")):
        for path in sorted((sets["coco"] / coco_split).glob("*.jpg")):
            assert path.read_bytes() == (sets["ade"] / "images" / ade_split / path.name).read_bytes()


def test_boxes_are_the_visible_mask_extents_inside_the_image(sets):
    for split in ("train", "val"):
        for ann in _instances(sets["coco"], split)["annotations"]:
            mask = _decode(ann)
            assert mask.shape == (SIZE, SIZE)
            assert ann["area"] == int(mask.sum()) > 0
            assert ann["bbox"] == _extent(mask)
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3, 4)


def test_objects_are_large(sets):
    boxes = [a["bbox"] for s in ("train", "val") for a in _instances(sets["coco"], s)["annotations"]]
    sides = np.array([max(w, h) for _, _, w, h in boxes])
    # the digit's square is 0.25-0.55 of the image; its strokes (and an occluded part) are a bit less
    assert sides.max() <= 0.55 * SIZE + 1 and np.median(sides) >= 0.2 * SIZE


def test_train_and_val_use_disjoint_real_digits(sets):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    used = {}
    for split in ("train", "val"):
        anns = _instances(sets["coco"], split)["annotations"]
        used[split] = {a["digit_index"] for a in anns}
        assert all(targets[a["digit_index"]] == a["category_id"] - 1 for a in anns)
    assert used["train"] and used["val"] and not used["train"] & used["val"]
    pools = _digit_pools(targets, NUM_CLASSES, seed=0)
    for d in range(NUM_CLASSES):
        assert not set(pools["train"][d]) & set(pools["val"][d])
        assert len(pools["train"][d]) + len(pools["val"][d]) == (targets == d).sum()


def test_every_object_stays_at_least_half_visible():
    src = _load_sources()
    pools = _digit_pools(src.targets, NUM_CLASSES, seed=0)["train"]
    objects = [o for i in range(40) for o in _scene(np.random.default_rng([5, i]), src, pools, SIZE, 4).objects]
    assert len(objects) > 60
    fractions = np.array([o.visible.sum() / o.area for o in objects])
    assert fractions.min() >= 0.5
    assert fractions.min() < 0.95  # occlusions do happen


def test_coco_json_loads_in_pycocotools(sets):
    from pycocotools.coco import COCO

    coco = COCO(str(sets["coco"] / "annotations" / "instances_val.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == sets["counts"]["val_objects"]
    for ann in anns:
        assert int(coco.annToMask(ann).sum()) == ann["area"]
        rle = coco.annToRLE(ann)
        assert float(mask_util.area(rle)) == ann["area"]
        assert mask_util.toBbox(rle).tolist() == ann["bbox"]


def test_ade_labels_take_the_documented_values(sets):
    labels = [np.array(Image.open(p)) for p in sorted((sets["ade"] / "annotations").rglob("*.png"))]
    assert len(labels) == 9
    with Image.open(next((sets["ade"] / "annotations" / "training").glob("*.png"))) as im:
        assert im.mode == "L"
    values = np.unique(np.concatenate([lab.ravel() for lab in labels]))
    assert set(values.tolist()) <= set(range(NUM_CLASSES + 2))  # 0 ignore, 1 background, 2.. digits
    assert {0, 1} <= set(values.tolist()) and len(values) >= 4
    band = sum(int((lab == 0).sum()) for lab in labels)
    digits = sum(int((lab >= 2).sum()) for lab in labels)
    assert 0 < band < 0.5 * digits  # a thin band, not a second object


def test_ignore_band_borders_the_digits(sets):
    for path in sorted((sets["ade"] / "annotations" / "training").glob("*.png")):
        lab = torch.from_numpy(np.array(Image.open(path))).long()
        digit = (lab >= 2).float()[None, None]
        near = torch.nn.functional.max_pool2d(digit, kernel_size=13, stride=1, padding=6)[0, 0] > 0
        band = lab == 0
        # nearly all of the band lies within 6 px of digit pixels (the rest: faint strokes of a digit)
        assert (band & near).sum() >= 0.9 * band.sum()


def test_ade_digit_pixels_are_the_coco_visible_masks(sets):
    for coco_split, ade_split in (("train", "training"), ("val", "validation")):
        data = _instances(sets["coco"], coco_split)
        for im in data["images"]:
            lab = np.array(
                Image.open(sets["ade"] / "annotations" / ade_split / im["file_name"].replace(".jpg", ".png"))
            )
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            for d in range(NUM_CLASSES):
                union = np.zeros((SIZE, SIZE), dtype=bool)
                for a in anns:
                    if a["category_id"] == d + 1:
                        union |= _decode(a).astype(bool)
                np.testing.assert_array_equal(lab == d + 2, union)


# ---- the writer's refusals --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"layout": "voc"}, "unknown layout 'voc'"),
        ({"num_classes": 0}, "num_classes must be 1..10"),
        ({"num_classes": 11}, "num_classes must be 1..10"),
        ({"num_train": 0}, "num_train must be a positive"),
        ({"num_val": -1}, "num_val must be a positive"),
        ({"max_objects": 0}, "max_objects must be a positive"),
        ({"image_size": 32}, "image_size must be at least 64"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, words):
    with pytest.raises(UserError, match=words) as info:
        write_dense_set(tmp_path / "x", **{**TINY, **kwargs})
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_existing_set_needs_overwrite(tmp_path):
    write_dense_set(tmp_path, layout="coco", **TINY)
    with pytest.raises(UserError, match="already holds a coco set.*pass overwrite to replace it"):
        write_dense_set(tmp_path, layout="coco", **TINY)
    # the other layout lives in other folders
    write_dense_set(tmp_path, layout="ade20k", **{**TINY, "num_train": 2, "num_val": 1})
    with pytest.raises(UserError, match="already holds a ade20k set"):
        write_dense_set(tmp_path, layout="ade20k", **TINY)
    counts = write_dense_set(tmp_path, layout="coco", overwrite=True, **{**TINY, "num_train": 2})
    assert counts["train"] == 2
    assert sorted(p.name for p in (tmp_path / "train").glob("*.jpg")) == ["000001.jpg", "000002.jpg"]
    assert len(_instances(tmp_path, "train")["images"]) == 2


def test_missing_extras_are_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(MissingExtraError, match=r"needs pycocotools: pip install 'repavit\[dense\]'"):
        write_dense_set(tmp_path / "c", layout="coco", **TINY)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingExtraError, match=r"needs scikit-learn: pip install 'repavit\[demo\]'"):
        write_dense_set(tmp_path / "a", layout="ade20k", **TINY)


# ---- CocoDetection ----------------------------------------------------------------------------------
def test_coco_detection_samples(sets):
    ds = CocoDetection(sets["coco"], "val", masks=True)
    data = _instances(sets["coco"], "val")
    assert len(ds) == 3 and ds.num_classes == NUM_CLASSES
    assert ds.category_names == ["__background__", "digit 0", "digit 1", "digit 2", "digit 3"]
    assert ds.label_to_category == {1: 1, 2: 2, 3: 3, 4: 4}
    for i, im in enumerate(data["images"]):
        image, target = ds[i]
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        assert (
            target["image_id"].dtype == torch.int64
            and target["image_id"].shape == ()
            and target["image_id"] == im["id"]
        )
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(anns), 4)
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(anns), SIZE, SIZE)
        for box, mask in zip(target["boxes"], target["masks"]):
            assert box.tolist() == _xyxy(mask.numpy())
    assert "masks" not in CocoDetection(sets["coco"], "val")[0][1]


def test_coco_flip_moves_boxes_with_masks(sets):
    plain = CocoDetection(sets["coco"], "train", masks=True)
    augmented = CocoDetection(sets["coco"], "train", masks=True, train=True)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = augmented[0]
        ref_image, ref = plain[0]
        flipped = bool(torch.equal(image, ref_image.flip(-1)))
        assert flipped or torch.equal(image, ref_image)
        seen.add(flipped)
        if flipped:
            x1, y1, x2, y2 = ref["boxes"].unbind(1)
            torch.testing.assert_close(target["boxes"], torch.stack([SIZE - x2, y1, SIZE - x1, y2], 1))
            assert torch.equal(target["masks"], ref["masks"].flip(-1))
        assert torch.equal(target["labels"], ref["labels"])
        for box, mask in zip(target["boxes"], target["masks"]):
            assert box.tolist() == _xyxy(mask.numpy())
    assert seen == {True, False}


def test_coco_reader_maps_ids_skips_crowds_and_decodes_every_encoding(tmp_path):
    (tmp_path / "val").mkdir()
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "val" / "a.png")
    square = np.zeros((20, 30), np.uint8)
    square[2:8, 4:12] = 1
    rle = mask_util.encode(np.asfortranarray(square))
    uncompressed = {"size": [20, 30], "counts": _runs(square.flatten(order="F"))}
    polygon = [[4.0, 2.0, 12.0, 2.0, 12.0, 8.0, 4.0, 8.0]]
    base = {"image_id": 5, "bbox": [4, 2, 8, 6], "iscrowd": 0}
    data = {
        "images": [{"id": 5, "file_name": "a.png", "width": 30, "height": 20}],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": [
            {**base, "id": 1, "category_id": 7, "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()}},
            {**base, "id": 2, "category_id": 3, "segmentation": uncompressed},
            {**base, "id": 3, "category_id": 7, "segmentation": polygon},
            {**base, "id": 4, "category_id": 3, "segmentation": polygon, "iscrowd": 1},
            {**base, "id": 5, "category_id": 3, "segmentation": polygon, "bbox": [4, 2, 0.5, 6]},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    ds = CocoDetection(tmp_path, "val", masks=True)
    assert ds.label_to_category == {1: 3, 2: 7} and ds.category_names == ["__background__", "three", "seven"]
    image, target = ds[0]
    assert image.shape == (3, 20, 30) and target["labels"].tolist() == [2, 1, 2]
    assert target["boxes"].tolist() == [[4.0, 2.0, 12.0, 8.0]] * 3
    assert target["masks"][0].sum() == target["masks"][1].sum() == 48 and target["masks"][2].sum() > 0
    assert torch.equal(target["masks"][0], target["masks"][1]) and torch.equal(
        target["masks"][0], torch.from_numpy(square)
    )


def test_coco_image_without_annotations_gives_empty_targets(tmp_path):
    (tmp_path / "train").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "train" / "e.jpg")
    data = {"images": [{"id": 1, "file_name": "e.jpg"}], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(data))
    torch.manual_seed(0)
    for _ in range(4):  # flipped or not
        _, target = CocoDetection(tmp_path, masks=True, train=True)[0]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["masks"].shape == (0, 10, 12)


def test_coco_reader_errors_name_the_file_and_the_layout(tmp_path):
    with pytest.raises(UserError) as info:
        CocoDetection(tmp_path, "val")
    message = str(info.value)
    assert str(tmp_path / "annotations" / "instances_val.json") in message
    assert "DIR/annotations/instances_{train,val}.json" in message and "DIR/{train,val}/" in message
    assert "\n" not in message
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(UserError, match="no list 'categories'"):
        CocoDetection(tmp_path, "val")
    (tmp_path / "annotations" / "instances_val.json").write_text('{"images": [')
    with pytest.raises(UserError, match="not valid JSON"):
        CocoDetection(tmp_path, "val")


def test_collate_detection_keeps_lists(sets):
    ds = CocoDetection(sets["coco"], "train")
    images, targets = collate_detection([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert torch.equal(images[1], ds[1][0]) and torch.equal(targets[0]["boxes"], ds[0][1]["boxes"])


# ---- AdeSegmentation --------------------------------------------------------------------------------
def test_ade_validation_reduces_the_zero_label(sets):
    ds = AdeSegmentation(sets["ade"], "validation")
    assert len(ds) == 3 and ds.num_classes == NUM_CLASSES + 1 and ds.classes[0] == "background"
    for i, (_, label_path) in enumerate(ds.samples):
        image, label = ds[i]
        raw = torch.from_numpy(np.array(Image.open(label_path))).long()
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE) and 0 <= image.min() <= image.max() <= 1
        assert label.dtype == torch.int64 and label.shape == (SIZE, SIZE)
        assert torch.equal(label[raw == 0], torch.full_like(label[raw == 0], IGNORE_INDEX))
        assert torch.equal(label[raw > 0], raw[raw > 0] - 1)
    values = set(torch.cat([ds[i][1].ravel() for i in range(3)]).unique().tolist())
    assert {0, IGNORE_INDEX} <= values <= {*range(NUM_CLASSES + 1), IGNORE_INDEX}


def test_ade_training_crops(sets):
    torch.manual_seed(0)
    ds = AdeSegmentation(sets["ade"], "training", train=True, crop_size=64)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 64, 64) and label.shape == (64, 64) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= {*range(NUM_CLASSES + 1), IGNORE_INDEX}
    big = AdeSegmentation(sets["ade"], "training", train=True, crop_size=128, scale_range=(1.0, 1.0))
    image, label = big[0]
    assert image.shape == (3, 128, 128)
    assert (label[SIZE:] == IGNORE_INDEX).all() and (image[:, SIZE:] == 0).all()  # padded below (flip is left-right)
    assert (label[:SIZE] != IGNORE_INDEX).any()
    images, labels = collate_segmentation([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)


def test_ade_training_rescales(sets):
    torch.manual_seed(0)
    ds = AdeSegmentation(sets["ade"], "training", train=True, crop_size=SIZE * 3, scale_range=(2.0, 2.0))
    _, label = ds[0]
    valid = (label != IGNORE_INDEX).any(1).sum(), (label != IGNORE_INDEX).any(0).sum()
    assert label.shape == (SIZE * 3, SIZE * 3) and max(valid) > SIZE * 1.5  # the image doubled in size


def test_collate_segmentation_lists_for_mixed_sizes():
    a = (torch.zeros(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64))
    b = (torch.zeros(3, 6, 5), torch.zeros(6, 5, dtype=torch.int64))
    images, labels = collate_segmentation([a, b])
    assert isinstance(images, list) and [x.shape[1] for x in images] == [4, 6] and len(labels) == 2


def test_ade_reader_errors(tmp_path, sets):
    with pytest.raises(UserError, match="image folder .* not found; expected the ADE20K layout"):
        AdeSegmentation(tmp_path, "training", num_classes=3)
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(UserError, match="has no images"):
        AdeSegmentation(tmp_path, "training", num_classes=3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "training" / "x1.jpg")
    with pytest.raises(UserError, match=r"x1\.jpg has no annotation .*x1\.png"):
        AdeSegmentation(tmp_path, "training", num_classes=3)
    with pytest.raises(UserError, match="names 5 classes"):
        AdeSegmentation(sets["ade"], "training", num_classes=3)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(tmp_path / "annotations" / "training" / "x1.png")
    with pytest.raises(UserError, match="classes.json not found; give num_classes"):  # the layout is checked first
        AdeSegmentation(tmp_path, "training")
    with pytest.raises(UserError, match="has label 9; expected 0 .ignore. or 1..3"):
        AdeSegmentation(tmp_path, "training", num_classes=3)[0]


def test_ade_reduce_zero_label_keeps_255_ignored(tmp_path):
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "images" / "validation" / "p.jpg")
    raw = np.array([[0, 1, 3], [255, 2, 1]], np.uint8)
    palette = Image.fromarray(raw).convert("P")  # palette pngs (as ADE20K ships some) read as their indices
    palette.save(tmp_path / "annotations" / "validation" / "p.png")
    ds = AdeSegmentation(tmp_path, "validation", num_classes=3)
    assert ds.classes == ["0", "1", "2"]
    assert ds[0][1].tolist() == [[255, 0, 2], [255, 1, 0]]
