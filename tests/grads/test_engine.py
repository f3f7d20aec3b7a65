"""The hook engine against the plain per-example backward loop and torch.func, layer by layer.

float64: both sides compute the same sums in a different order, so they agree to ~1e-15
relative; 1e-10 leaves room for accumulation over a few thousand terms. float32: the engine in
float32 against the float64 loop, relative 1e-5 (eps 1.2e-7 times sums of ~100 terms).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from grad_models import Mixed, TiedLM, conv_net, cross_entropy, mixed_batch, squared_error
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from utils import KeywordNet, assert_close

from influx.grads import (
    per_sample_grads,
    per_sample_norms,
    per_sample_projected,
    projection,
    reference,
    rules,
)
from influx.grads.projection import Projector, dense_project


def check_all(model, loss_fn, x, y, *, rtol, chunk_size=None):
    """Engine vs the naive per-example loop: grads, per-parameter norms, total norms."""
    expected = reference.naive_per_sample_grads(model, loss_fn, x, y)
    got = per_sample_grads(model, loss_fn, x, y, chunk_size=chunk_size)
    assert list(got) == list(expected)
    for name in expected:
        assert_close(got[name], expected[name], rtol=rtol, name=name)
    by_layer = per_sample_norms(model, loss_fn, x, y, by_layer=True, chunk_size=chunk_size)
    for name in expected:
        assert_close(
            by_layer[name],
            expected[name].flatten(1).norm(dim=1),
            rtol=rtol,
            name=f"norm {name}",
            elementwise=True,
        )
    total = per_sample_norms(model, loss_fn, x, y, chunk_size=chunk_size)
    assert_close(
        total,
        reference.flatten_per_sample(expected).norm(dim=1),
        rtol=rtol,
        name="total norm",
        elementwise=True,
    )


def test_mixed_model_float64(norm_form):
    model = Mixed().double()
    x, y = mixed_batch(7)
    check_all(model, cross_entropy, x, y, rtol=1e-10)


@pytest.fixture(params=["ghost", "im2col", "per-offset", "grouped"])
def norm_form(request, monkeypatch):
    """Force one form for every Linear/Conv layer whatever its size: ghost norms (Gram over
    im2col patches), or direct norms and full gradients by im2col + bmm, by per-offset bmms or by
    one convolution backward with the batch folded into its groups."""
    ghost = request.param == "ghost"
    form = "im2col" if ghost else request.param
    monkeypatch.setattr(rules.MatmulRule, "ghost_is_cheaper", lambda self, m, c: ghost)
    monkeypatch.setattr(rules.ConvRule, "_weight_form", lambda self, m, c, **_: form)
    return request.param


@pytest.fixture
def mixed_pair():
    model = Mixed()
    twin = Mixed().double()
    twin.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return model, twin


def test_float32_engine_matches_float64_loop(mixed_pair):
    model, twin = mixed_pair
    x, y = mixed_batch(6, torch.float32)
    got = per_sample_grads(model, cross_entropy, x, y)
    expected = reference.naive_per_sample_grads(twin, cross_entropy, x.double(), y)
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-5, name=name)
    norms = per_sample_norms(model, cross_entropy, x, y)
    assert_close(
        norms, reference.flatten_per_sample(expected).norm(dim=1), rtol=1e-5, elementwise=True
    )


def test_matches_torch_func_reference():
    model = Mixed().double()
    x, y = mixed_batch(5)
    expected = reference.per_sample_grads(model, cross_entropy, x, y)
    got = per_sample_grads(model, cross_entropy, x, y)
    for name in expected:
        assert_close(got[name], expected[name], name=name)


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(padding="valid"),
        dict(padding=(2, 1)),  # height and width padded differently
        dict(kernel_size=4),  # 'same' pads one more on the right and bottom
        dict(padding_mode="reflect"),
        dict(padding_mode="circular"),
        dict(groups=2),
        dict(stride=2),
        dict(dilation=2, padding=2),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_conv2d_variants(config, norm_form):
    model = conv_net(**config).double()
    x = torch.randn(5, 4, 7, 6, dtype=torch.float64)
    check_all(model, cross_entropy, x, torch.randint(0, 3, (5,)), rtol=1e-10)


def test_linear_with_several_leading_dims_and_regression_loss():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(4, 2, 3, 5, dtype=torch.float64)
    y = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    check_all(model, squared_error, x, y, rtol=1e-10)


def test_layer_norm_over_several_dims():
    model = nn.Sequential(nn.LayerNorm([3, 4]), nn.Flatten(), nn.Linear(12, 2)).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64) * 2 + 1
    check_all(model, cross_entropy, x, torch.randint(0, 2, (5,)), rtol=1e-10)


def test_tied_weights_sum_both_uses():
    model = TiedLM().double()
    tokens = torch.randint(0, 9, (6, 5))
    check_all(model, cross_entropy, tokens, torch.randint(0, 9, (6,)), rtol=1e-10)


def test_chunking_gives_the_same_result():
    model = Mixed().double()
    x, y = mixed_batch(7)
    check_all(model, cross_entropy, x, y, rtol=1e-10, chunk_size=3)


def test_parameter_selection_and_frozen_parameters():
    model = Mixed().double()
    model.head.requires_grad_(False)
    x, y = mixed_batch(4)
    got = per_sample_grads(model, cross_entropy, x, y)
    assert "head.weight" not in got and "conv2d.weight" in got
    chosen = per_sample_grads(model, cross_entropy, x, y, params=["head.weight", "conv1d.bias"])
    assert list(chosen) == ["head.weight", "conv1d.bias"]
    expected = reference.per_sample_grads(
        model, cross_entropy, x, y, params=["head.weight", "conv1d.bias"]
    )
    for name in chosen:
        assert_close(chosen[name], expected[name], name=name)
    assert not model.head.weight.requires_grad  # restored after the call
    assert (
        model.head.weight.grad is None and model.conv2d.weight.grad is None
    )  # nothing accumulated


def test_unused_parameter_has_zero_gradient():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner["used"](x)

    wrapper = Wrapper()
    x = torch.randn(4, 3, dtype=torch.float64)
    got = per_sample_grads(wrapper, cross_entropy, x, torch.randint(0, 2, (4,)))
    assert got["inner.unused.weight"].shape == (4, 2, 3) and not got["inner.unused.weight"].any()
    norms = per_sample_norms(wrapper, cross_entropy, x, torch.randint(0, 2, (4,)), by_layer=True)
    assert not norms["inner.unused.bias"].any()


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(n):
    model = Mixed().double()
    x, y = mixed_batch(n)
    got = per_sample_grads(model, cross_entropy, x, y)
    assert got["head.weight"].shape == (n, 5, 72)
    assert per_sample_norms(model, cross_entropy, x, y).shape == (n,)
    if n:
        check_all(model, cross_entropy, x, y, rtol=1e-10)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(0, 4),
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 5),
    kernel=st.integers(1, 3),
    size=st.integers(3, 7),
    stride=st.integers(1, 2),
    bias=st.booleans(),
)
def test_conv_and_linear_random_shapes(n, c_in, c_out, kernel, size, stride, bias):
    torch.manual_seed(n * 1000 + c_in * 100 + c_out)
    model = nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, bias=bias),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(2),
    ).double()
    x = torch.randn(max(n, 1), c_in, size, size, dtype=torch.float64)
    model(x)  # materialize the lazy layer
    x = x[:n]
    y = torch.randint(0, 2, (n,))
    got = per_sample_grads(model, cross_entropy, x, y)
    expected = reference.naive_per_sample_grads(model, cross_entropy, x, y)
    for name in expected:
        assert_close(got[name], expected[name], name=name)
    assert_close(
        per_sample_norms(model, cross_entropy, x, y),
        reference.flatten_per_sample(expected).norm(dim=1),
        elementwise=True,
    )


# --- projections -------------------------------------------------------------------------------


def kronecker_reference(model, x, y, dim, seed):
    """Materialize [weight | bias] per layer and apply P_out G P_in^T with the engine's factors."""
    grads = reference.naive_per_sample_grads(model, cross_entropy, x, y)
    modules = [(n, m) for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    projector = Projector(budget=dim // len(modules), seed=seed, dtype=torch.float64, device="cpu")
    blocks = []
    for name, module in modules:
        prefix = f"{name}."
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            g = grads[prefix + "weight"].flatten(2)
            if module.bias is not None:
                g = torch.cat([g, grads[prefix + "bias"].unsqueeze(2)], 2)
            p_in, p_out = projector.kronecker_factors(prefix + "weight", g.shape[2], g.shape[1])
            blocks.append((p_out @ g @ p_in.T).flatten(1))
        else:
            local = [k for k, _ in module.named_parameters(recurse=False)]
            share = max(1, projector.budget // len(local))
            for k in local:
                blocks.append(
                    projector.dense_block(prefix + k, grads[prefix + k].flatten(1), share)
                )
    return torch.cat(blocks, 1)


def test_kronecker_projection_equals_projecting_the_materialized_gradient():
    model = conv_net().double()
    x, y = torch.randn(5, 4, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = per_sample_projected(model, cross_entropy, x, y, dim=60, seed=3)
    assert got.shape[1] <= 60
    assert_close(got, kronecker_reference(model, x, y, 60, 3))
    again = per_sample_projected(model, cross_entropy, x, y, dim=60, seed=3, chunk_size=2)
    assert_close(again, got)


@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_kronecker_projection_equals_projecting_the_materialized_gradient(bias):
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv1d(3, 5, 3, padding=1, stride=2, bias=bias),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 4, 3),
    ).double()
    x, y = torch.randn(6, 3, 7, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = per_sample_projected(model, cross_entropy, x, y, dim=40, seed=2)
    # float64 on both sides; the projection is a few sums over <= 9 * 3 terms per entry
    assert_close(got, kronecker_reference(model, x, y, 40, 2), name="conv1d kronecker")


def test_dense_projection_is_jl_of_the_flat_gradient():
    model = Mixed().double()
    x, y = mixed_batch(5)
    flat = reference.flatten_per_sample(
        reference.naive_per_sample_grads(model, cross_entropy, x, y)
    )
    got = per_sample_projected(model, cross_entropy, x, y, dim=32, seed=1, kind="dense")
    assert_close(got, dense_project(flat, 32, seed=1))


@pytest.mark.parametrize("case", ["tied", "partial", "chunked"])
def test_dense_projection_layer_by_layer_is_the_flat_one(case, monkeypatch):
    # The dense path projects each layer's columns as it goes and drops them; the shares must add
    # up to the projection of the whole flat gradient, with blocks small enough here to straddle
    # parameters. float64 both sides: the same products summed in another order.
    monkeypatch.setattr(projection, "DENSE_BLOCK_COLUMNS", 16)
    params, chunk_size = None, None
    if case == "tied":
        model = TiedLM().double()
        x, y = torch.randint(0, 9, (5, 6)), torch.randint(0, 9, (5,))
    else:
        model = Mixed().double()
        x, y = mixed_batch(5)
        names = [name for name, _ in model.named_parameters()]
        params = names[1::2] if case == "partial" else None
        chunk_size = 2 if case == "chunked" else None
    flat = reference.flatten_per_sample(
        reference.naive_per_sample_grads(model, cross_entropy, x, y, params=params)
    )
    got = per_sample_projected(
        model, cross_entropy, x, y, dim=24, seed=3, kind="dense", params=params,
        chunk_size=chunk_size,
    )  # fmt: skip
    assert_close(got, dense_project(flat, 24, seed=3), rtol=1e-12, name=case)


def test_kronecker_factors_preserve_inner_products_on_average():
    # E[<P_out G P_in^T, P_out H P_in^T>] = <G, H> for N(0, 1/k) factors; the engine applies exactly
    # these factors (test above), so unbiasedness is checked on the factors themselves.
    g, h = torch.randn(2, 6, 5, dtype=torch.float64)
    products = []
    for seed in range(2000):
        projector = Projector(budget=12, seed=seed, dtype=torch.float64, device="cpu")
        p_in, p_out = projector.kronecker_factors("layer", 5, 6)
        products.append(((p_out @ g @ p_in.T) * (p_out @ h @ p_in.T)).sum())
    products = torch.stack(products)
    # the sample mean is within 4 standard errors of the truth
    assert abs(products.mean() - (g * h).sum()) < 4 * products.std() / len(products) ** 0.5


def test_projection_float32_matches_float64():
    model = Mixed()
    twin = Mixed().double()
    twin.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x, y = mixed_batch(4, torch.float32)
    got = per_sample_projected(model, cross_entropy, x, y, dim=40, seed=0)
    expected = per_sample_projected(twin, cross_entropy, x.double(), y, dim=40, seed=0)
    assert_close(got, expected, rtol=1e-5)


# --- Gram matrices and captured matmul forms ------------------------------------------------------


def test_gram_matrix_equals_products_of_materialized_gradients():
    from influx.grads import per_sample_gram

    model = Mixed().double()
    x, y = mixed_batch(5)
    x2, y2 = mixed_batch(3)
    flat = reference.flatten_per_sample(
        reference.naive_per_sample_grads(model, cross_entropy, x, y)
    )
    flat2 = reference.flatten_per_sample(
        reference.naive_per_sample_grads(model, cross_entropy, x2, y2)
    )
    assert_close(per_sample_gram(model, cross_entropy, x, y), flat @ flat.T)
    assert_close(per_sample_gram(model, cross_entropy, x, y, other=(x2, y2)), flat @ flat2.T)


def test_gram_matrix_of_a_tied_model():
    from influx.grads import per_sample_gram

    model = TiedLM().double()
    tokens, targets = torch.randint(0, 9, (4, 3)), torch.randint(0, 9, (4,))
    flat = reference.flatten_per_sample(
        reference.naive_per_sample_grads(model, cross_entropy, tokens, targets)
    )
    assert_close(per_sample_gram(model, cross_entropy, tokens, targets), flat @ flat.T)


def test_captured_matmul_forms_reproduce_weight_and_bias_gradients():
    from influx.grads import capture_matmul_layers

    model = conv_net().double()
    x, y = torch.randn(4, 4, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    expected = reference.naive_per_sample_grads(model, cross_entropy, x, y)
    captured = capture_matmul_layers(model, cross_entropy, x, y)
    assert set(captured) == {"0", "5"}
    for layer in captured.values():
        grad = layer.b.transpose(1, 2) @ layer.a  # [N, d_out, d_in + 1]
        assert_close(
            grad[:, :, :-1], expected[layer.weight_name].flatten(2), name=layer.weight_name
        )
        assert_close(grad[:, :, -1], expected[layer.bias_name], name=layer.bias_name)


class TwiceConv(nn.Module):
    """One strided, dilated Conv2d applied twice (shared weights): its gradients add up."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, stride=(2, 1), padding=2, dilation=(1, 2))
        self.head = nn.Linear(3 * 4 * 9, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


def test_conv_called_twice(norm_form):
    model = TwiceConv().double()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    check_all(model, cross_entropy, x, torch.randint(0, 2, (4,)), rtol=1e-10)


def test_conv1d_both_norm_forms(norm_form):
    length = 40
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=2, dilation=2, padding_mode="circular"),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(2),
    ).double()
    x = torch.randn(4, 3, length, dtype=torch.float64)
    model(x)
    y = torch.randint(0, 2, (4,))
    check_all(model, cross_entropy, x, y, rtol=1e-10)
    # The Kronecker projection of the circular, dilated Conv1d (and of the head) equals
    # P_out G_i P_in^T applied to each example's materialized [weight | bias] gradient from the
    # per-example loop, with the factors the engine draws for the same seed (12 dims per layer:
    # 3 x 4 for the conv's [4, 3 * 3 + 1] gradient, 2 x 6 for the head's [2, 161]). float64 on
    # both sides: the same products summed in another order, over at most a few hundred terms per
    # entry, so ~1e-15 relative; 1e-10 of the largest entry leaves wide room yet fails on any
    # wrong factor, patch or bias column (errors of order one relative).
    expected = kronecker_reference(model, x, y, 24, 5)
    got = per_sample_projected(model, cross_entropy, x, y, dim=24, seed=5)
    assert got.shape == (4, 24)
    assert_close(got, expected, rtol=1e-10, name="conv1d kronecker")
    chunked = per_sample_projected(model, cross_entropy, x, y, dim=24, seed=5, chunk_size=3)
    assert_close(chunked, expected, rtol=1e-10, name="conv1d kronecker, chunked")


@pytest.mark.parametrize("reparametrize", ["weight_norm", "prune"])
def test_a_weight_computed_by_a_hook_is_differentiated_through_it(reparametrize):
    # weight_norm (weight from weight_g, weight_v) and pruning (weight_orig times a mask) compute
    # the weight in a pre-hook: the Linear's own rule would differentiate the computed weight,
    # so these layers take the functional rule, which runs the hook per example
    import warnings

    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm is deprecated
        if reparametrize == "weight_norm":
            torch.nn.utils.weight_norm(model[0])
        else:
            prune.random_unstructured(model[0], "weight", amount=0.4)
    assert not isinstance(rules.rule_for(model[0]), rules.LinearRule)
    assert isinstance(rules.rule_for(model[2]), rules.LinearRule)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_all(model, cross_entropy, x, y, rtol=1e-10)


def test_keyword_arguments_of_a_call_are_replayed():
    # the functional rule replays the block's call with scale=3.0 and the per-example mask
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_all(KeywordNet().double(), cross_entropy, x, y, rtol=1e-10)


class Attention(nn.Module):
    """Token embedding -> a Transformer encoder layer -> nn.MultiheadAttention called directly
    with a padding mask per example and a causal mask shared by the batch -> head."""

    def __init__(self, tokens: int):
        super().__init__()
        self.embedding = nn.Embedding(11, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        causal = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal)

    def forward(self, ids):
        h = self.encoder(self.embedding(ids))
        padding = ids == 0
        out, _ = self.attention(h, h, h, key_padding_mask=padding, attn_mask=self.causal)
        return self.head(out.mean(1))


def test_multihead_attention_per_sample_gradients_norms_and_projections():
    # N = T = 6: the shared [T, T] mask has one row per example by coincidence and must still
    # be shared, while the [N, T] padding mask is split by example
    torch.manual_seed(0)
    model = Attention(tokens=6).double().eval()
    ids, y = torch.randint(1, 11, (6, 6)), torch.randint(0, 3, (6,))
    ids[:, -2:] = 0  # padded tail
    check_all(model, cross_entropy, ids, y, rtol=1e-10)
    flat = reference.flatten_per_sample(
        reference.naive_per_sample_grads(model, cross_entropy, ids, y)
    )
    got = per_sample_projected(model, cross_entropy, ids, y, dim=32, seed=1, kind="dense")
    assert_close(got, dense_project(flat, 32, seed=1), name="dense projection")
    kron = per_sample_projected(model, cross_entropy, ids, y, dim=64, seed=1, by_layer=True)
    assert "attention" in kron and "attention.out_proj" not in kron  # one block per planned layer


def test_attention_in_float32_is_vmapped_without_a_loop_fallback():
    # the fused float32 attention kernels have no vmap batching rule: torch would warn of a
    # performance drop and loop over the examples; the rule runs attention on the math kernel
    torch.manual_seed(0)
    model = Attention(tokens=5).eval()
    ids, y = torch.randint(1, 11, (4, 5)), torch.randint(0, 3, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = per_sample_grads(model, cross_entropy, ids, y)
    want = reference.naive_per_sample_grads(model.double(), cross_entropy, ids, y)
    for name, value in want.items():  # float32 rounding of a float64 reference
        assert_close(got[name].double(), value, rtol=1e-5, atol=1e-6, name=name)


def test_an_lstm_through_its_first_output_in_float32():
    # torch.func replays nn.LSTM per example in float32 (in float64 torch's vmap of it fails,
    # which the engine reports as unsupported); the loss reads only the output sequence
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    x, y = torch.randn(5, 3, 4), torch.randint(0, 3, (5,))
    check_all(Recurrent(), cross_entropy, x, y, rtol=1e-5)
