"""The checks that depend on the device, for a GPU: ``pytest -m cuda`` (``benchmarks/gpu_check.sh`` runs them).

``make test`` leaves them out (``-m "not cuda"`` in the pytest settings). ``REPAVIT_TEST_DEVICE=cpu``
runs the same checks on the CPU, which is what ``gpu_check.sh --dry-run`` does in CI, so the file
keeps working between the rare sessions that have a GPU. Without a GPU and without that variable
each test is skipped with the reason.

On CUDA, TF32 is turned off for the fp32 checks: with it, matmuls round to 10-bit mantissas and an
fp32 comparison measures TF32, not the fold.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import repavit
from repavit.layers.idle_mlp import FusedIdleMlp
from repavit.measure import inference_precision
from repavit.train.engine import Precision

from helpers import randomize_bn, randomize_params, rel_err

pytestmark = pytest.mark.cuda
DEVICE = torch.device(os.environ.get("REPAVIT_TEST_DEVICE", "cuda"))

# name -> (small kwargs, input size)
CASES = {
    "RePaViT_Tiny": (dict(depth=3), 32),
    "RePaSwin_Tiny": (dict(window_size=2, embed_dim=24), 64),
    "RePaPoolformer_s12": (dict(embed_dims=(8, 16, 24, 32)), 64),
    "RePaMlpMixer_s16": (dict(embed_dim=32, depth=3), 64),
    "RePaLVViT_S": (dict(depth=2, embed_dim=48, num_heads=2), 64),
}
HALF_TOL = {"fp16": 2e-2, "bf16": 6e-2}  # relative to the largest logit, against the fp32 training form


@pytest.fixture(autouse=True)
def no_tf32():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here (REPAVIT_TEST_DEVICE=cpu runs these checks on the CPU)")
    if DEVICE.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model(name: str, num_classes: int = 10) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs, size = CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size, num_classes=num_classes, **kwargs)
    randomize_params(randomize_bn(model), std=0.02)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model.to(DEVICE), x.to(DEVICE)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reparam_is_exact_in_fp32(name):
    model, x = _model(name)
    model.eval()
    fused = repavit.reparameterize_model(model)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < 2e-5


@pytest.mark.parametrize("mode", sorted(HALF_TOL))
@pytest.mark.parametrize("name", sorted(CASES))
def test_reparam_under_half_precision(name, mode):
    model, x = _model(name)
    model.eval()
    fused = repavit.reparameterize_model(model)
    with torch.no_grad():
        ref = model(x)
        with inference_precision(mode, DEVICE):
            train_half, fused_half = model(x), fused(x)
    assert fused_half.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    assert rel_err(fused_half.float(), ref) < HALF_TOL[mode]
    assert rel_err(train_half.float(), ref) < HALF_TOL[mode]


@pytest.mark.parametrize("mode", sorted(HALF_TOL))
def test_fused_ffn_under_autocast(mode):
    model, _ = _model("RePaViT_Tiny")
    fused = repavit.reparameterize_model(model.eval())
    ffn = next(m for m in fused.modules() if isinstance(m, FusedIdleMlp))
    x = torch.randn(2, 17, ffn.in_features if hasattr(ffn, "in_features") else 192, device=DEVICE)
    with torch.no_grad():
        ref = ffn(x)
        with torch.autocast(DEVICE.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[mode]):
            y = ffn(x)
    assert y.dtype != torch.float32 and y.shape == ref.shape
    assert rel_err(y.float(), ref) < HALF_TOL[mode]


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_training_step(name, mode):
    model, x = _model(name)
    model.train()
    y = torch.arange(x.shape[0], device=DEVICE) % 10
    precision = Precision(mode, DEVICE)
    assert (precision.scaler is not None) == (mode == "fp16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(3):
        with precision.autocast():
            loss = F.cross_entropy(model(x), y)
        precision.backward(loss)
        precision.step(opt, list(model.parameters()), clip_grad=1.0)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any(k.endswith("running_mean") for k in changed), "BatchNorm statistics were not updated"
    assert precision.skipped < 3, "every fp16 step was skipped"
    assert len([k for k in changed if not k.endswith(("running_mean", "running_var"))]) > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_one_process_group_with_sync_bn_resumes(tmp_path):
    """torchrun with one process and an explicit backend: a process group (nccl on CUDA), DDP and
    SyncBatchNorm (CUDA only: torch's SyncBatchNorm has no CPU kernel), two epochs with a resume."""
    cuda = DEVICE.type == "cuda"
    args = [
        "-m", "repavit", "train", "--model", "RePaViT_Tiny", "--model_kwargs", "depth=2", "embed_dim=32",
        "num_heads=2", "patch_size=8", "--input_size", "32", "--channel_idle", "--feature_norm", "BatchNorm",
        "--data_set", "SYNTH", "--synthetic_train_size", "64", "--synthetic_val_size", "16", "--batch_size", "16",
        "--num_workers", "0", "--device", str(DEVICE), "--dist_backend", "nccl" if cuda else "gloo",
        "--output_dir", str(tmp_path), *(["--sync_bn"] if cuda else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume", "auto"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={_free_port()}", *args, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["effective"]["backend"] == ("nccl" if cuda else "gloo")
    assert summary["effective"]["launcher"] == "torchrun" and summary["effective"]["sync_bn"] == cuda
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r.get("epoch", r.get("event")) for r in rows] == [0, "resumed", 1]


def test_onnx_export_of_a_device_model(tmp_path):
    pytest.importorskip("onnxruntime", reason="the ONNX extra is not installed")
    from repavit.export import export_onnx
    from repavit.export.onnx import verify_onnx

    model, x = _model("RePaViT_Tiny")
    fused = repavit.reparameterize_model(model.eval())
    path = export_onnx(fused, tmp_path / "m.onnx", (3, 32, 32))
    with torch.no_grad():
        report = verify_onnx(path, fused, [x.cpu()], rtol=1e-4)
    assert report["max_rel_diff"] < 1e-4
    assert next(fused.parameters()).device.type == DEVICE.type  # the export left the model where it was
