"""The training-step benchmark (`repavit bench --train-step --breakdown --train-compile`) and `--compile`
training. torch.compile runs with the ``aot_eager`` backend here: the same graph capture, wrappers and
autograd plumbing as inductor, without minutes of CPU code generation."""

from __future__ import annotations

import json
import shlex

import pytest
import timm
import torch

import repavit
from repavit.bench.train_step import _group, saved_for_backward_mb, train_step_breakdown
from repavit.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = (
    "--model RePaViT_Tiny --model_kwargs depth=2 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 "
    "--channel_idle --feature_norm BatchNorm --num_workers 0 --device cpu --data_set SYNTH "
    "--synthetic_train_size 64 --synthetic_val_size 16 --batch_size 16 --sched step --decay_epochs 100"
)


@pytest.fixture
def fast_compile(monkeypatch):
    calls = []
    real = torch.compile

    def compile_(model, **kwargs):
        calls.append(type(model).__name__)
        return real(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_)
    return calls


def test_operator_groups():
    assert _group("aten::addmm") == _group("aten::mm") == _group("aten::bmm") == "gemm"
    assert _group("aten::native_batch_norm_backward") == _group("aten::batch_norm") == "batch_norm"
    assert _group("aten::native_layer_norm") == "layer_norm" and _group("aten::gelu_backward") == "gelu"
    assert _group("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert _group("aten::something_new") == "other"


def test_breakdown_sums_the_step_and_saved_memory_grows_with_the_batch():
    torch.manual_seed(0)
    model = timm.create_model("RePaViT_Tiny", img_size=32, depth=1, num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    out = train_step_breakdown(step)
    assert out["gemm"] > 0 and out["batch_norm"] > 0
    assert out["total_ms"] == pytest.approx(sum(v for k, v in out.items() if k != "total_ms"))
    small, big = (saved_for_backward_mb(model, b, 32, torch.device("cpu")) for b in (2, 8))
    assert 0 < small < big


def test_bench_train_step_with_breakdown_and_compiled_forms(tmp_path, fast_compile):
    from repavit.bench.suite import format_entry, run_suite

    out = tmp_path / "b.json"
    # 4 images of 17 tokens at width 32: enough tokens for the covariance path to pay
    res = run_suite(["RePaViT_Tiny"], ["vanilla", "train"], batch_size=2, img_size=64, rounds=1, iters=1, warmup=0,
                    latency=False, train_step=True, train_batch_size=4, breakdown=True, train_compile=True,
                    output=out, depth=1, embed_dim=32, num_heads=2)  # fmt: skip
    entry = res["models"]["RePaViT_Tiny"]
    assert json.loads(out.read_text())["models"]["RePaViT_Tiny"]["train_step_ratios"] == entry["train_step_ratios"]
    forms = {"vanilla", "train", "train_explicit", "train_split", "masked"}
    assert set(entry["train_step_s"]) == forms | {"vanilla_compiled", "train_compiled"}
    assert {"train/vanilla", "train_compiled/vanilla_compiled"} <= set(entry["train_step_ratios"])
    assert set(entry["train_step_breakdown_ms"]) == forms
    saved = entry["train_saved_for_backward_mb"]
    assert all(v > 0 for v in saved.values())
    # the covariance path keeps no idle channel for backward, the one-node explicit one no BN2 output
    assert saved["train"] < saved["train_explicit"] < saved["train_split"]
    assert fast_compile.count("VisionTransformer") == 1 and fast_compile.count("RePaViT") == 1
    assert "train step breakdown train:" in format_entry("RePaViT_Tiny", entry)


def test_bench_cli_takes_the_train_step_flags():
    from repavit.cli.main import build_parser

    args = build_parser().parse_args(shlex.split("bench --train-step --breakdown --train-compile --amp bf16"))
    assert args.train_step and args.breakdown and args.train_compile and args.amp == "bf16"


def test_compiled_training_keeps_plain_checkpoints_and_updates_the_ema(tmp_path, fast_compile):
    assert main(shlex.split(f"train {TINY} --epochs 1 --compile --output_dir {tmp_path}")) == 0
    assert fast_compile == ["RePaViT"]
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert not [k for k in (*ckpt["model"], *ckpt["model_ema"]) if "_orig_mod" in k]
    assert not all(torch.equal(ckpt["model"][k], ckpt["model_ema"][k]) for k in ckpt["model"])
    loaded = repavit.models.load_model(tmp_path / "checkpoint.pth", reparameterized=True)
    assert loaded.record.model_name == "RePaViT_Tiny"
    # the same run eager starts from the same weights and moves the same way (compiled = eager numerics here)
    eager = tmp_path / "eager"
    assert main(shlex.split(f"train {TINY} --epochs 1 --output_dir {eager}")) == 0
    ref = torch.load(eager / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    worst = max((ckpt["model"][k] - ref[k]).abs().max().item() for k in ref if ref[k].is_floating_point())
    assert worst < 1e-4
