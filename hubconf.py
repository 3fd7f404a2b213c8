"""torch.hub entry points: every registered RePa model.

::

    model = torch.hub.load("/path/to/this/repo", "RePaViT_Small", source="local")
    model = torch.hub.load(REPO, "RePaViT_Base", source="local", pretrained=True)        # released weights
    model = torch.hub.load(REPO, "RePaViT_Tiny", source="local", checkpoint_path="w.pth", reparameterized=True)

Each entry point is ``repavit.create_model(name, ...)``: ``pretrained`` loads the released weights
through the Hugging Face cache, ``checkpoint_path`` a local ``.pth``/``.pt``/``.safetensors`` file
(authors' layout or ours), ``reparameterized=True`` returns the fused inference model, and other
keywords are model arguments (``idle_ratio``, ``num_classes``, ``img_size``, ...).
"""

import os
import sys

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]

# The repository uses a src/ layout: make its package importable without installing it.
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "repavit")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

import repavit as _repavit  # noqa: E402


def _entry(name):
    def entry(pretrained=False, checkpoint_path=None, reparameterized=False, **kwargs):
        return _repavit.create_model(
            name, pretrained=pretrained, checkpoint_path=checkpoint_path, reparameterized=reparameterized, **kwargs
        )

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{name}. Args: pretrained (released weights), checkpoint_path (local .pth/.pt/.safetensors), "
        "reparameterized (fused inference form), **kwargs (model arguments)."
    )
    return entry


for _name in _repavit.list_models():
    globals()[_name] = _entry(_name)
