"""RePaPoolFormer: PoolFormer (MetaFormer with pooling) with channel-idle, reparameterizable FFNs.

Papers: RePaViT (Xu et al., ICML 2025, https://arxiv.org/abs/2505.21847); PoolFormer (Yu et al.,
CVPR 2022, https://arxiv.org/abs/2111.11418). Original code: https://github.com/Ackesnal/RePaViT
(Apache-2.0). This is an independent implementation; its state-dict keys equal the authors'.

Architecture, NCHW throughout: 7x7/4 conv stem -> four stages of PoolFormer blocks with 3x3/2
conv downsampling between them (``network.{1,3,5}``) -> GroupNorm -> spatial mean -> ``head``.
A block is ``x + drop_path(layer_scale_1 * (avgpool(norm1(x)) - norm1(x)))`` with a one-group
GroupNorm, then the channel-idle FFN with 1x1 convs, BatchNorm2d and its own layer scale ``mlp.ls``
(:class:`~repavit.layers.ChannelIdleConvMlp`), which owns its residual.

Reparameterization is exact, layer scale included: the fold scales fc2's weight and bias by the
layer scale. The authors' fold scales only the weight, so their reparameterized PoolFormer differs
from their training form by O(1); their reparameterized checkpoints are refused here.
"""

import re
from collections.abc import Mapping, Sequence

import torch
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from ..errors import UserError
from ..layers.features import take_indices
from ..layers.ffn_state import ffn_forms, prepare_ffns
from ..layers.idle_conv_mlp import ChannelIdleConvMlp, FusedIdleConvMlp
from ..layers.idle_mlp import active_channels
from ..layers.reparam import ReparamMixin, check_ffn_settings
from ._pretrained import build_model_with_cfg, with_released_weights
from ._registry import register_variants, repa_cfg
from .record import CheckpointMismatchError

__all__ = ["RePaPoolFormer", "checkpoint_filter_fn"]


class ConvEmbed(nn.Module):
    """A strided convolution (``proj``), used for the stem and for downsampling between stages."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Pooling(nn.Module):
    """PoolFormer's token mixer: ``avgpool(x) - x`` (stride 1, padding excluded from the average)."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x) - x


class PoolFormerBlock(nn.Module):
    """``x + drop_path(ls1 * pool_mix(GroupNorm(x)))``, then the channel-idle FFN (its residual inside)."""

    def __init__(
        self,
        dim: int,
        pool_size: int = 3,
        mlp_ratio: float = 4.0,
        idle_ratio: float = 0.75,
        channel_idle: bool = True,
        feature_norm: str = "BatchNorm",
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-5,
        reparameterized: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if layer_scale_init_value is not None:
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.layer_scale_1 = None
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = Pooling(pool_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if reparameterized:
            act_dim = active_channels(hidden, idle_ratio, "floor") if channel_idle else hidden
            self.mlp: nn.Module = FusedIdleConvMlp(dim, act_dim, has_linear=act_dim < hidden, hidden_dim=hidden)
        else:
            self.mlp = ChannelIdleConvMlp(
                dim,
                hidden,
                idle_ratio=idle_ratio,
                channel_idle=channel_idle,
                feature_norm=feature_norm,
                drop_path=drop_path,
                layer_scale_init_value=layer_scale_init_value,
                rounding="floor",
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.token_mixer(self.norm1(x))  # (B, C, H, W)
        if self.layer_scale_1 is not None:
            y = y * self.layer_scale_1[:, None, None]
        x = x + self.drop_path(y)
        return self.mlp(x)


class RePaPoolFormer(ReparamMixin, nn.Module):
    """PoolFormer whose FFNs are channel-idle FFNs that fold into three 1x1 convolutions after training.

    Args:
        img_size: nominal input size (recorded for timm's data config; any size runs).
        in_chans: input channels.
        num_classes: classes of the head (0 for no head).
        global_pool: ``"avg"`` or ``""`` (no pooling).
        layers: blocks per stage.
        embed_dims: channels per stage.
        pool_size: average-pooling window of the token mixer.
        mlp_ratio: FFN hidden width over its input width.
        layer_scale_init_value: initial value of both layer scales.
        use_layer_scale: False for blocks without layer scales (as the original PoolFormer's flag).
        channel_idle: enable the channel-idle mechanism (False: every hidden channel activated).
        idle_ratio: share of FFN hidden channels that skip GELU (``int(h * (1 - idle_ratio))`` stay active).
        feature_norm: FFN normalization, ``"BatchNorm"`` (foldable) or ``"LayerNorm"`` (per pixel, over channels).
        heuristic: idle-ratio schedule; only ``"static"`` (the same ratio in every block).
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth, rising linearly from 0 to this value over all blocks.
        reparameterized: build the FFNs directly in their fused inference form; such a model cannot be trained.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        layers: Sequence[int] = (2, 2, 6, 2),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        pool_size: int = 3,
        mlp_ratio: float = 4.0,
        layer_scale_init_value: float = 1e-5,
        use_layer_scale: bool = True,
        channel_idle: bool = True,
        idle_ratio: float = 0.75,
        feature_norm: str = "BatchNorm",
        heuristic: str = "static",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reparameterized: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise UserError(f"unknown global_pool {global_pool!r}; expected 'avg' or ''")
        if len(layers) != len(embed_dims):
            raise UserError(f"layers {tuple(layers)} and embed_dims {tuple(embed_dims)} need one entry per stage")
        if pool_size < 1 or pool_size % 2 == 0:
            raise UserError(f"pool_size must be an odd positive integer, got {pool_size}")
        self.heuristic = check_ffn_settings(feature_norm, idle_ratio, reparameterized, heuristic, "RePaPoolFormer")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.channel_idle, self.idle_ratio, self.feature_norm = channel_idle, idle_ratio, feature_norm
        self.depths, self.embed_dims = tuple(layers), tuple(embed_dims)
        self.pool_size, self.layer_scale_init_value = pool_size, layer_scale_init_value if use_layer_scale else None
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.patch_embed = ConvEmbed(in_chans, embed_dims[0], kernel_size=7, stride=4, padding=2)
        total = sum(layers)
        network: list[nn.Module] = []
        for i, (depth, dim) in enumerate(zip(layers, embed_dims)):
            start = sum(layers[:i])
            blocks = [
                PoolFormerBlock(
                    dim,
                    pool_size=pool_size,
                    mlp_ratio=mlp_ratio,
                    idle_ratio=idle_ratio,
                    channel_idle=channel_idle,
                    feature_norm=feature_norm,
                    drop_path=drop_path_rate * (start + j) / max(total - 1, 1),
                    layer_scale_init_value=self.layer_scale_init_value,
                    reparameterized=reparameterized,
                )
                for j in range(depth)
            ]
            network.append(nn.Sequential(*blocks))
            if i < len(layers) - 1:
                network.append(ConvEmbed(dim, embed_dims[i + 1], kernel_size=3, stride=2, padding=1))
        self.network = nn.ModuleList(network)  # stages at even indices, downsampling at odd ones
        self.norm = nn.GroupNorm(1, self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=dim, reduction=4 * 2**i, module=f"network.{2 * i}") for i, dim in enumerate(embed_dims)
        ]
        self._init_weights()
        if reparameterized:
            self.eval()

    def _init_weights(self) -> None:
        # As PoolFormer: trunc-normal linears and FFN 1x1 convs; the stem/downsampling convs keep
        # PyTorch's default init.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and ".mlp." in name + "."):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Module]:
        return [self.network[i] for i in range(0, len(self.network), 2)]

    # ---- timm model API ---------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=[(r"^network\.(\d+)\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._reset_head(num_classes, global_pool, ("avg", ""), self.num_features)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> normalized last-stage map ``(B, num_features, H/32, W/32)``.

        The input is taken channels-last (a view if it already is): every convolution, pooling and
        GroupNorm after it follows, which makes the model about 2x faster at inference on a CPU and 1.4x
        for a training step (same outputs to rounding; ``tests/test_precision.py``).
        """
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for m in self.network:
            x = m(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs as multi-scale NCHW maps (strides 4, 8, 16, 32), timm's API.

        ``indices``: None for all stages, ``n`` for the last ``n``, or a list. ``norm`` applies the
        final GroupNorm to the last stage's map. Returns the maps, or ``(final features, maps)``.
        """
        if output_fmt != "NCHW":
            raise UserError(f"unknown output_fmt {output_fmt!r}; expected 'NCHW'")
        n = len(self.stages)
        taken, max_index = take_indices(n, indices)
        stop = 2 * max_index + 1 if stop_early else len(self.network)
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        intermediates = []
        for j, m in enumerate(self.network[:stop]):
            x = m(x)
            if j % 2 == 0 and j // 2 in taken:
                intermediates.append(self.norm(x) if norm and j // 2 == n - 1 else x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if stop == len(self.network) else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm/head) the requested feature maps do not need. Returns the indices."""
        taken, max_index = take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.network = self.network[: 2 * max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    # ---- checkpoints and benchmarks ------------------------------------------------------------
    def checkpoint_filter(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def vanilla_counterpart(self) -> nn.Module:
        """timm's plain PoolFormer (v1, ``poolformer_*``) of the same size and pool size, for benchmarks.

        timm registers every ``poolformer_*`` with pool size 3; the s-models here use 7 (as the
        authors registered them), so the counterpart is built with this model's pool size to
        compare FFNs only.
        """
        from timm.layers import GroupNorm1
        from timm.models.metaformer import MetaFormer

        return MetaFormer(
            depths=self.depths,
            dims=self.embed_dims,
            num_classes=self.num_classes,
            downsample_norm=None,
            mlp_act=nn.GELU,
            mlp_bias=True,
            norm_layers=GroupNorm1,
            layer_scale_init_values=self.layer_scale_init_value,
            res_scale_init_values=None,
            use_mlp_head=False,
            pool_size=self.pool_size,
        )


# ---- checkpoint conversion ----------------------------------------------------------------
_BLOCK = re.compile(r"^network\.(\d+)\.(\d+)\.")


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: RePaPoolFormer) -> dict[str, Tensor]:
    """Check a checkpoint in the authors' layout (= ours) against ``model``.

    Raises :class:`CheckpointMismatchError` naming the first setting that differs (widths, blocks per
    stage, FFN form, feature_norm, idle_ratio). The authors' reparameterized layout (``mlp.fc3``) is
    refused: their fold leaves the layer scale out of the bias, so those weights are wrong.
    (The pool size has no parameters and cannot be checked.)
    """
    sd = dict(state_dict)
    widths = []
    for i in range(len(model.embed_dims)):
        w = sd.get(f"network.{2 * i}.0.norm1.weight")
        if w is not None:
            widths.append(w.shape[0])
    if widths and tuple(widths) != model.embed_dims[: len(widths)]:
        raise CheckpointMismatchError(
            f"checkpoint has embed_dims {tuple(widths)}, model {model.embed_dims}: it is for another model size"
        )
    blocks: dict[int, int] = {}
    for k in sd:
        m = _BLOCK.match(k)
        if m and int(m.group(1)) % 2 == 0:
            stage = int(m.group(1)) // 2
            blocks[stage] = max(blocks.get(stage, 0), int(m.group(2)) + 1)
    if blocks:
        layers = tuple(blocks.get(i, 0) for i in range(max(blocks) + 1))
        if layers != model.depths:
            raise CheckpointMismatchError(
                f"checkpoint has layers {layers} (blocks per stage), model {model.depths}: it is for another model size"
            )
    has_ls = any(k.endswith("layer_scale_1") for k in sd)
    if blocks and has_ls != (model.layer_scale_init_value is not None):
        raise CheckpointMismatchError(
            f"checkpoint {'has' if has_ls else 'has no'} layer scales, model "
            f"{'has' if model.layer_scale_init_value is not None else 'has none'}: set use_layer_scale to match"
        )
    if "authors_fused" in ffn_forms(sd).values():
        raise CheckpointMismatchError(
            "checkpoint holds the authors' reparameterized PoolFormer FFNs (mlp.fc1/fc2/fc3), which are wrong "
            "(their fold leaves the layer scale out of the bias); load the training-form checkpoint and reparameterize"
        )
    msg = prepare_ffns(sd, model, model.feature_norm, model.reparameterized)
    if msg:
        raise CheckpointMismatchError(msg)
    return sd


def identify_state_dict(state_dict: Mapping[str, Tensor]) -> str | None:
    """The RePaPoolFormer size (authors' name) whose widths and blocks per stage a state dict has, or None."""
    if "network.0.0.mlp.fc1.weight" not in state_dict and "network.0.0.mlp.in_proj.weight" not in state_dict:
        return None
    blocks: dict[int, int] = {}
    for k in state_dict:
        m = _BLOCK.match(k)
        if m and int(m.group(1)) % 2 == 0:
            stage = int(m.group(1)) // 2
            blocks[stage] = max(blocks.get(stage, 0), int(m.group(2)) + 1)
    layers = tuple(blocks.get(i, 0) for i in range(max(blocks, default=-1) + 1))
    widths = tuple(
        state_dict[f"network.{2 * i}.0.norm1.weight"].shape[0]
        for i in range(len(layers))
        if f"network.{2 * i}.0.norm1.weight" in state_dict
    )
    for size, (arch_layers, dims, _, _) in ARCHS.items():
        if (layers, widths) == (arch_layers, dims):
            return f"RePaPoolformer_{size}"
    return None


# ---- registry -------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return repa_cfg(first_conv="patch_embed.proj", pool_size=(7, 7), fixed_input_size=False, **kwargs)


# Model sizes: (blocks per stage, widths, pool size, layer-scale init), as the authors registered them.
ARCHS = {
    "s12": ((2, 2, 6, 2), (64, 128, 320, 512), 7, 1e-5),
    "s24": ((4, 4, 12, 4), (64, 128, 320, 512), 7, 1e-5),
    "s36": ((6, 6, 18, 6), (64, 128, 320, 512), 7, 1e-6),
    "m36": ((6, 6, 18, 6), (96, 192, 384, 768), 3, 1e-6),
    "m48": ((8, 8, 24, 8), (96, 192, 384, 768), 3, 1e-6),
}
# The authors' names and the timm-style names, each mapped to a size.
MODEL_NAMES = {f"RePaPoolformer_{s}": s for s in ARCHS} | {f"repapoolformer_{s}": s for s in ARCHS}

default_cfgs = generate_default_cfgs(with_released_weights({name: _cfg() for name in MODEL_NAMES}))


def _create_repapoolformer(variant: str, pretrained: bool = False, **kwargs) -> RePaPoolFormer:
    layers, dims, pool_size, ls_init = ARCHS[MODEL_NAMES[variant]]
    model_args = dict(layers=layers, embed_dims=dims, pool_size=pool_size, layer_scale_init_value=ls_init)
    out_indices = kwargs.pop("out_indices", tuple(range(len(layers))))
    return build_model_with_cfg(
        RePaPoolFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


def _describe(name: str) -> str:
    layers, dims, pool, ls = ARCHS[MODEL_NAMES[name]]
    return f"{name}: RePaPoolFormer, layers {layers}, widths {dims}, pool {pool}, layer scale {ls}."


register_variants(__name__, MODEL_NAMES, _create_repapoolformer, _describe, identify_state_dict)
