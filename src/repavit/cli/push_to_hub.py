"""``repavit push-to-hub``: write a Hub-layout model folder (config.json, model.safetensors, model card).

The folder is written locally; this command does not upload (upload it with ``hf upload REPO DIR``).
"""

from __future__ import annotations

import argparse

from ._deploy_args import add_source_args, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push-to-hub",
        help="write a local folder laid out as a Hugging Face Hub model repository (timm-loadable)",
        description="Load a checkpoint, optionally reparameterize it, measure it (parameters, size, GMACs, the "
        "difference to the training form) and write OUTPUT_DIR/{config.json, model.safetensors, README.md}. "
        "timm.create_model('local-dir:OUTPUT_DIR', pretrained=True) loads it after `import repavit`.",
    )
    add_source_args(p)
    p.add_argument("-o", "--output-dir", required=True, help="folder to write")
    p.add_argument("--reparameterize", action="store_true", help="write the fused (deploy) form")
    p.add_argument("--repo-id", default=None, help="ORG/NAME the folder is meant for (used in the model card)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import measure_model, save_hub_folder
    from ..models import record_of, reparameterize_model

    loaded = load_from_args(args)
    model, reference = loaded.model, None
    if args.reparameterize and not loaded.reparameterized:
        reference, model = model, reparameterize_model(model)
    record = record_of(model, loaded.model_name, loaded.model_args, loaded.class_names, loaded.record.overrides)
    numbers = measure_model(model, reference)
    out = save_hub_folder(
        model,
        args.output_dir,
        record,
        args.repo_id,
        numbers,
        loaded.metrics,
        loaded.released,
        loaded.assumptions,
        loaded.release_like,
    )
    print(f"wrote {out}/config.json, model.safetensors, README.md ({record.describe()})")
    for key, value in numbers.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if loaded.metrics.get("acc1") is not None:
        print(f"  top-1 recorded by training: {loaded.metrics['acc1']:.2f}%")
    print(f"load it with: timm.create_model('local-dir:{out}', pretrained=True)  (after `import repavit`)")
    if args.repo_id:
        print(f"upload it with: hf upload {args.repo_id} {out}")
    return 0
