"""A local folder laid out as a Hugging Face Hub model repository, loadable by timm.

::

    out/repavit_base/
      config.json          timm's layout: architecture, num_classes, model_args, pretrained_cfg
      model.safetensors    the state dict (training form or reparameterized)
      README.md            model card with the numbers measured at export

``timm.create_model("local-dir:out/repavit_base", pretrained=True)`` loads it (after
``import repavit``); uploaded (``hf upload ORG/NAME out/repavit_base``) it loads as
``"hf-hub:ORG/NAME"``. Reparameterized folders record ``reparameterized: true`` in
``model_args``, so timm builds the fused model directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models._pretrained import FFN_ARGS, released_weights, same_setting
from .checkpoint import input_size_of, model_args_of, tensor_bytes

_logger = logging.getLogger(__name__)

__all__ = ["measure_model", "model_card", "save_hub_folder"]

WEIGHTS_NAME = "model.safetensors"
CITATION = "\n".join(
    [
        "@inproceedings{xu2025repavit,",
        "  title = {RePaViT: Scalable Vision Transformer Acceleration via Structural Reparameterization on "
        "Feedforward Network Layers},",
        "  author = {Xu, Xuwei and Li, Yang and Chen, Yudong and Liu, Jiajun and Wang, Sen},",
        "  booktitle = {The 42nd International Conference on Machine Learning (ICML)},",
        "  year = {2025}",
        "}",
    ]
)


@torch.no_grad()
def measure_model(model: nn.Module, reference: nn.Module | None = None, batch_size: int = 2) -> dict[str, Any]:
    """Numbers for a model card: parameters, tensor size, GMACs, and the max difference to ``reference``.

    ``reference`` is the training form the model was folded from (same weights); the difference is
    measured on ``batch_size`` random images of the model's input size.
    """
    from ..bench.throughput import count_gmacs

    size = input_size_of(model)
    numbers: dict[str, Any] = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tensor_mb": tensor_bytes(model) / 1e6,
        "gmacs": count_gmacs(model.eval(), img_size=size[-1], in_chans=size[0]),
        "input_size": list(size),
    }
    if reference is not None:
        x = torch.randn(batch_size, *size, generator=torch.Generator().manual_seed(0))
        ref, out = reference.eval()(x), model(x)
        numbers["max_abs_diff_vs_training_form"] = (out - ref).abs().max().item()
        numbers["max_rel_diff_vs_training_form"] = ((out - ref).abs().max() / ref.abs().max()).item()
        numbers["training_form_params_m"] = sum(p.numel() for p in reference.parameters()) / 1e6
        numbers["training_form_tensor_mb"] = tensor_bytes(reference) / 1e6
    return numbers


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}"
    return str(value)


def model_card(
    model_name: str,
    model_args: Mapping[str, Any],
    numbers: Mapping[str, Any],
    repo_id: str | None = None,
    reparameterized: bool = False,
) -> str:
    """Markdown model card (YAML front matter as the Hub expects)."""
    entry = released_weights(model_name)
    matches_release = entry is not None and all(
        same_setting(model_args.get(k, v), v) for k, v in entry.model_args.items()
    )
    form = "reparameterized (deploy) form" if reparameterized else "training form"
    settings = ", ".join(f"`{k}={model_args[k]!r}`" for k in FFN_ARGS if k in model_args)
    load_name = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in numbers.items())
    lines = [
        "---",
        "tags:",
        "- image-classification",
        "- timm",
        "- repavit",
        "library_name: timm",
        "license: apache-2.0",
        "---",
        f"# {repo_id or model_name}",
        "",
        f"`{model_name}` in its {form}: a RePaViT (ICML 2025) Vision Transformer whose channel-idle FFNs "
        + (
            "have been folded into three matrices; it cannot be trained further."
            if reparameterized
            else "fold into three matrices for inference (`repavit.reparameterize_model`)."
        ),
        "",
        f"- Model settings: {settings}" if settings else "- Model settings: defaults",
        f"- Model arguments: `{json.dumps(dict(model_args))}`",
    ]
    if matches_release and entry is not None and entry.top1 is not None:
        lines.append(f"- ImageNet-1k top-1 reported in the paper for these settings: {entry.top1}%")
    lines += [
        "- Paper: https://arxiv.org/abs/2505.21847",
        "- Original code: https://github.com/Ackesnal/RePaViT",
        "",
        "## Measured at export",
        "",
        "| quantity | value |",
        "|---|---|",
        rows,
        "",
        "Sizes are the bytes of all tensors in the state dict; GMACs are for one image; differences are "
        "between this model and the training form it was folded from, on random inputs.",
        "",
        "## Usage",
        "",
        "```python",
        "import timm",
        "import repavit  # registers the RePa models in timm",
        "",
        f'model = timm.create_model("{load_name}", pretrained=True).eval()',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def save_hub_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    numbers: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a Hub-layout folder (``config.json``, ``model.safetensors``, ``README.md``).

    Args:
        model: a timm-built RePa model (it carries the ``pretrained_cfg`` written to config.json).
        out_dir: output folder (created).
        model_name: registered name; defaults to ``model.pretrained_cfg["architecture"]``.
        model_args: arguments that rebuild the architecture; defaults to the model's own.
        repo_id: Hub repository the folder is meant for (used in the model card only).
        numbers: measured numbers for the model card; defaults to :func:`measure_model` (no reference).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        raise ValueError("the model has no pretrained_cfg; build it with timm.create_model / repavit.create_model")
    name = model_name or cfg.get("architecture")
    if not name:
        raise ValueError("model_name is needed: the model's pretrained_cfg names no architecture")
    fused = bool(getattr(model, "reparameterized", False))
    args = dict(model_args or model_args_of(model))
    args["reparameterized"] = fused
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    if cfg.get("architecture") != name:
        model.pretrained_cfg = {**cfg, "architecture": name}
    save_config_for_hf(model, str(out / "config.json"), model_args=args)
    numbers = dict(numbers) if numbers is not None else measure_model(model)
    card_args = {k: v for k, v in args.items() if k != "reparameterized"}
    (out / "README.md").write_text(model_card(name, card_args, numbers, repo_id, fused))
    _logger.info("wrote Hub-layout folder %s", out)
    return out
