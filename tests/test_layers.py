"""The channel-idle FFN, its folding, and its fused inference form."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repavit.errors import ArgumentError
from repavit.layers import ChannelIdleMlp, FusedIdleMlp, active_channels, idle_ratios_for_depth

from helpers import randomize_bn, randomize_params, rel_err


class StraightforwardIdleMlp(nn.Module):
    """The FFN written the obvious (slow) way: transposed BatchNorm1d, GELU everywhere, masked select."""

    def __init__(self, ref: ChannelIdleMlp):
        super().__init__()
        self.m = ref

    def forward(self, x):
        m = self.m
        u = m.norm1(x.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d over (B, C, N)
        z = m.fc1(u)
        mask = torch.zeros_like(z, dtype=torch.bool)
        mask[..., : m.act_dim] = True
        z = torch.where(mask, F.gelu(z), z)
        z = m.norm2(z.transpose(1, 2)).transpose(1, 2)
        return x + m.fc2(z)


@pytest.mark.parametrize(
    ("idle", "c", "expected"),
    [(0.25, 192, 576), (0.5, 384, 768), (0.75, 768, 768), (0.75, 1280, 1280), (1.0, 1024, 0), (0.0, 192, 768)],
)
def test_active_channels_table(idle, c, expected):
    assert active_channels(4 * c, idle) == expected


def test_active_channels_floor_for_poolformer():
    assert active_channels(10, 0.75, "ceil") == 3
    assert active_channels(10, 0.75, "floor") == 2


def test_linear_heuristic_matches_formula():
    ratios = idle_ratios_for_depth(0.75, 12, "linear")
    assert ratios[-1] == 0.0 and ratios[-2] == pytest.approx(1.0)
    assert ratios[0] == pytest.approx(0.5 + 0.5 / 11)
    assert sum(ratios) / 12 == pytest.approx(0.708, abs=1e-3)
    acts = [active_channels(768, r) for r in ratios]
    assert acts[0] == 350 and acts[1] == 315 and acts[-3] == 35 and acts[-2] == 0 and acts[-1] == 768
    assert idle_ratios_for_depth(0.75, 12, "static") == [0.75] * 12
    assert idle_ratios_for_depth(0.75, 3, "none") == [0.75] * 3


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", None, True])
def test_bad_idle_ratio(bad):
    with pytest.raises(ValueError, match="idle_ratio"):
        ChannelIdleMlp(8, 32, idle_ratio=bad)


def test_bad_feature_norm_and_heuristic():
    with pytest.raises(ValueError, match="feature_norm.*BatchNorm, LayerNorm"):
        ChannelIdleMlp(8, 32, feature_norm="GroupNorm")
    with pytest.raises(ValueError, match="heuristic.*static, linear"):
        idle_ratios_for_depth(0.5, 4, "cubic")


@pytest.mark.parametrize("idle", [0.0, 0.3, 0.75, 1.0])
def test_training_form_equals_straightforward_formulation(idle):
    """Outputs, gradients and BatchNorm running statistics, in train mode (batch statistics)."""
    torch.manual_seed(0)
    ours = ChannelIdleMlp(12, 48, idle_ratio=idle).double()
    randomize_bn(ours)
    ref_module = ChannelIdleMlp(12, 48, idle_ratio=idle).double()
    ref_module.load_state_dict(ours.state_dict())
    ref = StraightforwardIdleMlp(ref_module)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    for (na, pa), (_, pb) in zip(ours.named_parameters(), ref_module.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12, msg=na)
    for (na, ba), (_, bb) in zip(ours.named_buffers(), ref_module.named_buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-12, atol=1e-12, msg=na)
    ours.eval(), ref_module.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_activation_runs_on_active_channels_only():
    seen = []

    class Spy(nn.GELU):
        def forward(self, x):
            seen.append(x.shape[-1])
            return super().forward(x)

    m = ChannelIdleMlp(8, 32, idle_ratio=0.75, act_layer=Spy)
    m(torch.randn(2, 5, 8))
    assert seen == [8]


@settings(max_examples=40, deadline=None)
@given(
    c=st.integers(1, 24),
    ratio=st.sampled_from([1, 2, 4]),
    idle=st.one_of(st.sampled_from([0.0, 1.0, 0.75, 0.5]), st.floats(0.0, 1.0)),
    layer_scale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_is_exact(c, ratio, idle, layer_scale, seed):
    """Property: fused == training form (eval), random weights and BN statistics, fp64 and fp32."""
    torch.manual_seed(seed)
    h = c * ratio
    m = ChannelIdleMlp(c, h, idle_ratio=idle)
    randomize_bn(m, seed)
    randomize_params(m, seed, std=0.3)
    m.eval()
    ls = torch.randn(c) if layer_scale else None
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        md = m.to(dtype)
        x = torch.randn(4, 3, c, dtype=dtype)
        with torch.no_grad():
            if ls is None:
                ref = md(x)
                fused = md.fuse()
            else:  # x + ls * y, folded through the layer_scale argument
                ref = x + ls.to(dtype) * (md(x) - x)
                fused = FusedIdleMlp(c, md.act_dim, has_linear=md.act_dim < h)
                fused.load_folded(md.fold(layer_scale=ls), dtype=dtype)
            out = fused(x)
        assert out.dtype == dtype
        assert rel_err(out, ref) <= tol, (dtype, rel_err(out, ref))


def test_fused_edge_cases_structure():
    all_idle = ChannelIdleMlp(8, 32, idle_ratio=1.0).eval().fuse()
    assert all_idle.out_proj is None and tuple(all_idle.in_proj.weight.shape) == (8, 8)
    none_idle = ChannelIdleMlp(8, 32, idle_ratio=0.0).eval().fuse()
    assert not none_idle.has_linear and tuple(none_idle.in_proj.weight.shape) == (32, 8)
    plain = ChannelIdleMlp(8, 32, channel_idle=False).eval().fuse()
    assert plain.act_dim == 32 and not plain.has_linear
    default = ChannelIdleMlp(8, 32, idle_ratio=0.75).eval().fuse()
    assert tuple(default.in_proj.weight.shape) == (16, 8) and tuple(default.out_proj.weight.shape) == (8, 8)
    # 3C^2 multiply-adds instead of 8C^2 (plus biases)
    n_weights = default.in_proj.weight.numel() + default.out_proj.weight.numel()
    assert n_weights == 3 * 8 * 8


def test_fold_keeps_dtype_and_device():
    m = ChannelIdleMlp(8, 32).double().eval()
    f = m.fuse()
    assert all(p.dtype == torch.float64 for p in f.parameters())
    m16 = ChannelIdleMlp(8, 32).to(torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in m16.fuse().parameters())


def test_layernorm_ffn_cannot_fold_and_says_why():
    m = ChannelIdleMlp(8, 32, feature_norm="LayerNorm")
    with pytest.raises(ValueError, match="LayerNorm.*BatchNorm"):
        m.fuse()


def test_layernorm_form_is_partial_act_without_bn2():
    m = ChannelIdleMlp(8, 32, idle_ratio=0.75, feature_norm="LayerNorm").eval()
    x = torch.randn(2, 3, 8)
    z = m.fc1(F.layer_norm(x, (8,), m.norm1.weight, m.norm1.bias))
    z = torch.cat((F.gelu(z[..., :8]), z[..., 8:]), -1)
    torch.testing.assert_close(m(x), x + m.fc2(z))


def test_fused_module_refuses_training():
    f = ChannelIdleMlp(8, 32).eval().fuse()
    assert not f.training
    with pytest.raises(RuntimeError, match="reparameterized"):
        f.train()
    f.eval()  # eval stays allowed


def test_drop_path_only_in_training():
    m = ChannelIdleMlp(8, 32, drop_path=0.5)
    x = torch.randn(64, 5, 8)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    y = m(x)
    # dropped samples are exactly the residual input
    dropped = (y - x).flatten(1).abs().amax(1) == 0
    assert 0 < dropped.sum() < 64
    assert math.isfinite(y.sum().item())


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_on_cpu(fused):
    m = ChannelIdleMlp(16, 64, idle_ratio=0.75)
    randomize_bn(m)
    m.eval()
    if fused:
        m = m.fuse()
    x = torch.randn(2, 5, 16)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert rel_err(out.float(), ref) < 5e-2


@pytest.mark.parametrize("idle", [0.0, 0.75, 1.0])
def test_fused_ffn_scripts(idle):
    f = ChannelIdleMlp(8, 32, idle_ratio=idle).eval().fuse()
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(torch.jit.script(f)(x), f(x))


def _hidden_inputs(M=10, C=5, h=16, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    gamma = (1 + 0.3 * torch.randn(h, generator=g, dtype=torch.float64)).requires_grad_()
    return r(M, C), r(h, C), r(h) if bias else None, r(C, h), r(C) if bias else None, gamma, r(h)


@pytest.mark.parametrize("a, bias", [(4, True), (1, False), (15, True)])
@pytest.mark.parametrize("node", ["explicit", "covariance"])
def test_hidden_layer_nodes_gradcheck(node, a, bias):
    from repavit.layers.idle_autograd import _HiddenLayer
    from repavit.layers.idle_covariance import _CovarianceHidden

    fn = {"explicit": _HiddenLayer, "covariance": _CovarianceHidden}[node]
    inputs = _hidden_inputs(bias=bias)
    h = inputs[1].shape[0]
    stats = torch.zeros(h, dtype=torch.float64), torch.ones(h, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: fn.apply(*t, *stats, a, 0.1, 1e-5), inputs)


def _hidden_paths_agree(paths, dtype, tol, x, momentum=0.1, ops=False, monkeypatch=None):
    """Every path in ``paths`` against ``split``: outputs, input and parameter gradients, buffers, after two
    steps (so num_batches_tracked and a cumulative average advance); returns each path's saved bytes."""
    torch.manual_seed(0)
    base = randomize_bn(ChannelIdleMlp(12, 48, idle_ratio=0.75)).to(dtype).train()
    base.norm2.momentum = momentum
    if ops:  # the plain-op covariance path (torch.compile, autocast) in eager mode
        import repavit.layers.idle_covariance as cov

        monkeypatch.setattr(cov, "fused_hidden_applies", lambda *a: False)
        monkeypatch.setattr(cov._CovarianceHidden, "apply", None)  # the node must not run
    out = {}
    for path in ("split", *paths):
        m = copy.deepcopy(base)
        m.hidden_path = path
        assert m.hidden_path_for(x.reshape(-1, 12)) == path
        xi = x.to(dtype).requires_grad_()
        nbytes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, acc=nbytes: acc.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            for _ in range(2):
                y = m(xi)
        y.backward(torch.cos(y.detach()))
        out[path] = (y, xi.grad, m, sum(nbytes))
    ref = out.pop("split")
    for path, (y, dx, m, _) in out.items():
        torch.testing.assert_close(y, ref[0], rtol=tol, atol=tol, msg=path)
        torch.testing.assert_close(dx, ref[1], rtol=10 * tol, atol=tol, msg=path)
        for (n, p), (_, q) in zip(m.named_parameters(), ref[2].named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=10 * tol, atol=tol, msg=f"{path} {n}")
        for (n, p), (_, q) in zip(m.named_buffers(), ref[2].named_buffers()):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol / 10, msg=f"{path} {n}")
    return {k: v[3] for k, v in out.items()} | {"split": ref[3]}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_hidden_layer_paths_equal_split_graph_and_save_less(momentum, dtype, tol):
    """The covariance and explicit nodes compute what the split graph computes; each keeps fewer bytes."""
    x = 2 * torch.randn(8, 30, 12) + 1  # non-centered tokens: the covariance path subtracts their mean
    saved = _hidden_paths_agree(("explicit", "covariance"), dtype, tol, x, momentum)
    # per token: split keeps 2h + a + 2C, explicit h + a + 2C, covariance 2a + 2C columns (C = a = 12)
    assert saved["covariance"] < 0.7 * saved["explicit"] and saved["explicit"] < 0.8 * saved["split"], saved


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_covariance_ops_path_equals_split_graph(dtype, tol, monkeypatch):
    _hidden_paths_agree(("covariance",), dtype, tol, torch.randn(3, 10, 12), ops=True, monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_mlp_covariance_path_equals_split_graph(dtype, tol, channels_last):
    """PoolFormer's NCHW FFN: the pixels as tokens (a view when channels-last), the same as the split graph."""
    from repavit.layers import ChannelIdleConvMlp

    torch.manual_seed(0)
    base = randomize_bn(ChannelIdleConvMlp(8, 32, layer_scale_init_value=0.5)).to(dtype).train()
    x = torch.randn(3, 8, 6, 5, dtype=dtype) + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = {}
    for path in ("split", "covariance"):
        m = copy.deepcopy(base)
        m.hidden_path = path
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.cos(y.detach()))
        out[path] = (y, xi.grad, m)
    (y, dx, m), (ry, rdx, ref) = out["covariance"], out["split"]
    torch.testing.assert_close(y, ry, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, rdx, rtol=10 * tol, atol=tol)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=10 * tol, atol=tol, msg=n)
    for (n, p), (_, q) in zip(m.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol / 10, msg=n)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("rows", ["random", "aligned", "subspace", "subspace16-static"])
def test_covariance_path_in_float32_is_as_accurate_as_the_plain_graph(cond, rows, monkeypatch):
    """Against float64, on tokens with a large mean and a covariance of condition number ``cond``: the
    float32 covariance path errs no more than the float32 straightforward graph (within 2x), outputs and
    gradients, although its variance is ``wᵀ Σ w`` instead of a sum over the tokens. Idle rows of fc1:
    ``random``; ``aligned``, 8 of them along the smallest eigenvectors; ``subspace``, all of them in the
    8 smallest eigenvectors' span. There ``wᵀ Σ w`` and ``Σ w`` alone cancel badly (the guard's case).
    ``subspace16-static``: 16 of them in that span, and the guard as on an accelerator (the 16 most
    exposed channels, no ``nonzero``)."""
    if rows.endswith("-static"):
        monkeypatch.setattr("repavit.layers.idle_covariance.DYNAMIC_GUARD_DEVICES", set())
    torch.manual_seed(0)
    c = 64
    base = ChannelIdleMlp(c, 4 * c).double().train()
    base.norm1 = nn.Identity()  # the conditioned tokens straight into fc1
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    ev = torch.logspace(0, -math.log10(cond), c, dtype=torch.float64)
    a, low = base.act_dim, q[:, -8:].t()
    with torch.no_grad():
        if rows == "aligned":
            base.fc1.weight[a : a + 8] = low
        elif rows.startswith("subspace"):
            n, scale = (16, 30.0) if rows.startswith("subspace16") else (4 * c - a, 1.0)
            base.fc1.weight[a : a + n] = scale * torch.randn(n, 8, dtype=torch.float64) @ low
    x = (torch.randn(4, 512, c, dtype=torch.float64) * ev.sqrt()) @ q.t() + 3
    out = {}
    for dtype, path in ((torch.float64, "split"), (torch.float32, "split"), (torch.float32, "covariance")):
        m = copy.deepcopy(base).to(dtype)
        m.hidden_path = path
        xi = x.to(dtype).detach().requires_grad_()
        y = m(xi)
        y.backward(torch.cos(y.detach()))
        out[dtype, path] = [t.double() for t in (y, xi.grad, m.fc1.weight.grad, m.fc2.weight.grad)]
    ref = out[torch.float64, "split"]
    for plain, cov in zip(out[torch.float32, "split"], out[torch.float32, "covariance"]):
        r = ref.pop(0)
        assert rel_err(cov, r) <= 2 * rel_err(plain, r) + 1e-7


def test_set_hidden_path_reaches_every_family_ffn():
    import timm

    from repavit.layers.idle_mlp import set_hidden_path

    vit = timm.create_model("RePaViT_Tiny", depth=3, img_size=32)
    pool = timm.create_model("RePaPoolformer_s12", embed_dims=(8, 16, 24, 32))
    assert set_hidden_path(vit, "split") == 3 and set_hidden_path(pool, "covariance") == 12
    assert {m.hidden_path for m in pool.modules() if hasattr(m, "hidden_path")} == {"covariance"}
    with pytest.raises(ArgumentError, match="got 'fast'"):
        set_hidden_path(vit, "fast")


def _step(m, x, autocast=False):
    """Output, input gradient, parameter gradients and buffers of one training step of ``m`` on ``x``."""
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(xi)
    y.float().backward(torch.cos(y.detach().float()))
    mod = getattr(m, "_orig_mod", m)
    return [y.float(), xi.grad, *(p.grad for p in mod.parameters()), *(b.float() for b in mod.buffers())]


def test_covariance_path_under_autocast_and_compile():
    """Compiled (dynamic shapes, two batch sizes) the plain-op form gives the split graph's outputs,
    gradients and running statistics; under bfloat16 autocast it lands as near the float32 result as the
    split graph does under autocast."""
    torch.manual_seed(0)
    base = randomize_bn(ChannelIdleMlp(16, 64)).train()
    split, cov = copy.deepcopy(base), copy.deepcopy(base)
    split.hidden_path, cov.hidden_path = "split", "covariance"
    compiled = torch.compile(cov, backend="aot_eager", dynamic=True)
    for batch in (4, 6):  # the second size runs the dynamic graph
        x = torch.randn(batch, 12, 16) + 1
        for got, want in zip(_step(compiled, x), _step(split, x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    x = torch.randn(4, 12, 16) + 1
    ref = _step(copy.deepcopy(base), x)
    for path in ("split", "covariance"):
        m = copy.deepcopy(base)
        m.hidden_path = path
        half = _step(m, x, autocast=True)
        errs = [rel_err(h, r) for h, r in zip(half[:4], ref[:4])]  # output, input, fc1 weight and bias
        assert 0 < max(errs) < 5e-2, (path, errs)


def test_covariance_path_on_half_precision_weights_keeps_its_statistics_in_float32():
    """A float16 model on large tokens: u_cᵀ u_c would overflow float16 (8192 tokens of std 10); the
    statistics stay float32, so the output and running variance are finite and match the split graph's."""
    torch.manual_seed(0)
    base = ChannelIdleMlp(16, 64).train().half()
    base.norm1 = nn.Identity()  # the large tokens straight into fc1
    x = (10 * torch.randn(8, 1024, 16)).half()
    out = {}
    for path in ("split", "covariance"):
        m = copy.deepcopy(base)
        m.hidden_path = path
        out[path] = (m(x).float(), m.norm2.running_var.float())
    assert torch.isfinite(out["covariance"][0]).all() and torch.isfinite(out["covariance"][1]).all()
    assert rel_err(out["covariance"][0], out["split"][0]) < 1e-2
    assert rel_err(out["covariance"][1], out["split"][1]) < 1e-2


def test_covariance_path_where_it_pays():
    from repavit.layers.idle_covariance import covariance_pays

    m = ChannelIdleMlp(64, 256).train()  # idle ratio 0.75: 192 idle channels
    assert covariance_pays(6304, 384, 1536, 384) and covariance_pays(80, 64, 256, 64)
    assert not covariance_pays(60, 64, 256, 64) and not covariance_pays(10**6, 64, 256, 256)
    assert m.hidden_path_for(torch.randn(80, 64)) == "covariance"
    assert m.hidden_path_for(torch.randn(60, 64)) == "explicit"  # few tokens: materializing is cheaper
    m.hidden_path = "fast"
    with pytest.raises(ArgumentError, match="hidden_path must be one of auto, covariance, explicit, split"):
        m(torch.randn(2, 3, 64))


def test_fused_hidden_layer_only_where_exact():
    from repavit.layers.idle_autograd import fused_hidden_applies

    m = ChannelIdleMlp(8, 32).train()
    u = torch.randn(6, 8)
    assert fused_hidden_applies(u, m.norm2, m.act)
    assert not fused_hidden_applies(u[:1], m.norm2, m.act)  # one token: BatchNorm refuses, as it should
    assert not fused_hidden_applies(u, m.norm2, nn.GELU(approximate="tanh"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_hidden_applies(u, m.norm2, m.act)
    m.eval()
    assert not fused_hidden_applies(u, m.norm2, m.act)  # running statistics: the plain (foldable) ops
