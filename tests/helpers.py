"""Shared test utilities: random BatchNorm statistics and reparameterization checks."""

from __future__ import annotations

import copy

import torch
from torch import nn

import repavit


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (in place).

    Default statistics (mean 0, var 1, gamma 1, beta 0) make BatchNorm nearly the identity and hide
    folding bugs; these do not.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.copy_(1.0 + torch.randn(n, generator=g) * 0.2)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


@torch.no_grad()
def randomize_params(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Perturb every floating parameter (biases and layer scales included) so nothing is trivially zero/one."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def reparam_error(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative max error between eval-mode training form and its reparameterized copy."""
    model = copy.deepcopy(model).to(dtype).eval()
    x = x.to(dtype)
    ref = model(x)
    fused = repavit.reparameterize_model(model)
    return rel_err(fused(x), ref)


def run_isolated(test_file: str, name: str) -> bool:
    """Run test ``name`` of ``test_file`` in a fresh process: True here, in the parent (the child passed);
    False in that process, which then runs the test's body.

    Run in one long pytest process, the runtime tests (OpenVINO, ONNX Runtime's quantizer) left it
    crashing with a segmentation fault minutes later in an unrelated test (reproduced; never without them).
    """
    import os
    import subprocess
    import sys

    if os.environ.get("REPAVIT_TEST_ISOLATED") == name:
        return False
    env = {**os.environ, "REPAVIT_TEST_ISOLATED": name}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{test_file}::{name}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return True
