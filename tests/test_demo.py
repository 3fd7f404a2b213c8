"""`python -m repavit.demo --quick`: real digits, trained, evaluated, reparameterized, timed, reported."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from repavit.demo import main, write_digits


def test_write_digits_is_a_stratified_image_folder(tmp_path):
    from sklearn.datasets import load_digits

    counts = write_digits(tmp_path, size=16)
    assert counts == {"train": 1437, "val": 360}
    totals = np.bincount(load_digits().target)  # 174 to 183 scans per digit
    per_split = {}
    for split, n in counts.items():
        classes = sorted(p.name for p in (tmp_path / split).iterdir())
        assert classes == [str(d) for d in range(10)]
        per_split[split] = np.array([len(list((tmp_path / split / c).glob("*.png"))) for c in classes])
        assert per_split[split].sum() == n
    assert np.array_equal(per_split["train"] + per_split["val"], totals)
    assert np.abs(per_split["val"] - 0.2 * totals).max() <= 1  # stratified: 20% of every digit
    img = Image.open(next((tmp_path / "val" / "0").glob("*.png")))
    assert img.size == (16, 16) and img.mode == "RGB"
    assert np.asarray(img).max() > 200  # ink is bright: the 0..16 scans were scaled to 0..255


def test_quick_demo_learns_and_reports(tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        assert main(["--output-dir", str(tmp_path), "--quick", "--threads", "1", "--speed-batch-size", "64"]) == 0
    finally:
        torch.set_num_threads(n)
    report = json.loads((tmp_path / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["identical_after_reparam"]
    assert acc["reparameterized"]["acc1"] == acc["training_form"]["acc1"]
    assert acc["training_form"]["acc1"] >= 15.0  # 10 classes: chance is 10%; 3 epochs already learn
    assert report["logits"]["same_prediction"] == 1.0 and report["logits"]["max_rel_logit_diff"] < 1e-4
    cx = report["complexity"]
    assert cx["reparam"]["params_m"] < cx["train"]["params_m"] and cx["reparam"]["gmacs"] < cx["train"]["gmacs"]
    assert report["speed"]["speedup"] > 0 and len(report["speed"]["images_per_s"]["train"]) == 3
    assert len(report["history"]) == 3 and report["command"].startswith("repavit train ")
    for png in ("training_curves.png", "speed.png"):
        with Image.open(tmp_path / png) as im:
            assert im.size[0] > 800 and im.size[1] > 300
    assert f"report: {tmp_path / 'report.json'}" in capsys.readouterr().out
