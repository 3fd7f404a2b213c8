"""``repavit reparam``: a training-form checkpoint -> a deploy checkpoint (fused weights only)."""

from __future__ import annotations

import argparse

from ._deploy_args import add_source_args, check_output, load_from_args, mb, provenance


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reparam",
        help="fold a training-form checkpoint into a deploy checkpoint; prints the size before and after",
        description="Load a training-form checkpoint (repavit train's checkpoint.pth / best_checkpoint.pth, a "
        "convert output, or the authors'), fold every FFN (BatchNorms, idle path and residual into three "
        "matrices), check that the outputs are unchanged on random inputs, and write OUTPUT.safetensors + "
        "OUTPUT.json with the model record. repavit.create_model(name, checkpoint_path=OUTPUT.safetensors, "
        "reparameterized=True) loads it strictly.",
    )
    add_source_args(p)
    p.add_argument("-o", "--output", required=True, help="output path without suffix (writes .safetensors and .json)")
    p.add_argument("--batch-size", type=int, default=2, help="random images for the equivalence check")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative output difference accepted")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserError, VerificationError
    from ..export import input_size_of, tensor_bytes
    from ..models import fold_refusal, record_of, reparameterize_model, save_checkpoint

    check_output(args.output)
    loaded = load_from_args(args, reparameterized=False)
    train = loaded.model.eval()
    why = fold_refusal(train)
    if why:
        raise UserError(f"{args.checkpoint} cannot be reparameterized: {why}")
    fused = reparameterize_model(train)
    before, after = tensor_bytes(train), tensor_bytes(fused)
    params_before = sum(p.numel() for p in train.parameters())
    params_after = sum(p.numel() for p in fused.parameters())
    dtype = str(next(train.parameters()).dtype).removeprefix("torch.")
    print(f"{loaded.record.describe()}: {params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M params")
    print(f"size: {mb(before)} -> {mb(after)} ({dtype} tensors, -{100 * (1 - after / before):.1f}%)")
    if not args.no_verify:
        x = torch.randn(args.batch_size, *input_size_of(train), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, out = train(x), fused(x)
        diff = (out - ref).abs().max().item()
        rel = diff / max(ref.abs().max().item(), 1e-30)
        print(f"max |fused - training| on {args.batch_size} random images: {diff:.3g} (relative {rel:.3g})")
        if rel > args.rtol:
            raise VerificationError(
                f"reparameterized outputs differ by {rel:.3g} relative > {args.rtol:g}; not written"
            )
    record = record_of(fused, loaded.model_name, loaded.model_args, loaded.class_names, loaded.record.overrides)
    weights, config = save_checkpoint(args.output, fused.state_dict(), record, provenance(args, loaded))
    print(f"wrote {weights} ({mb(weights.stat().st_size)} on disk) and {config}")
    return 0
