"""Every error the engine raises on purpose names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from grad_models import cross_entropy
from torch import nn

from influx.errors import InfluxValueError, UnsupportedModelError
from influx.grads import per_sample_grads, per_sample_norms, per_sample_projected
from influx.grads.reference import naive_per_sample_grads


def small():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def batch(n=5):
    return torch.randn(n, 4), torch.randint(0, 2, (n,))


def test_batchnorm_in_train_mode_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm1d \(1\).*convert_batchnorm"):
        per_sample_grads(model, cross_entropy, *batch())
    model.eval()  # running statistics: examples no longer interact
    per_sample_grads(model, cross_entropy, *batch())


def test_reduced_loss_is_refused():
    def mean_loss(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(
        InfluxValueError, match=r"per-example losses of shape \[5\].*reduction='none'"
    ):
        per_sample_norms(small(), mean_loss, *batch())


def test_inputs_and_targets_must_agree():
    x, _ = batch(5)
    with pytest.raises(InfluxValueError, match="disagree on the batch size: 5 vs 4"):
        per_sample_grads(small(), cross_entropy, x, torch.zeros(4, dtype=torch.long))


def test_unknown_parameter_name():
    with pytest.raises(InfluxValueError, match=r"no parameter named '0.wieght'.*'0.weight'"):
        per_sample_grads(small(), cross_entropy, *batch(), params=["0.wieght"])


def test_bad_projection_arguments():
    with pytest.raises(InfluxValueError, match=r"kind must be one of \('kronecker', 'dense'\)"):
        per_sample_projected(small(), cross_entropy, *batch(), dim=8, kind="sparse")
    with pytest.raises(InfluxValueError, match="dim must be >= 1"):
        per_sample_projected(small(), cross_entropy, *batch(), dim=0)


def test_bad_chunk_size():
    with pytest.raises(InfluxValueError, match="chunk_size must be a positive integer"):
        per_sample_grads(small(), cross_entropy, *batch(), chunk_size=0)


def test_tuple_outputs_other_than_the_first_and_other_containers_are_refused():
    class Pair(nn.Module):
        def __init__(self, returns=tuple):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.returns = returns

        def forward(self, x):
            return self.returns([x * self.scale, x * self.scale.square()])

    class Net(nn.Module):
        def __init__(self, returns=tuple, used=1):
            super().__init__()
            self.pair = Pair(returns)
            self.head = nn.Linear(4, 2)
            self.used = used

        def forward(self, x):
            return self.head(self.pair(x)[self.used])

    # the rules differentiate a module through its first output: a loss reading the second
    # would get part of the gradient only
    with pytest.raises(UnsupportedModelError, match="other than its first"):
        per_sample_grads(Net(), cross_entropy, *batch())
    with pytest.raises(UnsupportedModelError, match="returns list"):
        per_sample_grads(Net(list, 0), cross_entropy, *batch())
    per_sample_grads(Net(tuple, 0), cross_entropy, *batch())  # the first output alone: fine


def test_a_layer_that_vmap_cannot_replay_is_named():
    class Thresholded(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            # data-dependent Python control flow: no vmap can replay it
            return x * self.scale if float(x.sum()) > 0 else x * self.scale.square()

    model = nn.Sequential(Thresholded(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match="Thresholded by torch.func.vmap"):
        per_sample_grads(model, cross_entropy, *batch())


def test_embedding_scale_grad_by_freq_is_refused():
    model = nn.Sequential(
        nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 2)
    )
    with pytest.raises(UnsupportedModelError, match="scale_grad_by_freq"):
        per_sample_grads(
            model, cross_entropy, torch.randint(0, 5, (3, 2)), torch.randint(0, 2, (3,))
        )


def test_nonfinite_rows_screens_by_sums_without_false_alarms():
    from influx.grads.common import nonfinite_rows

    x = torch.randn(6, 5, 3)
    x[1, 0, 0], x[4, 2, 1] = float("nan"), float("inf")
    assert nonfinite_rows(x).tolist() == [1, 4]
    big = torch.full((3, 4), 3e38)  # rows 0 and 1 are finite, their float32 sums overflow
    big[2, 0] = float("-inf")
    assert nonfinite_rows(big).tolist() == [2]
    half = torch.full((2, 10_000), 60_000.0, dtype=torch.float16)  # sums beyond float16's range
    half[1, 5] = float("nan")
    assert nonfinite_rows(half).tolist() == [1]
    cancelling = torch.tensor([[float("inf"), float("-inf")], [1.0, 2.0]])  # inf - inf = nan
    assert nonfinite_rows(cancelling).tolist() == [0]
    assert nonfinite_rows(torch.zeros(0, 3)).tolist() == []
    assert nonfinite_rows(torch.arange(4)).tolist() == []


class FunctionalTiedLM(nn.Module):
    """The output layer reads the embedding's weight through F.linear, not a module call."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, tokens):
        hidden = torch.tanh(self.mix(self.embedding(tokens))).mean(1)
        return torch.nn.functional.linear(hidden, self.embedding.weight)


@pytest.mark.parametrize(
    ("model", "parameter"),
    [(FunctionalTiedLM, "embedding.weight")],
)
def test_a_parameter_read_outside_its_module_is_refused(model, parameter):
    # Its module's rule would see only part of its gradient: refused on the first batch, by
    # every path that captures (the engine, K-FAC's streaming capture, DP-SGD's clipping).
    from influx import dp, influence

    tokens, targets = torch.randint(0, 9, (5, 3)), torch.randint(0, 2, (5,))
    calls = [
        lambda m: per_sample_grads(m, cross_entropy, tokens, targets),
        lambda m: per_sample_norms(m, cross_entropy, tokens, targets, chunk_size=2),
        lambda m: influence.fit(m, cross_entropy, (tokens, targets), method="ekfac"),
        lambda m: dp.clipped_grad(m, cross_entropy, tokens, targets, max_grad_norm=1.0),
    ]
    for call in calls:
        with pytest.raises(UnsupportedModelError, match=f"'{parameter}' is read outside a call"):
            call(model().eval())


def test_reads_of_a_parameter_that_carry_no_gradient_are_allowed():
    # metadata, detached copies and no_grad computations outside the owning module are common
    # (a device for new tensors, a norm for logging) and escape nothing
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            weight = self.fc.weight
            shift = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                scale = weight.norm()
            return self.head(self.fc(x) + shift + 0 * scale + 0 * weight.detach().sum())

    torch.manual_seed(0)
    model = Reads().double()
    x, y = batch()
    x = x.double()
    grads = per_sample_grads(model, cross_entropy, x, y)
    assert list(grads) == ["fc.weight", "fc.bias", "head.weight", "head.bias"]
    assert grads["fc.weight"].shape == (5, 4, 4)
    # the reads add nothing to any gradient: the values are those of the per-example loop.
    # float64 on both sides, the same sums in another order over a few terms: ~1e-16 relative,
    # so rtol 1e-10 per entry (atol 1e-12 for entries that cancel to about zero; the entries
    # here reach a few units) is loose for rounding and tight for any wrong value
    expected = naive_per_sample_grads(model, cross_entropy, x, y)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12)


def test_outputs_without_the_batch_first_are_refused():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # [N, T, 4] -> a Linear on [T, N, 4]
            return self.head(self.mix(x.transpose(0, 1)).mean(0))

    with pytest.raises(UnsupportedModelError, match=r"mix \(Linear\) returned shape \(3, 5, 4\)"):
        per_sample_grads(
            SequenceFirst(), cross_entropy, torch.randn(5, 3, 4), torch.randint(0, 2, (5,))
        )
    # a parametrization computes the weight from its parameters, with no batch at all
    model = small()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(UnsupportedModelError, match="parametrizations.weight.*one row per example"):
        per_sample_grads(model, cross_entropy, *batch())


def test_sequence_first_attention_is_refused_even_when_length_equals_batch():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2)  # batch_first=False
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # [N, T, 4] with T = N: the [T, N, 4] output passes a shape check
            h = x.transpose(0, 1)
            return self.head(self.attention(h, h, h)[0].mean(0))

    with pytest.raises(UnsupportedModelError, match="batch_first=True"):
        per_sample_grads(
            SequenceFirst(), cross_entropy, torch.randn(5, 5, 4), torch.randint(0, 2, (5,))
        )


def test_a_positional_embedding_shared_by_the_batch_is_refused_and_per_example_works():
    class Positional(nn.Module):
        def __init__(self, expand: bool):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(10, 4), nn.Embedding(6, 4)
            self.head = nn.Linear(4, 2)
            self.expand = expand

        def forward(self, ids):
            at = torch.arange(ids.shape[1])
            shared = self.positions(at.expand(ids.shape[0], -1) if self.expand else at)
            return self.head((self.tokens(ids) + shared).mean(1))

    ids, targets = torch.randint(0, 10, (5, 6)), torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match=r"positions \(Embedding\).*expand\(N, -1\)"):
        per_sample_grads(Positional(False), cross_entropy, ids, targets)
    model = Positional(True).double()
    got = per_sample_grads(model, cross_entropy, ids, targets)
    expected = naive_per_sample_grads(model, cross_entropy, ids, targets)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
