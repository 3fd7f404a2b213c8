"""Where the time goes inside ONNX Runtime and OpenVINO, ours against vanilla: why the RePa speed-up is
smaller inside the int8 runtimes than in fp32.

For RePaViT_Base (reparameterized, identity kept out of the int8 matrices) and timm's vanilla ViT-B, each
exported as ``repavit export`` does, in ONNX Runtime (fp32, dynamic int8, static int8) and OpenVINO (fp32,
static int8), the per-operator time of a batch from the runtime's own profiler, summed in three groups:

- ``gemm``: the matrix products (MatMul, Gemm, MatMulInteger, FullyConnected, ...): where the fold
  removes work (17.6 -> 10.0 GMACs per image);
- ``quant``: quantize / dequantize steps around the int8 products (int8 paths only);
- ``other``: softmax, LayerNorm, GELU, reshapes, adds, the attention matmuls a runtime leaves elsewhere.

The fold shrinks the GEMM group by about the MAC ratio; the rest shrinks less. In an int8 runtime the GEMMs
get several times faster while the rest does not, so the rest's share grows and ours/vanilla falls towards
the ratio of the rest. The script prints each group's time, ours/vanilla per group, and the ceiling
``vanilla total / ours total`` would reach if only the GEMM group counted.

    python benchmarks/runtime_profile.py [--batch-size 16] [--runs 3] [--output benchmarks/results/runtime_profile.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import timm
import torch

import repavit  # noqa: F401  (registers the models)
from repavit.bench.suite import _ort_dynamic_int8, vanilla_counterpart
from repavit.export import export_onnx
from repavit.export.int8 import quantize_onnx_static, quantize_openvino_static, with_identity_separate
from repavit.export.openvino import export_openvino
from repavit.models import reparameterize_model

GEMM = (
    "MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "FullyConnected", "FullyConnected_compressed", "Conv", "ConvInteger", "QLinearConv",
)  # fmt: skip
QUANT = ("DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "FakeQuantize")


def _group(op: str) -> str:
    base = op.split("_")[0] if op.startswith("FullyConnected") else op
    if base in GEMM or op in GEMM or "MatMul" in op or op.startswith(("Convolution", "FullyConnected")):
        return "gemm"
    if op in QUANT or "Quantize" in op:
        return "quant"
    return "other"


def _ort_profile(path: Path, x: np.ndarray, runs: int, threads: int) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)  # warm-up: counted too, removed below by taking only the last runs
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 1)
    totals: dict[str, float] = defaultdict(float)
    for e in nodes[per_run:]:
        totals[_group(e["args"]["op_name"])] += e["dur"] / 1e3 / runs  # ms per batch
    return dict(totals)


def _ov_profile(path: Path, x: np.ndarray, runs: int, threads: int) -> dict[str, float]:
    import openvino as ov

    config = {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    request.infer({0: x})
    totals: dict[str, float] = defaultdict(float)
    for _ in range(runs):
        request.infer({0: x})
        for info in request.profiling_info:
            totals[_group(info.node_type)] += info.real_time.total_seconds() * 1e3 / runs
    return dict(totals)


def _files(model: torch.nn.Module, tmp: Path, tag: str, calib: list) -> dict[str, tuple[str, Path]]:
    size = (3, 224, 224)
    onnx = export_onnx(model, tmp / f"{tag}.onnx", size)
    xml = export_openvino(model, tmp / f"{tag}.xml", size)
    return {
        "onnxruntime fp32": ("ort", onnx),
        "onnxruntime dynamic int8": ("ort", Path(_ort_dynamic_int8(onnx, str(tmp / f"{tag}.dyn.onnx")))),
        "onnxruntime static int8": ("ort", quantize_onnx_static(onnx, tmp / f"{tag}.s8.onnx", calib)),
        "openvino fp32": ("ov", xml),
        "openvino static int8": ("ov", quantize_openvino_static(xml, tmp / f"{tag}.s8.xml", calib)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="RePaViT_Base")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--output", default="benchmarks/results/runtime_profile.json")
    args = p.parse_args()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    models = {"ours": with_identity_separate(reparameterize_model(model)), "vanilla": vanilla_counterpart(model).eval()}
    x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calib = list(x)
    result: dict = {"model": args.model, "batch_size": args.batch_size, "threads": threads, "paths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: _files(m, Path(tmp), k, calib) for k, m in models.items()}
        for path_name in files["ours"]:
            row = {}
            for who in ("ours", "vanilla"):
                kind, f = files[who][path_name]
                prof = _ort_profile if kind == "ort" else _ov_profile
                row[who] = prof(f, x.numpy(), args.runs, threads)
            groups = sorted(set(row["ours"]) | set(row["vanilla"]))
            row["vanilla/ours per group"] = {
                g: row["vanilla"].get(g, 0) / max(row["ours"].get(g, 0), 1e-9) for g in groups
            }
            total = {w: sum(row[w].values()) for w in ("ours", "vanilla")}
            row["vanilla/ours total"] = total["vanilla"] / total["ours"]
            row["gemm share (vanilla, ours)"] = [row[w].get("gemm", 0) / total[w] for w in ("vanilla", "ours")]
            result["paths"][path_name] = row
            per_group = "  ".join(
                f"{g} {row['ours'].get(g, 0):6.1f}/{row['vanilla'].get(g, 0):6.1f} "
                f"({row['vanilla/ours per group'][g]:.2f}x)"
                for g in groups
            )
            print(
                f"{path_name:26s} ms/batch ours {total['ours']:7.1f} vanilla {total['vanilla']:7.1f}  "
                f"ours/vanilla speed {row['vanilla/ours total']:.2f}x  {per_group}  "
                f"gemm share vanilla {100 * row['gemm share (vanilla, ours)'][0]:.0f}%",
                flush=True,
            )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
