"""State-dict layouts of the channel-idle FFN, shared by every family's checkpoint filter.

An FFN lives under a key prefix ending in ``mlp.`` (``blocks.3.mlp.``, ``layers.2.blocks.5.mlp.``,
``network.4.1.mlp.``) and is stored in one of four forms:

* ``"bn"``: training form with BatchNorm (``norm1.running_mean`` present);
* ``"ln"``: training form with LayerNorm (``norm1.weight`` without running statistics);
* ``"fused"``: our inference form (``in_proj``/``out_proj``);
* ``"authors_fused"``: the authors' inference form: ``fc1`` = linear branch plus identity (C x C),
  ``fc2`` = activated branch input (a x C), ``fc3`` = its output (C x a, no bias).

A prefix whose keys fit none of these (a plain ``fc1``/``fc2`` MLP, e.g. DeiT's) is not reported.

These helpers only read and rewrite dicts; the model files turn the returned messages into
``CheckpointMismatchError`` (``layers`` never imports ``models``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["act_dim_mismatch", "convert_authors_fused", "ffn_forms", "ffn_modules", "form_mismatch", "prepare_ffns"]

_FFN_KEY = re.compile(r"^((?:.*\.)?mlp\.)(.+)$")
FORM_NAMES = {"bn": "BatchNorm", "ln": "LayerNorm"}


def ffn_forms(state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """Map each FFN prefix found in ``state_dict`` to its form (see the module docstring)."""
    rests: dict[str, set[str]] = {}
    for k in state_dict:
        m = _FFN_KEY.match(k)
        if m:
            rests.setdefault(m.group(1), set()).add(m.group(2))
    forms = {}
    for prefix, ks in rests.items():
        if "in_proj.weight" in ks:
            forms[prefix] = "fused"
        elif "norm1.running_mean" in ks:
            forms[prefix] = "bn"
        elif "norm1.weight" in ks:
            forms[prefix] = "ln"
        elif "fc3.weight" in ks or ("fc1.weight" in ks and _is_square(state_dict[prefix + "fc1.weight"])):
            # the authors' fused FFN: fc1 is C x C (linear path + identity); a plain MLP's fc1 is h x C
            forms[prefix] = "authors_fused"
    return forms


def _is_square(w: Tensor) -> bool:
    return w.dim() >= 2 and w.shape[0] == w.shape[1]


def form_mismatch(forms: Mapping[str, str], reparameterized: bool, feature_norm: str) -> str | None:
    """One-line reason why FFNs in ``forms`` cannot load into a model in the given state, or None."""
    kinds = set(forms.values())
    if reparameterized:
        if "ln" in kinds:
            return "checkpoint has LayerNorm FFNs, which have no fused form; model is reparameterized"
        if "bn" in kinds:
            return (
                "checkpoint is in training form but the model is reparameterized: build it with "
                "reparameterized=False, load, then call reparameterize()"
            )
        return None
    if kinds & {"fused", "authors_fused"}:
        return "checkpoint is reparameterized but the model is in training form: build it with reparameterized=True"
    want = "bn" if feature_norm == "BatchNorm" else "ln"
    other = kinds - {want}
    if other:
        return f"checkpoint has feature_norm={FORM_NAMES[other.pop()]} FFNs, model has feature_norm={feature_norm}"
    return None


def convert_authors_fused(sd: dict[str, Tensor], prefix: str, has_linear: bool) -> None:
    """Rewrite one FFN from the authors' ``fc1/fc2/fc3`` inference layout to ours, in place.

    Args:
        sd: state dict, modified in place.
        prefix: the FFN's key prefix, e.g. ``"layers.0.blocks.1.mlp."``.
        has_linear: whether the target module has a linear (idle) branch. Without one (nothing
            idles) the authors' ``fc1`` is the identity and only its bias is kept, as our output bias.
    """
    fc1_w, fc1_b = sd.pop(prefix + "fc1.weight"), sd.pop(prefix + "fc1.bias")
    fc2 = sd.get(prefix + "fc2.weight")
    if fc2 is None or fc2.shape[0] == 0:  # a == 0 (no fc2/fc3, or empty ones): the FFN is one linear map
        for key in ("fc2.weight", "fc2.bias", "fc3.weight"):
            sd.pop(prefix + key, None)
        sd[prefix + "in_proj.weight"], sd[prefix + "in_proj.bias"] = fc1_w, fc1_b
        return
    fc2_w, fc2_b, fc3_w = sd.pop(prefix + "fc2.weight"), sd.pop(prefix + "fc2.bias"), sd.pop(prefix + "fc3.weight")
    identity = torch.eye(fc1_w.shape[0], dtype=fc1_w.dtype).reshape(fc1_w.shape)
    if not has_linear and torch.equal(fc1_w, identity):
        sd[prefix + "in_proj.weight"], sd[prefix + "in_proj.bias"] = fc2_w, fc2_b
        sd[prefix + "out_proj.weight"], sd[prefix + "out_proj.bias"] = fc3_w, fc1_b
        return
    sd[prefix + "in_proj.weight"] = torch.cat((fc1_w, fc2_w), 0)
    sd[prefix + "in_proj.bias"] = torch.cat((fc1_b, fc2_b), 0)
    sd[prefix + "out_proj.weight"] = fc3_w


def act_dim_mismatch(
    sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, int, float]], what: str = "FFN"
) -> str | None:
    """Compare the activated widths of fused FFNs in ``sd`` with the model's.

    Args:
        sd: state dict in our fused layout.
        expected: prefix -> (act_dim, hidden_dim, idle_ratio) of the model's FFN there.
        what: how to name an FFN in the message (the prefix is appended).
    """
    for prefix, (act_dim, hidden, idle_ratio) in expected.items():
        if prefix + "in_proj.weight" not in sd:
            continue
        out_w = sd.get(prefix + "out_proj.weight")
        got = 0 if out_w is None else out_w.shape[1]
        if got != act_dim:
            return (
                f"{what} {prefix.rstrip('.')} of the checkpoint activates {got} of {hidden} hidden channels "
                f"(idle_ratio ~{1 - got / hidden:.4g}), the model {act_dim} (idle_ratio {idle_ratio:.4g}): "
                "set idle_ratio/channel_idle to match"
            )
    return None


def ffn_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's channel-idle FFNs (training or fused form), keyed by state-dict prefix (``...mlp.``)."""
    return {
        name + ".": m
        for name, m in model.named_modules()
        if (name == "mlp" or name.endswith(".mlp")) and hasattr(m, "act_dim") and hasattr(m, "dim")
    }


def prepare_ffns(sd: dict[str, Tensor], model: nn.Module, feature_norm: str, reparameterized: bool) -> str | None:
    """Check the FFN forms of ``sd`` against ``model`` and convert the authors' fused layout to ours, in place.

    Returns a one-line reason when the checkpoint cannot load (form, feature_norm or idle-ratio
    mismatch), else None.
    """
    forms = ffn_forms(sd)
    msg = form_mismatch(forms, reparameterized, feature_norm)
    if msg:
        return msg
    modules = ffn_modules(model)
    for prefix, form in forms.items():
        if form == "authors_fused" and prefix in modules:
            convert_authors_fused(sd, prefix, has_linear=modules[prefix].has_linear)
    if not reparameterized:
        return None
    expected = {}
    for prefix, m in modules.items():
        hidden = m.hidden_dim or m.act_dim  # 0: a fused module built without its hidden width
        expected[prefix] = (m.act_dim, hidden, 1 - m.act_dim / hidden if hidden else 0.0)
    return act_dim_mismatch(sd, expected)
