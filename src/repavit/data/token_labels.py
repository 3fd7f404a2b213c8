"""Token labels (LV-ViT's token labeling): dense score maps per training image, stores, joint augmentation, targets.

**Format.** A score map is a teacher's top-``k`` class scores on an ``h x w`` grid over the whole
image: ``values`` (raw scores, ``(k, h, w)``) and ``indices`` (class ids, ``(k, h, w)``). On disk it is
LV-ViT's (TokenLabeling) format: one ``torch.save`` tensor ``(2, k, h, w)`` of float16, row 0 the
values and row 1 the class ids, at ``<label dir>/<class>/<image stem>.pt``; so the maps LV-ViT's
``generate_label.py`` wrote (e.g. the published NFNet-F6 maps) are read as they are, and ours by its
code. Datasets with more than 2048 classes (float16 holds integers exactly only up to 2048) are
written as a dict ``{"values": float16, "indices": int32}`` instead. A RocksDB label store
(``*.db``) holds the same serialized tensors under the image keys ``"<class>/<file>"``.

**Keys.** Every image is named by its sample key: ``"<class>/<file>"`` for ImageFolder and RocksDB
(the key RocksDB stores), ``"<index>"`` for the synthetic set. The folder store drops the file
extension (``n01440764/x.JPEG`` -> ``n01440764/x.pt``), as LV-ViT does.

**Augmentation.** :class:`TokenLabelTransform` applies the training augmentation to the image and
records what the score map needs: the random-resized-crop box (relative coordinates), whether the crop
was flipped, and the affine map of RandAugment's geometric operations (rotate, shear, translate), which
LV-ViT also applies to its maps. Photometric augmentation (colour jitter, RandAugment's colour
operations, random erasing) leaves the map as it is.

**Targets.** :func:`token_targets` (on the training device) turns each cell's top-``k`` scores into
probabilities (softmax over the ``k`` stored classes, 0 for the others) and samples that map under
every token of the augmented image: each token's area is sampled on a regular grid of points (as
RoIAlign samples a bin), every point is carried back through the geometric operations, the flip and the
crop to the original image, the map is read there bilinearly (map cell ``i`` centred at ``i + 0.5``), and
the samples are averaged; the class token's target is the average over the whole image. Without
geometric operations this is RoIAlign of the crop box on the token grid (``aligned=True``). Then label
smoothing. A token whose points all fall outside the image (e.g. a rotated corner) gets the uniform
distribution. Averaging probabilities makes a target the mixture of its cells' distributions, whatever
the teacher's score scale. (LV-ViT instead scatters the raw scores into a map of zeros and applies the
softmax after RoIAlign: the classes it did not store then score 0, which outweighs the stored ones
wherever a teacher's top scores are negative, as a small teacher's are on background; with the large
logits of its NFNet-F6 maps the two agree on the top classes. LV-ViT also gives its crop box to
RoIAlign in ``(top, left, bottom, right)`` order, which RoIAlign reads as ``(x0, y0, x1, y1)``: its
targets are transposed for non-square crops.)
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError
from ..utils import atomic_write
from .robust import BadImageError
from .transforms import TransformConfig, _patch_posterize

__all__ = [
    "GEOMETRIC_OPS",
    "BadLabelError",
    "LabelStore",
    "TokenLabelDataset",
    "TokenLabelTransform",
    "check_labels",
    "decode_label_map",
    "encode_label_map",
    "sample_key",
    "token_targets",
]

# timm's RandAugment functions that move pixels (applied to the score map too); the others change values only
GEOMETRIC_OPS = (
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x_abs",
    "translate_y_abs",
    "translate_x_rel",
    "translate_y_rel",
)
_HALF_EXACT = 2048  # float16 holds every integer up to this


class BadLabelError(BadImageError):
    """A training image's score map is missing or unreadable (the sample is skipped like a bad image)."""


# ---- format -----------------------------------------------------------------------------------------
def encode_label_map(values: Tensor, indices: Tensor) -> Any:
    """The stored form of one score map (see the module docstring): ``(2, k, h, w)`` float16, or a dict."""
    if values.shape != indices.shape or values.dim() != 3:
        raise UserError(
            f"a score map is (k, h, w) values and indices; got {tuple(values.shape)}, {tuple(indices.shape)}"
        )
    if int(indices.max()) < _HALF_EXACT:
        return torch.stack((values.half(), indices.half())).cpu()
    return {"values": values.half().cpu(), "indices": indices.to(torch.int32).cpu()}


def decode_label_map(stored: Any, where: str = "score map") -> tuple[Tensor, Tensor]:
    """``(values float32 (k, h, w), indices int64 (k, h, w))`` from the stored form; a clear error otherwise."""
    if isinstance(stored, Tensor) and stored.dim() == 4 and stored.shape[0] == 2:
        return stored[0].float(), stored[1].round().long()
    if isinstance(stored, Mapping) and {"values", "indices"} <= set(stored):
        v, i = stored["values"], stored["indices"]
        if isinstance(v, Tensor) and isinstance(i, Tensor) and v.shape == i.shape and v.dim() == 3:
            return v.float(), i.long()
    shape = tuple(stored.shape) if isinstance(stored, Tensor) else type(stored).__name__
    raise BadLabelError(f"{where} is not a score map: expected a (2, k, h, w) tensor, got {shape}")


def _to_bytes(stored: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(stored, buf)
    return buf.getvalue()


def _from_bytes(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: skip the sample, name it
        raise BadLabelError(f"cannot read {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ---- stores -------------------------------------------------------------------------------------------
class LabelStore:
    """Score maps by sample key: a folder of ``.pt`` files (LV-ViT's layout) or a RocksDB (``*.db``).

    Opened lazily, so it can be pickled into data-loader workers. ``writable=True`` creates what is missing.
    """

    def __init__(self, path: str | os.PathLike, writable: bool = False) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self.is_db = self.path.rstrip("/").endswith(".db")
        self._db: Any = None
        self._pid: int | None = None  # the process that opened _db
        if not writable and not os.path.exists(self.path):
            raise FileNotFoundError(f"token-label data not found: {self.path} (make it with `repavit label generate`)")
        if not writable and not self.is_db and not os.path.isdir(self.path):
            raise UserError(f"token-label data {self.path} is not a folder (or a RocksDB *.db)")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_db": None, "_pid": None}

    def _rocks(self) -> Any:
        """The open database of this process: a handle inherited through fork (data-loader workers) is set
        aside, never used or closed here, and the database is opened again (as RocksDBDataset does)."""
        from .rocksdb import _INHERITED, open_rocksdb

        pid = os.getpid()
        if self._db is None or getattr(self, "_pid", None) != pid:
            if self._db is not None:
                _INHERITED.append(self._db)
            self._db = open_rocksdb(self.path, read_only=not self.writable, create=self.writable)
            self._pid = pid
        return self._db

    def file_of(self, key: str) -> Path:
        return Path(self.path, os.path.splitext(key)[0] + ".pt")

    def has(self, key: str) -> bool:
        if self.is_db:
            return self._rocks().get(key.encode()) is not None
        return self.file_of(key).is_file()

    def get(self, key: str) -> tuple[Tensor, Tensor]:
        where = f"the score map of {key} in {self.path}"
        if self.is_db:
            data = self._rocks().get(key.encode())
            if data is None:
                raise BadLabelError(f"{where} is missing (regenerate with `repavit label generate`)")
            return decode_label_map(_from_bytes(data, where), where)
        path = self.file_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadLabelError(f"{where} is missing: no {path} (regenerate with `repavit label generate`)") from None
        return decode_label_map(_from_bytes(data, where), where)

    def put(self, key: str, values: Tensor, indices: Tensor) -> None:
        data = _to_bytes(encode_label_map(values, indices))
        if self.is_db:
            self._rocks().put(key.encode(), data)
            return
        path = self.file_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))

    def close(self) -> None:
        if self._db is not None and getattr(self, "_pid", None) == os.getpid():
            self._db.close()
        self._db = None


def sample_key(dataset: Dataset, index: int) -> str:
    """The key naming sample ``index`` (see the module docstring); a clear error for datasets without one."""
    if callable(getattr(dataset, "key", None)):  # RocksDB
        return dataset.key(index)
    samples, root = getattr(dataset, "samples", None), getattr(dataset, "root", None)
    if samples is not None and root is not None and isinstance(samples[index][0], str):  # ImageFolder
        return os.path.relpath(samples[index][0], root).replace(os.sep, "/")
    if type(dataset).__name__ == "SyntheticImages":
        return f"{index:08d}"
    raise UserError(
        f"token labels name images by their file or RocksDB key; {type(dataset).__name__} has neither "
        "(use ImageFolder data, --rocksdb, or --data_set SYNTH)"
    )


# ---- joint augmentation ---------------------------------------------------------------------------------
def _op_matrix(name: str, size: tuple[int, int], args: tuple) -> Tensor:
    """The 3x3 map (output pixel -> input pixel, continuous coordinates) of one timm geometric operation."""
    W, H = size
    m = torch.eye(3, dtype=torch.float64)
    if name == "rotate":  # PIL's Image.rotate: about the centre, counter-clockwise for positive degrees
        a = -math.radians(args[0])
        rot = torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]], dtype=torch.float64)
        centre = torch.tensor([W / 2.0, H / 2.0], dtype=torch.float64)
        m[:2, :2], m[:2, 2] = rot, centre - rot @ centre
    elif name == "shear_x":
        m[0, 1] = args[0]
    elif name == "shear_y":
        m[1, 0] = args[0]
    elif name == "translate_x_abs":
        m[0, 2] = args[0]
    elif name == "translate_y_abs":
        m[1, 2] = args[0]
    elif name == "translate_x_rel":
        m[0, 2] = args[0] * W
    elif name == "translate_y_rel":
        m[1, 2] = args[0] * H
    return m


class _Recorded:
    """A timm geometric augmentation function that also records its pixel map into ``owner._moves``."""

    def __init__(self, fn: Any, owner: TokenLabelTransform) -> None:
        self.fn, self.owner, self.name = fn, owner, fn.__name__

    def __call__(self, img: Any, *args: Any, **kwargs: Any) -> Any:
        self.owner._moves.append(_op_matrix(self.name, img.size, args))
        return self.fn(img, *args, **kwargs)


class TokenLabelTransform:
    """The training augmentation of one image, returning ``(image tensor, box (4,), flipped, moves (3, 3))``.

    ``box`` is the random-resized crop as ``(top, left, bottom, right)`` relative to the image (0..1);
    ``moves`` maps an output pixel to the pixel of the cropped (and flipped) image it came from, through
    RandAugment's geometric operations (identity when none ran). Order as timm's pipeline: crop, flip,
    RandAugment or colour jitter, normalization, random erasing.

    Args:
        cfg: the run's augmentation settings.
        ra_ops: RandAugment operation names to draw from (default: the policy's own list).
    """

    def __init__(self, cfg: TransformConfig, ra_ops: list[str] | None = None) -> None:
        self.crop = RandomResizedCropAndInterpolation(cfg.input_size, interpolation=cfg.train_interpolation)
        self.hflip = cfg.hflip
        self._moves: list[Tensor] = []
        aa = None if cfg.aa in (None, "", "none", "None") else cfg.aa
        color: list[Any] = []
        if aa:
            if not aa.startswith("rand"):
                raise UserError(f"token labeling supports RandAugment policies ('rand-...'), not {aa!r}")
            mean = tuple(min(255, round(255 * x)) for x in cfg.mean)
            hparams: dict[str, Any] = dict(translate_const=int(cfg.input_size * 0.45), img_mean=mean)
            if cfg.train_interpolation != "random":  # as timm's create_transform: the crop's interpolation
                hparams["interpolation"] = str_to_pil_interp(cfg.train_interpolation)
            ra = rand_augment_transform(aa, hparams, transforms=ra_ops)
            for op in ra.ops:
                if getattr(op.aug_fn, "__name__", "") in GEOMETRIC_OPS:
                    op.aug_fn = _Recorded(op.aug_fn, self)
            color.append(ra)
        elif cfg.color_jitter:
            color.append(T.ColorJitter(*(float(cfg.color_jitter),) * 3))
        self.color = T.Compose(color)
        _patch_posterize(self.color)
        self.final = T.Compose([T.ToTensor(), T.Normalize(tuple(cfg.mean), tuple(cfg.std))])
        self.erase = (
            RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device="cpu") if cfg.reprob > 0 else None
        )

    def __call__(self, img: Any) -> tuple[Tensor, Tensor, bool, Tensor]:
        W, H = img.size
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interp = self.crop.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        img = TF.resized_crop(img, i, j, h, w, list(self.crop.size), interp)
        flipped = bool(torch.rand(()) < self.hflip)
        if flipped:
            img = TF.hflip(img)
        self._moves = []
        img = self.color(img)
        moves = torch.eye(3, dtype=torch.float64)
        for m in self._moves:  # op 1 ran first: its map is applied last (output -> input)
            moves = moves @ m
        x = self.final(img)
        if self.erase is not None:
            x = self.erase(x)
        box = torch.tensor([i / H, j / W, (i + h) / H, (j + w) / W], dtype=torch.float32)
        return x, box, flipped, moves.to(torch.float32)


class TokenLabelDataset(Dataset):
    """``(image, target)`` with the target a dict: ``label`` (class id), ``values``/``indices`` (the score
    map), ``box``, ``flip`` and ``moves`` (see :class:`TokenLabelTransform`). The default collate batches the dicts.

    ``dataset`` must return PIL images (no transform). Attribute access falls through to it
    (``classes``, ``targets``, ``loader``, ...). A missing or unreadable map raises :class:`BadLabelError`,
    which :class:`~repavit.data.robust.RobustDataset` skips like an unreadable image.
    """

    def __init__(self, dataset: Dataset, store: LabelStore, transform: TokenLabelTransform) -> None:
        self.dataset, self.store, self.transform = dataset, store, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "store", "transform") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "loader":  # RobustDataset swaps the image loader of the dataset that reads files
            setattr(self.dataset, name, value)
        else:
            super().__setattr__(name, value)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        values, indices = self.store.get(sample_key(self.dataset, index))
        img, label = self.dataset[index]
        x, box, flipped, moves = self.transform(img)
        target = {"label": label, "values": values, "indices": indices, "box": box, "flip": flipped, "moves": moves}
        return x, target


def check_labels(dataset: Dataset, store: LabelStore, num_classes: int, probes: int = 16) -> tuple[int, int, int]:
    """Check that score maps exist for a spread of samples and fit ``num_classes``; return ``(k, h, w)``.

    Fails early, with one line, on the mistakes a run would otherwise hit an hour in: a label folder for
    another dataset (keys missing), or maps of another class count.
    """
    n = len(dataset)  # type: ignore[arg-type]
    picks = sorted({round(i * (n - 1) / max(probes - 1, 1)) for i in range(min(probes, n))})
    missing = [sample_key(dataset, i) for i in picks if not store.has(sample_key(dataset, i))]
    if missing:
        raise UserError(
            f"token-label data {store.path} has no score map for {len(missing)} of {len(picks)} probed training "
            f"images (e.g. {missing[0]!r}): it was made for other data; run `repavit label generate` on this dataset"
        )
    values, indices = store.get(sample_key(dataset, picks[0]))
    top = int(indices.max())
    if top >= num_classes:
        raise UserError(
            f"token-label data {store.path} has class id {top}, but the dataset has {num_classes} classes: "
            "the maps are for another label set"
        )
    return tuple(values.shape)  # type: ignore[return-value]


# ---- targets ----------------------------------------------------------------------------------------------
def token_targets(
    target: Mapping[str, Tensor],
    num_classes: int,
    grid: tuple[int, int],
    smoothing: float = 0.0,
    image_size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(class-token target (B, K), token targets (B, H*W, K))``: probabilities from the augmented score maps.

    See the module docstring. ``grid`` is the model's token grid ``(H, W)``; ``image_size`` the model input
    ``(H, W)`` in pixels, the space of ``target["moves"]`` (needed only when geometric operations ran).
    """
    values, indices, box = target["values"].float(), target["indices"].long(), target["box"].float()
    dev = values.device
    B, _, h, w = values.shape
    gh, gw = grid
    maps = torch.zeros(B, num_classes, h, w, device=dev, dtype=torch.float32)
    maps.scatter_(1, indices, F.softmax(values, dim=1))  # each cell: a distribution over the classes
    # sample points per token and axis, as RoIAlign's adaptive sampling: the map cells a token spans
    sy = max(1, math.ceil(float((box[:, 2] - box[:, 0]).max()) * h / gh - 1e-6))
    sx = max(1, math.ceil(float((box[:, 3] - box[:, 1]).max()) * w / gw - 1e-6))
    v = (torch.arange(gh * sy, device=dev, dtype=torch.float32) + 0.5) / (gh * sy)  # output rows, 0..1
    u = (torch.arange(gw * sx, device=dev, dtype=torch.float32) + 0.5) / (gw * sx)  # output columns
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    uu, vv = uu.expand(B, -1, -1), vv.expand(B, -1, -1)  # (B, gh*sy, gw*sx)
    moves = target.get("moves")
    if moves is not None and not torch.allclose(moves, torch.eye(3, device=moves.device).expand_as(moves)):
        if image_size is None:
            raise UserError("token_targets needs image_size when geometric augmentation moved the images")
        Hp, Wp = image_size
        m = moves.to(dev, torch.float32)
        px, py = uu * Wp, vv * Hp
        qx = m[:, 0, 0, None, None] * px + m[:, 0, 1, None, None] * py + m[:, 0, 2, None, None]
        qy = m[:, 1, 0, None, None] * px + m[:, 1, 1, None, None] * py + m[:, 1, 2, None, None]
        uu, vv = qx / Wp, qy / Hp
    flip = target["flip"].to(device=dev, dtype=torch.bool)[:, None, None]
    uu = torch.where(flip, 1.0 - uu, uu)
    x = box[:, 1, None, None] + uu * (box[:, 3] - box[:, 1])[:, None, None]  # original image, 0..1
    y = box[:, 0, None, None] + vv * (box[:, 2] - box[:, 0])[:, None, None]
    points = torch.stack((2 * x - 1, 2 * y - 1), dim=-1)  # grid_sample's coordinates (align_corners=False)
    samples = F.grid_sample(maps, points, mode="bilinear", padding_mode="zeros", align_corners=False)
    dense = F.avg_pool2d(samples, (sy, sx)).flatten(2).transpose(1, 2)  # (B, gh*gw, K)
    whole = samples.mean((2, 3))  # (B, K)
    dense, whole = _normalized(dense, num_classes), _normalized(whole, num_classes)
    if smoothing > 0:
        dense = dense * (1.0 - smoothing) + smoothing / num_classes
        whole = whole * (1.0 - smoothing) + smoothing / num_classes
    return whole, dense


def _normalized(p: Tensor, num_classes: int) -> Tensor:
    """Rows scaled to sum 1 (sampling near the border loses mass); rows with nothing become uniform."""
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 1e-6, p / total.clamp_min(1e-12), torch.full_like(p, 1.0 / num_classes))
