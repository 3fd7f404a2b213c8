"""Multi-head self-attention with its pre-norm inside (the RePaViT layout: ``blocks.i.attn.norm``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError


class PreNormAttention(nn.Module):
    """``proj(MHSA(LayerNorm(x)))`` for tokens ``(B, N, C)``; the residual add is the caller's.

    With ``norm=False`` there is no LayerNorm inside: ``proj(MHSA(x))``.

    Uses ``scaled_dot_product_attention`` (fused kernels where the backend has them); the math is
    the standard ``softmax(q k^T * head_dim^-0.5) v`` with qkv split as ``(3, heads, head_dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-5,
        norm: bool = True,
        proj_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise UserError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        # Registration order follows the authors' state_dict order (qkv, proj, norm).
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # norm=False: the caller normalizes (LV-ViT keeps the LayerNorm in the block, ``blocks.i.norm1``)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        return self._attend(q, k, v)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of ``q`` (B, heads, n, head_dim) over ``k``, ``v``, projected: (B, n, C)."""
        B, _, n, _ = q.shape
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))

    def forward_prefix(self, x: Tensor, num_queries: int = 1) -> Tensor:
        """The attention output for the first ``num_queries`` tokens only, attending to all tokens.

        ``forward_prefix(x, n)`` equals ``forward(x)[:, :n]`` (every query row is independent), at
        the cost of keys and values for all tokens but queries, attention rows and the projection
        for ``n`` tokens. The class-token shortcut of :class:`repavit.models.RePaViT` uses it.
        """
        B, N, C = x.shape
        h = self.norm(x)
        qkv = self.qkv
        if isinstance(qkv, nn.Linear):  # queries for the prefix only
            w, b = qkv.weight, qkv.bias
            q = F.linear(h[:, :num_queries], w[:C], None if b is None else b[:C])
            kv = F.linear(h, w[C:], None if b is None else b[C:])
        else:  # a swapped-in module (e.g. int8 dynamic Linear) has no weight to slice
            out = qkv(h)
            q, kv = out[:, :num_queries, :C], out[..., C:]
        q = q.reshape(B, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self._attend(q, k, v)
