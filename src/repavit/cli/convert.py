"""``repavit convert``: any supported checkpoint -> our layout (safetensors + JSON record)."""

from __future__ import annotations

import argparse

from ._deploy_args import add_source_args, check_output, load_from_args, mb, provenance


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert any checkpoint (repavit train's, the authors' .pth) into a clean safetensors + JSON checkpoint",
        description="Read a checkpoint safely (weights-only), decide the model from its record (or, for files "
        "without one, its shapes, the authors' pickled training args, the released-weights table or the options), "
        "load it strictly, and write OUTPUT.safetensors + OUTPUT.json carrying the model record. The form "
        "(training or reparameterized) is kept.",
    )
    add_source_args(p)
    p.add_argument("-o", "--output", required=True, help="output path without suffix (writes .safetensors and .json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import safetensors.torch

    from ..errors import VerificationError
    from ..export import tensor_bytes
    from ..models import save_checkpoint

    check_output(args.output)
    loaded = load_from_args(args)
    weights, config = save_checkpoint(args.output, loaded.model.state_dict(), loaded.record, provenance(args, loaded))
    reread = safetensors.torch.load_file(weights)
    own = loaded.model.state_dict()
    if reread.keys() != own.keys() or any(not reread[k].equal(own[k].cpu()) for k in own):
        weights.unlink(missing_ok=True)
        config.unlink(missing_ok=True)
        raise VerificationError(f"{weights} did not read back equal to the loaded model; nothing was kept")
    form = "reparameterized" if loaded.reparameterized else "training form"
    print(f"{loaded.record.describe()} ({form}, {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f}M params)")
    print(f"model args: {loaded.model_args}")
    print(f"wrote {weights} ({mb(tensor_bytes(own))}) and {config}")
    return 0
