"""The GPU recipe's paths that a CPU can run: fp16 with a gradient scaler, bf16, half-precision inference
with the flash attention kernel, channels-last, and the device checks under a faked CUDA state.

`tests/test_cuda.py` (marker ``cuda``) repeats the device-dependent checks on a GPU, and on CPU in
``benchmarks/gpu_check.sh --dry-run``.
"""

from __future__ import annotations

import json
import shlex

import pytest
import timm
import torch
import torch.nn.functional as F

import repavit
from repavit.cli.main import main
from repavit.errors import ArgumentError
from repavit.measure import attention_kernels, check_device, inference_precision
from repavit.train.distributed import resolve_device
from repavit.train.engine import Precision

from helpers import randomize_bn

TINY = (
    "--model RePaViT_Tiny --model_kwargs depth=2 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 "
    "--channel_idle --feature_norm BatchNorm --num_workers 0 --device cpu --data_set SYNTH "
    "--synthetic_train_size 96 --synthetic_val_size 16 --batch_size 16 --opt adamw --lr 1e-3 --warmup_epochs 0 "
    "--sched step --decay_epochs 100"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(cmd: str) -> int:
    return main(shlex.split(cmd))


# ---- fp16 with the gradient scaler on CPU -------------------------------------------------------------
def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("RePaViT_Tiny", depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32,
                             num_classes=4)  # fmt: skip


def _scaled_step(precision: Precision, model, opt, poison: bool) -> None:
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with precision.autocast():
        out = model(x)
        assert out.dtype == torch.float16
        loss = F.cross_entropy(out.float(), y)
    precision.backward(loss)
    if poison:
        model.head.weight.grad[0, 0] = float("inf")
    precision.step(opt, list(model.parameters()), clip_grad=1.0)
    opt.zero_grad(set_to_none=True)


def test_fp16_scaler_on_cpu_skips_an_inf_step_and_halves_the_scale():
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision("fp16", torch.device("cpu"))
    assert precision.scaler is not None and precision.scaler.is_enabled()
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # small: ordinary steps do not overflow
    before = [p.detach().clone() for p in model.parameters()]
    _scaled_step(precision, model, opt, poison=True)
    assert precision.skipped == 1 and precision.scaler.get_scale() == 2.0**7
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "the inf step changed weights"
    _scaled_step(precision, model, opt, poison=False)
    assert precision.skipped == 1 and precision.scaler.get_scale() == 2.0**7
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "a finite step did nothing"


def test_precision_modes():
    assert Precision("auto", torch.device("cpu")).mode == "off"
    assert Precision("bf16", torch.device("cpu")).scaler is None
    with pytest.raises(ArgumentError, match="is not a precision"):
        Precision("fp8", torch.device("cpu"))


def _weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt, ckpt["model"]


def test_fp16_training_on_cpu_resumes_bit_identically_with_the_scaler_state(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    assert cli(f"train {TINY} --amp fp16 --epochs 2 --output_dir {full}") == 0
    assert cli(f"train {TINY} --amp fp16 --epochs 1 --output_dir {half}") == 0
    first, _ = _weights(half / "checkpoint.pth")
    assert first["scaler"]["_growth_tracker"] == 96 // 16, "the checkpoint does not hold the scaler after training"
    assert cli(f"train {TINY} --amp fp16 --epochs 2 --resume auto --output_dir {half}") == 0
    a, wa = _weights(full / "checkpoint.pth")
    b, wb = _weights(half / "checkpoint.pth")
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 2 * 96 // 16  # restored, not reset
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "fp16 resume is not bit-identical"
    rows = [json.loads(line) for line in (full / "log.txt").read_text().splitlines()]
    # the log counts skipped updates (none here: this model's gradients do not overflow at 2**16)
    assert rows[0]["train_skipped_updates"] == 0 and rows[0]["train_loss_scale"] == first["scaler"]["scale"]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["effective"]["amp"] == "fp16"


# ---- half-precision inference ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_inference_precision_autocasts_and_uses_the_flash_kernel(mode):
    model = randomize_bn(_tiny_model()).eval()
    fused = repavit.reparameterize_model(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with inference_precision(mode, "cpu"):
            y = fused(x)
            kernels = attention_kernels(lambda: fused(x))
    assert y.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    assert (y.float() - ref).abs().max() / ref.abs().max() < 3e-2
    assert any("flash" in k for k in kernels), kernels


def test_speed_test_in_bf16_with_channels_last_writes_its_result(tmp_path, capsys):
    cmd = (
        "speed --model RePaPoolformer_s12 --model_kwargs embed_dims=8,16,24,32 --input_size 64 --device cpu "
        f"--amp bf16 --channels_last --speed_batch_size 2 --speed_iters 1 --output_dir {tmp_path}"
    )
    assert cli(cmd) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["precision"] == "bf16" and result["speedup_reparam_over_train"] > 0
    assert "bf16 autocast" in capsys.readouterr().out


# ---- channels-last ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("RePaPoolformer_s12", dict(embed_dims=(8, 16, 24, 32)), 64),
        ("RePaLVViT_S", dict(depth=2, embed_dim=48, num_heads=2), 64),
    ],
)
def test_channels_last_gives_the_same_outputs(name, kwargs, size):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, img_size=size, **kwargs)).eval()
    fused = repavit.reparameterize_model(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = fused(x)
        y = fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_training_with_channels_last(tmp_path):
    cmd = (
        "train --model RePaPoolformer_s12 --model_kwargs embed_dims=8,16,24,32 layers=1,1,1,1 --input_size 32 "
        "--channel_idle --num_workers 0 --device cpu --data_set SYNTH --synthetic_train_size 32 "
        f"--synthetic_val_size 8 --batch_size 8 --epochs 1 --channels_last --reparam --output_dir {tmp_path}"
    )
    assert cli(cmd) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_reparam"]["acc1"] == pytest.approx(summary["final"]["acc1"])


# ---- devices, with a faked CUDA state --------------------------------------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch):
    """Two pretend GPUs: availability and count are faked, set_device is recorded."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    return chosen


def test_device_selection_with_gpus(fake_cuda):
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)  # local rank modulo the GPUs
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert fake_cuda == [torch.device("cuda", i) for i in (0, 1, 1)]
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ArgumentError, match=r"has 2 CUDA GPU\(s\), numbered 0 to 1"):
        resolve_device("cuda:2")
    assert Precision("auto", torch.device("cuda", 0)).mode == "fp16"


def test_device_selection_without_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ArgumentError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    for bad in ("gpu", "cuda:x"):
        with pytest.raises(ArgumentError, match="is not a device: expected cpu, cuda or cuda:N"):
            check_device(bad)


@pytest.mark.parametrize(
    "cmd",
    [
        "bench --models RePaViT_Tiny --device cuda",
        "predict --model RePaViT_Tiny --pretrained --device cuda x.jpg",
        f"train {TINY.replace('--device cpu', '--device cuda')} --output_dir OUT",
    ],
)
def test_cuda_without_a_gpu_is_one_line(cmd, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli(cmd.replace("OUT", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda was asked for but no CUDA GPU is available" in err[0], err
    assert not (tmp_path / "o").exists()


def test_cpu_training_does_not_warn(tmp_path, recwarn):
    """No pin-memory or non-blocking warnings on a CPU run."""
    assert cli(f"train {TINY} --epochs 1 --output_dir {tmp_path}") == 0
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "pin" in m.lower() or "non_blocking" in m.lower()], messages
