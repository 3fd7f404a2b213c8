"""Dense prediction: backbones, detectors and the segmenter, the fold's exactness, metrics, and the CLI end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import repavit
from repavit.cli.main import main as cli
from repavit.data.dense import write_dense_set
from repavit.dense.backbone import DenseBackbone, build_backbone
from repavit.dense.detectors import DetectorConfig, build_detector, detector_backbone
from repavit.dense.metrics import coco_evaluate, confusion_matrix, segmentation_scores
from repavit.dense.segmenter import SegmenterConfig, build_segmenter
from repavit.errors import UserError

from helpers import randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

SWIN = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))
TINY = {
    "RePaSwin_Tiny": SWIN,
    "RePaPoolformer_s12": dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32)),
    "RePaViT_Small": dict(depth=2, embed_dim=48, num_heads=2, img_size=96),
}


@pytest.mark.parametrize("name", list(TINY))
def test_backbone_levels_and_frozen_statistics(name):
    bb = build_backbone(name, model_kwargs=TINY[name])
    assert bb.strides == [4, 8, 16, 32]
    maps = bb(torch.rand(2, 3, 96, 96))
    assert [tuple(m.shape) for m in maps.values()] == [
        (2, c, 96 // s, 96 // s) for c, s in zip(bb.out_channels, bb.strides)
    ]
    bns = [m for m in bb.body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns, "a RePa backbone has FFN BatchNorms"
    before = [m.running_mean.clone() for m in bns]
    bb.train()  # frozen (the default): training mode leaves the statistics alone
    bb(torch.rand(2, 3, 96, 96)).popitem()[1].sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert all(p.grad is not None for m in bns for p in (m.weight, m.bias))  # the affine weights still learn
    trained = DenseBackbone(bb.body, bb.family, bn="train").train()
    trained(torch.rand(2, 3, 96, 96))
    assert not all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))


@pytest.mark.parametrize("name", ["RePaSwin_Tiny", "RePaViT_Small"])
def test_imagenet_checkpoint_loads_into_the_backbone_through_its_record(tmp_path, name):
    from repavit.models import record_of, save_checkpoint

    kwargs = {**TINY[name], "num_classes": 7}
    if name == "RePaViT_Small":
        kwargs["img_size"] = 64  # a detector's ViT takes another size: the position embedding is resampled
    cls = randomize_bn(repavit.create_model(name, **kwargs))
    save_checkpoint(tmp_path / "cls.pth", cls.state_dict(), record_of(cls, name))
    given = {"img_size": 96} if name == "RePaViT_Small" else {}  # the rest comes from the record
    bb = build_backbone(name, pretrained=str(tmp_path / "cls.pth"), model_kwargs=given)
    ref = cls.state_dict()
    for key, value in bb.body.state_dict().items():
        if key == "pos_embed":
            assert value.shape[1] == 1 + (96 // 16) ** 2 and ref[key].shape[1] == 1 + (64 // 16) ** 2
        else:
            assert torch.equal(value, ref[key]), key
    assert bb.body.num_classes == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(clip_grad=-1.0), "--clip-grad"),
        (dict(ema_decay=1.0), "--model-ema-decay"),
        (dict(workers=-1), "--workers"),
        (dict(epochs=0), "--epochs"),
        (dict(warmup_ratio=0.0), "--warmup-ratio"),
    ],
)
def test_schedule_refuses_bad_values(bad, match):
    from repavit.dense.engine import Schedule

    with pytest.raises(UserError, match=match):
        Schedule(**bad)


def test_lr_schedule_warms_up_then_steps():
    from repavit.dense.engine import Schedule, lr_factor

    s = Schedule(epochs=12, lr_steps=(8, 11), warmup_iters=10, warmup_ratio=0.001)
    assert lr_factor(0, 100, s) == pytest.approx(0.001)
    assert lr_factor(5, 100, s) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, 100, s) == 1.0
    assert lr_factor(799, 100, s) == 1.0 and lr_factor(800, 100, s) == pytest.approx(0.1)
    assert lr_factor(1100, 100, s) == pytest.approx(0.01)


def test_backbone_refusals():
    with pytest.raises(UserError, match="no dense-prediction backbone"):
        build_backbone("RePaMlpMixer_s16")
    with pytest.raises(UserError, match="BatchNorm mode"):
        build_backbone("RePaSwin_Tiny", bn="maybe", model_kwargs=SWIN)
    with pytest.raises(UserError, match="unknown detector"):
        DetectorConfig("yolo", "RePaSwin_Tiny", 3)
    with pytest.raises(UserError, match="multiple of 32"):
        DetectorConfig("retinanet", "RePaViT_Small", 3, min_size=100, max_size=200)
    with pytest.raises(UserError, match="fpn_channels"):
        DetectorConfig("retinanet", "RePaSwin_Tiny", 3, fpn_channels=0)


def _folded_pair(model: torch.nn.Module, backbone_of) -> tuple[torch.nn.Module, torch.nn.Module]:
    randomize_bn(backbone_of(model).body, seed=3)  # default statistics would hide a folding bug
    model.eval()
    fused = copy.deepcopy(model)
    backbone_of(fused).reparameterize()
    assert backbone_of(fused).reparameterized and not backbone_of(model).reparameterized
    return model, fused


@pytest.mark.parametrize("kind", ["retinanet", "maskrcnn", "fcos"])
def test_reparameterized_detector_gives_the_same_detections(kind):
    torch.manual_seed(0)
    cfg = DetectorConfig(kind, "RePaSwin_Tiny", 3, min_size=96, max_size=96, fpn_channels=32, model_kwargs=SWIN)
    model, fused = _folded_pair(build_detector(cfg).double(), detector_backbone)
    for m in (model, fused):  # keep every candidate box, so there is a ranking to compare
        head = getattr(m, "roi_heads", m)
        head.score_thresh, head.detections_per_img = 0.0, 30
    images = [torch.rand(3, 96, 96, dtype=torch.float64), torch.rand(3, 80, 100, dtype=torch.float64)]
    with torch.no_grad():
        ref, out = model(images), fused(images)
    for a, b in zip(ref, out):
        assert len(a["boxes"]) > 10
        assert torch.equal(a["labels"], b["labels"])  # same detections in the same score order
        assert torch.allclose(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-4 * float(a["boxes"].abs().max()))
        assert torch.allclose(a["scores"], b["scores"], rtol=1e-4, atol=0)
        if kind == "maskrcnn":
            assert torch.equal(a["masks"] > 0.5, b["masks"] > 0.5)


@pytest.mark.parametrize("inference", ["whole", "slide"])
def test_reparameterized_segmenter_gives_the_same_map(inference):
    torch.manual_seed(0)
    cfg = SegmenterConfig(
        "RePaSwin_Tiny", 5, channels=16, crop_size=64, stride=40, inference=inference, model_kwargs=SWIN
    )
    model, fused = _folded_pair(build_segmenter(cfg).double(), lambda m: m.backbone)
    image = torch.rand(3, 72, 100, dtype=torch.float64)
    a, b = model.predict(image), fused.predict(image)
    assert a.shape == (5, 72, 100)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-10
    assert torch.equal(a.argmax(0), b.argmax(0))
    f32 = copy.deepcopy(model).float(), copy.deepcopy(fused).float()
    x = image.float()
    assert float((f32[0].predict(x) - f32[1].predict(x)).abs().max() / a.abs().max()) < 1e-4


def test_sliding_window_covers_the_image_and_equals_whole_on_one_window():
    torch.manual_seed(0)
    cfg = SegmenterConfig(
        "RePaSwin_Tiny", 3, channels=16, crop_size=64, stride=64, inference="slide", model_kwargs=SWIN
    )
    model = build_segmenter(cfg).eval()
    image = torch.rand(3, 64, 64)
    whole = model(image[None])[0]
    assert torch.allclose(model.predict(image), whole, atol=1e-6)  # one window = the whole image
    assert torch.isfinite(model.predict(torch.rand(3, 70, 150))).all()  # every pixel got a window


def test_coco_ap_of_perfect_and_of_no_detections(tmp_path):
    write_dense_set(tmp_path, layout="coco", num_train=2, num_val=4, image_size=96, num_classes=3)
    gt = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    file = tmp_path / "annotations" / "instances_val.json"
    assert coco_evaluate(file, perfect, ["bbox"])["bbox"]["AP"] == pytest.approx(1.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]} for r in perfect]  # IoU 0
    assert coco_evaluate(file, shifted, ["bbox"])["bbox"]["AP"] == 0.0
    assert coco_evaluate(file, [], ["bbox", "segm"])["segm"]["AP"] == 0.0


def test_segmentation_scores_by_hand():
    label = torch.tensor([[0, 0, 1, 255], [1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 0], [1, 1, 2, 0]])
    conf = confusion_matrix(pred, label, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    s = segmentation_scores(conf)
    assert s["aAcc"] == pytest.approx(5 / 7)
    assert s["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert s["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    with pytest.raises(UserError, match="holds class 5"):
        confusion_matrix(pred, torch.full_like(label, 5), 3)


def _swin_flags() -> list[str]:
    return ["--model", "RePaSwin_Tiny", "--model-kwargs", "embed_dim=24", "depths=1,1,1,1", "num_heads=1,2,3,4"]


TRAIN = ["--epochs", "1", "--batch-size", "2", "--warmup-iters", "2", "--workers", "0", "--log-freq", "100"]


@pytest.mark.parametrize("detector", ["retinanet", "maskrcnn"])
def test_detect_cli_train_eval_reparam_predict(tmp_path, capsys, detector):
    data, run = tmp_path / "data", tmp_path / "run"
    assert cli(["detect", "data", str(data), "--num-train", "4", "--num-val", "2", "--image-size", "96"]) == 0
    (data / "train" / "000002.jpg").write_bytes(b"not a jpeg")  # one bad image must not stop the epoch
    args = [
        "detect",
        "train",
        "--data",
        str(data),
        "--detector",
        detector,
        *_swin_flags(),
        "--min-size",
        "96",
        "--max-size",
        "96",
        "--fpn-channels",
        "16",
        "--output-dir",
        str(run),
        *TRAIN,
    ]
    assert cli(args) == 0
    assert "bbox: AP" in capsys.readouterr().out
    ckpt = run / "checkpoint.pth"
    assert cli(["detect", "eval", str(ckpt), "--data", str(data)]) == 0
    assert cli(["detect", "eval", str(ckpt), "--data", str(data), "--reparam"]) == 0
    plain, folded = (json.loads((run / n).read_text()) for n in ("eval.json", "eval_reparam.json"))
    assert folded["reparameterized"] and not plain["reparameterized"]
    assert folded["detections"] == plain["detections"]
    for iou in ("bbox", "segm") if detector == "maskrcnn" else ("bbox",):
        assert folded[iou]["AP"] == pytest.approx(plain[iou]["AP"], abs=1e-3)
    assert cli(["detect", "predict", str(ckpt), str(data / "val"), "-o", str(tmp_path / "pred"), "--reparam"]) == 0
    rows = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(rows) == 2 and all((tmp_path / "pred" / f"{r['image'].split('/')[-1][:-4]}.png").is_file() for r in rows)
    assert cli([*args[: -len(TRAIN)], *TRAIN, "--batch-size", "10", "--output-dir", str(tmp_path / "r2")]) == 2
    assert "fewer than --batch-size 10" in capsys.readouterr().err  # 4 images cannot make a batch of 10
    assert cli(args) == 2  # a second run into the same folder is refused in one line
    assert "holds a run" in capsys.readouterr().err
    assert cli([*args, "--resume", "auto"]) == 0  # the finished run: nothing left to train
    assert cli(["segment", "eval", str(ckpt), "--data", str(data)]) == 2
    assert "not a segmentation one" in capsys.readouterr().err
    other = tmp_path / "other"  # another class list: scoring against it would map categories wrongly
    write_dense_set(other, layout="coco", num_train=1, num_val=1, image_size=96, num_classes=2)
    assert cli(["detect", "eval", str(ckpt), "--data", str(other)]) == 2
    assert "has 2 categories" in capsys.readouterr().err


def test_segment_cli_train_eval_reparam(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert cli(["segment", "data", str(data), "--num-train", "4", "--num-val", "2", "--image-size", "96"]) == 0
    args = [
        "segment",
        "train",
        "--data",
        str(data),
        *_swin_flags(),
        "--crop-size",
        "64",
        "--channels",
        "16",
        "--output-dir",
        str(run),
        *TRAIN,
        "--epochs",
        "2",
    ]
    assert cli(args) == 0
    assert "mIoU" in capsys.readouterr().out
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "mIoU" in log[-1]
    ckpt = run / "checkpoint.pth"
    assert cli(["segment", "eval", str(ckpt), "--data", str(data)]) == 0
    assert cli(["segment", "eval", str(ckpt), "--data", str(data), "--reparam"]) == 0
    plain, folded = (json.loads((run / n).read_text()) for n in ("eval.json", "eval_reparam.json"))
    assert folded["mIoU"] == pytest.approx(plain["mIoU"], abs=1e-6)
    assert folded["aAcc"] == pytest.approx(plain["aAcc"], abs=1e-6)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["record"]["model_name"] == "RePaSwin_Tiny" and raw["dense"]["task"] == "segmentation"
    other = [a if a != "16" else "32" for a in args]  # another head width: resuming must refuse it
    assert cli([*other, "--resume", "auto", "--epochs", "3"]) == 2
    assert "channels=16" in capsys.readouterr().err


@pytest.mark.slow  # ~20 s: a 2-process torchrun run
def test_torchrun_two_processes_train_and_score_every_image_once(tmp_path):
    """DDP training, then evaluation sharded over 2 processes: 3 images, none counted twice, the same score."""
    import subprocess
    import sys

    from test_distributed import free_port

    data, run = tmp_path / "data", tmp_path / "run"
    write_dense_set(data, layout="coco", num_train=4, num_val=3, image_size=96, num_classes=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "repavit", "detect", "train", "--data", str(data), *_swin_flags(),
           "--min-size", "96", "--max-size", "96", "--fpn-channels", "16", "--output-dir", str(run), *TRAIN,
           "--batch-size", "1"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["images"] == 3
    assert cli(["detect", "eval", str(run / "checkpoint.pth"), "--data", str(data)]) == 0  # one process
    single = json.loads((run / "eval.json").read_text())
    assert single["detections"] == summary["metrics"]["detections"]
    assert single["bbox"]["AP"] == pytest.approx(summary["metrics"]["bbox"]["AP"], abs=1e-9)
