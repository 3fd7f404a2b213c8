"""`repavit train | eval | speed` end to end, in-process through the real CLI, on small data."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import repavit
from repavit.cli.main import main
from repavit.cli.train import seed_main
from repavit.train.distributed import state_fingerprint

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--model RePaViT_Tiny --model_kwargs depth=2 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 "
    "--channel_idle --idle_ratio 0.75 --feature_norm BatchNorm --num_workers 0 --device cpu"
)
SYNTH = "--data_set SYNTH --synthetic_train_size 320 --synthetic_val_size 40 --batch_size 16"
# A recipe a 2-block model learns in a few epochs (the DeiT regularizers slow tiny runs down).
EASY = (
    "--opt adamw --lr 2e-3 --unscale_lr --warmup_epochs 0 --mixup 0 --cutmix 0 --aa none --reprob 0 --smoothing 0 "
    "--drop_path 0 --hflip 0 --model_ema_decay 0.9"
)
EPOCHS = 6


def cli(cmd: str, *extra: str) -> int:
    return main(shlex.split(cmd) + list(extra))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 6-epoch run, a checkpoint kept after every epoch."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    rc = cli(f"train {TINY} {SYNTH} {EASY} --epochs {EPOCHS} --save_freq 1 --output_dir {out} --reparam")
    torch.set_num_threads(n)
    assert rc == 0
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_writes_everything_and_learns(trained):
    names = {p.name for p in trained.iterdir()}
    expected = {"config.yaml", "log.txt", "summary.json", "checkpoint.pth", "best_checkpoint.pth"}
    expected |= {f"checkpoint_{e}epoch.pth" for e in range(1, EPOCHS + 1)} | {"checkpoint_reparam.pth"}
    assert names == expected, names ^ expected  # nothing else (no temporary files left)
    rows = [json.loads(line) for line in (trained / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert {"train_loss", "train_lr", "test_acc1", "test_acc5", "ema_test_acc1"} <= set(rows[0])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    assert max(r["test_acc1"] for r in rows) >= 25.0  # 10 classes: chance is 10%
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["final_reparam"]["acc1"] == summary["final"]["acc1"]
    assert summary["complexity"]["after"]["params_m"] < summary["complexity"]["before"]["params_m"]


def test_checkpoints_are_plain_and_weights_only_loadable(trained):
    ckpt = load(trained / "checkpoint.pth")  # weights_only=True: no pickled objects inside
    assert {"model", "model_ema", "optimizer", "lr_scheduler", "epoch", "config", "max_accuracy"} <= set(ckpt)
    assert "args" not in ckpt and ckpt["epoch"] == EPOCHS - 1 and ckpt["config"]["model"] == "RePaViT_Tiny"
    assert load(trained / "checkpoint_2epoch.pth")["epoch"] == 1
    best = load(trained / "best_checkpoint.pth")
    rows = [json.loads(line) for line in (trained / "log.txt").read_text().splitlines()]
    assert best["epoch"] == int(np.argmax([r["test_acc1"] for r in rows]))
    assert best["max_accuracy"] == max(r["test_acc1"] for r in rows)


def test_schedule_follows_warmup_and_cosine_per_update(tmp_path):
    # 4 epochs x 10 updates, 1 warmup epoch: lr after update u (timm's cosine, checked against the formula)
    out = tmp_path / "sched"
    cfg = f"{TINY} {SYNTH} --synthetic_train_size 160 --mixup 0 --cutmix 0 --aa none --no_model_ema"
    assert (
        cli(f"train {cfg} --epochs 4 --lr 1e-3 --min_lr 1e-5 --warmup_lr 1e-6 --warmup_epochs 1 --output_dir {out}")
        == 0
    )
    lrs = [json.loads(line)["train_lr"] for line in (out / "log.txt").read_text().splitlines()]
    scale = 16 / 1024  # lr * batch_size * world_size / 1024 (no --unscale_lr)
    lr, lo, warm = 1e-3 * scale, 1e-5 * scale, 1e-6 * scale
    updates, warm_u = 40, 10

    def expected(u):
        if u < warm_u:
            return warm + u * (lr - warm) / warm_u
        return lo + 0.5 * (lr - lo) * (1 + np.cos(np.pi * u / updates))

    assert lrs == pytest.approx([expected(10 * (e + 1)) for e in range(4)], rel=1e-6)


def test_resumed_run_ends_with_the_same_weights(trained, tmp_path):
    out = tmp_path / "resumed"
    rc = cli(
        f"train {TINY} {SYNTH} {EASY} --epochs {EPOCHS} --output_dir {out} --reparam "
        f"--resume {trained / 'checkpoint_3epoch.pth'}"
    )
    assert rc == 0
    a, b = load(trained / "checkpoint.pth"), load(out / "checkpoint.pth")
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    timeless = lambda text: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k not in ("train_images_per_s", "train_time_s")}
        for line in text.splitlines()
    ]
    rows = timeless((out / "log.txt").read_text())
    assert rows[0]["event"] == "resumed" and rows[0]["next_epoch"] == 3 and rows[0]["next_step"] == 0
    rows = rows[1:]
    assert [r["epoch"] for r in rows] == [3, 4, 5]  # only the remaining epochs ran
    assert rows == timeless((trained / "log.txt").read_text())[3:]


def test_eval_and_reparam_eval_agree_and_write_json(trained, tmp_path, capsys):
    ckpt = trained / "checkpoint.pth"
    args = f"{TINY} {SYNTH} --resume {ckpt} --output_dir {tmp_path}"
    assert cli(f"eval {args}") == 0
    assert cli(f"eval {args} --reparam") == 0
    assert cli(f"eval {args} --eval_ema") == 0
    assert cli(f"eval {TINY} {SYNTH} --resume {trained / 'checkpoint_reparam.pth'} --reparam") == 0
    out = capsys.readouterr().out
    plain, fused = (json.loads((tmp_path / n).read_text()) for n in ("eval.json", "eval_reparam.json"))
    assert plain["acc1"] == fused["acc1"] and plain["acc5"] == fused["acc5"]
    assert plain["loss"] == pytest.approx(fused["loss"], rel=1e-4)
    assert fused["params_m"] < plain["params_m"]
    final = json.loads((trained / "summary.json").read_text())
    assert plain["acc1"] == final["final"]["acc1"]
    assert json.loads((tmp_path / "eval_ema.json").read_text())["acc1"] == final["final_ema"]["acc1"]
    assert out.count(f"top-1 {plain['acc1']:.2f}%") >= 3  # the deploy checkpoint scores the same too
    assert "before reparameterization" in out and "after reparameterization" in out


def test_speed_test_of_trained_and_deployed_checkpoints(trained, capsys):
    assert cli(f"speed {TINY} --speed_batch_size 4 --speed_iters 1 --resume {trained / 'checkpoint.pth'}") == 0
    assert "reparameterized / training form =" in capsys.readouterr().out  # head size read from the checkpoint
    fused = trained / "checkpoint_reparam.pth"
    assert cli(f"speed {TINY} --speed_batch_size 4 --speed_iters 1 --resume {fused} --reparam") == 0
    out = capsys.readouterr().out
    assert out.count("inference_speed:") == 3 and "the checkpoint is reparameterized" in out
    assert cli(f"speed {TINY} --resume {fused}") == 2
    assert "holds reparameterized weights: add --reparam" in capsys.readouterr().err


def test_speed_test_prints_three_speeds_and_the_ratio(capsys):
    assert cli(f"speed {TINY} --speed_batch_size 8 --speed_iters 2 --reparam") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("inference_speed:")]
    assert len(lines) == 3 and all(float(line.split()[1]) > 0 for line in lines)
    assert "reparameterized / training form =" in out
    assert "before reparameterization:" in out and "after reparameterization:" in out


def test_without_ffn_flags_a_run_trains_the_foldable_form_and_says_so(tmp_path, capsys):
    cfg = f"--model RePaViT_Tiny --model_kwargs depth=1 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 {SYNTH}"
    assert cli(f"train {cfg} --epochs 1 --num_workers 0 --output_dir {tmp_path / 'a'}") == 0
    out = capsys.readouterr().out
    assert "idle_ratio=0.75, BatchNorm FFN" in out and "its FFNs fold after training" in out
    assert "after reparameterization" in out


def test_layernorm_model_trains_but_has_no_reparam_form(tmp_path, capsys):
    cfg = f"--model RePaViT_Tiny --model_kwargs depth=1 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 {SYNTH}"
    cfg += " --feature_norm LayerNorm"
    assert cli(f"train {cfg} --epochs 1 --num_workers 0 --output_dir {tmp_path}") == 0
    out = capsys.readouterr().out
    assert "no reparameterized form" in out and "no fold: its FFNs use LayerNorm" in out
    assert cli(f"speed {cfg} --speed_batch_size 4 --speed_iters 1") == 0


def test_every_hidden_path_trains_to_the_same_weights(tmp_path, monkeypatch):
    """--hidden_path split (the straightforward graph) and the default (the idle channels through the
    covariance of the tokens, which these 272-token batches take) end four SGD steps with the same weights
    and BatchNorm statistics; an unknown path is refused by the parser."""
    args = f"{TINY} {SYNTH} {EASY} --synthetic_train_size 64 --epochs 1 --no_model_ema --opt sgd --lr 0.5"
    import repavit.layers.idle_mlp as idle_mlp

    calls = {"auto": 0, "split": 0}
    states, real = {}, idle_mlp.covariance_hidden
    for path in ("auto", "split"):
        monkeypatch.setattr(
            idle_mlp, "covariance_hidden", lambda *a, p=path: calls.__setitem__(p, calls[p] + 1) or real(*a)
        )
        assert cli(f"train {args} --hidden_path {path} --output_dir {tmp_path / path}") == 0
        states[path] = load(tmp_path / path / "checkpoint.pth")["model"]
    assert calls == {"auto": 4 * 2, "split": 0}  # four steps, two blocks
    for k, v in states["split"].items():
        torch.testing.assert_close(states["auto"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    bn2 = "blocks.0.mlp.norm2"
    assert states["auto"][f"{bn2}.num_batches_tracked"] == 4  # four steps, the statistics moved from 0 and 1:
    assert states["auto"][f"{bn2}.running_mean"].abs().min() > 0 and (states["auto"][f"{bn2}.running_var"] != 1).all()
    with pytest.raises(SystemExit):
        cli(f"train {args} --hidden_path fast --output_dir {tmp_path / 'bad'}")


def test_gradient_accumulation_scales_lr_and_counts_updates(tmp_path):
    out = tmp_path / "acc"
    args = f"{TINY} {SYNTH} {EASY} --epochs 1 --accumulation_steps 4 --batch_size 8 --output_dir {out}"
    assert cli(f"train {args}") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["effective"]["lr"] == pytest.approx(2e-3 * 4)  # --unscale_lr, times accumulation
    assert summary["effective"]["updates_per_epoch"] == 320 // 8 // 4
    assert summary["effective"]["global_batch_size"] == 32


def test_bf16_autocast_on_cpu_and_clip_grad_and_bce(tmp_path):
    out = tmp_path / "bf16"
    args = f"{TINY} {SYNTH} --synthetic_train_size 64 --epochs 1 --amp bf16 --clip_grad 1.0 --bce_loss --opt sgd"
    assert cli(f"train {args} --lr 0.1 --output_dir {out}") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["effective"]["amp"] == "bf16" and np.isfinite(summary["final"]["loss"])


# ---- bad input: one line, exit code 2, nothing written ------------------------------------------------
def _image_folder(root: Path, classes=("a", "b"), n=4, size=32) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png"
                )
    return root


def _bad_cases(tmp: Path) -> dict[str, tuple[str, str]]:
    folder = _image_folder(tmp / "images")
    noimg = _image_folder(tmp / "noimg")
    (noimg / "train" / "c").mkdir()
    (noimg / "train" / "c" / "readme.txt").write_text("x")
    (tmp / "empty").mkdir()
    other = tmp / "other.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 64), "pos_embed": torch.zeros(1, 17, 64)}}, other)
    base = f"{TINY} --batch_size 4 --epochs 1"
    return {
        "missing folder": (f"train {base} --data_path {tmp / 'nowhere'}", "data folder not found"),
        "empty folder": (f"train {base} --data_path {tmp / 'empty'}", "is empty"),
        "class without images": (f"train {base} --data_path {noimg}", "class folder .*/c has no images"),
        "unknown model": (f"train --model RePaViT_Gigantic --data_path {folder}", "unknown model 'RePaViT_Gigantic'"),
        "checkpoint of another model": (
            f"eval {base} --data_path {folder} --resume {other}",
            "other.pth holds no channel-idle FFN: it is not a RePaViT_Tiny checkpoint",
        ),
        "resume of another model": (
            f"train {base} --data_path {folder} --resume {other}",
            "other.pth holds no channel-idle FFN: it is not a RePaViT_Tiny checkpoint",
        ),
        "missing checkpoint": (f"eval {base} --data_path {folder} --resume {tmp / 'x.pth'}", "checkpoint not found"),
        "reparam on LayerNorm": (
            f"eval {base} --feature_norm LayerNorm --reparam --data_path {folder}",
            "--reparam needs --feature_norm BatchNorm",
        ),
        "wandb without WANDB_MODE": (f"train {base} --data_path {folder} --wandb", "--wandb needs WANDB_MODE"),
        "odd batch with mixup": (f"train {base} --batch_size 5 --data_path {folder}", "even --batch_size"),
        "batch larger than data": (f"train {base} --batch_size 64 --data_path {folder}", "fewer than one update"),
    }


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cases = _bad_cases(tmp_path)
    for name, (cmd, needle) in cases.items():
        out_dir = tmp_path / f"out_{name.replace(' ', '_')}"
        rc = cli(cmd, "--output_dir", str(out_dir))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        assert len(err) == 1 and err[0].startswith("repavit "), (name, err)
        assert re.search(needle, err[0]), (name, err[0])
        assert not out_dir.exists(), name


def test_wandb_offline_logs_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    args = f"{TINY} {SYNTH} --synthetic_train_size 32 --epochs 2 --wandb --wandb_suffix smoke --output_dir {out}"
    assert cli(f"train {args}") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wandb_project"] == "RePaViT_Tiny_smoke"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


# ---- the seed README's commands, as written (paths, process count, batch size, epochs changed) ------
@pytest.mark.slow  # ~15-30 s: a subprocess, and RePaViT_Tiny at 224x224
def test_seed_commands_run(tmp_path, capsys):
    """The README's RePaViT-Base training command through the root main.py, then its evaluation (with and
    without --reparam) and speed-test commands through the same front end.

    Only paths, batch size and epochs differ from the README; the model is RePaViT_Tiny (the same code
    path as Base) so that the run stays small. torchrun itself is exercised in test_distributed.py.
    """
    data = _image_folder(tmp_path / "imagenet", n=2, size=48)
    out = tmp_path / "output"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    train = (
        f"--model=RePaViT_Tiny --batch_size=2 --epochs=1 --dist_eval --channel_idle --idle_ratio=0.75 "
        f"--feature_norm=BatchNorm --data_path={data} --output_dir={out} --lr=4e-3 --min_lr=4e-5 --warmup_lr=1e-6 "
        f"--warmup_epochs=20 --unscale_lr --weight_decay=0.05 --opt=lamb --drop_path=0.1 --num_workers=0"
    )
    r = subprocess.run(
        [sys.executable, "main.py", *shlex.split(train)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoint.pth").exists() and (out / "log.txt").exists()
    evaluate = (
        f"--model=RePaViT_Tiny --batch_size=2 --eval --dist_eval --channel_idle --idle_ratio=0.75 "
        f"--feature_norm=BatchNorm --data_path={data} --resume={out / 'checkpoint.pth'} --num_workers=0"
    )
    speed = "--model=RePaViT_Tiny --channel_idle --idle_ratio=0.75 --feature_norm=BatchNorm --test_speed"
    assert seed_main(shlex.split(evaluate)) == 0
    assert seed_main(shlex.split(evaluate + " --reparam")) == 0
    assert seed_main(shlex.split(speed + " --speed_batch_size=2 --speed_iters=1 --reparam")) == 0
    stdout = capsys.readouterr().out
    acc = [line for line in stdout.splitlines() if line.startswith("Accuracy of the network")]
    assert len(acc) == 2 and acc[0] == acc[1]  # identical accuracy after reparameterization
    assert stdout.count("inference_speed:") == 3


def test_fingerprint_matches_saved_weights(trained):
    ckpt = load(trained / "checkpoint.pth")
    model = repavit.create_model(
        "RePaViT_Tiny", img_size=32, depth=2, embed_dim=32, num_heads=2, patch_size=8, num_classes=10,
        channel_idle=True, feature_norm="BatchNorm", drop_path_rate=0.0,
    )  # fmt: skip
    model.load_state_dict(ckpt["model"])
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["rank_fingerprints"] == [state_fingerprint(model)]


def test_progress_logs_plain_lines_off_terminal_and_nothing_on_other_ranks(caplog):
    from repavit.train.progress import Progress

    caplog.set_level("INFO", logger="repavit.train.progress")
    p = Progress(5, "Epoch [1/2]", enabled=True, log_freq=2, use_bar=False)
    for _ in range(5):
        p.update(4, loss=1.5, lr=1e-4)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # steps 2, 4 and the last one
    assert lines[-1].startswith("Epoch [1/2] step 5/5") and "loss 1.5000" in lines[-1] and "lr 1.000e-04" in lines[-1]
    assert "img/s" in lines[-1] and "eta 0:00:00" in lines[-1]
    caplog.clear()
    quiet = Progress(5, "Epoch", enabled=False, log_freq=1, use_bar=False)
    for _ in range(5):
        quiet.update(4, loss=1.0)
    assert not caplog.records


def test_corrupt_image_is_skipped_counted_and_fatal_on_request(tmp_path, capsys):
    """One unreadable training image: the epoch completes, log.txt counts it; --fatal_bad_images stops."""
    folder = _image_folder(tmp_path / "images", n=6)
    bad = folder / "train" / "b" / "5.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    base = f"train {TINY} {EASY} --batch_size 4 --epochs 1 --data_path {folder}"
    out = tmp_path / "run"
    assert cli(base, "--output_dir", str(out)) == 0
    row = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert row["train_bad_images"] == 1 and row["test_bad_images"] == 0
    capsys.readouterr()
    rc = cli(base, "--fatal_bad_images", "--output_dir", str(tmp_path / "fatal"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "5.png" in err[0]
