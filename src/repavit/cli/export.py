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
    q = p.add_argument_group("static int8 (ONNX: ONNX Runtime QDQ; OpenVINO: NNCF)")
    q.add_argument("--int8", action="store_true", help="quantize to int8, calibrated on --calibration images")
    q.add_argument("--calibration", metavar="DIR", help="folder of images (any depth) to calibrate and check on")
    q.add_argument("--calibration-size", type=int, default=128, help="images used from DIR (default 128)")
    q.add_argument(
        "--min-agreement", type=float, default=0.95,
        help="fail if top-1 agreement with fp32 on the held-out images is below this (default 0.95)",
    )  # fmt: skip
    p.set_defaults(func=run)


def _int8_settings(args: argparse.Namespace):
    from ..errors import UserError
    from ..export.deploy import Int8Settings

    if not args.int8:
        if args.calibration:
            raise UserError("--calibration is for --int8 exports; add --int8 or drop --calibration")
        return None
    if args.format not in ("onnx", "openvino"):
        raise UserError(f"--int8 is for ONNX (.onnx) and OpenVINO (.xml) files, not {args.format}")
    if not args.calibration:
        raise UserError("--int8 needs --calibration DIR: a folder of real images like the ones the model will see")
    if args.calibration_size < 1 or not 0.0 <= args.min_agreement <= 1.0:
        raise UserError("--calibration-size must be >= 1 and --min-agreement between 0 and 1")
    return Int8Settings(args.calibration, args.calibration_size, args.min_agreement)


def run(args: argparse.Namespace) -> int:
    from ..export.deploy import export_format, export_model

    args.format = export_format(args.output, args.format)  # before loading: a wrong name costs nothing
    int8 = _int8_settings(args)
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
        int8=int8,
    )
    form = "" if loaded.reparameterized else ", training form"
    what = f"{mb(out.nbytes)}; {loaded.record.describe()}{form}; {out.description}"
    print(f"wrote {out.path} ({what}) and {out.sidecar.name}")
    if int8 is not None:
        c = out.check
        print(
            f"checked against the fp32 PyTorch model on {c['images']} held-out images: top-1 agreement "
            f"{100 * c['top1_agreement']:.1f}%, logit cosine mean {c['logit_cosine_mean']:.4f}, "
            f"min {c['logit_cosine_min']:.4f}"
        )
    elif out.check is not None:
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
