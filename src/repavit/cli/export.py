"""``repavit export``: the reparameterized model -> ONNX (dynamic batch) or TorchScript, verified."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ._deploy_args import add_source_args, load_from_args, mb, provenance


def register(sub: argparse._SubParsersAction) -> None:
    from ..export.onnx import DEFAULT_OPSET, EXPORTERS
    from ..export.torchscript import TORCHSCRIPT_METHODS

    p = sub.add_parser(
        "export",
        help="export the reparameterized model to ONNX or TorchScript and check it against PyTorch",
        description="Load a checkpoint (repavit train's checkpoint.pth, a convert/reparam output, the authors' "
        "files; training form or fused), reparameterize it, export it with its model record (in the file and in "
        "OUTPUT.json: model, settings, class names, preprocessing), then run the exported file (ONNX Runtime for "
        "ONNX) on random inputs of two batch sizes and compare with PyTorch.",
    )
    add_source_args(p)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("-o", "--output", required=True, help="output file (.onnx or .pt)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument(
        "--exporter", choices=EXPORTERS, default="dynamo", help="ONNX exporter: torch.export-based or legacy"
    )
    p.add_argument("--method", choices=TORCHSCRIPT_METHODS, default="auto", help="TorchScript: script or trace")
    p.add_argument("--no-reparam", action="store_true", help="export the training form as it is (for comparison)")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input used to export")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative difference accepted by the check")
    p.add_argument("--no-verify", action="store_true", help="skip running the exported file")
    p.add_argument(
        "--bench-batch",
        type=int,
        default=0,
        metavar="N",
        help="ONNX only: also time ONNX Runtime against PyTorch eager on batches of N (interleaved rounds)",
    )
    p.add_argument("--bench-rounds", type=int, default=5, help="rounds for --bench-batch (median reported)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..export import export_onnx, export_torchscript, input_size_of, verify_onnx, verify_torchscript, write_sidecar
    from ..export.onnx import onnx_files_size

    suffix = Path(args.output).suffix.lower()
    expected = {"onnx": ".onnx", "torchscript": ".pt"}[args.format]
    other = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript"}.get(suffix)
    if other is not None and other != args.format:
        raise UserError(
            f"-o {args.output} names a {other} file but --format is {args.format}: pass --format {other} or name "
            f"the file *{expected}"
        )
    if not Path(args.output).name:
        raise UserError(f"-o {args.output!r}: give a file path, e.g. -o out/model{expected}")
    loaded = load_from_args(args, reparameterized=None if args.no_reparam else True)
    model = loaded.model.eval()
    record = loaded.record
    size = input_size_of(model)
    if args.format == "onnx":
        meta = {"repavit_record": record.to_dict()}
        path = export_onnx(model, args.output, size, args.batch_size, args.opset, args.exporter, metadata=meta)
        verify = verify_onnx
        what = f"ONNX opset {args.opset}, {args.exporter} exporter, dynamic batch axis"
        nbytes = onnx_files_size(path)
    else:
        extra = {"repavit_record.json": json.dumps(record.to_dict())}
        path = export_torchscript(model, args.output, args.method, extra_files=extra)
        verify = verify_torchscript
        what = "TorchScript"
        nbytes = path.stat().st_size
    sidecar = write_sidecar(path, model, record, format=args.format, **provenance(args, loaded))
    form = "" if loaded.reparameterized else ", training form"
    print(f"wrote {path} ({mb(nbytes)}; {record.describe()}{form}; {what}) and {sidecar.name}")
    if not args.no_verify:
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(b, *size, generator=g) for b in (1, args.batch_size + 1)]
        result = verify(path, model, inputs, rtol=args.rtol)
        print(
            f"checked against PyTorch on batches {result['batches']}: max abs diff {result['max_abs_diff']:.3g}, "
            f"max relative diff {result['max_rel_diff']:.3g} (limit {args.rtol:g})"
        )
    if args.bench_batch > 0 and args.format == "onnx":
        bench_onnxruntime(model, path, size, args.bench_batch, args.bench_rounds)
    return 0


def bench_onnxruntime(model, path, size, batch: int, rounds: int) -> dict[str, float]:
    """Images/s of PyTorch eager and ONNX Runtime on the same model and input, timed interleaved."""
    import torch

    from ..bench.throughput import interleaved_throughput, summarize
    from ..export import OrtModel, ort_forward

    x = torch.randn(batch, *size)
    runner = OrtModel(path)
    fns = {"pytorch_eager": lambda: model(x), "onnxruntime": ort_forward(runner, x)}
    samples = interleaved_throughput(fns, batch, rounds=rounds, iters=2, warmup=1)
    med = {k: summarize(v)["median"] for k, v in samples.items()}
    print(
        f"throughput (batch {batch}, {torch.get_num_threads()} torch threads, median of {rounds} rounds): "
        f"PyTorch eager {med['pytorch_eager']:.1f} img/s, ONNX Runtime {med['onnxruntime']:.1f} img/s "
        f"({med['onnxruntime'] / med['pytorch_eager']:.2f}x)"
    )
    return med
