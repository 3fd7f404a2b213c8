"""``repavit export``: the reparameterized model -> ONNX (dynamic batch), TorchScript or OpenVINO IR, verified."""

from __future__ import annotations

import argparse

from ._deploy_args import add_source_args, load_from_args, mb, provenance


def register(sub: argparse._SubParsersAction) -> None:
    from ..export.deploy import FORMATS
    from ..export.onnx import DEFAULT_OPSET, EXPORTERS
    from ..export.torchscript import TORCHSCRIPT_METHODS

    p = sub.add_parser(
        "export",
        help="export the reparameterized model to ONNX, TorchScript or OpenVINO and check it against PyTorch",
        description="Load a checkpoint (repavit train's checkpoint.pth, a convert/reparam output, the authors' "
        "files; training form or fused), reparameterize it, export it with its model record (in the file and in "
        "OUTPUT.json: model, settings, class names, preprocessing), then run the exported file (ONNX Runtime for "
        "ONNX, OpenVINO for an IR) on random inputs of two batch sizes and compare with PyTorch.",
    )
    add_source_args(p)
    p.add_argument(
        "--format",
        choices=list(FORMATS),
        default=None,
        help="default: the -o suffix's (.pt: torchscript, .xml: openvino)",
    )
    p.add_argument("-o", "--output", required=True, help="output file (.onnx, .pt, or .xml with .bin beside it)")
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
        help="ONNX and OpenVINO: also time the runtime against PyTorch eager on batches of N (interleaved rounds)",
    )
    p.add_argument("--bench-rounds", type=int, default=5, help="rounds for --bench-batch (median reported)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.deploy import export_format, export_model

    args.format = export_format(args.output, args.format)  # before loading: a wrong name costs nothing
    loaded = load_from_args(args, reparameterized=None if args.no_reparam else True)
    out = export_model(
        loaded,
        args.output,
        args.format,
        opset=args.opset,
        exporter=args.exporter,
        method=args.method,
        batch_size=args.batch_size,
        rtol=args.rtol,
        verify=not args.no_verify,
        extra=provenance(args, loaded),
    )
    form = "" if loaded.reparameterized else ", training form"
    what = f"{mb(out.nbytes)}; {loaded.record.describe()}{form}; {out.description}"
    print(f"wrote {out.path} ({what}) and {out.sidecar.name}")
    if out.check is not None:
        c = out.check
        print(
            f"checked against PyTorch on batches {c['batches']}: max abs diff {c['max_abs_diff']:.3g}, "
            f"max relative diff {c['max_rel_diff']:.3g} (limit {args.rtol:g})"
        )
    if args.bench_batch > 0 and args.format in ("onnx", "openvino"):
        from ..bench.runtimes import RUNTIME_NAMES, runtime_vs_eager

        med = runtime_vs_eager(loaded.model, out.path, args.format, args.bench_batch, args.bench_rounds)
        name = RUNTIME_NAMES[args.format]
        print(
            f"throughput (batch {args.bench_batch}, {med['threads']} threads, median of {args.bench_rounds} rounds): "
            f"PyTorch eager {med['pytorch_eager']:.1f} img/s, {name} {med['runtime']:.1f} img/s "
            f"({med['runtime'] / med['pytorch_eager']:.2f}x)"
        )
    return 0
