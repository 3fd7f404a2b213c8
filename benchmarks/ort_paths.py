"""Why an ONNX Runtime path can be slower than PyTorch eager, measured: exporter, graph optimizations, threads.

For one reparameterized model (random weights: only shapes matter for speed), in one process,
interleaved round by round with PyTorch eager (``inference_mode``) as the reference:

- the two exporters: torch.onnx's dynamo (``torch.export``-based, what ``repavit export`` writes) and
  the legacy TorchScript-based one;
- ONNX Runtime's graph optimization levels (disabled, basic, extended, all) on the dynamo file;
- ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``, ``model_type="vit"``:
  attention, LayerNorm and GELU fusions) on both files, where it applies;
- intra-op threads: torch's count against ONNX Runtime's default;

and writes every sample with the fused-node counts of each graph.

Usage: python benchmarks/ort_paths.py [--model RePaViT_Base] [--batch-size 16] [--rounds 3]
           [--output benchmarks/results/ort_paths.json]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import timm
import torch

import repavit
from repavit.export import export_onnx
from repavit.measure import interleaved_throughput, machine_info, summarize
from repavit.utils import write_json

LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session(path: Path, level: str = "all", threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


def transformer_optimized(src: Path, dst: Path, heads: int, hidden: int) -> Path | None:
    try:
        from onnxruntime.transformers import optimizer
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt = optimizer.optimize_model(str(src), model_type="vit", num_heads=heads, hidden_size=hidden)
        except Exception as e:  # the optimizer does not know every graph; record why
            print(f"transformer optimizer failed on {src.name}: {type(e).__name__}: {e}")
            return None
    opt.save_model_to_file(str(dst))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="RePaViT_Base")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output", default="benchmarks/results/ort_paths.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = repavit.reparameterize_model(timm.create_model(args.model).eval())
    heads, hidden = model.blocks[0].attn.num_heads, model.embed_dim
    x = torch.randn(args.batch_size, 3, 224, 224)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "dynamo": export_onnx(model, Path(tmp) / "dynamo.onnx", (3, 224, 224), exporter="dynamo"),
            "legacy": export_onnx(model, Path(tmp) / "legacy.onnx", (3, 224, 224), exporter="legacy"),
        }
        for name in ("dynamo", "legacy"):
            opt = transformer_optimized(files[name], Path(tmp) / f"{name}_tf.onnx", heads, hidden)
            if opt is not None:
                files[f"{name}+transformer_optimizer"] = opt
        sessions = {f"ort[{name}]": session(path, "all", threads) for name, path in files.items()}
        for level in ("disabled", "basic", "extended"):
            sessions[f"ort[dynamo, {level}]"] = session(files["dynamo"], level, threads)
        sessions["ort[dynamo, default threads]"] = session(files["dynamo"], "all", None)
        array = x.numpy()
        fns = {"pytorch_eager": lambda: model(x)}
        for key, sess in sessions.items():
            inp = sess.get_inputs()[0].name
            fns[key] = lambda sess=sess, inp=inp: sess.run(None, {inp: array})
        with torch.inference_mode():
            samples = interleaved_throughput(fns, args.batch_size, rounds=args.rounds, iters=2, warmup=1,
                                             desc=f"{args.model} ORT paths")  # fmt: skip
        counts = {name: op_counts(path) for name, path in files.items()}
    med = {k: summarize(v)["median"] for k, v in samples.items()}
    eager = med["pytorch_eager"]
    print(f"{args.model}, batch {args.batch_size}, {threads} torch threads:")
    for k, v in med.items():
        print(f"  {k:42s} {v:7.2f} img/s  {v / eager:5.2f}x eager")
    write_json(
        Path(args.output),
        {"machine": machine_info(), "model": args.model, "batch_size": args.batch_size, "threads": threads,
         "samples": samples, "median": med, "vs_eager": {k: v / eager for k, v in med.items()}, "op_counts": counts},
    )  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
