"""Token labeling: score-map format and stores, augmentation alignment, targets, loss, generation, a torchrun run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import repavit
from repavit.cli.main import main as cli
from repavit.data import SyntheticImages, TransformConfig
from repavit.data.robust import RobustDataset
from repavit.data.token_labels import (
    BadLabelError,
    LabelStore,
    TokenLabelDataset,
    TokenLabelTransform,
    check_labels,
    decode_label_map,
    encode_label_map,
    token_targets,
)
from repavit.errors import UserError
from repavit.train.token_labeling import TokenLabelLoss, generate_token_labels
from test_distributed import env, free_port

ROOT = Path(__file__).resolve().parents[1]


def _target(values, indices, box, flip, moves=None):
    out = {"values": values, "indices": indices, "box": box, "flip": torch.as_tensor(flip)}
    return out if moves is None else {**out, "moves": moves}


def test_format_round_trip_and_reference_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 3, 4, generator=g)
    indices = torch.randint(0, 1000, (5, 3, 4), generator=g)
    v, i = decode_label_map(encode_label_map(values, indices))
    assert torch.equal(i, indices) and torch.allclose(v, values.half().float())
    # LV-ViT's own files: a (2, k, h, w) float16 tensor at <class>/<stem>.pt
    (tmp_path / "n01").mkdir()
    torch.save(torch.stack([values.half(), indices.half()]), tmp_path / "n01" / "img1.pt")
    store = LabelStore(tmp_path)
    _, i2 = store.get("n01/img1.JPEG")
    assert torch.equal(i2, indices) and store.has("n01/img1.JPEG") and not store.has("n01/other.JPEG")
    # more classes than float16 holds exactly: the dict form keeps the ids
    big = torch.full((5, 3, 4), 70000)
    assert torch.equal(decode_label_map(encode_label_map(values, big))[1], big)
    with pytest.raises(BadLabelError, match="missing"):
        store.get("n01/absent.JPEG")
    (tmp_path / "n01" / "bad.pt").write_bytes(b"not a tensor")
    with pytest.raises(BadLabelError, match="cannot read"):
        store.get("n01/bad.png")


def test_rocksdb_store_round_trip(tmp_path, monkeypatch):
    pytest.importorskip("rocksdict")
    values, indices = torch.randn(2, 2, 2), torch.randint(0, 9, (2, 2, 2))
    store = LabelStore(tmp_path / "labels.db", writable=True)
    store.put("cls/a.png", values, indices)
    store.close()
    reader = LabelStore(tmp_path / "labels.db")
    assert torch.equal(reader.get("cls/a.png")[1], indices) and not reader.has("cls/b.png")
    # a forked data-loader worker (another pid) never uses the parent's handle: it opens its own
    parent_handle = reader._db
    import os

    child = os.getpid() + 1
    monkeypatch.setattr(os, "getpid", lambda: child)  # as a forked worker sees it
    assert torch.equal(reader.get("cls/a.png")[1], indices) and reader._db is not parent_handle
    reader.close()


def test_targets_on_the_full_image_are_each_cells_distribution_and_flip_mirrors_them():
    g = torch.Generator().manual_seed(1)
    B, k, h, w, K = 2, 3, 4, 4, 7
    values = torch.randn(B, k, h, w, generator=g)
    indices = torch.stack([torch.randperm(K, generator=g)[:k] for _ in range(B * h * w)]).reshape(B, h, w, k)
    indices = indices.permute(0, 3, 1, 2).contiguous()
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * B)
    cls_t, dense = token_targets(_target(values, indices, full, [False, True]), K, (h, w))
    for b in range(B):
        for r in range(h):
            for c in range(w):
                cc = w - 1 - c if b == 1 else c  # sample 1 was flipped
                want = torch.zeros(K)
                want[indices[b, :, r, cc]] = torch.softmax(values[b, :, r, cc], 0)  # independent: by hand
                torch.testing.assert_close(dense[b, r * w + c], want, rtol=1e-5, atol=1e-6)
    # the class token's target is the mean over the crop
    torch.testing.assert_close(cls_t, dense.mean(1), rtol=1e-4, atol=1e-6)
    assert torch.allclose(dense.sum(-1), torch.ones(B, h * w))


def _quadrant_image(size: int = 64) -> Image.Image:
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    img = np.zeros((size, size, 3), dtype=np.uint8)
    half = size // 2
    for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        img[r * half : (r + 1) * half, c * half : (c + 1) * half] = colors[q]
    return Image.fromarray(img)


@pytest.mark.parametrize(
    "aa,ra_ops,share",
    [
        ("none", None, 1.0),  # crop and flip: every single-quadrant token
        ("rand-m9-n2-mstd0.5", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"], 0.97),
    ],
    ids=["crop_flip", "geometric_randaugment"],
)
def test_augmentation_keeps_image_and_score_map_aligned(aa, ra_ops, share):
    """A 4-quadrant image with a score map naming the quadrant: after random crops, flips (and RandAugment's
    rotations, shears and translations), a token whose pixels are one quadrant gets it as its top class."""
    img = _quadrant_image()
    h = w = 8
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    quadrant = (rows >= h // 2).long() * 2 + (cols >= w // 2).long()
    indices = torch.stack([quadrant, (quadrant + 1) % 4]).unsqueeze(0)  # (1, 2, h, w): top-2, right one first
    values = torch.tensor([8.0, 0.0])[None, :, None, None].expand(1, 2, h, w)
    cfg = TransformConfig(input_size=32, aa=aa, reprob=0.0, color_jitter=0.0, hflip=0.5)
    transform = TokenLabelTransform(cfg, ra_ops=ra_ops)
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    palette = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    torch.manual_seed(0)
    np.random.seed(0)
    checked = agree = moved = 0
    for _ in range(40):
        x, box, flipped, moves = transform(img)
        moved += not torch.equal(moves, torch.eye(3))
        t = _target(values, indices, box[None], [flipped], moves[None])
        _, dense = token_targets(t, 4, (4, 4), image_size=(32, 32))
        rgb = (x * std + mean).clamp(0, 1)  # (3, 32, 32)
        for tok in range(16):
            r, c = divmod(tok, 4)
            patch = rgb[:, r * 8 + 1 : r * 8 + 7, c * 8 + 1 : c * 8 + 7].reshape(3, -1).T  # inner pixels
            dist = torch.cdist(patch, palette)
            nearest = dist.argmin(1)
            if (nearest == nearest[0]).all() and dist.min(1).values.max() < 0.1:  # one quadrant, no fill
                agree += dense[0, tok].argmax().item() == nearest[0].item()
                checked += 1
    assert checked > 150 and agree >= share * checked, (checked, agree)
    assert ra_ops is None or moved > 20  # the geometric operations did run


def test_loss_matches_the_formula_written_out():
    g = torch.Generator().manual_seed(2)
    B, K, grid = 4, 6, (2, 3)
    target = _target(
        torch.randn(B, 2, 2, 3, generator=g),
        torch.randint(0, K, (B, 2, 2, 3), generator=g),
        torch.tensor([[0.1, 0.0, 0.9, 0.8]] * B),
        [False, True, False, True],
    )
    cls, aux = torch.randn(B, K, generator=g), torch.randn(B, 6, K, generator=g)
    box = (0, 1, 2, 3)  # 4 of 6 tokens mixed: lam = 1/3
    loss = TokenLabelLoss(K, grid, smoothing=0.1, cls_weight=0.7, dense_weight=0.4)((cls, aux, box), target)
    t_cls, t_dense = token_targets(target, K, grid, 0.1)
    lam = 1 - 4 / 6
    want_cls = want_dense = 0.0
    for b in range(B):
        mixed = lam * t_cls[b] + (1 - lam) * t_cls[B - 1 - b]
        want_cls += -(mixed * torch.log_softmax(cls[b], 0)).sum() / B
        for i in range(6):
            want_dense += -(t_dense[b, i] * torch.log_softmax(aux[b, i], 0)).sum() / (B * 6)
    torch.testing.assert_close(loss, 0.7 * want_cls + 0.4 * want_dense)


def _tiny_teacher(num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return repavit.create_model(
        "RePaViT_Tiny", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=num_classes,
        global_pool="avg",
    ).eval()  # fmt: skip


def test_generation_round_trip_resumes_and_missing_maps_are_skipped(tmp_path):
    import torchvision.transforms as T

    data = SyntheticImages(12, 4, 32, split="train", seed=0, transform=T.ToTensor())
    teacher = _tiny_teacher()
    out = tmp_path / "labels"
    stats = generate_token_labels(teacher, data, out, topk=3, batch_size=5, progress=False)
    assert stats == {"written": 12, "skipped": 0, "unreadable": 0, "images": 12}
    store = LabelStore(out)
    values, indices = store.get("00000003")
    with torch.no_grad():
        feats = teacher.forward_features(data[3][0][None])[:, 1:]  # 16 patch tokens
        scores = teacher.head(feats).reshape(1, 4, 4, 4).permute(0, 3, 1, 2)[0]
    top = scores.topk(3, dim=0)
    assert torch.equal(indices, top.indices) and torch.allclose(values, top.values, atol=1e-2)
    (out / "00000005.pt").unlink()
    again = generate_token_labels(teacher, data, out, topk=3, batch_size=5, progress=False)
    assert again == {"written": 1, "skipped": 11, "unreadable": 0, "images": 12}
    # training data with a missing map: the sample is skipped like an unreadable image
    (out / "00000007.pt").unlink()
    raw = SyntheticImages(12, 4, 32, split="train", seed=0)
    ds = RobustDataset(TokenLabelDataset(raw, store, TokenLabelTransform(TransformConfig(input_size=32, aa="none"))))
    x, t = ds[7]
    assert x.shape == (3, 32, 32) and t["label"] == raw[8][1] and ds.pop_bad_count() == 1
    with pytest.raises(UserError, match="no score map for 1 of"):
        check_labels(raw, store, num_classes=4)
    generate_token_labels(teacher, data, out, topk=3, batch_size=5, progress=False)
    assert check_labels(raw, store, num_classes=4) == (3, 4, 4)
    with pytest.raises(UserError, match="class id"):
        check_labels(raw, store, num_classes=2)


def test_token_label_flags_refuse_mistakes(tmp_path, capsys):
    base = "train --model RePaLVViT_S --data_set SYNTH --input_size 32 --epochs 1 --device cpu --num_workers 0"
    cases = {
        "--token_label": "--token_label needs --token_label_data",
        f"--token_label --token_label_data {tmp_path} --mixup 0.8": "MixToken in place of mixup",
        f"--token_label_data {tmp_path}": "--token_label is not",
        f"--token_label --token_label_data {tmp_path} --model RePaViT_Tiny": "dense",
        f"--token_label --token_label_data {tmp_path / 'nope'}": "not found",
    }
    (tmp_path / "x").mkdir()
    for extra, needle in cases.items():
        rc = cli([*shlex.split(base), *shlex.split(extra), "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (extra, err)
        assert needle in err[0], (extra, err[0])


@pytest.mark.slow  # ~60 s: a teacher, its labels, a two-process student and two evaluations
def test_torchrun_token_labeling_learns_and_reparam_keeps_accuracy(tmp_path):
    from repavit.demo import write_digits

    write_digits(tmp_path / "digits", size=32)
    recipe = (
        "--input_size 32 --data_path digits --batch_size 16 --lr 2e-3 --unscale_lr --warmup_epochs 1 "
        "--num_workers 0 --device cpu --aa none --reprob 0 --hflip 0 --crop_padding 0 --color_jitter 0 "
        "--drop_path 0 --model_ema_decay 0.995 --seed 0"
    )
    teacher = "--model RePaViT_Tiny --model_kwargs patch_size=8 depth=2 embed_dim=64 num_heads=2 global_pool=avg"
    student = "--model RePaLVViT_S --model_kwargs patch_size=8 depth=2 embed_dim=64 num_heads=2"

    def run(args: list[str]) -> subprocess.CompletedProcess:
        r = subprocess.run(args, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    repavit_cmd = [sys.executable, "-m", "repavit"]
    run([*repavit_cmd, "train", *shlex.split(f"{teacher} {recipe} --mixup 0 --cutmix 0 --epochs 4 --output_dir t")])
    run([*repavit_cmd, "label", "generate", "t/checkpoint.pth", "--data_path", "digits", "-o", "labels"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    torchrun += [f"--master_port={free_port()}", str(ROOT / "main.py")]
    tl = "--token_label --token_label_data labels --no_repeated_aug --lr 3e-3"
    run([*torchrun, *shlex.split(f"{student} {recipe} --epochs 6 {tl} --output_dir s")])
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["effective"]["world_size"] == 2
    accs = []
    for extra in ([], ["--reparam"]):
        r = run([*repavit_cmd, "eval", "--resume", "s/checkpoint.pth", "--data_path", "digits", "--input_size", "32",
                 "--num_workers", "0", "--device", "cpu", *extra])  # fmt: skip
        accs.append(float(re.search(r"top-1 ([\d.]+)%", r.stdout + r.stderr).group(1)))
    assert accs[0] == accs[1], accs  # the reparameterized model scores the same
    assert accs[0] > 25.0, accs  # 10 classes: chance is 10%


def test_soft_cross_entropy_is_cross_entropy_on_one_hot():
    from repavit.train.token_labeling import soft_cross_entropy

    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 2])
    torch.testing.assert_close(
        soft_cross_entropy(logits, F.one_hot(labels, 4).float()), F.cross_entropy(logits, labels)
    )


def _tiny_folder(root: Path, per_class: int = 6) -> None:
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((32, 32, 3), 60 * c, dtype=np.uint8) + g.integers(0, 40, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")


def test_rocksdb_images_with_rocksdb_labels_train(tmp_path, capsys):
    """Images in RocksDB, score maps in a RocksDB keyed like them: generate, then a short training run."""
    pytest.importorskip("rocksdict")
    _tiny_folder(tmp_path / "d")
    build = ["rocksdb", "build", "--source", "folder", "--output", str(tmp_path / "db")]
    assert cli([*build, "--train", str(tmp_path / "d" / "train"), "--val", str(tmp_path / "d" / "val")]) == 0
    teacher = _tiny_teacher(num_classes=3)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    tiny = (
        "--model RePaViT_Tiny --img-size 32 --model-arg patch_size=8 depth=1 embed_dim=32 num_heads=2 global_pool=avg"
    )
    gen = ["label", "generate", str(tmp_path / "teacher.pth"), *shlex.split(tiny), "--idle-ratio", "0.75"]
    assert cli([*gen, "--rocksdb", str(tmp_path / "db"), "-o", str(tmp_path / "labels.db")]) == 2
    assert "fewer than --topk 5" in capsys.readouterr().err  # checked before anything is written
    assert not (tmp_path / "labels.db").exists()
    assert cli([*gen, "--rocksdb", str(tmp_path / "db"), "-o", str(tmp_path / "labels.db"), "--topk", "2"]) == 0
    assert "score maps: 18 written" in capsys.readouterr().out
    store = LabelStore(tmp_path / "labels.db")
    assert store.get("c1/3.png")[0].shape == (2, 4, 4)
    store.close()
    student = "--model RePaLVViT_S --model_kwargs patch_size=8 depth=1 embed_dim=32 num_heads=2 --input_size 32"
    run = f"train {student} --rocksdb {tmp_path / 'db'} --token_label --token_label_data {tmp_path / 'labels.db'}"
    run += " --epochs 1 --batch_size 6 --num_workers 0 --device cpu --aa none --output_dir " + str(tmp_path / "s")
    assert cli(shlex.split(run)) == 0
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["final"]["images"] == 18


def test_generation_skips_an_unreadable_image_and_says_so(tmp_path, capsys):
    _tiny_folder(tmp_path / "d", per_class=2)
    (tmp_path / "d" / "train" / "c1" / "broken.png").write_bytes(b"not an image")
    torch.save({"model": _tiny_teacher(num_classes=3).state_dict()}, tmp_path / "teacher.pth")
    tiny = (
        "--model RePaViT_Tiny --img-size 32 --model-arg patch_size=8 depth=1 embed_dim=32 num_heads=2 global_pool=avg"
    )
    gen = [
        "label",
        "generate",
        str(tmp_path / "teacher.pth"),
        *shlex.split(tiny),
        "--idle-ratio",
        "0.75",
        "--topk",
        "2",
    ]
    assert cli([*gen, "--data_path", str(tmp_path / "d"), "-o", str(tmp_path / "labels")]) == 0
    assert "6 written, 0 already there, 1 unreadable images skipped (7 images)" in capsys.readouterr().out
    assert not (tmp_path / "labels" / "c1" / "broken.pt").exists() and (tmp_path / "labels" / "c1" / "0.pt").exists()
