"""Dense-prediction data: a small real-image set that needs no download, and readers for the COCO and ADE20K layouts.

:func:`write_dense_set` composes scenes from real images that ship with scikit-learn: backgrounds are
random crops of its two sample photos (``china.jpg``, ``flower.jpg``), objects are its scanned
handwritten digits (``load_digits``, 8x8), and writes them in the COCO instances layout (detection,
instance segmentation) or the ADE20K layout (semantic segmentation). The decisions:

* **Objects.** A digit is upscaled bilinearly from 8x8 to a square of side ``OBJECT_SCALE`` (0.25 to
  0.55) of the image side, so objects are large, and painted in one random bright colour (random hue,
  saturation 0.6-1, full value). Its mask is its strokes: upscaled intensity (0..1) above
  ``MASK_THRESHOLD`` (0.5). The colour's opacity ramps from 0 at intensity ``BAND_LOW`` (0.35) to 1 at
  the threshold, so the mask is fully coloured and the rim between the two values is a soft,
  anti-aliased edge: the **ambiguous band**.
* **Splits.** Per class, a seeded quarter of the digit samples goes to validation and the rest to
  training: no digit sample appears in both splits. COCO annotations keep the sample's index into
  ``load_digits()`` as the extra field ``digit_index`` (pycocotools ignores it).
* **Occlusion.** Objects are pasted in order, fully inside the image; a later object hides what its
  strokes *and* its band cover, so the visible masks of earlier objects lose those pixels (band pixels
  belong to no object). An object is only pasted where every earlier object keeps at least
  ``MIN_VISIBLE`` (50%) of its own mask; after ``PLACEMENT_TRIES`` positions that all hide too much it
  is left out of the image, so every digit drawn is annotated and no annotation is mostly hidden.
* **ADE20K labels** follow that dataset: 0 = "other", ignored in training and not scored; 1 = the
  background scene; ``d + 2`` = digit ``d``. The ignore label 0 goes on the ambiguous band (a thin rim,
  1.5 pixels wide on average around 64-pixel digits, and faint strokes that never reach the threshold): whether
  those pixels are digit or scene is a matter of opinion, so they are not scored. Digit pixels of the
  ADE labels are exactly the union of the COCO visible masks of that digit (same seed, same scenes:
  both layouts write byte-identical images).
* **Determinism.** Image ``i`` of a split draws from its own generator seeded with ``(seed, split, i)``,
  so the same arguments give byte-identical files and a longer split starts with the same images.
* **Crash safety.** Every file is written atomically (temporary file, then rename). The COCO json of a
  split is written after all its images, and ADE20K's ``classes.json`` last, so a crash never leaves
  an annotation file that names missing images.

The readers return what torchvision's detection models and an UperNet-style segmentation head take:

* :class:`CocoDetection` reads ``DIR/annotations/instances_{split}.json`` with plain :mod:`json`
  (pycocotools only decodes masks) and returns ``(image, target)`` with ``boxes`` (x1y1x2y2 pixels),
  ``labels`` (category ids mapped to ``1..K`` in sorted id order; 0 is the detectors' background),
  ``image_id`` and, with ``masks=True``, ``masks``. :func:`collate_detection` keeps lists.
* :class:`AdeSegmentation` pairs ``images/{split}/X.jpg`` with ``annotations/{split}/X.png`` and
  applies MMSegmentation's "reduce zero label": 0 -> 255 (ignore), others minus 1, so classes are
  ``0..K-1``. Training augmentation: random rescale (relative to the image's own size), random crop
  padded with 0 / 255, random horizontal flip. Validation returns whole images at their own size.
  :func:`collate_segmentation` stacks samples of one size (always so in training) and returns lists
  when sizes differ (whole-image validation of real ADE20K, best run one image at a time, as
  MMSegmentation does; padding would change what the model sees next to the real pixels).
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ArgumentError, MissingExtraError, UserError
from ..utils import atomic_write, write_json
from .robust import load_rgb

__all__ = [
    "BAND_LOW",
    "IGNORE_INDEX",
    "MASK_THRESHOLD",
    "AdeSegmentation",
    "CocoDetection",
    "collate_detection",
    "collate_segmentation",
    "write_dense_set",
]

LAYOUTS = ("coco", "ade20k")
MASK_THRESHOLD = 0.5  # upscaled digit intensity (0..1) above which a pixel is the digit
BAND_LOW = 0.35  # intensity above which a pixel is coloured at all; (BAND_LOW, MASK_THRESHOLD] is the band
OBJECT_SCALE = (0.25, 0.55)  # object side, as a fraction of the image side
CROP_SCALE = (0.4, 1.0)  # background crop side, as a fraction of the photo's short side
MIN_VISIBLE = 0.5  # fraction of its own mask every object keeps visible
PLACEMENT_TRIES = 10
VAL_FRACTION = 0.25  # of each class's digit samples
IGNORE_INDEX = 255
_COCO_LAYOUT = "DIR/annotations/instances_{train,val}.json with images in DIR/{train,val}/"
_ADE_LAYOUT = "DIR/images/{training,validation}/X.jpg with labels in DIR/annotations/{training,validation}/X.png"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _mask_api(what: str) -> Any:
    """``pycocotools.mask``, or a :class:`MissingExtraError` naming the extra."""
    try:
        from pycocotools import mask as mask_util
    except ImportError:
        raise MissingExtraError(f"{what} needs pycocotools: pip install 'repavit[dense]'") from None
    return mask_util


# ---- writing the set ------------------------------------------------------------------------------
@dataclass
class _Object:
    digit: int
    index: int  # into load_digits()
    area: int  # of its own (unoccluded) mask
    visible: np.ndarray  # bool (H, W)


@dataclass
class _Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    labels: np.ndarray  # uint8 (H, W), ADE20K convention
    objects: list[_Object]


@dataclass
class _Sources:
    digits: np.ndarray  # (1797, 8, 8), 0..16
    targets: np.ndarray
    photos: list[np.ndarray]


def _load_sources() -> _Sources:
    try:
        from sklearn.datasets import load_digits, load_sample_images
    except ImportError:
        raise MissingExtraError("write_dense_set needs scikit-learn: pip install 'repavit[demo]'") from None
    digits = load_digits()
    photos = [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]
    return _Sources(np.asarray(digits.images), np.asarray(digits.target), photos)


def _digit_pools(targets: np.ndarray, num_classes: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Per split, per class, the digit sample indices it may use (disjoint between the splits)."""
    rng = np.random.default_rng([seed, 99])
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for d in range(num_classes):
        idx = rng.permutation(np.flatnonzero(targets == d))
        n_val = max(1, round(VAL_FRACTION * len(idx)))
        pools["val"].append(np.sort(idx[:n_val]))
        pools["train"].append(np.sort(idx[n_val:]))
    return pools


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    """A random square crop of a photo (random scale, position, flip), resized: float32 (size, size, 3)."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.uniform(*CROP_SCALE) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop, dtype=np.float32)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out.copy()


def _render_digit(pixels: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 digit (0..16) upscaled bilinearly to (side, side) intensities in 0..1."""
    small = Image.fromarray((pixels / 16.0).astype(np.float32))
    return np.clip(np.asarray(small.resize((side, side), Image.BILINEAR), dtype=np.float32), 0.0, 1.0)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), 1.0)
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _place(rng: np.random.Generator, cover: np.ndarray, size: int, placed: list[_Object]) -> tuple[int, int] | None:
    """A random top-left corner for the square ``cover`` where every earlier object stays visible enough."""
    side = cover.shape[0]
    for _ in range(PLACEMENT_TRIES):
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        square = (slice(y, y + side), slice(x, x + side))
        if all(o.visible.sum() - (o.visible[square] & cover).sum() >= MIN_VISIBLE * o.area for o in placed):
            return y, x
    return None


def _scene(rng: np.random.Generator, src: _Sources, pools: list[np.ndarray], size: int, max_objects: int) -> _Scene:
    """One image: a background photo crop with 1..max_objects digits pasted on it (see the module docstring)."""
    canvas = _background(rng, src.photos, size)
    labels = np.ones((size, size), dtype=np.uint8)
    placed: list[_Object] = []
    lo, hi = (round(f * size) for f in OBJECT_SCALE)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        digit = int(rng.integers(len(pools)))
        index = int(rng.choice(pools[digit]))
        intensity = _render_digit(src.digits[index], int(rng.integers(lo, hi + 1)))
        colour = _bright_colour(rng)
        cover = intensity > BAND_LOW
        corner = _place(rng, cover, size, placed)
        if corner is None:
            continue  # it would hide too much of an earlier object: leave it out of the image
        square = (slice(corner[0], corner[0] + cover.shape[0]), slice(corner[1], corner[1] + cover.shape[1]))
        alpha = np.clip((intensity - BAND_LOW) / (MASK_THRESHOLD - BAND_LOW), 0.0, 1.0)[..., None]
        canvas[square] = canvas[square] * (1.0 - alpha) + colour * alpha
        for o in placed:
            o.visible[square] &= ~cover
        mask = np.zeros((size, size), dtype=bool)
        mask[square] = intensity > MASK_THRESHOLD
        labels[square][cover] = 0
        labels[mask] = digit + 2
        placed.append(_Object(digit, index, int(mask.sum()), mask))
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return _Scene(image, labels, placed)


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="JPEG", quality=95))


def _save_png(path: Path, labels: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(labels).save(tmp, format="PNG"))


def _coco_annotation(obj: _Object, ann_id: int, image_id: int, mask_util: Any) -> dict[str, Any]:
    ys, xs = np.nonzero(obj.visible)
    x0, y0 = int(xs.min()), int(ys.min())
    rle = mask_util.encode(np.asfortranarray(obj.visible.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.digit + 1,
        "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
        "area": int(obj.visible.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "digit_index": obj.index,
    }


def _write_coco_split(root: Path, split: str, scenes: Any, num_classes: int, mask_util: Any) -> int:
    """Images of one split, then its annotation json; returns the number of objects."""
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        name = f"{image_id:06d}.jpg"
        _save_jpeg(root / split / name, scene.image)
        h, w = scene.labels.shape
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for obj in scene.objects:
            annotations.append(_coco_annotation(obj, len(annotations) + 1, image_id, mask_util))
    categories = [{"id": d + 1, "name": f"digit {d}", "supercategory": "digit"} for d in range(num_classes)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    write_json(root / "annotations" / f"instances_{split}.json", data)
    return len(annotations)


def _write_ade_split(root: Path, split: str, scenes: Any) -> int:
    """Label pngs and images of one split (label first: a crash leaves no image without its label)."""
    folder = {"train": "training", "val": "validation"}[split]
    count = 0
    for i, scene in enumerate(scenes, start=1):
        _save_png(root / "annotations" / folder / f"{i:06d}.png", scene.labels)
        _save_jpeg(root / "images" / folder / f"{i:06d}.jpg", scene.image)
        count += len(scene.objects)
    return count


def _layout_files(root: Path, layout: str) -> list[Path]:
    """The files of ``layout`` under ``root`` that exist (annotation files first)."""
    if layout == "coco":
        found = [root / "annotations" / f"instances_{s}.json" for s in ("train", "val")]
        found = [p for p in found if p.is_file()]
        return found + [p for s in ("train", "val") for p in sorted((root / s).glob("*.jpg"))]
    found = [p for p in [root / "classes.json"] if p.is_file()]
    for s in ("training", "validation"):
        found += sorted((root / "annotations" / s).glob("*.png")) + sorted((root / "images" / s).glob("*.jpg"))
    return found


def _check_write_args(layout: str, image_size: int, num_classes: int, seed: int, **counts: int) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}")
    if not 1 <= num_classes <= 10:
        raise UserError(f"num_classes must be 1..10 (digits 0..num_classes-1), got {num_classes}")
    for name, value in counts.items():
        if value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}")
    if image_size < 64:
        raise UserError(f"image_size must be at least 64 pixels, got {image_size}")
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")


def write_dense_set(
    root: str | os.PathLike,
    *,
    layout: str = "coco",
    num_train: int = 160,
    num_val: int = 48,
    image_size: int = 160,
    num_classes: int = 4,
    max_objects: int = 3,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write a small real-image detection / segmentation set (digits on photos) under ``root``.

    Layouts: ``"coco"`` writes ``root/{train,val}/*.jpg`` and ``root/annotations/instances_{train,val}.json``
    (COCO instances: RLE segmentations, ``category_id = digit + 1``); ``"ade20k"`` writes
    ``root/images/{training,validation}/*.jpg``, ``root/annotations/{training,validation}/*.png``
    (0 = ignore, 1 = background, ``digit + 2``) and ``root/classes.json`` (names of the classes after
    reduce-zero-label: ``["background", "digit 0", ...]``). See the module docstring for how scenes are made.

    Args:
        root: the folder (created if needed).
        layout: ``"coco"`` or ``"ade20k"``.
        num_train, num_val: images per split.
        image_size: side of the square images (at least 64).
        num_classes: digits ``0..num_classes-1`` (1 to 10).
        max_objects: each image has 1 to ``max_objects`` digits.
        seed: the same seed (and arguments) gives byte-identical files.
        overwrite: replace the files of this layout already under ``root`` (otherwise refuse).

    Returns:
        ``{"train": images, "val": images, "train_objects": objects, "val_objects": objects}``.

    Raises:
        UserError: a bad argument, or ``root`` already holds this layout and ``overwrite`` is False.
        MissingExtraError: scikit-learn (or, for ``"coco"``, pycocotools) is not installed.
    """
    _check_write_args(
        layout, image_size, num_classes, seed, num_train=num_train, num_val=num_val, max_objects=max_objects
    )
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"root {root} exists and is not a folder; expected a folder to write the {layout} set in")
    src = _load_sources()
    mask_util = _mask_api("write_dense_set(layout='coco')") if layout == "coco" else None
    existing = _layout_files(root, layout)
    if existing and not overwrite:
        raise ArgumentError(
            "{root} already holds a {layout} set ({first}); pass {overwrite} to replace it",
            root=root, layout=layout, first=existing[0],
        )  # fmt: skip
    for path in existing:  # annotation files first: a crash here leaves no annotation naming deleted images
        path.unlink()
    pools = _digit_pools(src.targets, num_classes, seed)
    counts: dict[str, int] = {"train": num_train, "val": num_val}
    for split_index, (split, n) in enumerate((("train", num_train), ("val", num_val))):
        scenes = (
            _scene(np.random.default_rng([seed, split_index, i]), src, pools[split], image_size, max_objects)
            for i in range(n)
        )
        if layout == "coco":
            counts[f"{split}_objects"] = _write_coco_split(root, split, scenes, num_classes, mask_util)
        else:
            counts[f"{split}_objects"] = _write_ade_split(root, split, scenes)
    if layout == "ade20k":
        write_json(root / "classes.json", ["background", *(f"digit {d}" for d in range(num_classes))])
    return counts


# ---- COCO reader -----------------------------------------------------------------------------------
def _to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def _read_coco_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"annotation file {path} not found; expected the COCO layout {_COCO_LAYOUT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); expected a COCO instances file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}; expected a COCO instances object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path} has no list {key!r}; expected COCO keys 'images', 'annotations', 'categories'")
    return data


def _group_annotations(data: dict[str, Any], cat_to_label: dict[int, int], path: Path) -> dict[int, list[dict]]:
    """Usable annotations per image id: no crowds, boxes at least 1 pixel wide and high."""
    groups: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        try:
            _, _, w, h = (float(v) for v in ann["bbox"])
            cat, image_id, crowd = int(ann["category_id"]), int(ann["image_id"]), ann.get("iscrowd", 0)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"annotation {ann.get('id', '?')!r}" if isinstance(ann, dict) else f"annotation {ann!r}"
            raise UserError(f"{path}: malformed {what} ({e!r}); expected image_id, category_id, bbox") from None
        if cat not in cat_to_label:
            raise UserError(f"{path}: annotation {ann.get('id', '?')!r} has category_id {cat}, not in 'categories'")
        if crowd or w < 1 or h < 1:
            continue
        groups.setdefault(image_id, []).append(ann)
    return groups


def _decode_segmentation(seg: Any, h: int, w: int, mask_util: Any, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed RLE, compressed RLE as str or bytes) as uint8 (h, w)."""
    if isinstance(seg, list) and seg:
        rle = mask_util.merge(mask_util.frPyObjects([[float(v) for v in p] for p in seg], h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_util.frPyObjects(seg, *seg["size"])
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
        rle = {"size": list(seg["size"]), "counts": counts}
    else:
        raise UserError(f"{where} has no usable segmentation; expected polygons or an RLE dict (size, counts)")
    if [int(v) for v in rle["size"]] != [h, w]:
        raise UserError(f"{where}: segmentation size {list(rle['size'])} differs from the image's [{h}, {w}]")
    return np.ascontiguousarray(mask_util.decode(rle), dtype=np.uint8)


class CocoDetection(Dataset):
    """COCO instances (``DIR/annotations/instances_{split}.json``, images in ``DIR/{split}/``) for
    torchvision's detection models.

    ``dataset[i]`` is ``(image, target)``: image float32 (3, H, W) in [0, 1]; target ``boxes`` float32
    (N, 4) x1y1x2y2 pixels, ``labels`` int64 (N,) in ``1..K``, ``image_id`` int64 scalar and, with
    ``masks=True``, ``masks`` uint8 (N, H, W). Crowd annotations and boxes under 1 pixel are left out;
    images without annotations stay in (empty targets).

    Attributes:
        label_to_category: ``{label: category_id}`` (labels 1..K follow sorted category ids).
        category_to_label: the inverse.
        category_names: ``category_names[label]``; index 0 is ``"__background__"``, as torchvision's.
        annotation_file: the json read (for COCO evaluation).

    Args:
        root: the dataset folder ``DIR``.
        split: ``"train"`` or ``"val"`` (any name whose json and image folder exist).
        masks: also return instance masks (decoding needs pycocotools).
        train: random horizontal flip (p=0.5) of image, boxes and masks, with torch's global generator.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, masks: bool = False, train: bool = False):
        self.root, self.split, self.masks, self.train = Path(root), split, masks, train
        if masks:
            _mask_api("CocoDetection(masks=True)")
        self.annotation_file = self.root / "annotations" / f"instances_{split}.json"
        self.image_dir = self.root / split
        data = _read_coco_json(self.annotation_file)
        if not self.image_dir.is_dir():
            raise UserError(f"image folder {self.image_dir} not found; expected the COCO layout {_COCO_LAYOUT}")
        try:
            cats = sorted(data["categories"], key=lambda c: int(c["id"]))
            self.images = [{**im, "id": int(im["id"]), "file_name": str(im["file_name"])} for im in data["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.annotation_file}: malformed image or category ({e!r}); expected ids") from None
        self.label_to_category = {i + 1: int(c["id"]) for i, c in enumerate(cats)}
        self.category_to_label = {c: label for label, c in self.label_to_category.items()}
        self.category_names = ["__background__", *(str(c.get("name", c["id"])) for c in cats)]
        self._annotations = _group_annotations(data, self.category_to_label, self.annotation_file)

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (labels 1..K; torchvision models take ``num_classes=K + 1``)."""
        return len(self.label_to_category)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[index]
        image = _to_tensor(load_rgb(self.image_dir / info["file_name"]))
        h, w = image.shape[1:]
        anns = self._annotations.get(info["id"], [])
        boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.category_to_label[int(a["category_id"])] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(info["id"], dtype=torch.int64),
        }
        if self.masks:
            mask_util = _mask_api("CocoDetection(masks=True)")
            where = f"{self.annotation_file} image {info['id']}"
            decoded = [_decode_segmentation(a.get("segmentation"), h, w, mask_util, where) for a in anns]
            target["masks"] = (
                torch.from_numpy(np.stack(decoded)) if decoded else torch.zeros((0, h, w), dtype=torch.uint8)
            )
        if self.train and torch.rand(()) < 0.5:
            image, target = _hflip(image, target)
        return image, target


def _hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror an image and its target left-right: x1' = W - x2, x2' = W - x1."""
    w = image.shape[-1]
    x1, y1, x2, y2 = target["boxes"].unbind(1)
    flipped = {**target, "boxes": torch.stack([w - x2, y1, w - x1, y2], 1)}
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    return image.flip(-1), flipped


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target), ...]`` -> ``([images], [targets])``, what torchvision's detection models take."""
    return [b[0] for b in batch], [b[1] for b in batch]


# ---- ADE20K reader ---------------------------------------------------------------------------------
def _ade_classes(root: Path, num_classes: int | None) -> list[str]:
    path = root / "classes.json"
    if path.is_file():
        try:
            classes = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); expected a list of class names") from None
        if not isinstance(classes, list) or not classes:
            raise UserError(f'{path} is not a list of class names; expected e.g. ["background", "digit 0"]')
        if num_classes is not None and num_classes != len(classes):
            raise UserError(f"num_classes={num_classes} but {path} names {len(classes)} classes; give one or fix it")
        classes = [str(c) for c in classes]
    elif num_classes is None:
        raise ArgumentError(
            "{path} not found; give {num_classes} (classes after reduce-zero-label, 150 for ADE20K)", path=path
        )
    else:
        classes = [str(i) for i in range(num_classes)]
    if not 1 <= len(classes) <= 255:
        raise UserError(f"the number of classes must be 1..255 (255 is the ignore index), got {len(classes)}")
    return classes


def _pair_ade(image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    if not image_dir.is_dir():
        raise UserError(f"image folder {image_dir} not found; expected the ADE20K layout {_ADE_LAYOUT}")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"image folder {image_dir} has no images; expected the ADE20K layout {_ADE_LAYOUT}")
    pairs = []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise UserError(f"image {image} has no annotation {label}; expected the ADE20K layout {_ADE_LAYOUT}")
        pairs.append((image, label))
    return pairs


def _read_labels(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """A label png, reduced (0 -> 255, others minus 1, 255 stays): uint8 (H, W) with values 0..K-1 or 255."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, raw = im.mode, np.array(im)
    except Exception as e:
        raise UserError(f"cannot read annotation {path}: {e}") from e
    if mode not in ("L", "P"):
        raise UserError(f"annotation {path} has mode {mode!r}; expected an 8-bit label png (mode 'L' or 'P')")
    if raw.shape[::-1] != tuple(size):
        raise UserError(f"annotation {path} is {raw.shape[1]}x{raw.shape[0]}, its image {size[0]}x{size[1]}")
    labels = raw.astype(np.int16) - 1
    labels[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
    bad = (labels >= num_classes) & (labels != IGNORE_INDEX)
    if bad.any():
        value = int(raw[bad][0])
        raise UserError(f"annotation {path} has label {value}; expected 0 (ignore) or 1..{num_classes} (the classes)")
    return labels.astype(np.uint8)


class AdeSegmentation(Dataset):
    """ADE20K-layout semantic segmentation: ``images/{split}/X.jpg`` with ``annotations/{split}/X.png``.

    ``dataset[i]`` is ``(image float32 (3, H, W) in [0, 1], label int64 (H, W))`` with labels reduced
    as MMSegmentation does for ADE20K: 0 -> 255 (ignored), others minus 1, so classes are ``0..K-1``.

    Args:
        root: the dataset folder.
        split: ``"training"`` or ``"validation"`` (any folder name of the layout).
        train: random rescale by a factor in ``scale_range`` (image bilinear, labels nearest), random
            ``crop_size`` square crop (padded bottom/right with 0 / 255 where smaller), random horizontal
            flip, with torch's global generator. Otherwise the whole image, at its own size.
        crop_size: side of the training crops.
        scale_range: ``(low, high)`` rescale factors, relative to the image's own size.
        num_classes: K, when ``root/classes.json`` (the class names) is absent.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        *,
        train: bool = False,
        crop_size: int = 128,
        scale_range: tuple[float, float] = (0.5, 2.0),
        num_classes: int | None = None,
    ) -> None:
        if crop_size < 1:
            raise UserError(f"crop_size must be a positive integer, got {crop_size}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise UserError(f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}")
        self.root, self.split, self.train = Path(root), split, train
        self.crop_size, self.scale_range = crop_size, (lo, hi)
        self.samples = _pair_ade(self.root / "images" / split, self.root / "annotations" / split)  # layout first
        self.classes = _ade_classes(self.root, num_classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _augment(self, img: Image.Image, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand(()))
        w, h = img.size
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.BILINEAR)
        labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
        image, label = _to_tensor(img), torch.from_numpy(labels.astype(np.int64))
        c = self.crop_size
        ph, pw = max(0, c - size[1]), max(0, c - size[0])
        if ph or pw:
            image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
            label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
        y = int(torch.randint(0, image.shape[1] - c + 1, ()))
        x = int(torch.randint(0, image.shape[2] - c + 1, ()))
        image, label = image[:, y : y + c, x : x + c], label[y : y + c, x : x + c]
        if torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        img = load_rgb(image_path)
        labels = _read_labels(label_path, img.size, self.num_classes)
        if self.train:
            return self._augment(img, labels)
        return _to_tensor(img), torch.from_numpy(labels.astype(np.int64))


def collate_segmentation(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor]]:
    """Stack ``[(image, label), ...]`` into ``(B, 3, H, W)`` and ``(B, H, W)`` when all share one size
    (training crops always do); otherwise return the lists (whole-image validation: run them one by one)."""
    images, labels = [b[0] for b in batch], [b[1] for b in batch]
    if len({tuple(x.shape) for x in images}) == 1:
        return torch.stack(images), torch.stack(labels)
    return images, labels
