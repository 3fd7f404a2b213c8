"""How much faster than the authors' three-linear FFN can any FFN implementation make the model here?

Both FFN structures do the same multiply-adds (C x C, C x a and a x C per token), so on a CPU whose
GEMMs already run near peak, restructuring can only remove the non-GEMM work around them. This
script measures, in one process:

- whole-model throughput of ``reparam`` (ours) and ``reference`` (the same model with the authors'
  three-linear FFN), interleaved;
- the FFN's share of the reference model's time (module hooks);
- the FFN modules alone on one block's input, and the FFN's two GEMMs with nothing else (no bias,
  no GELU, no add) into preallocated outputs;
- the best GEMM rate seen (those GEMMs, and a large square sgemm) and, where a C compiler with
  AVX2 is present, the CPU's fp32 FMA peak (``fma_peak.c``);

and reports the ceiling: the whole-model speed-up over ``reference`` if the FFN took only its GEMM
FLOPs at the best GEMM rate, or at the FMA peak, with everything else unchanged.

Usage: python benchmarks/ffn_ceiling.py [--model RePaViT_Base] [--batch-size 16]
           [--output benchmarks/results/ffn_ceiling.json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import timm
import torch

import repavit
from repavit.bench.reference import with_three_linear_ffn
from repavit.bench.suite import latency_breakdown
from repavit.layers.idle_mlp import FusedIdleMlp
from repavit.measure import interleaved_throughput, machine_info, summarize
from repavit.utils import write_json

HERE = Path(__file__).resolve().parent


def fma_peak_gflops() -> float | None:
    """The CPU's fp32 FMA peak in GFLOP/s over torch's thread count, or None without cc/AVX2."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        build = [cc, "-O2", "-mavx2", "-mfma", "-fopenmp", str(HERE / "fma_peak.c"), "-o", str(exe)]
        if subprocess.run(build, capture_output=True).returncode != 0:
            return None
        env = {"OMP_NUM_THREADS": str(torch.get_num_threads()), "PATH": "/usr/bin:/bin"}
        out = [subprocess.run([str(exe)], capture_output=True, text=True, env=env).stdout for _ in range(3)]
        runs = [float(o.splitlines()[0]) for o in out]  # first line: the best of AVX2 and AVX-512
    return max(runs)


def ffn_gemm_flops(model: torch.nn.Module, batch: int, tokens: int) -> float:
    """FLOPs of the fused FFNs' GEMMs for one batch (the last block sees only the class token)."""
    mlps = [m for m in model.modules() if isinstance(m, FusedIdleMlp)]
    total = 0.0
    for i, m in enumerate(mlps):
        rows = batch * (1 if (i == len(mlps) - 1 and model.class_token_shortcut) else tokens)
        k = m.in_proj.weight.numel() + (m.out_proj.weight.numel() if m.out_proj is not None else 0)
        total += 2.0 * rows * k
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="RePaViT_Base")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--output", default=str(HERE / "results" / "ffn_ceiling.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    fused = repavit.reparameterize_model(timm.create_model(args.model).eval())
    ref = with_three_linear_ffn(fused)
    B, dev = args.batch_size, torch.device("cpu")
    x = torch.randn(B, 3, 224, 224)
    N, C = fused.pos_embed.shape[1], fused.embed_dim

    ours_ffn, ref_ffn = fused.blocks[0].mlp, ref.blocks[0].mlp
    h = torch.randn(B, N, C)
    w_in, w_out = ours_ffn.in_proj.weight.detach(), ours_ffn.out_proj.weight.detach()
    h2, mid, out = h.reshape(B * N, C), torch.empty(B * N, w_in.shape[0]), torch.empty(B * N, C)

    def gemms_only() -> None:
        torch.mm(h2, w_in.t(), out=mid)
        torch.mm(mid[:, C:], w_out.t(), out=out)

    sq = torch.randn(2048, 2048)
    sq_out = torch.empty(2048, 2048)
    with torch.inference_mode():
        whole = interleaved_throughput(
            {"reparam": lambda: fused(x), "reference": lambda: ref(x)}, B, args.rounds, 2, 1, dev
        )
        parts = interleaved_throughput(
            {
                "ffn_ours": lambda: ours_ffn(h),
                "ffn_reference": lambda: ref_ffn(h),
                "ffn_gemms_only": gemms_only,
                "square_sgemm_2048": lambda: torch.mm(sq, sq, out=sq_out),
            },
            1,
            args.rounds,
            5,
            2,
            dev,
        )
        shares = latency_breakdown(ref, x)
    med = {k: summarize(v)["median"] for k, v in whole.items()}  # images/s
    sec = {k: 1.0 / summarize(v)["median"] for k, v in parts.items()}  # seconds per call
    ffn_flops_block = 2.0 * B * N * (w_in.numel() + w_out.numel())
    rates = {
        "ffn_gemms_only": ffn_flops_block / sec["ffn_gemms_only"] / 1e9,
        "square_sgemm_2048": 2.0 * 2048**3 / sec["square_sgemm_2048"] / 1e9,
        "ffn_ours": ffn_flops_block / sec["ffn_ours"] / 1e9,
        "ffn_reference": ffn_flops_block / sec["ffn_reference"] / 1e9,
    }
    best_gemm = max(rates["ffn_gemms_only"], rates["square_sgemm_2048"])
    peak = fma_peak_gflops()

    t_ref = B / med["reference"]  # seconds per batch
    t_ffn = shares["ffn"] * t_ref
    flops = ffn_gemm_flops(fused, B, N)  # the reference's three GEMMs have the same shapes

    def ceiling(rate_gflops: float) -> float:
        return t_ref / (t_ref - t_ffn + flops / (rate_gflops * 1e9))

    result = {
        "machine": machine_info(),
        "model": args.model,
        "batch_size": B,
        "images_per_s": med,
        "measured_reparam_over_reference": med["reparam"] / med["reference"],
        "reference_time_shares": shares,
        "ffn_module_ms": {k: 1e3 * v for k, v in sec.items() if k.startswith("ffn")},
        "gflops": {**rates, "fma_peak": peak},
        "ceiling_reparam_over_reference": {
            "ffn_at_best_gemm_rate": ceiling(best_gemm),
            "ffn_at_fma_peak": None if peak is None else ceiling(peak),
        },
    }
    out_path = Path(args.output)
    write_json(out_path, result)
    print(f"{args.model} batch {B}: reparam/reference measured {result['measured_reparam_over_reference']:.3f}x")
    print(f"  FFN share of the reference model's time: {100 * shares['ffn']:.1f}%")
    print("  FFN one block (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in result["ffn_module_ms"].items()))
    print("  GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in result["gflops"].items() if v is not None))
    c = result["ceiling_reparam_over_reference"]
    print(f"  ceiling with the FFN at the best GEMM rate: {c['ffn_at_best_gemm_rate']:.3f}x")
    if c["ffn_at_fma_peak"] is not None:
        print(f"  ceiling with the FFN at the FMA peak:      {c['ffn_at_fma_peak']:.3f}x")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
