"""Deterministic checkpoints in the authors' layout, and the logits their models give on them.

``tests/data/checkpoint_keys/<Model>.tsv`` lists the authors' released state-dict keys (name,
shape, dtype). Every tensor is drawn from a generator seeded with the CRC32 of its key, so the
checkpoint is the same on every machine; the authors' own models, loaded with exactly these
tensors, produced ``tests/data/<case>.expected.pt``. Structural buffers (Swin's relative position
index and attention masks) are the real values, stored in ``structural_buffers.pt``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
CASES = ["RePaViT_Tiny", "RePaViT_Tiny@linear", "RePaViT_Tiny@idle0.5"]


def key_list(model: str) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    with open(DATA / "checkpoint_keys" / f"{model}.tsv") as f:
        next(f)  # header
        for line in f:
            key, shape, dtype = line.rstrip("\n").split("\t")
            rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return rows


def _draw(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key.endswith("running_mean"):
        return torch.randn(shape, generator=g) * 0.5
    if key.endswith("running_var"):
        return torch.rand(shape, generator=g) * 1.5 + 0.5
    if len(shape) == 1 and key.endswith(".weight"):
        return 1.0 + torch.randn(shape, generator=g) * 0.1
    if len(shape) <= 1:
        return torch.randn(shape, generator=g) * 0.1
    return torch.randn(shape, generator=g) * 0.02


def authors_state_dict(model: str) -> dict[str, torch.Tensor]:
    structural = None
    sd = {}
    for key, shape, _ in key_list(model):
        if key.endswith(("relative_position_index", "attn_mask")):
            if structural is None:
                structural = torch.load(DATA / "structural_buffers.pt", weights_only=True)
            sd[key] = structural[f"{model}:{key}"].clone()
        elif key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0, dtype=torch.int64)
        else:
            sd[key] = _draw(key, shape)
    return sd


def golden_input() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def expected(case: str) -> dict:
    return torch.load(DATA / f"{case}.expected.pt", weights_only=True)
