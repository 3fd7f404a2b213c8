"""Robust loading: every image mode decodes to the right RGB pixels, and unreadable samples are skipped,
warned about once, counted across DataLoader workers, or fatal on request."""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from repavit.data.datasets import dataset_classes
from repavit.data.robust import BadImageError, GuardedLoader, RobustDataset, check_split, load_rgb


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): signature, IHDR, IDAT, IEND."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _rgb(data: bytes) -> np.ndarray:
    out = load_rgb(data)
    assert out.mode == "RGB"
    return np.asarray(out).astype(np.int64)


# ---- decoding every mode ---------------------------------------------------------------------------
def test_grayscale_and_bilevel_repeat_the_gray_value():
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = _rgb(_png_bytes(Image.fromarray(gray, "L")))
    assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    bits = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    out = _rgb(_png_bytes(Image.fromarray(bits, "L").convert("1")))
    assert np.array_equal(out, np.repeat(bits[..., None], 3, axis=2))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    out = _rgb(_png_bytes(img))
    expected = np.round(values.astype(np.float64) / 257.0)  # 65535 -> 255, linear
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)


def test_sixteen_bit_rgb_png_keeps_its_colours():
    pixels = np.array([[[65535, 0, 32768], [1000, 50000, 65535]]], dtype=np.uint16)
    out = _rgb(_png16_rgb(pixels))
    assert np.abs(out - pixels / 257.0).max() <= 1.0


def test_float_image_in_unit_range_is_scaled():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = _rgb(_encode(Image.fromarray(values, "F"), "TIFF"))
    assert np.array_equal(out[..., 1], [[0, 128, 255]])


def test_cmyk_lossless_matches_the_formula():
    # CMYK -> RGB: R = (255 - C) * (255 - K) / 255, likewise G with M and B with Y.
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 128, 255, 0], [40, 80, 120, 100]]], dtype=np.uint8)
    out = _rgb(_encode(Image.fromarray(cmyk, "CMYK"), "TIFF"))
    c = cmyk.astype(np.float64)
    expected = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255
    assert np.abs(out - expected).max() <= 1.0


def test_cmyk_jpeg_decodes_to_the_right_colour():
    # Pure cyan (C=255): RGB (0, 255, 255). JPEG is lossy, so a tolerance.
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    out = _rgb(_encode(img, "JPEG", quality=95))
    assert np.abs(out - np.array([0, 255, 255])).max() <= 6


def test_palette_without_and_with_transparency():
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = [10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (768 - 9)
    img = Image.fromarray(idx, "P")
    img.putpalette(palette)
    colours = np.array(palette[:9]).reshape(3, 3)
    assert np.array_equal(_rgb(_png_bytes(img)), colours[idx])
    # Entry 1 transparent: composited over white.
    out = _rgb(_png_bytes(img, transparency=1))
    expected = colours[idx].copy()
    expected[idx == 1] = 255
    assert np.array_equal(out, expected)


def test_alpha_is_composited_over_white():
    rgba = np.array([[[200, 10, 50, 255], [200, 10, 50, 0], [200, 10, 50, 128]]], dtype=np.uint8)
    out = _rgb(_png_bytes(Image.fromarray(rgba, "RGBA")))
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = rgba[..., :3] * a + 255 * (1 - a)
    assert np.abs(out - expected).max() <= 1.0
    la = np.array([[[60, 0], [60, 255]]], dtype=np.uint8)
    out = _rgb(_png_bytes(Image.fromarray(la, "LA")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [60, 60, 60]


def test_rgb_jpeg_is_unchanged_and_paths_work(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    path = tmp_path / "x.jpg"
    img.save(path)
    with Image.open(path) as ref:
        assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(ref.convert("RGB")))
        assert np.array_equal(np.asarray(load_rgb(str(path))), np.asarray(ref.convert("RGB")))


# ---- unreadable input ------------------------------------------------------------------------------
def _jpeg(seed: int = 0, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize(
    "data",
    [_jpeg()[: len(_jpeg()) // 2], b"this is not an image", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["truncated-jpeg", "text", "empty", "broken-png"],
)
def test_unreadable_bytes_raise_one_line_error_naming_the_file(data):
    with pytest.raises(BadImageError) as e:
        load_rgb(data, name="cls/pic.JPEG")
    msg = str(e.value)
    assert "cls/pic.JPEG" in msg and "\n" not in msg


def test_missing_and_non_image_files(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(BadImageError, match="notes.jpg"):
        load_rgb(text)


def test_worker_reraise_keeps_the_file_name_on_the_first_line():
    from torch._utils import ExceptionWrapper

    try:
        raise BadImageError("cannot read image /data/a/b.JPEG: image file is truncated")
    except BadImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(BadImageError) as e:
        wrapped.reraise()
    first = str(e.value).splitlines()[0]
    assert first == "cannot read image /data/a/b.JPEG: image file is truncated (in DataLoader worker process 3)"


# ---- RobustDataset -----------------------------------------------------------------------------------
@pytest.fixture
def broken_folder(tmp_path):
    """a/bad.jpg (garbage), a/good0.png, a/good1.png, b/good2.png, b/trunc.jpg (truncated); 8x8 images."""
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i, (c, name) in enumerate([("a", "good0.png"), ("a", "good1.png"), ("b", "good2.png")]):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / c / name)
    (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (root / "b" / "trunc.jpg").write_bytes(_jpeg(1, 8)[:120])
    return root


def test_bad_samples_are_replaced_warned_once_and_counted(broken_folder, caplog):
    ds = RobustDataset(ImageFolder(str(broken_folder), transform=T.PILToTensor()))
    names = [os.path.relpath(p, broken_folder) for p, _ in ds.samples]
    assert names == ["a/bad.jpg", "a/good0.png", "a/good1.png", "b/good2.png", "b/trunc.jpg"]
    with caplog.at_level(logging.WARNING, logger="repavit.data.robust"):
        first = [ds[i] for i in range(len(ds))]
        assert ds.pop_bad_count() == 2
        second = [ds[i] for i in range(len(ds))]
        assert ds.pop_bad_count() == 2 and ds.pop_bad_count() == 0
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warned) == 2  # one per file, not one per epoch
    assert any("bad.jpg" in m for m in warned) and any("trunc.jpg" in m for m in warned)
    # Index 0 (a/bad.jpg) -> next readable: a/good0.png; index 4 (b/trunc.jpg) wraps to 0, bad, then a/good0.png.
    good0 = first[1]
    for sample in (first[0], first[4], second[0], second[4]):
        assert torch.equal(sample[0], good0[0]) and sample[1] == 0
    assert ds.bad_indices() == [0, 4]


def test_counts_and_once_per_file_warnings_cross_worker_processes(broken_folder, capfd):
    ds = RobustDataset(ImageFolder(str(broken_folder), transform=T.PILToTensor()))
    log = logging.getLogger("repavit.data.robust")
    handler = logging.StreamHandler(sys.stderr)  # forked workers inherit it and write to fd 2
    log.addHandler(handler)
    try:
        loader = DataLoader(ds, batch_size=1, num_workers=2)
        for _ in range(2):  # two epochs, fresh workers each time
            labels = [int(y) for _, y in loader]
            assert ds.pop_bad_count() == 2
            assert labels == [0, 0, 0, 1, 0]
    finally:
        log.removeHandler(handler)
    err = capfd.readouterr().err
    assert err.count("skipping unreadable") == 2
    assert ds.bad_indices() == [0, 4]


def test_fatal_raises_naming_the_file_also_from_workers(broken_folder):
    ds = RobustDataset(ImageFolder(str(broken_folder)), fatal=True)
    with pytest.raises(BadImageError, match="bad.jpg"):
        ds[0]
    it = iter(DataLoader(ds, batch_size=1, num_workers=1, collate_fn=lambda b: b))
    with pytest.raises(BadImageError) as e:
        next(it)
    it._shutdown_workers()  # at once; torch's finalizer waits 5 s for a worker that raised
    first = str(e.value).splitlines()[0]
    assert "bad.jpg" in first and "worker" in first


def test_all_bad_data_is_an_error_not_an_endless_loop(tmp_path):
    for i in range(3):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{i}.jpg").write_bytes(b"junk")
    ds = RobustDataset(ImageFolder(str(tmp_path)), max_tries=3)
    with pytest.raises(BadImageError, match="3 consecutive samples"):
        ds[1]


def test_errors_outside_decoding_are_not_swallowed(broken_folder):
    def broken_transform(img):
        raise RuntimeError("bug in a transform")

    ds = RobustDataset(ImageFolder(str(broken_folder), transform=broken_transform))
    with pytest.raises(RuntimeError, match="bug in a transform"):
        ds[1]


def test_loader_swap_converts_special_modes_in_an_image_folder(tmp_path):
    (tmp_path / "c").mkdir()
    Image.fromarray(np.array([[0, 32768]], dtype=np.uint16)).save(tmp_path / "c" / "deep.png")
    folder = ImageFolder(str(tmp_path))
    naive = np.asarray(folder[0][0])  # torchvision's loader: convert("RGB") clips 16-bit to 255
    assert naive[0, 0, 0] == 0 and naive[0, 1, 0] == 255
    ds = RobustDataset(folder)
    assert folder.loader is load_rgb
    assert np.asarray(ds[0][0])[0].tolist() == [[0, 0, 0], [128, 128, 128]]


def test_custom_loader_is_guarded_and_attributes_pass_through(broken_folder):
    def strict(path):
        if path.endswith(".jpg"):
            raise OSError("no JPEG support here")
        return Image.open(path).convert("RGB")

    folder = ImageFolder(str(broken_folder), loader=strict)
    ds = RobustDataset(folder)
    assert isinstance(folder.loader, GuardedLoader)
    assert dataset_classes(ds) == ["a", "b"] and ds.targets == folder.targets
    assert ds[0][1] == 0 and ds.pop_bad_count() == 1
    with pytest.raises(ValueError, match="already a RobustDataset"):
        RobustDataset(ds)


class _Listed(Dataset):
    def __init__(self, targets, classes):
        self.targets, self.classes = targets, classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return i, self.targets[i]


def test_check_split_names_empty_splits_and_classes():
    check_split(_Listed([0, 1, 1], ["x", "y"]))
    with pytest.raises(ValueError, match="validation split .* has no images"):
        check_split(_Listed([], ["x"]), "validation")
    with pytest.raises(ValueError, match="class 'y' of the training split"):
        check_split(_Listed([0, 2], ["x", "y", "z"]))
    with pytest.raises(ValueError, match="empty dataset"):
        RobustDataset(_Listed([], []))
