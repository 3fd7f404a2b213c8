"""Every benchmarked path computes the same function (timings themselves live in the benchmark)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import repavit
from repavit.bench.reference import with_masked_ffn, with_three_linear_ffn

from helpers import randomize_bn, randomize_params, rel_err


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("RePaViT_Tiny", img_size=32, depth=3, heuristic="linear", num_classes=10)
    return randomize_params(randomize_bn(model), std=0.02)


def test_three_linear_reference_equals_fused(tiny):
    x = torch.randn(2, 3, 32, 32)
    fused = repavit.reparameterize_model(tiny)
    ref = with_three_linear_ffn(fused)
    with torch.no_grad():
        assert rel_err(ref(x), fused(x)) <= 1e-5


def test_masked_training_reference_has_same_outputs_and_gradients(tiny):
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ours = copy.deepcopy(tiny).double().train()
    ref = with_masked_ffn(ours).train()
    ya, yb = ours(x), ref(x)
    assert rel_err(ya, yb) <= 1e-12
    ya.square().sum().backward()
    yb.square().sum().backward()
    ga = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ga[name.replace(".m.", ".")].grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_ffn_gemm_flops_counts_the_class_token_block_once_per_image():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ffn_ceiling.py"
    spec = importlib.util.spec_from_file_location("ffn_ceiling", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fused = repavit.reparameterize_model(timm.create_model("RePaViT_Tiny", depth=3).eval())
    c, a, b, n = 192, 192, 4, 197  # idle 0.75: a = C; in_proj is C x (C + a), out_proj a x C
    per_token = 2 * (c * (c + a) + a * c)
    assert mod.ffn_gemm_flops(fused, b, n) == per_token * b * (2 * n + 1)
    fused.class_token_shortcut = False
    assert mod.ffn_gemm_flops(fused, b, n) == per_token * b * 3 * n


@pytest.mark.slow  # ~10 s: a subprocess times a Tiny model and compiles a small C program
def test_ffn_ceiling_script_writes_its_report(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ceiling.json"
    argv = [sys.executable, str(root / "benchmarks" / "ffn_ceiling.py"), "--model", "RePaViT_Tiny"]
    argv += ["--batch-size", "2", "--rounds", "2", "--output", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert 0 < res["reference_time_shares"]["ffn"] < 1
    assert res["gflops"]["ffn_gemms_only"] > 0 and res["measured_reparam_over_reference"] > 0
    assert res["ceiling_reparam_over_reference"]["ffn_at_best_gemm_rate"] > 1
    assert "ceiling with the FFN at the best GEMM rate" in proc.stdout


def test_peak_memory_counts_live_tensors_only():
    """10 MiB and 5 MiB alive together, then freed, then 12 MiB alone: the peak is 15 MiB."""
    from repavit.bench import peak_memory_mb

    existing = torch.zeros(8 * 2**20 // 4)  # allocated before: not counted

    def fn():
        a = torch.empty(10 * 2**20 // 4)
        b = torch.empty(5 * 2**20 // 4)
        del a, b
        c = torch.empty(12 * 2**20 // 4)
        return c.sum() + existing[0]

    assert peak_memory_mb(fn) == pytest.approx(15.0, abs=0.01)


def test_peak_memory_of_reparameterized_model_is_lower():
    """The fused FFN's hidden buffers are (C + a) and a wide instead of 4C: less activation memory."""
    from repavit.bench import peak_memory_mb

    model = timm.create_model("RePaViT_Tiny", depth=2).eval()
    fused = repavit.reparameterize_model(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        train_mb, fused_mb = peak_memory_mb(lambda: model(x)), peak_memory_mb(lambda: fused(x))
    assert 0 < fused_mb < train_mb
